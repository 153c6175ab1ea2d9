"""Image decoding and upstream preprocessing with PIL and numpy (no torch).

`decode` + `to_tensor` reproduce upstream's `Image.open(...).convert('RGB')` followed by
torchvision `Resize` / `ToTensor` / `Normalize` on PIL images: torchvision resizes a PIL
image with PIL's own bilinear filter, so this path is upstream's arithmetic, not an
approximation of it. The CPU Triton preprocessing model and the client use it.
"""
from __future__ import annotations

import io
import re

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


# What the gpu target's check step lets through to DALI (`check_complete(data, GPU_FORMATS)`):
# DALI does not decode GIF, and a TIFF has no end marker, so its end cannot be told from zero
# padding (and nvImageCodec may decode it on the GPU): both are refused there with a reason,
# and decoded by PIL on the cpu target. See `check_complete`.
GPU_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# Formats whose end `check_complete` cannot find (no end marker, or a first frame is all that
# is read): the CPU decoder judges them, and clients send them one per request, unpadded.
UNCHECKED_FORMATS = ("GIF", "TIFF")
# End of a JPEG entropy-coded segment: 0xFF followed by a marker code. Inside a scan 0xFF is
# always followed by 0x00 (stuffing) or RST0-7 (0xD0-0xD7); 0xFF 0xFF is fill (ITU T.81
# B.1.1.2, F.1.2.3).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG, DAC are not frames
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # length 0, type, CRC-32 of b"IEND"


def _check_jpeg(data: bytes, end: int) -> None:
    """The JPEG's marker segments are whole, it has a frame and a scan, and its image ends
    with EOI (FFD9) at or before `end`. Fast: segments are skipped by their lengths up to the
    first scan; then a file whose last non-zero bytes are FFD9 is complete. Only otherwise
    (data after EOI: motion photos carry a video there) are the scans searched for EOI."""
    pos, frame = 2, False
    while True:
        if pos + 2 > end:
            raise ImageError(f"truncated JPEG: it ends at byte {end}, inside its headers")
        if data[pos] != 0xFF:
            raise ImageError(f"corrupt JPEG: no marker at byte {pos}")
        while pos + 2 < end and data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
        marker = data[pos + 1]
        pos += 2
        if marker == 0xD9:  # EOI
            if not frame:
                raise ImageError("truncated JPEG: it ends (FFD9) before any image data")
            return
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):  # no length: RSTn, TEM, SOI
            continue
        if pos + 2 > end:
            raise ImageError(f"truncated JPEG: it ends at byte {end}, inside its headers")
        seg_end = pos + int.from_bytes(data[pos:pos + 2], "big")
        if seg_end > end:
            raise ImageError(f"truncated JPEG: a segment (marker {marker:02X}) runs to byte "
                             f"{seg_end}, the file ends at byte {end}")
        frame |= marker in _JPEG_SOF
        pos = seg_end
        if marker == 0xDA:  # SOS: entropy-coded data follows
            if not frame:
                raise ImageError("corrupt JPEG: a scan (SOS) before the frame header (SOF)")
            if data[end - 2:end] == b"\xff\xd9":
                return
            m = _JPEG_MARKER.search(data, pos, end)
            if m is None:
                raise ImageError(f"truncated JPEG: no end-of-image marker (FFD9) in its "
                                 f"{end} bytes")
            pos = m.start()


def _check_png(data: bytes, end: int) -> None:
    """IHDR first, and an IEND chunk with its CRC at or before `end` (fast: the last non-zero
    bytes are IEND's; otherwise the chunks are walked to it, each whole)."""
    if data[12:16] != b"IHDR":
        raise ImageError("corrupt PNG: its first chunk is not IHDR")
    if data[end - 12:end] == _PNG_IEND:
        return
    pos = 8
    while pos + 12 <= end:
        kind = data[pos + 4:pos + 8]
        if not kind.isalpha():
            raise ImageError(f"corrupt PNG: no chunk type at byte {pos + 4}")
        if kind == b"IEND":
            return
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    raise ImageError(f"truncated PNG: no IEND chunk in its {end} bytes")


def _check_webp(data: bytes, end: int) -> None:
    """The RIFF header's length fits in the data, and so does every chunk inside it.

    Trailing zeros cannot be told from a payload that ends in zeros (VP8's coder flushes
    zero bytes), so the data up to the RIFF length counts, padding included: a WebP cut
    inside its last chunk and then zero-padded by a client passes this, and its decoder
    (libwebp, on the CPU in DALI too) reads zeros: a wrong image, never another request's
    pixels. sscd-embed checks every file before padding it."""
    riff_end = 8 + int.from_bytes(data[4:8], "little")
    if riff_end > len(data):
        raise ImageError(f"truncated WebP: its RIFF header says {riff_end} bytes, "
                         f"{len(data)} given")
    pos = 12
    while pos < riff_end:
        if pos + 8 > riff_end:
            raise ImageError(f"corrupt WebP: a chunk header at byte {pos} runs past its "
                             f"RIFF length {riff_end}")
        if not all(32 <= c < 127 for c in data[pos:pos + 4]):
            raise ImageError(f"corrupt WebP: no chunk type at byte {pos}")
        size = int.from_bytes(data[pos + 4:pos + 8], "little")
        pos += 8 + size + (size & 1)
        if pos > riff_end + 1:  # a last odd chunk may omit its pad byte
            raise ImageError(f"truncated WebP: a chunk runs to byte {pos}, its RIFF length "
                             f"is {riff_end}")


