from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from facekd.errors import ConfigError, DataError, FacekdError
from facekd.io import images
from facekd.io.images import (
    IMAGE_EXTENSIONS,
    decode_image,
    encode_image,
    read_image,
    resize_to,
    to_rgb_uint8,
    write_image,
)


# --- helpers that build files by hand ---------------------------------------------------------


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def make_png(
    width: int, height: int, color_type: int, rows: list[bytes], extra: bytes = b""
) -> bytes:
    """An 8-bit PNG from raw scanlines (filter byte 0 is added here)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    raw = b"".join(b"\x00" + row for row in rows)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + extra
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def exif_block(orientation: int, byte_order: str = "<") -> bytes:
    """A TIFF-structured EXIF block whose first directory holds only the Orientation tag."""
    header = (b"II*\x00" if byte_order == "<" else b"MM\x00*") + struct.pack(byte_order + "I", 8)
    entry = struct.pack(byte_order + "HHIH", 0x0112, 3, 1, orientation) + b"\x00\x00"
    return header + struct.pack(byte_order + "H", 1) + entry + struct.pack(byte_order + "I", 0)


def jpeg_with_orientation(jpeg: bytes, orientation: int, byte_order: str = "<") -> bytes:
    body = b"Exif\x00\x00" + exif_block(orientation, byte_order)
    app1 = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    return jpeg[:2] + app1 + jpeg[2:]


def png_with_orientation(png: bytes, orientation: int) -> bytes:
    ihdr_end = 8 + 25
    return png[:ihdr_end] + png_chunk(b"eXIf", exif_block(orientation)) + png[ihdr_end:]


def make_tiff(gray: np.ndarray, orientation: int | None = None) -> bytes:
    """A little-endian, uncompressed, one-strip 8-bit grayscale TIFF, directory first."""
    height, width = gray.shape
    tags = {256: width, 257: height, 258: 8, 259: 1, 262: 1, 277: 1, 278: height}
    if orientation is not None:
        tags[274] = orientation
    count = len(tags) + 2  # plus StripOffsets and StripByteCounts
    pixels_at = 8 + 2 + 12 * count + 4
    tags[273] = pixels_at
    tags[279] = gray.size
    directory = struct.pack("<H", count)
    for tag in sorted(tags):
        directory += struct.pack("<HHII", tag, 4, 1, tags[tag])
    return b"II*\x00" + struct.pack("<I", 8) + directory + struct.pack("<I", 0) + gray.tobytes()


def cv_encode(ext: str, bgr: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buffer = cv2.imencode(ext, bgr, params or [])
    assert ok
    return buffer.tobytes()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def rgb_test_image(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def smooth_test_image(height: int = 48, width: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    channels = [x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)]
    return np.stack(channels, -1).astype(np.uint8)


def expect_error(path: Path, *words: str) -> DataError:
    with pytest.raises(DataError) as info:
        read_image(path)
    error = info.value
    assert error.path == str(path)
    assert str(path) in str(error)
    for word in words:
        assert word in error.reason, error.reason
    return error


@pytest.fixture
def no_decode(monkeypatch):
    """Fail the test if any pixel decoding is attempted."""

    def refuse(*args, **kwargs):
        raise AssertionError("cv2.imdecode must not be called")

    monkeypatch.setattr(images.cv2, "imdecode", refuse)


# --- bad files ---------------------------------------------------------------------------------


def test_empty_file_is_refused(tmp_path):
    expect_error(write(tmp_path, "empty.png", b""), "empty file")


def test_random_bytes_are_refused(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes()
    expect_error(write(tmp_path, "noise.png", b"\x00" + data), "not a supported image")


def test_text_file_with_jpg_extension_is_refused(tmp_path):
    path = write(tmp_path, "notes.jpg", b"hello, this is not a picture\n")
    expect_error(path, "not a supported image")


def test_truncated_png_is_refused(tmp_path):
    png = cv_encode(".png", rgb_test_image())
    expect_error(write(tmp_path, "half.png", png[: len(png) // 2]), "truncated PNG")
    expect_error(write(tmp_path, "no_iend.png", png[:-12]), "truncated PNG")


def test_png_with_damaged_pixel_data_is_refused(tmp_path):
    png = bytearray(cv_encode(".png", rgb_test_image()))
    start = png.index(b"IDAT") + 4
    png[start : start + 40] = bytes(40)  # chunk structure intact, contents (and CRC) wrong
    expect_error(write(tmp_path, "damaged.png", bytes(png)), "corrupt PNG")


def test_png_without_ihdr_first_is_refused(tmp_path):
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IEND", b"")
    expect_error(write(tmp_path, "headless.png", data), "corrupt PNG", "IHDR")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_jpeg_is_refused(tmp_path, fraction):
    jpeg = cv_encode(".jpg", rgb_test_image(96, 96))
    expect_error(write(tmp_path, "cut.jpg", jpeg[: int(len(jpeg) * fraction)]), "truncated JPEG")


def test_jpeg_missing_only_its_end_marker_is_refused(tmp_path):
    jpeg = cv_encode(".jpg", rgb_test_image(96, 96))
    assert jpeg.endswith(b"\xff\xd9")
    expect_error(write(tmp_path, "no_eoi.jpg", jpeg[:-2]), "truncated JPEG", "end-of-image")


def test_jpeg_without_frame_header_is_refused(tmp_path):
    sos = b"\xff\xda" + struct.pack(">H", 8) + bytes(6)
    data = b"\xff\xd8" + sos + b"\x12\x34\xff\xd9"
    expect_error(write(tmp_path, "nosof.jpg", data), "corrupt JPEG")


@pytest.mark.parametrize(
    "ext, params",
    [(".bmp", []), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 90]), (".ppm", []), (".gif", [])],
)
def test_other_truncated_formats_are_refused(tmp_path, ext, params):
    data = cv_encode(ext, rgb_test_image(64, 64)[:, :, ::-1].copy(), params)
    expect_error(write(tmp_path, "cut" + ext, data[: len(data) * 2 // 3]), "truncated")


def test_truncated_tiff_is_refused(tmp_path):
    tiff = make_tiff(GRAY_PIXELS)
    np.testing.assert_array_equal(decode_image(tiff)[:, :, 0], GRAY_PIXELS)
    expect_error(write(tmp_path, "cut.tif", tiff[:-100]), "truncated TIFF")
    expect_error(write(tmp_path, "stub.tif", tiff[:40]), "corrupt TIFF")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nowhere.png", "file not found")


def test_directory_is_refused(tmp_path):
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    expect_error(folder, "folder")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_unreadable_file_reports_os_reason(tmp_path):
    path = write(tmp_path, "locked.png", cv_encode(".png", rgb_test_image()))
    path.chmod(0)
    try:
        expect_error(path, "cannot read", "ermission")
    finally:
        path.chmod(0o644)


# --- size limits from the header ---------------------------------------------------------------


def test_huge_png_header_is_refused_without_decoding(tmp_path, no_decode):
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )
    assert len(data) < 200
    expect_error(write(tmp_path, "bomb.png", data), "too large", "100000x100000")


def test_zero_size_header_is_refused(tmp_path, no_decode):
    data = make_png(0, 4, 2, [])
    expect_error(write(tmp_path, "zero.png", data), "zero size")


GRAY_PIXELS = np.random.default_rng(4).integers(0, 256, (30, 50), dtype=np.uint8)
SIZE_CASES = [
    (".png", []),
    (".jpg", []),
    (".bmp", []),
    (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),  # lossy: VP8
    (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),  # lossless: VP8L
    (".tiff", []),
    (".gif", []),
    (".ppm", []),
    (".pgm", []),
]


SIZE_IDS = [f"{ext}{params[1:] if params else ''}" for ext, params in SIZE_CASES]


@pytest.mark.parametrize("ext, params", SIZE_CASES, ids=SIZE_IDS)
def test_every_format_reports_its_size_from_the_header(ext, params):
    """The limit is exact: width*height pixels pass, one pixel less of budget refuses."""
    pixels = GRAY_PIXELS if ext == ".pgm" else np.dstack([GRAY_PIXELS] * 3)
    data = cv_encode(ext, pixels, params)
    assert decode_image(data, "ok", max_pixels=30 * 50).shape == (30, 50, 3)
    with pytest.raises(DataError, match="50x30"):
        decode_image(data, "small", max_pixels=30 * 50 - 1)


def test_webp_extended_header_size(no_decode):
    """A VP8X container gives the canvas size in its own header."""
    vp8x_payload = bytes([0, 0, 0, 0]) + (9999).to_bytes(3, "little") + (7999).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", len(vp8x_payload)) + vp8x_payload
    body = b"WEBP" + chunk
    data = b"RIFF" + struct.pack("<I", len(body)) + body
    with pytest.raises(DataError, match="10000x8000"):
        decode_image(data, "x.webp")


def test_module_limit_and_parameter(monkeypatch):
    data = cv_encode(".png", rgb_test_image(10, 10))
    assert decode_image(data).shape == (10, 10, 3)
    with pytest.raises(DataError, match="too large"):
        decode_image(data, max_pixels=99)
    monkeypatch.setattr(images, "MAX_PIXELS", 99)
    with pytest.raises(DataError, match="too large"):
        decode_image(data)
    assert decode_image(data, max_pixels=100).shape == (10, 10, 3)


# --- colour, depth and alpha -------------------------------------------------------------------


def test_decoded_image_is_rgb_uint8_contiguous(tmp_path):
    rgb = rgb_test_image()
    path = write(tmp_path, "a.png", cv_encode(".png", rgb[:, :, ::-1].copy()))
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (48, 64, 3)
    assert image.flags.c_contiguous
    np.testing.assert_array_equal(image, rgb)


def test_grayscale_png_becomes_three_equal_channels(tmp_path):
    path = write(tmp_path, "gray.png", cv_encode(".png", GRAY_PIXELS))
    image = read_image(path)
    assert image.shape == (30, 50, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], GRAY_PIXELS)


def composite_over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.rint(rgb.astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def test_rgba_png_is_composited_over_white(tmp_path):
    rgb = np.array([[[200, 100, 0], [10, 20, 30], [0, 255, 0], [90, 90, 90]]], dtype=np.uint8)
    alpha = np.array([[255, 0, 128, 64]], dtype=np.uint8)
    bgra = np.dstack([rgb[:, :, ::-1], alpha])
    image = read_image(write(tmp_path, "rgba.png", cv_encode(".png", bgra)))
    assert image.shape == (1, 4, 3)
    np.testing.assert_array_equal(image[0, 0], [200, 100, 0])  # opaque: unchanged
    np.testing.assert_array_equal(image[0, 1], [255, 255, 255])  # transparent: white
    expected = composite_over_white(rgb, alpha)
    np.testing.assert_allclose(image.astype(int), expected.astype(int), atol=1)


def test_gray_alpha_png_is_composited_over_white(tmp_path):
    rows = [bytes([100, 255, 100, 0, 0, 128])]  # (gray, alpha) pairs
    image = read_image(write(tmp_path, "la.png", make_png(3, 1, 4, rows)))
    np.testing.assert_array_equal(image[0, 0], [100, 100, 100])
    np.testing.assert_array_equal(image[0, 1], [255, 255, 255])
    assert abs(int(image[0, 2, 0]) - round(255 * (1 - 128 / 255))) <= 1


def test_paletted_png_with_transparency(tmp_path):
    palette = png_chunk(b"PLTE", bytes([255, 0, 0, 0, 0, 255, 0, 200, 0]))
    transparency = png_chunk(b"tRNS", bytes([255, 0, 128]))
    rows = [bytes([0, 1, 2, 0]), bytes([2, 2, 1, 0])]
    image = read_image(write(tmp_path, "pal.png", make_png(4, 2, 3, rows, palette + transparency)))
    assert image.shape == (2, 4, 3)
    np.testing.assert_array_equal(image[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(image[0, 1], [255, 255, 255])  # index 1 fully transparent
    green = composite_over_white(np.array([[[0, 200, 0]]], np.uint8), np.array([[128]], np.uint8))
    np.testing.assert_allclose(image[0, 2].astype(int), green[0, 0].astype(int), atol=1)
    np.testing.assert_array_equal(image[1, 3], [255, 0, 0])


def test_paletted_png_without_transparency(tmp_path):
    palette = png_chunk(b"PLTE", bytes([255, 0, 0, 0, 0, 255]))
    image = read_image(write(tmp_path, "pal.png", make_png(2, 1, 3, [bytes([1, 0])], palette)))
    np.testing.assert_array_equal(image[0], [[0, 0, 255], [255, 0, 0]])


def test_sixteen_bit_png_is_scaled_not_truncated(tmp_path):
    values = np.array([[0, 128, 256, 257, 1000, 32768, 65280, 65407, 65535]], dtype=np.uint16)
    image = read_image(write(tmp_path, "deep.png", cv_encode(".png", values)))
    # round(v / 257): the exact 16 -> 8 bit mapping (65535 -> 255, 32768 -> 128)
    np.testing.assert_array_equal(image[0, :, 0], [0, 0, 1, 1, 4, 128, 254, 255, 255])
    assert (image == image[:, :, :1]).all()


def test_sixteen_bit_colour_png_keeps_channel_order(tmp_path):
    rgb16 = np.array([[[65535, 32768, 0]]], dtype=np.uint16)
    image = read_image(write(tmp_path, "deep_rgb.png", cv_encode(".png", rgb16[:, :, ::-1].copy())))
    np.testing.assert_array_equal(image[0, 0], [255, 128, 0])


def test_sixteen_bit_rgba_png(tmp_path):
    bgra16 = np.array([[[0, 0, 65535, 65535], [0, 0, 65535, 0]]], dtype=np.uint16)
    image = read_image(write(tmp_path, "deep_rgba.png", cv_encode(".png", bgra16)))
    np.testing.assert_array_equal(image[0], [[255, 0, 0], [255, 255, 255]])


@pytest.mark.parametrize("ext", [".bmp", ".tiff", ".ppm", ".webp"])
def test_lossless_formats_decode_exactly(ext):
    rgb = rgb_test_image(20, 30, seed=7)
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else []
    np.testing.assert_array_equal(decode_image(cv_encode(ext, rgb[:, :, ::-1].copy(), params)), rgb)


def test_gif_decodes_first_frame():
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[:, :12] = (255, 0, 0)
    rgb[:, 12:] = (0, 0, 255)
    image = decode_image(cv_encode(".gif", rgb[:, :, ::-1].copy()))
    assert image.shape == (16, 24, 3)
    np.testing.assert_allclose(image[8, 2].astype(int), [255, 0, 0], atol=8)
    np.testing.assert_allclose(image[8, 20].astype(int), [0, 0, 255], atol=8)


# --- EXIF orientation --------------------------------------------------------------------------


def marked_image(height: int = 48, width: int = 80) -> np.ndarray:
    """Grey picture with a red block at the top-left and a blue block at the top-right."""
    rgb = np.full((height, width, 3), 128, np.uint8)
    rgb[:16, :16] = (255, 0, 0)
    rgb[:16, -16:] = (0, 0, 255)
    return rgb


def corner_colours(image: np.ndarray) -> dict[str, np.ndarray]:
    def mean(block):
        return block.reshape(-1, 3).mean(0)

    return {
        "top_left": mean(image[2:12, 2:12]),
        "top_right": mean(image[2:12, -12:-2]),
        "bottom_left": mean(image[-12:-2, 2:12]),
        "bottom_right": mean(image[-12:-2, -12:-2]),
    }


RED, BLUE = np.array([255, 0, 0]), np.array([0, 0, 255])


@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_jpeg_orientation_6_rotates_clockwise(tmp_path, byte_order):
    base = cv_encode(".jpg", marked_image()[:, :, ::-1].copy())
    jpeg = jpeg_with_orientation(base, 6, byte_order)
    image = read_image(write(tmp_path, "o6.jpg", jpeg))
    assert image.shape == (80, 48, 3)
    corners = corner_colours(image)
    np.testing.assert_allclose(corners["top_right"], RED, atol=20)  # top-left moved right
    np.testing.assert_allclose(corners["bottom_right"], BLUE, atol=20)  # top-right moved down


def test_jpeg_orientation_8_rotates_counter_clockwise(tmp_path):
    jpeg = jpeg_with_orientation(cv_encode(".jpg", marked_image()[:, :, ::-1].copy()), 8)
    image = read_image(write(tmp_path, "o8.jpg", jpeg))
    assert image.shape == (80, 48, 3)
    corners = corner_colours(image)
    np.testing.assert_allclose(corners["bottom_left"], RED, atol=20)
    np.testing.assert_allclose(corners["top_left"], BLUE, atol=20)


def test_jpeg_orientation_1_and_invalid_values_leave_image_as_stored(tmp_path):
    base = cv_encode(".jpg", marked_image()[:, :, ::-1].copy())
    for orientation in (1, 0, 9):
        image = decode_image(jpeg_with_orientation(base, orientation))
        assert image.shape == (48, 80, 3)
        np.testing.assert_allclose(corner_colours(image)["top_left"], RED, atol=20)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_opencv_reference(orientation):
    """Lossless PNG with an eXIf chunk: same pixels as OpenCV's own orientation handling."""
    rgb = rgb_test_image(12, 20, seed=orientation)
    data = png_with_orientation(cv_encode(".png", rgb[:, :, ::-1].copy()), orientation)
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    if orientation != 1 and reference.shape == rgb.shape and np.array_equal(reference, rgb):
        pytest.skip("this OpenCV build ignores PNG eXIf orientation")
    np.testing.assert_array_equal(decode_image(data), reference)


