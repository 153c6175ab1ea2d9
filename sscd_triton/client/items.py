"""What `Client.embed` accepts, turned into requests' payloads (`pipeline.Item`s).

Kinds of item (`kind` says which, or raises TypeError for anything else):

- a path (`str`, `os.PathLike`): read with `sources.read_problem` (regular files only,
  the `max_file_bytes` cap), so an unreadable path is a per-item reason, like sscd-embed's;
- encoded bytes (`bytes`, `bytearray`, `memoryview`): sent as they are;
- a PIL image, or a uint8 numpy array (RGB `[H, W, 3]`, or grayscale `[H, W]` /
  `[H, W, 1]`): encoded losslessly (PNG) here, so the server decodes exactly these pixels.
  Modes other than RGB and L are converted to RGB first, as the server would after
  decoding (`images.decode`).

Every kind then goes through `pipeline.item_from_bytes`: the completeness check, and in
client mode the decode and preprocessing, with the reasons sscd-embed records.
"""
from __future__ import annotations

import os
from typing import Any, Union

import numpy as np
from PIL import Image

from sscd_triton import images
from sscd_triton.client import pipeline, sources
from sscd_triton.client.transport import Item

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image,
                   np.ndarray]

PATH, BYTES, PIL, ARRAY = "path", "bytes", "pil", "array"


def kind(item: Any, index: int) -> str:
    """The kind of `item`; TypeError (naming `index`) for one `embed` does not take: a
    mistake in the calling code, not a bad image."""
    if isinstance(item, (str, os.PathLike)):
        return PATH
    if isinstance(item, (bytes, bytearray, memoryview)):
        return BYTES
    if isinstance(item, Image.Image):
        return PIL
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or not (
                item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (1, 3))):
            raise TypeError(f"item {index}: a numpy image must be uint8 [H, W, 3] (RGB) or "
                            f"[H, W] (grayscale), not {item.dtype} {list(item.shape)}")
        return ARRAY
    raise TypeError(f"item {index}: embed takes paths, encoded bytes, PIL images or uint8 "
                    f"numpy arrays, not {type(item).__name__}")


def check_items(items: Any) -> list:
    """`items` as a list, after checking each one's kind (TypeError before anything is
    sent). A lone item (a path, bytes, an image) is refused: pass `[item]`."""
    if isinstance(items, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)) or (
            isinstance(items, np.ndarray) and items.ndim < 4):
        raise TypeError("embed takes a sequence of items; for one item pass [item]")
    items = list(items)
    for i, item in enumerate(items):
        kind(item, i)
    return items


def png(img: Image.Image) -> bytes:
    """Lossless encoding of `img`'s pixels, in a mode the server decodes to the same RGB."""
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    return images.encode(img, "PNG", compress_level=1)


def encoded(item: Any, max_bytes: int) -> tuple[bytes | None, str | None]:
    """`(data, None)`: the encoded image to send, or `(None, reason)`."""
    k = kind(item, -1)
    if k == PATH:
        return sources.read_problem(os.fspath(item), max_bytes)
    if k == PIL:
        return png(item), None
    if k == ARRAY:
        arr = item[:, :, 0] if item.ndim == 3 and item.shape[2] == 1 else item
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            return None, f"the array has no pixels: {list(item.shape)}"
        return png(Image.fromarray(np.ascontiguousarray(arr))), None
    data = bytes(item)
    if not data:
        return None, "the bytes are empty (0 bytes)"
    if len(data) > max_bytes:
        return None, f"the image is too large: {len(data)} bytes, over the limit of {max_bytes}"
    return data, None


def load(index: int, item: Any, opts: pipeline.Options) -> Item | str:
    """The Item (id: `index`) for one input, or the reason it cannot be embedded. Runs on a
    thread (reading, encoding, decoding); never raises for a bad image."""
    try:
        data, why = encoded(item, opts.max_file_bytes)
    except Exception as e:  # noqa: BLE001  (PIL on an odd image mode, ...)
        return f"could not encode it: {type(e).__name__}: {e}"
    if why:
        return why
    return pipeline.item_from_bytes(index, data, opts)
