"""Decode, validate, convert and write images.

Every image that leaves this module is RGB, uint8, HxWx3 and C-contiguous. Files are checked
before decoding: the format is recognised from its signature, width and height are read from
the header (so a decompression bomb is refused without allocating it), and truncated files
are refused rather than decoded partially.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from facekd.checks import whole_number
from facekd.errors import ConfigError, DataError, FacekdError
from facekd.io.atomic import atomic_write_bytes

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "RESIZE_MODES",
    "Resize",
    "center_crop_offsets",
    "WRITABLE_EXTENSIONS",
    "decode_image",
    "encode_image",
    "probe_image",
    "read_image",
    "resize_shorter_side",
    "resize_to",
    "to_rgb_uint8",
    "write_image",
]

#: Largest width*height accepted by default (64 megapixels). Change it here, or pass max_pixels.
MAX_PIXELS = 64_000_000

#: File extensions (lowercase, with the dot) treated as images when listing folders.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif",
    ".pbm", ".pgm", ".ppm", ".pnm",
)

#: Extensions that encode_image/write_image can produce.
WRITABLE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

ARRAY_SOURCE = "<array>"


class _Header(NamedTuple):
    format: str
    width: int
    height: int
    orientation: int  # EXIF orientation still to apply after OpenCV decodes (1 = none)


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_image(data: bytes, source: str = "<bytes>", max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to RGB uint8 HxWx3.

    Grayscale is expanded to three channels; an alpha channel (RGBA, gray+alpha, paletted with
    transparency) is composited over white; 16-bit samples are scaled to 8 bits with rounding
    (65535 -> 255); an EXIF orientation (JPEG, PNG eXIf, WebP EXIF; TIFF through libtiff) is
    applied. Formats: JPEG, PNG, BMP, WebP, TIFF, GIF (first frame), PBM/PGM/PPM.

    Raises DataError(source, reason) for empty, unrecognised, truncated or corrupt data, and
    for images whose header claims more than `max_pixels` pixels (default: the module's
    MAX_PIXELS at call time) or a zero side.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise DataError(source, "empty file")
    header = _read_header(data, source)
    _check_dimensions(header, source, MAX_PIXELS if max_pixels is None else max_pixels)
    try:
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise DataError(source, f"corrupt {header.format} file ({_cv_message(exc)})") from None
    if decoded is None or decoded.size == 0:
        raise DataError(source, f"corrupt {header.format} file (OpenCV could not decode it)")
    image = _to_rgb_uint8(decoded, source, bgr=True)
    return np.ascontiguousarray(_apply_orientation(image, header.orientation))


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read and decode an image file to RGB uint8 HxWx3 (see decode_image)."""
    return decode_image(_read_bytes(path), str(path), max_pixels)


def probe_image(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[str, int, int]:
    """(format, width, height) of an image file from its header, without decoding pixels.

    Makes every check of `read_image` short of decoding: the file exists and is readable, its
    signature is recognised, its structure is complete (not truncated) and its size is within
    `max_pixels`. Raises DataError(path, reason) otherwise. A file that passes can still fail to
    decode (corrupt compressed data behind an intact structure). Not Pillow's lazy `Image.open`:
    it accepts truncated JPEG, PNG, BMP and PPM files (it reads only the size) and refuses
    truncated TIFF and WebP with no reason, where this names "truncated PNG", "end-of-image"..."""
    data = _read_bytes(path)
    if not data:
        raise DataError(str(path), "empty file")
    header = _read_header(data, str(path))
    _check_dimensions(header, str(path), MAX_PIXELS if max_pixels is None else max_pixels)
    return header.format, header.width, header.height


def _read_bytes(path: str | os.PathLike) -> bytes:
    path = Path(path)
    if path.is_dir():
        raise DataError(path, "is a folder, not an image file")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, "is a folder, not an image file") from None
    except OSError as exc:
        raise DataError(path, f"cannot read file ({exc.strerror or exc})") from None


def _check_dimensions(header: _Header, source: str, max_pixels: int) -> None:
    width, height = header.width, header.height
    if width <= 0 or height <= 0:
        raise DataError(source, f"{header.format} header gives a zero size ({width}x{height})")
    if width * height > max_pixels:
        raise DataError(
            source,
            f"image too large: {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{max_pixels} (raise facekd.io.images.MAX_PIXELS or pass max_pixels)",
        )