def test_tiff_orientation_is_applied_once():
    gray = np.full((48, 80), 128, np.uint8)
    gray[:16, :16] = 0  # dark block at the top-left
    image = decode_image(make_tiff(gray, orientation=6))
    assert image.shape == (80, 48, 3)
    assert image[:16, -16:].max() == 0  # rotated clockwise: now at the top-right
    assert image[:16, :16].min() == 128


def test_jpeg_orientations_match_opencv_reference():
    base = cv_encode(".jpg", marked_image()[:, :, ::-1].copy())
    for orientation in range(1, 9):
        data = jpeg_with_orientation(base, orientation)
        reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        np.testing.assert_array_equal(decode_image(data), reference)


# --- encoding and writing ----------------------------------------------------------------------


def test_png_round_trip_is_exact(tmp_path):
    rgb = rgb_test_image()
    path = tmp_path / "out" / "round.png"
    write_image(path, rgb)
    np.testing.assert_array_equal(read_image(path), rgb)
    np.testing.assert_array_equal(decode_image(encode_image(rgb, ".png")), rgb)
    assert [p.name for p in path.parent.iterdir()] == ["round.png"]  # no temp leftovers


def test_gray_round_trip(tmp_path):
    write_image(tmp_path / "g.png", GRAY_PIXELS)
    np.testing.assert_array_equal(read_image(tmp_path / "g.png")[:, :, 1], GRAY_PIXELS)


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".JPG", ".webp"])
def test_lossy_round_trip_is_close(tmp_path, suffix):
    rgb = smooth_test_image()
    write_image(tmp_path / f"x{suffix}", rgb, quality=95)
    back = read_image(tmp_path / f"x{suffix}")
    assert back.shape == rgb.shape
    assert np.abs(back.astype(int) - rgb.astype(int)).mean() < 3


