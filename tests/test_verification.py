from __future__ import annotations

import collections
import datetime
import pickle

import cv2
import numpy as np
import pytest

from facekd.errors import DataError
from facekd.io.verification import read_verification_bin, write_verification_bin


def png(seed: int) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    ok, buffer = cv2.imencode(".png", image)
    assert ok
    return buffer.tobytes()


IMAGES = [png(i) for i in range(6)]
ISSAME = [True, False, True]


def test_round_trip(tmp_path):
    path = tmp_path / "lfw.bin"
    write_verification_bin(path, IMAGES, ISSAME)
    data = read_verification_bin(path)
    assert data.images == IMAGES
    assert data.issame.dtype == bool and data.issame.tolist() == ISSAME
    assert len(data) == 3
    assert data.pair(1) == (IMAGES[2], IMAGES[3], False)
    decoded = cv2.imdecode(np.frombuffer(data.images[0], np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (6, 6, 3)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_reads_pickles_of_every_protocol_python3_writes(tmp_path, protocol):
    # protocol 2 from Python 3 encodes bytes through _codecs.encode / bytes() / bytearray()
    path = tmp_path / "set.bin"
    images = IMAGES[:2] + [bytearray(IMAGES[2]), IMAGES[3]]
    path.write_bytes(pickle.dumps((images, [True, 0]), protocol=protocol))
    data = read_verification_bin(path)
    assert data.images == IMAGES[:4] and all(type(image) is bytes for image in data.images)
    assert data.issame.tolist() == [True, False]


def test_reads_python2_style_pickle(tmp_path):
    # what Python 2's pickle.dump(..., protocol=2) writes for (list of str, list of bool):
    # SHORT_BINSTRING opcodes, which only encoding="bytes" turns into bytes
    images = [b"\x89PNGaaa", b"\xff\xd8jpeg"]
    strings = b"".join(b"U" + bytes([len(image)]) + image for image in images)
    raw = b"\x80\x02]q\x00(" + strings + b"e]q\x01\x88a\x86q\x02."
    assert pickle.loads(raw, encoding="bytes") == (images, [True])  # the stream is well formed
    path = tmp_path / "py2.bin"
    path.write_bytes(raw)
    data = read_verification_bin(path)
    assert data.images == images and data.issame.tolist() == [True]


@pytest.mark.parametrize("payload, refused", [
    (([b"a", b"b"], collections.OrderedDict()), "collections.OrderedDict"),
    (([b"a", b"b"], [datetime.date(2020, 1, 2)]), "datetime.date"),
    (([b"a", b"b"], np.array([True])), "numpy"),
])
def test_refuses_any_global(tmp_path, payload, refused):
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(DataError) as info:
        read_verification_bin(path)
    message = str(info.value)
    assert str(path) in message and "refused to unpickle" in message and refused in message
    assert "may only hold bytes, lists, tuples and bools" in message


def test_refuses_a_callable_global_without_calling_it(tmp_path):
    # GLOBAL 'os getcwd' + EMPTY_TUPLE + REDUCE: harmless even if it ran, but must be refused
    path = tmp_path / "call.bin"
    path.write_bytes(b"\x80\x02cos\ngetcwd\n)R.")
    with pytest.raises(DataError, match="refused to unpickle os.getcwd"):
        read_verification_bin(path)


def test_byte_stand_ins_refuse_other_arguments(tmp_path):
    # _codecs.encode called with a non-latin-1 codec must not reach the real codec machinery
    path = tmp_path / "codec.bin"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R.")
    with pytest.raises(DataError, match="refused a byte-string constructor"):
        read_verification_bin(path)


def test_truncated_and_garbage_files(tmp_path):
    good = pickle.dumps((IMAGES, ISSAME), protocol=4)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="truncated.bin: not a verification .bin or truncated"):
        read_verification_bin(truncated)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n not a pickle at all")
    with pytest.raises(DataError, match="not a verification .bin"):
        read_verification_bin(garbage)
    huge_claim = tmp_path / "claim.bin"  # BINBYTES8 announcing 2**40 bytes, then nothing
    huge_claim.write_bytes(b"\x80\x04\x8e" + (2 ** 40).to_bytes(8, "little"))
    with pytest.raises(DataError, match="claim.bin: not a verification .bin"):
        read_verification_bin(huge_claim)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        read_verification_bin(empty)
    with pytest.raises(DataError, match="not found"):
        read_verification_bin(tmp_path / "absent.bin")


@pytest.mark.parametrize("payload, expected", [
    ([b"a", b"b", [True]], "expected a pickled pair (images, issame), found list of length 3"),
    ({"images": 1}, "found dict"),
    ((b"ab", [True]), "images must be a list of encoded images, found bytes"),
    (([b"a", b"b"], True), "issame must be a list of bools"),
    (([b"a", "b"], [True]), "image 1 is a str, expected encoded image bytes"),
    (([b"a", b""], [True]), "image 1 is empty"),
    (([b"a", b"b"], [2]), "issame[0] is 2, expected a bool"),
    (([b"a", b"b"], ["yes"]), "issame[0] is 'yes'"),
    (([], []), "holds no pairs"),
    (([b"a", b"b", b"c"], [True, False]), "3 images for 2 pairs (expected 4)"),
])
def test_wrong_structure(tmp_path, payload, expected):
    path = tmp_path / "odd.bin"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(DataError) as info:
        read_verification_bin(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_write_validates_and_is_atomic(tmp_path):
    path = tmp_path / "out.bin"
    write_verification_bin(path, IMAGES[:2], np.array([True]))
    before = path.read_bytes()
    with pytest.raises(DataError, match="3 images for 1 pairs"):
        write_verification_bin(path, IMAGES[:3], [False])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