def _cv_message(exc: cv2.error) -> str:
    text = str(exc).strip().splitlines()
    return text[-1].strip() if text else "OpenCV error"


# ---------------------------------------------------------------------------------------------
# Headers: format, size and orientation, read without decoding pixels


def _read_header(data: bytes, source: str) -> _Header:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_header(data, source)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_header(data, source)
    if data.startswith(b"BM"):
        return _bmp_header(data, source)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return _webp_header(data, source)
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _tiff_header(data, source)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return _gif_header(data, source)
    if len(data) >= 2 and data[0:1] == b"P" and data[1:2] in b"123456":
        return _pnm_header(data, source)
    raise DataError(source, f"not a supported image (unknown file signature {data[:8]!r})")


def _truncated(source: str, fmt: str, detail: str) -> DataError:
    return DataError(source, f"truncated {fmt} file ({detail})")


def _corrupt(source: str, fmt: str, detail: str) -> DataError:
    return DataError(source, f"corrupt {fmt} file ({detail})")


def _png_header(data: bytes, source: str) -> _Header:
    """Walk the chunks: IHDR gives the size, eXIf the orientation, IEND proves completeness."""
    size = len(data)
    pos = 8
    width = height = -1
    orientation = 1
    while True:
        if pos + 8 > size:
            raise _truncated(source, "PNG", "ends before the IEND chunk")
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if length > 0x7FFFFFFF:
            raise _corrupt(source, "PNG", f"chunk {kind!r} has an invalid length")
        if pos == 8:
            if kind != b"IHDR" or length != 13:
                raise _corrupt(source, "PNG", "first chunk is not IHDR")
            if end > size:
                raise _truncated(source, "PNG", "ends inside the IHDR chunk")
            width, height = struct.unpack_from(">II", data, pos + 8)
        elif kind == b"eXIf" and end <= size:
            orientation = _exif_orientation(data[pos + 8 : pos + 8 + length])
        elif kind == b"IEND":
            return _Header("PNG", width, height, orientation)
        if end > size:
            raise _truncated(source, "PNG", f"ends inside a {kind.decode('latin-1')!r} chunk")
        pos = end


_JPEG_SOF_MARKERS = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})


def _jpeg_header(data: bytes, source: str) -> _Header:
    """Walk the segments up to the first scan; then require an end-of-image marker after it."""
    size = len(data)
    pos = 2
    width = height = None
    orientation = None
    while True:
        if pos >= size:
            raise _truncated(source, "JPEG", "ends before the image data")
        if data[pos] != 0xFF:
            raise _corrupt(source, "JPEG", f"expected a marker at byte {pos}")
        while pos < size and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= size:
            raise _truncated(source, "JPEG", "ends before the image data")
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE_MARKERS:
            continue
        if marker == 0xD9:
            raise _corrupt(source, "JPEG", "end-of-image marker before any image data")
        if pos + 2 > size:
            raise _truncated(source, "JPEG", "ends inside a segment header")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise _corrupt(source, "JPEG", f"segment at byte {pos} has an invalid length")
        if pos + length > size:
            raise _truncated(source, "JPEG", "ends inside a segment")
        segment = data[pos + 2 : pos + length] if marker != 0xDA else b""
        pos += length
        if marker in _JPEG_SOF_MARKERS and width is None:
            if len(segment) < 5:
                raise _corrupt(source, "JPEG", "frame header too short")
            height, width = struct.unpack_from(">HH", segment, 1)
        elif marker == 0xE1 and orientation is None and segment.startswith(b"Exif\x00\x00"):
            orientation = _exif_orientation(segment[6:])
        elif marker == 0xDA:
            break
    if width is None or height is None:
        raise _corrupt(source, "JPEG", "no frame header before the image data")
    # Entropy-coded data escapes 0xFF as FF00, so FFD9 after the first scan is the real EOI.
    if data.find(b"\xff\xd9", pos) < 0:
        raise _truncated(source, "JPEG", "no end-of-image marker")
    return _Header("JPEG", width, height, orientation or 1)