def test_bmp_round_trip_is_exact(tmp_path):
    rgb = rgb_test_image(7, 9)  # odd width: rows are padded in the file
    write_image(tmp_path / "x.bmp", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "x.bmp"), rgb)


def test_quality_changes_jpeg_size():
    rgb = rgb_test_image(64, 64)
    assert len(encode_image(rgb, ".jpg", quality=30)) < len(encode_image(rgb, "jpg", quality=95))


def test_write_refuses_unknown_extension(tmp_path):
    with pytest.raises(DataError) as info:
        write_image(tmp_path / "x.gif", rgb_test_image())
    assert "x.gif" in str(info.value)
    assert not (tmp_path / "x.gif").exists()


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4, 3), np.float32),
        np.zeros((4, 4, 4), np.uint8),
        np.zeros((4,), np.uint8),
        np.zeros((0, 4, 3), np.uint8),
        [[1, 2], [3, 4]],
    ],
    ids=["float", "four-channels", "1d", "empty", "list"],
)
def test_write_validates_array(tmp_path, array):
    with pytest.raises(DataError) as info:
        write_image(tmp_path / "bad.png", array)
    assert "bad.png" in str(info.value)
    assert not (tmp_path / "bad.png").exists()


def test_encode_refuses_bad_options():
    with pytest.raises(ConfigError):
        encode_image(rgb_test_image(), ".gif")
    with pytest.raises(ConfigError):
        encode_image(rgb_test_image(), ".jpg", quality=0)
    with pytest.raises(ConfigError):
        encode_image(rgb_test_image(), ".jpg", quality=95.0)