def _check_bmp(data: bytes, end: int) -> None:
    """The file size the header states, and the pixel array it implies, fit in the data
    (zeros included: uncompressed rows cut and zero-padded decode as black, never as
    another request's pixels)."""
    if len(data) < 26:
        raise ImageError(f"truncated BMP: {len(data)} bytes, shorter than its headers")
    size = int.from_bytes(data[2:6], "little")
    offset = int.from_bytes(data[10:14], "little")
    if size > len(data):
        raise ImageError(f"truncated BMP: its header says {size} bytes, {len(data)} given")
    if int.from_bytes(data[14:18], "little") == 12:  # BITMAPCOREHEADER
        width, height = (int.from_bytes(data[i:i + 2], "little") for i in (18, 20))
        bits, compression, stated = int.from_bytes(data[24:26], "little"), 0, 0
    else:
        if len(data) < 38:
            raise ImageError(f"truncated BMP: {len(data)} bytes, shorter than its headers")
        width = int.from_bytes(data[18:22], "little", signed=True)
        height = int.from_bytes(data[22:26], "little", signed=True)
        bits = int.from_bytes(data[28:30], "little")
        compression = int.from_bytes(data[30:34], "little")
        stated = int.from_bytes(data[34:38], "little")
    # BI_RGB (0) and BI_BITFIELDS (3, 6) are uncompressed: rows of 4-byte multiples.
    pixels = ((abs(width) * bits + 31) // 32) * 4 * abs(height) if compression in (0, 3, 6) \
        else stated
    if offset + pixels > len(data):
        raise ImageError(f"truncated BMP: its pixels end at byte {offset + pixels}, "
                         f"{len(data)} given")


def _content_end(data: bytes) -> int:
    """`len(data.rstrip(b"\\0"))` in O(log n) memcmp calls (`endswith`): rstrip walks the
    padding a byte at a time, ~2 ns each (130 us for 64 KiB, more than the check itself)."""
    n = len(data)
    if n == 0 or data[-1]:
        return n
    lo = 1  # the last `lo` bytes are zeros
    while True:  # gallop to a run length that is not all zeros (or the whole input)
        hi = min(2 * lo, n)
        if not data.endswith(bytes(hi)):
            break
        if hi == n:
            return 0
        lo = hi
    while hi - lo > 1:  # the longest zero run in [lo, hi)
        mid = (lo + hi) // 2
        if data.endswith(bytes(mid)):
            lo = mid
        else:
            hi = mid
    return n - lo


_CHECKS = {"JPEG": _check_jpeg, "PNG": _check_png, "WEBP": _check_webp, "BMP": _check_bmp}


def check_complete(data: bytes, formats: tuple[str, ...] = FORMATS) -> None:
    """Raise `ImageError` (a ValueError) naming the reason unless `data` holds one whole
    encoded image of one of `formats`, possibly followed by zero padding.

    Every path calls this before any decoder: the cpu server's preprocessing (`decode`),
    the gpu ensemble's check step ahead of DALI (`sscd_triton.serving.triton_check`, its
    source written into the generated `sscd_check/1/model.py`) with `GPU_FORMATS`, and the
    client before sending. Zero padding is the request convention (`pack_rows`): a file
    cut short and then padded must not reach a decoder, which would read the zeros as
    image data (nvJPEG's hardware path even returns a cut JPEG without an error, its
    missing rows holding pixels of an image decoded earlier into the same buffer).
    JPEG: whole marker segments, a frame and a scan, and its EOI (FFD9) present; PNG: IHDR
    first and the IEND chunk with its CRC; WebP: the RIFF length (and its chunks') within
    the data; BMP: the stated size and pixel array within the data. Bytes after the end
    (zero padding, a motion photo's video) are allowed: decoders stop at the end.
    GIF and TIFF (`UNCHECKED_FORMATS`) have no end this can find; here they are only
    sniffed. What it cannot catch: a file whose entropy-coded data was damaged but whose
    structure is whole (a JPEG scan cut short and EOI appended on purpose): the decoder's.
    Cost: a few microseconds per image (structure up to the first scan, then the tail);
    measured in benchmarks/check_cost.py (docs/bad-input.md).
    """
    end = _content_end(data)
    if end == 0:
        raise ImageError("empty input: no bytes (or only zero padding)")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(f"not an image: {end} bytes in no supported format "
                         "(JPEG, PNG, WebP, BMP, TIFF, GIF)")
    if fmt not in formats:
        raise ImageError(f"{fmt} is not accepted here (accepted: {', '.join(formats)})")
    check = _CHECKS.get(fmt)
    if check is not None:
        check(data, end)


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
    """Whether a file may share a zero-padded request: it passes `check_complete` and its
    format's end can be told from padding (not GIF or TIFF, which go alone, unpadded, so
    that the verdict is the one on their exact bytes, whatever their neighbours)."""
    try:
        check_complete(data)
    except ImageError:
        return False
    return sniff_format(data) not in UNCHECKED_FORMATS


# The names the gpu check step's generated model.py is made of, in order
# (sscd_triton/serving/check_step.py writes their source): self-contained, stdlib only.
CHECK_SOURCE = ("FORMATS", "GPU_FORMATS", "UNCHECKED_FORMATS", "_JPEG_MARKER", "_JPEG_SOF",
                "_PNG_IEND", "ImageError", "sniff_format", "_content_end", "_check_jpeg", "_check_png",
                "_check_webp", "_check_bmp", "_CHECKS", "check_complete")


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
    check_complete(data)
    data = trim_padding(data)
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