def _bmp_header(data: bytes, source: str) -> _Header:
    size = len(data)
    if size < 26:
        raise _truncated(source, "BMP", "header incomplete")
    pixel_offset, dib_size = struct.unpack_from("<II", data, 10)
    if dib_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height, _planes, bits = struct.unpack_from("<HHHH", data, 18)
        compression = 0
    elif dib_size in (16, 40, 52, 56, 64, 108, 124):
        if size < 34:
            raise _truncated(source, "BMP", "header incomplete")
        width, height, _planes, bits, compression = struct.unpack_from("<iiHHI", data, 18)
        height = abs(height)  # negative height means rows stored top-down
    else:
        raise _corrupt(source, "BMP", f"unknown header size {dib_size}")
    if width < 0:
        raise _corrupt(source, "BMP", f"negative width {width}")
    if compression in (0, 3, 6) and bits in (1, 4, 8, 16, 24, 32):
        row_bytes = (width * bits + 31) // 32 * 4
        needed = pixel_offset + row_bytes * height
        if size < needed:
            raise _truncated(source, "BMP", f"{size} bytes, pixel data needs {needed}")
    return _Header("BMP", width, height, 1)


def _webp_header(data: bytes, source: str) -> _Header:
    size = len(data)
    (riff_size,) = struct.unpack_from("<I", data, 4)
    riff_end = 8 + riff_size
    if size < riff_end:
        raise _truncated(source, "WebP", f"{size} bytes, RIFF header says {riff_end}")
    if riff_end < 20 + 10:
        raise _truncated(source, "WebP", "no image chunk")
    kind = data[12:16]
    (chunk_size,) = struct.unpack_from("<I", data, 16)
    payload = data[20 : min(20 + chunk_size, riff_end)]
    orientation = 1
    if kind == b"VP8 ":
        if len(payload) < 10 or payload[3:6] != b"\x9d\x01\x2a":
            raise _corrupt(source, "WebP", "bad VP8 frame header")
        width = struct.unpack_from("<H", payload, 6)[0] & 0x3FFF
        height = struct.unpack_from("<H", payload, 8)[0] & 0x3FFF
    elif kind == b"VP8L":
        if len(payload) < 5 or payload[0] != 0x2F:
            raise _corrupt(source, "WebP", "bad VP8L header")
        (bits,) = struct.unpack_from("<I", payload, 1)
        width = (bits & 0x3FFF) + 1
        height = ((bits >> 14) & 0x3FFF) + 1
    elif kind == b"VP8X":
        if len(payload) < 10:
            raise _corrupt(source, "WebP", "bad VP8X header")
        width = int.from_bytes(payload[4:7], "little") + 1
        height = int.from_bytes(payload[7:10], "little") + 1
        orientation = _webp_exif_orientation(data, riff_end)
    else:
        raise _corrupt(source, "WebP", f"unknown first chunk {kind!r}")
    return _Header("WebP", width, height, orientation)


def _webp_exif_orientation(data: bytes, riff_end: int) -> int:
    pos = 12
    while pos + 8 <= riff_end:
        kind = data[pos : pos + 4]
        (length,) = struct.unpack_from("<I", data, pos + 4)
        if kind == b"EXIF":
            exif = data[pos + 8 : min(pos + 8 + length, riff_end)]
            return _exif_orientation(exif[6:] if exif.startswith(b"Exif\x00\x00") else exif)
        pos += 8 + length + (length & 1)
    return 1


def _tiff_header(data: bytes, source: str) -> _Header:
    directory = _tiff_directory(data)
    if directory is None:
        raise _corrupt(source, "TIFF", "unreadable first directory")
    width, height = _tiff_scalar(data, directory, 256), _tiff_scalar(data, directory, 257)
    if width is None or height is None:
        raise _corrupt(source, "TIFF", "no image width/length tags")
    for offsets_tag, counts_tag in ((273, 279), (324, 325)):  # strips, tiles
        if offsets_tag in directory.entries and counts_tag in directory.entries:
            offsets = _tiff_values(data, directory, offsets_tag)
            counts = _tiff_values(data, directory, counts_tag)
            if offsets is None or counts is None or len(offsets) != len(counts):
                raise _corrupt(source, "TIFF", "unreadable strip/tile table")
            if len(offsets):
                end = int((offsets.astype(np.uint64) + counts.astype(np.uint64)).max())
                if end > len(data):
                    raise _truncated(source, "TIFF", f"{len(data)} bytes, pixel data needs {end}")
    # OpenCV's TIFF reader applies the Orientation tag itself, so nothing is left to do here.
    return _Header("TIFF", width, height, 1)