# --- array conversion --------------------------------------------------------------------------


def test_to_rgb_uint8_accepts_common_layouts():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for array in (gray, gray[:, :, None]):
        out = to_rgb_uint8(array)
        assert out.shape == (3, 4, 3) and (out == gray[:, :, None]).all()
    rgb = rgb_test_image(3, 4)
    out = to_rgb_uint8(rgb)
    np.testing.assert_array_equal(out, rgb)
    assert out.flags.c_contiguous and not np.shares_memory(out, rgb)
    np.testing.assert_array_equal(to_rgb_uint8(rgb[:, ::-1]), rgb[:, ::-1])  # non-contiguous view


def test_to_rgb_uint8_scales_floats_and_uint16():
    floats = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(to_rgb_uint8(floats)[0, :, 0], [0, 128, 255])
    deep = np.array([[0, 32768, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(to_rgb_uint8(deep)[0, :, 2], [0, 128, 255])


def test_to_rgb_uint8_composites_rgba_over_white():
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 1.0]]], dtype=np.float64)
    rgba[0, :2, :3] /= 255.0
    rgba[0, :2, 3] /= 255.0
    out = to_rgb_uint8(rgba)
    np.testing.assert_array_equal(out[0], [[10, 20, 30], [255, 255, 255], [0, 0, 0]])


