"""Image decoding and upstream preprocessing with PIL and numpy (no torch).

`decode` + `to_tensor` reproduce upstream's `Image.open(...).convert('RGB')` followed by
torchvision `Resize` / `ToTensor` / `Normalize` on PIL images: torchvision resizes a PIL
image with PIL's own bilinear filter, so this path is upstream's arithmetic, not an
approximation of it. The CPU Triton preprocessing model and the client use it.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from sscd_triton import spec

# decode() enforces its own, configurable limit; PIL's process-wide one (error at 179M
# pixels) would otherwise cap --max-pixels silently.
Image.MAX_IMAGE_PIXELS = None
# Deliberately narrower than PIL's plug-ins (no PPM, TGA, ICO, PSD...): less parser surface
# facing untrusted bytes.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")  # JPEG covers multi-picture (MPO) files


class ImageError(ValueError):
    """An input that is not a decodable image; the message says why, for a person."""


def sniff_format(head: bytes) -> str | None:
    """The format of a file whose first bytes (12 or more) are `head`: one of `FORMATS`
    by its signature, or None (not an image this project reads, or too short to tell)."""
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM" and len(head) >= 14:
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def trim_padding(data: bytes) -> bytes:
    """Drop the zero padding that packs files of different lengths into one request.

    Decoders would read it as image data: a truncated JPEG followed by zeros decodes as a
    half-grey image instead of failing. JPEG, PNG and GIF never end in a zero byte and a
    WebP's RIFF header gives its length, so for them the padding can be told from the
    file; BMP and TIFF cannot, and are best sent one per request.
    """
    fmt = sniff_format(data)
    if fmt in ("JPEG", "PNG", "GIF"):
        return data.rstrip(b"\0")
    if fmt == "WEBP":
        return data[: 8 + int.from_bytes(data[4:8], "little")]
    return data


def looks_complete(data: bytes) -> bool:
    """Whether an encoded image visibly ends where its format says it ends.

    Requests pad every row with zeros to the longest one, and zeros after a *truncated*
    file can let a decoder finish it (a JPEG cut to a third decodes once ~200 KB of zeros
    follow it). Files that fail this check are sent alone, unpadded, so the verdict is the
    one on their exact bytes, whatever their neighbours. Garbage fails it too, so it
    never costs a batch a split.
    """
    fmt = sniff_format(data)
    tail = data.rstrip(b"\x00")
    if fmt == "JPEG":
        return tail.endswith(b"\xff\xd9")
    if fmt == "PNG":
        return tail.endswith(b"IEND\xaeB`\x82")
    if fmt == "GIF":
        return tail.endswith(b";")
    if fmt == "BMP":
        return 26 <= int.from_bytes(data[2:6], "little") <= len(data)
    if fmt == "WEBP":
        return int.from_bytes(data[4:8], "little") + 8 <= len(data)
    return False  # TIFF (no end marker) or not an image: alone


def header_size(path: str) -> tuple[int, int] | None:
    """`(width, height)` of the image file at `path` from its header alone (no pixels
    decoded); None when it is not a readable image of `FORMATS`."""
    try:
        with Image.open(path, formats=FORMATS) as img:
            return img.size
    except Exception:  # noqa: BLE001  (PIL raises many types on malformed headers)
        return None


def decode(data: bytes, max_pixels: int = spec.MAX_IMAGE_PIXELS) -> Image.Image:
    """Encoded bytes -> RGB PIL image, refusing oversized images before decoding them.

    Animated images give their first frame; EXIF orientation is ignored, as upstream.
    """
    data = trim_padding(data)
    if len(data) == 0:
        raise ImageError("empty input: no bytes (or only zero padding)")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError(f"not an image: {len(data)} bytes in no supported format "
                         "(JPEG, PNG, WebP, BMP, TIFF, GIF)") from None
    except Exception as e:  # PIL raises many types on malformed headers
        raise ImageError(f"unreadable image header: {e}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(f"image too large: {width}x{height} = {width * height} pixels, "
                         f"limit {max_pixels}")
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels: {width}x{height}")
    try:
        img.load()
        return img.convert("RGB")
    except Exception as e:
        raise ImageError(f"corrupt or truncated {img.format} image: {e}") from None


def to_tensor(img: Image.Image, preprocess: spec.Preprocess) -> np.ndarray:
    """RGB PIL image -> float32 `[3, H, W]`, normalised as upstream (see `spec`)."""
    h, w = preprocess.output_hw(*img.size)
    resized = img.resize((w, h), Image.BILINEAR)
    x = np.asarray(resized, dtype=np.float32) / np.float32(255.0)
    x = (x - np.asarray(spec.MEAN, np.float32)) / np.asarray(spec.STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def load_tensor(data: bytes, preprocess: spec.Preprocess,
                max_pixels: int = spec.MAX_IMAGE_PIXELS) -> np.ndarray:
    """Bytes -> float32 `[3, H, W]`; `max_pixels` bounds the decoded and the resized image
    (short-edge resizing of a 1 x 2000 strip would otherwise ask for 288 x 576000)."""
    img = decode(data, max_pixels)
    h, w = preprocess.output_hw(*img.size)
    if h * w > max_pixels:
        raise ImageError(f"extreme aspect ratio: {img.size[0]}x{img.size[1]} resizes to "
                         f"{w}x{h} for {preprocess.upstream_name}, over the {max_pixels}-pixel limit")
    return to_tensor(img, preprocess)


def pack_rows(encoded: list) -> np.ndarray:
    """Several encoded files (bytes, bytearray or memoryview) as one request tensor: uint8
    `[B, max length]`, zero-padded (the ensemble's input convention; decoders ignore
    trailing bytes of complete files, see `trim_padding` and `looks_complete`)."""
    out = np.zeros((len(encoded), max(len(b) for b in encoded)), np.uint8)
    for i, b in enumerate(encoded):
        out[i, : len(b)] = np.frombuffer(b, np.uint8)
    return out


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()