def _gif_header(data: bytes, source: str) -> _Header:
    if len(data) < 13:
        raise _truncated(source, "GIF", "header incomplete")
    width, height = struct.unpack_from("<HH", data, 6)
    if not data.rstrip(b"\x00").endswith(b";"):
        raise _truncated(source, "GIF", "no trailer byte")
    return _Header("GIF", width, height, 1)


def _pnm_header(data: bytes, source: str) -> _Header:
    kind = data[1] - ord("0")
    needed_fields = 2 if kind in (1, 4) else 3
    fields: list[int] = []
    pos = 2
    size = len(data)
    while len(fields) < needed_fields:
        while pos < size and data[pos] in b" \t\r\n\x0b\x0c":
            pos += 1
        if pos < size and data[pos] == ord("#"):
            end = data.find(b"\n", pos)
            pos = size if end < 0 else end + 1
            continue
        start = pos
        while pos < size and data[pos : pos + 1].isdigit():
            pos += 1
        if start == pos:
            if pos >= size:
                raise _truncated(source, "PNM", "header incomplete")
            raise _corrupt(source, "PNM", "header is not a list of numbers")
        fields.append(int(data[start:pos]))
    width, height = fields[0], fields[1]
    if kind >= 4:  # binary body after one whitespace byte
        maxval = fields[2] if kind != 4 else 1
        sample_bytes = 2 if maxval > 255 else 1
        if kind == 4:
            row_bytes = (width + 7) // 8
        else:
            row_bytes = width * sample_bytes * (3 if kind == 6 else 1)
        needed = pos + 1 + row_bytes * height
        if size < needed:
            raise _truncated(source, "PNM", f"{size} bytes, pixel data needs {needed}")
    return _Header("PNM", width, height, 1)


class _TiffDirectory(NamedTuple):
    byte_order: str
    big: bool  # BigTIFF: 8-byte offsets and counts
    entries: dict[int, tuple[int, int, int]]  # tag -> (field type, count, value field position)


_TIFF_INTEGER_TYPES = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8


def _tiff_directory(tiff: bytes) -> _TiffDirectory | None:
    """The first directory of a TIFF (also the layout of an EXIF block); None if unreadable."""
    if len(tiff) < 8:
        return None
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        return None
    (magic,) = struct.unpack_from(order + "H", tiff, 2)
    if magic == 42:
        (offset,) = struct.unpack_from(order + "I", tiff, 4)
        big, count_format, entry_size = False, "H", 12
    elif magic == 43 and len(tiff) >= 16:
        (offset,) = struct.unpack_from(order + "Q", tiff, 8)
        big, count_format, entry_size = True, "Q", 20
    else:
        return None
    count_size = struct.calcsize(count_format)
    if offset < 8 or offset + count_size > len(tiff):
        return None
    (count,) = struct.unpack_from(order + count_format, tiff, offset)
    entries: dict[int, tuple[int, int, int]] = {}
    for index in range(count):
        entry = offset + count_size + index * entry_size
        if entry + entry_size > len(tiff):
            return None
        tag, kind = struct.unpack_from(order + "HH", tiff, entry)
        (values,) = struct.unpack_from(order + ("Q" if big else "I"), tiff, entry + 4)
        entries[tag] = (kind, values, entry + (12 if big else 8))
    return _TiffDirectory(order, big, entries)


def _tiff_values(tiff: bytes, directory: _TiffDirectory, tag: int) -> np.ndarray | None:
    """All integer values of a tag, inline or stored elsewhere in the file; None if unreadable."""
    kind, count, field = directory.entries[tag]
    value_format = _TIFF_INTEGER_TYPES.get(kind)
    if value_format is None:
        return None
    item_size = struct.calcsize(value_format)
    if count * item_size <= (8 if directory.big else 4):
        position = field
    else:
        (position,) = struct.unpack_from(
            directory.byte_order + ("Q" if directory.big else "I"), tiff, field
        )
    if position + count * item_size > len(tiff):
        return None
    dtype = np.dtype(directory.byte_order + value_format)
    return np.frombuffer(tiff, dtype=dtype, count=count, offset=position)


def _tiff_scalar(tiff: bytes, directory: _TiffDirectory, tag: int) -> int | None:
    if tag not in directory.entries:
        return None
    values = _tiff_values(tiff, directory, tag)
    return int(values[0]) if values is not None and len(values) else None