@pytest.mark.parametrize(
    "array, reason",
    [
        (np.zeros((4, 4, 5), np.uint8), "shape"),
        (np.zeros((2, 2, 2, 3), np.uint8), "shape"),
        (np.zeros((0, 3), np.uint8), "empty"),
        (np.zeros((3, 3), np.int64), "pixel type"),
        (np.full((3, 3), 2.0), "[0, 1]"),
        (np.full((3, 3), np.nan, np.float32), "NaN"),
        (np.array([["a", "b"]]), "pixel type"),
    ],
)
def test_to_rgb_uint8_refuses_unusable_arrays(array, reason):
    with pytest.raises(DataError) as info:
        to_rgb_uint8(array)
    assert info.value.path == "<array>"
    assert reason in info.value.reason


def test_float_tiff_outside_unit_range_names_the_file(tmp_path):
    path = write(tmp_path, "hdr.tiff", cv_encode(".tiff", np.full((4, 4), 7.5, np.float32)))
    expect_error(path, "[0, 1]")


# --- resizing ----------------------------------------------------------------------------------


def test_resize_shrinks_by_area_averaging():
    blocks = np.array([[10, 50], [90, 250]], dtype=np.uint8)
    image = np.dstack([np.kron(blocks, np.ones((2, 2), np.uint8))] * 3)
    image[0, 0] = 14  # block mean becomes 11
    out = resize_to(image, (2, 2))
    np.testing.assert_array_equal(out[:, :, 0], [[11, 50], [90, 250]])