def _exif_orientation(exif_tiff: bytes) -> int:
    """EXIF Orientation (tag 0x0112) from a TIFF-structured EXIF block; 1 if absent or bad."""
    directory = _tiff_directory(exif_tiff)
    value = _tiff_scalar(exif_tiff, directory, 0x0112) if directory is not None else None
    return value if value is not None and 1 <= value <= 8 else 1


def _apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a stored image into its displayed form for an EXIF orientation (1..8)."""
    if orientation == 2:
        return image[:, ::-1]
    if orientation == 3:
        return image[::-1, ::-1]
    if orientation == 4:
        return image[::-1]
    if orientation == 5:
        return image.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(image, -1)  # 90 degrees clockwise
    if orientation == 7:
        return image[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(image, 1)  # 90 degrees counter-clockwise
    return image


# ---------------------------------------------------------------------------------------------
# Array conversion


def to_rgb_uint8(array: np.ndarray, source: str = ARRAY_SOURCE) -> np.ndarray:
    """Convert a user array to RGB uint8 HxWx3 (C-contiguous, always a new array).

    Accepts HxW, HxWx1 (gray), HxWx2 (gray+alpha), HxWx3 (RGB) and HxWx4 (RGBA) arrays of
    uint8, uint16 (scaled with rounding, 65535 -> 255) or floats in [0, 1]. Alpha is composited
    over white. Anything else raises DataError(source, reason).
    """
    return _to_rgb_uint8(array, source, bgr=False)


def _to_rgb_uint8(array: np.ndarray, source: str, bgr: bool) -> np.ndarray:
    """The one conversion path shared by user arrays (RGB order) and decoded images (BGR)."""
    if not isinstance(array, np.ndarray):
        try:
            array = np.asarray(array)
        except (TypeError, ValueError) as exc:
            raise DataError(source, f"not an image array ({exc})") from None
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise DataError(
            source, f"expected an HxW, HxWx1, HxWx2, HxWx3 or HxWx4 array, got shape {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(source, f"empty image (shape {array.shape})")

    if array.dtype == np.uint8:
        full_scale = 255.0
    elif array.dtype == np.uint16:
        full_scale = 65535.0
    elif array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise DataError(source, "image contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise DataError(
                source, f"float image values must lie in [0, 1], found [{low:.4g}, {high:.4g}]"
            )
        full_scale = 1.0
    else:
        raise DataError(
            source, f"unsupported pixel type {array.dtype} (expected uint8, uint16 or float)"
        )

    channels = array.shape[2]
    if bgr and channels == 3 and array.dtype == np.uint8:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)  # the common case: one SIMD pass, GIL released
    has_alpha = channels in (2, 4)
    color = array[:, :, : channels - 1] if has_alpha else array
    if bgr and color.shape[2] == 3:
        color = color[:, :, ::-1]

    if has_alpha:
        alpha = array[:, :, channels - 1 :].astype(np.float32) / np.float32(full_scale)
        mixed = color.astype(np.float32) / np.float32(full_scale) * alpha + (1.0 - alpha)
        out = _float_to_uint8(mixed)
    elif array.dtype == np.uint8:
        out = color
    elif array.dtype == np.uint16:
        out = ((color.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    else:
        out = _float_to_uint8(color)

    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    if np.may_share_memory(out, array):
        return np.array(out, order="C", copy=True)
    return np.ascontiguousarray(out)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Encoding and writing


def encode_image(image_rgb: np.ndarray, ext: str = ".png", quality: int = 95) -> bytes:
    """Encode an RGB (HxWx3) or gray (HxW) uint8 array; `quality` (1-100) is for JPEG/WebP."""
    ext = _normalize_extension(ext)
    if ext not in WRITABLE_EXTENSIONS:
        raise ConfigError(
            f"cannot write {ext!r} images (use one of {', '.join(WRITABLE_EXTENSIONS)})"
        )
    whole_number(quality, "image quality", 1, 100)
    _validate_writable(image_rgb)
    pixels = image_rgb[:, :, ::-1] if image_rgb.ndim == 3 else image_rgb
    params: list[int] = []
    if ext in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif ext == ".webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, int(quality)]
    try:
        ok, buffer = cv2.imencode(ext, np.ascontiguousarray(pixels), params)
    except cv2.error as exc:
        raise DataError(ARRAY_SOURCE, f"cannot encode as {ext} ({_cv_message(exc)})") from None
    if not ok:
        raise DataError(ARRAY_SOURCE, f"cannot encode as {ext}")
    return buffer.tobytes()


def write_image(path: str | os.PathLike, image_rgb: np.ndarray, quality: int = 95) -> None:
    """Encode by the path's suffix (.png/.jpg/.jpeg/.bmp/.webp) and write atomically."""
    path = Path(path)
    if path.suffix.lower() not in WRITABLE_EXTENSIONS:
        raise DataError(
            path, f"cannot write {path.suffix or 'extension-less'!r} images "
            f"(use one of {', '.join(WRITABLE_EXTENSIONS)})"
        )
    try:
        data = encode_image(image_rgb, path.suffix, quality)
    except DataError as exc:
        raise DataError(path, exc.reason) from None
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise DataError(path, f"cannot write file ({exc.strerror or exc})") from None


def _normalize_extension(ext: str) -> str:
    ext = str(ext).lower()
    return ext if ext.startswith(".") else "." + ext


def _validate_writable(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise DataError(ARRAY_SOURCE, f"expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise DataError(ARRAY_SOURCE, f"expected a uint8 image, got {image.dtype}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise DataError(ARRAY_SOURCE, f"expected an HxW or HxWx3 image, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise DataError(ARRAY_SOURCE, f"empty image (shape {image.shape})")


# ---------------------------------------------------------------------------------------------
# Resizing


def resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (height, width): INTER_AREA when shrinking both sides, else INTER_LINEAR."""
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size)
        or min(size) <= 0
    ):
        raise ConfigError(f"image size must be two positive integers (height, width), got {size!r}")
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.size == 0:
        shape = getattr(image, "shape", type(image).__name__)
        raise DataError(ARRAY_SOURCE, f"expected a non-empty HxW or HxWxC image, got {shape}")
    height, width = int(size[0]), int(size[1])
    if (height, width) == image.shape[:2]:
        return image.copy()
    shrinking = height <= image.shape[0] and width <= image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    try:
        resized = cv2.resize(image, (width, height), interpolation=interpolation)
    except cv2.error as exc:
        raise FacekdError(f"cannot resize image of {image.dtype} {image.shape}: {_cv_message(exc)}")
    if image.ndim == 3 and resized.ndim == 2:  # OpenCV drops a single channel axis
        resized = resized[:, :, None]
    return resized


# ---------------------------------------------------------------------------------------------
# Input geometry: how a decoded image becomes a model's square input

RESIZE_MODES = ("stretch", "center_crop")


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side resized to `size` (the longer one in proportion, rounded down) with
    Pillow's antialiased bilinear filter: torchvision's `Resize(size)` on a PIL image, pixel
    for pixel (same output size rule, same filter, the image returned as is when unchanged)."""
    height, width = image.shape[:2]
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_h, new_w) == (height, width):
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def center_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's `CenterCrop(size)` (Python's round, as it uses)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


class Resize:
    """How a decoded RGB image becomes a model's `size`×`size` input.

    - "stretch": both sides resized to `size` (INTER_AREA when shrinking, else INTER_LINEAR),
      facekd's default for aligned face crops;
    - "center_crop": the shorter side resized to `size` (`resize_shorter_side`), then the
      centre `size`×`size` crop: torchvision's `Resize(S)` + `CenterCrop(S)` on a PIL image, as
      Efficient-FIQA tests and timm/torchvision models are evaluated.
    Hashable and comparable, so decoded sets can be cached by geometry."""

    __slots__ = ("size", "mode")

    def __init__(self, size: int, mode: str = "stretch"):
        whole_number(size, "image size")
        if mode not in RESIZE_MODES:
            raise ConfigError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
        self.size = int(size)
        self.mode = mode

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.mode == "stretch":
            return resize_to(image, (self.size, self.size))
        resized = resize_shorter_side(image, self.size)
        top, left = center_crop_offsets(resized.shape[0], resized.shape[1], self.size)
        return np.ascontiguousarray(resized[top: top + self.size, left: left + self.size])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Resize) and (self.size, self.mode) == (other.size, other.mode)

    def __hash__(self) -> int:
        return hash((self.size, self.mode))

    def __repr__(self) -> str:
        return f"Resize({self.size}, {self.mode!r})"