def test_resize_enlarges_smoothly_and_keeps_channels():
    image = np.zeros((2, 2, 3), np.uint8)
    image[:, 1] = 200
    out = resize_to(image, (4, 8))
    assert out.shape == (4, 8, 3)
    assert len(np.unique(out[0, :, 0])) > 2  # interpolated, not nearest-neighbour
    assert resize_to(GRAY_PIXELS[:, :, None], (10, 10)).shape == (10, 10, 1)
    assert resize_to(GRAY_PIXELS, (60, 100)).shape == (60, 100)


def test_resize_refuses_bad_sizes():
    for size in [(0, 4), (4,), (4.0, 4), "44", (-1, 3)]:
        with pytest.raises(ConfigError):
            resize_to(rgb_test_image(), size)
    with pytest.raises(FacekdError):
        resize_to(np.zeros((0, 3, 3), np.uint8), (2, 2))


def test_image_extensions():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".webp"} <= set(IMAGE_EXTENSIONS)
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)


def test_damaged_files_only_ever_raise_data_error():
    """Seeded byte flips and cuts of valid files: a DataError or a valid image, nothing else."""
    rng = np.random.default_rng(5)
    rgb = rgb_test_image(16, 24, seed=5)
    originals = [
        cv_encode(".png", rgb),
        jpeg_with_orientation(cv_encode(".jpg", rgb), 6),
        cv_encode(".bmp", rgb),
        cv_encode(".webp", rgb),
        cv_encode(".tiff", rgb),
        make_tiff(rgb[:, :, 0].copy()),
        cv_encode(".gif", rgb),
        cv_encode(".ppm", rgb),
    ]
    for original in originals:
        for _ in range(40):
            data = bytearray(original)
            for _ in range(rng.integers(1, 4)):
                position = int(rng.integers(0, min(len(data), 120)))
                data[position] = int(rng.integers(0, 256))
            if rng.random() < 0.5:
                data = data[: int(rng.integers(1, len(data) + 1))]
            try:
                image = decode_image(bytes(data), "fuzz", max_pixels=1_000_000)
            except DataError as error:
                assert error.path == "fuzz" and error.reason
            else:
                assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
