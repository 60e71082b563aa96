from __future__ import annotations

import pickle
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from facekd.errors import DataError
from facekd.io.recordio import (MAGIC, IRHeader, RecordIOReader, encode_record, pack_record,
                                read_insightface_dataset, unpack_record, write_insightface_dataset,
                                write_records)

MAGIC_BYTES = struct.pack("<I", MAGIC)


def png(seed: int, size: int = 8) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    ok, buffer = cv2.imencode(".png", image)
    assert ok
    return buffer.tobytes()


def raw_record(payload: bytes, flag: int = 0) -> bytes:
    """One on-disk part written by hand (independent of the module's encoder)."""
    pad = (-len(payload)) % 4
    return struct.pack("<II", MAGIC, (flag << 29) | len(payload)) + payload + b"\0" * pad


def write_raw(tmp_path: Path, records: list[tuple[int, bytes]], name: str = "raw") -> Path:
    """Write hand-made on-disk records and an .idx with their offsets."""
    rec = tmp_path / f"{name}.rec"
    offsets, blob = [], b""
    for key, data in records:
        offsets.append(f"{key}\t{len(blob)}\n")
        blob += data
    rec.write_bytes(blob)
    rec.with_suffix(".idx").write_text("".join(offsets))
    return rec


@pytest.fixture
def dataset(tmp_path):
    """6 images, labels 0..3: label 1 has no image, label 3 has three."""
    items = [(0, png(0)), (0, png(1)), (2, png(2)), (3, png(3)), (3, png(4)), (3, png(5))]
    rec = tmp_path / "train.rec"
    counts = write_insightface_dataset(rec, items, image_size=(8, 8))
    return rec, items, counts


def test_insightface_round_trip(dataset, tmp_path):
    rec, items, counts = dataset
    assert counts == (6, 4)
    assert (tmp_path / "train.idx").is_file()
    assert (tmp_path / "property").read_text().strip() == "4,8,8"
    data = read_insightface_dataset(rec)
    assert data.has_header and data.num_classes == 4 and len(data) == 6
    assert data.image_keys.tolist() == [1, 2, 3, 4, 5, 6]
    assert data.labels.dtype == np.int64
    assert data.labels.tolist() == [label for label, _ in items]
    for i, (_, image) in enumerate(items):
        assert data.image_bytes(i) == image
        decoded = cv2.imdecode(np.frombuffer(data.image_bytes(i), np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape == (8, 8, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_insightface_layout_header_and_identity_records(dataset):
    rec, _, _ = dataset
    reader = RecordIOReader(rec)
    header, rest = reader.unpack(0)
    assert rest == b""
    assert header.flag == 2 and header.label == (7.0, 11.0)  # identities at keys 7..10
    # identity records: image key ranges [start, end) per label; label 1 has none
    ranges = [reader.unpack(key)[0].label for key in range(7, 11)]
    assert ranges == [(1.0, 3.0), (3.0, 3.0), (3.0, 4.0), (4.0, 7.0)]
    image_header, image = reader.unpack(4)
    assert image_header == IRHeader(0, 3.0, 4, 0) and image[:4] == b"\x89PNG"
    assert sorted(reader.keys) == list(range(11))


def test_reader_is_picklable_and_reads_after_unpickling(dataset):
    rec, items, _ = dataset
    data = read_insightface_dataset(rec)
    assert data.image_bytes(0) == items[0][1]  # opens the descriptor
    clone = pickle.loads(pickle.dumps(data))
    assert clone.image_bytes(5) == items[5][1]
    assert clone.labels.tolist() == data.labels.tolist()
    data.reader.close()
    assert data.image_bytes(2) == items[2][1]  # reopens lazily after close


def test_write_refuses_unsorted_and_bad_labels(tmp_path):
    rec = tmp_path / "train.rec"
    with pytest.raises(DataError, match="item 2: label 0 follows label 1; items must be ordered by label"):
        write_insightface_dataset(rec, [(0, png(0)), (1, png(1)), (0, png(2))])
    with pytest.raises(DataError, match="item 0: label must be a whole number"):
        write_insightface_dataset(rec, [(1.5, png(0))])
    with pytest.raises(DataError, match="no images to write"):
        write_insightface_dataset(rec, [])
    with pytest.raises(DataError, match="image_size"):
        write_insightface_dataset(rec, [(0, png(0))], image_size=(0, 3))
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_multipart_record_written_and_read(tmp_path):
    # the magic at aligned offsets 0, 8 and 12 splits the payload into parts; at 5 it does not
    payload = MAGIC_BYTES + b"abcd" + MAGIC_BYTES + MAGIC_BYTES + b"x" + MAGIC_BYTES + b"yz"
    encoded = encode_record(payload)
    flags = []
    position = 0
    while position < len(encoded):
        magic, lrecord = struct.unpack_from("<II", encoded, position)
        assert magic == MAGIC
        flags.append(lrecord >> 29)
        position += 8 + ((lrecord & ((1 << 29) - 1)) + 3) // 4 * 4
    assert flags == [1, 2, 2, 3]
    rec, idx = tmp_path / "m.rec", tmp_path / "m.idx"
    write_records(rec, idx, [(0, b"before"), (1, payload), (2, b"after")])
    reader = RecordIOReader(rec)
    assert [reader.read(k) for k in (0, 1, 2)] == [b"before", payload, b"after"]


def test_multipart_record_crafted_by_hand(tmp_path):
    # parts "abcd" | "efgh" | "ij": the reader restores the magic between parts
    blob = raw_record(b"abcd", 1) + raw_record(b"efgh", 2) + raw_record(b"ij", 3) + raw_record(b"next")
    rec = tmp_path / "hand.rec"
    rec.write_bytes(blob)
    rec.with_suffix(".idx").write_text(f"0\t0\n1\t{len(blob) - 12}\n")
    reader = RecordIOReader(rec)
    assert reader.read(0) == b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES + b"ij"
    assert reader.read(1) == b"next"


def test_broken_multipart_records(tmp_path):
    rec = write_raw(tmp_path, [(0, raw_record(b"abcd", 2)), (1, raw_record(b"abcd", 1) + raw_record(b"ef", 0))])
    reader = RecordIOReader(rec)
    with pytest.raises(DataError, match="key 0: .*starts with a continuation part"):
        reader.read(0)
    with pytest.raises(DataError, match="key 1: multi-part record broken"):
        reader.read(1)


def test_corrupt_magic_names_file_key_and_offset(tmp_path):
    good = raw_record(pack_record(1.0, b"img"))
    bad = b"\x00\x11\x22\x33" + good[4:]
    rec = write_raw(tmp_path, [(0, good), (1, bad)])
    reader = RecordIOReader(rec)
    assert reader.unpack(0)[1] == b"img"
    with pytest.raises(DataError) as info:
        reader.read(1)
    message = str(info.value)
    assert str(rec) in message and "key 1" in message and f"offset {len(good)}" in message
    assert "magic 0x33221100" in message


def test_idx_offset_beyond_file(tmp_path):
    rec = write_raw(tmp_path, [(0, raw_record(b"data"))])
    size = rec.stat().st_size
    rec.with_suffix(".idx").write_text(f"0\t0\n1\t{size}\n")
    with pytest.raises(DataError, match=r"raw\.idx: line 2: offset \d+ of key 1 lies beyond the end"):
        RecordIOReader(rec)


def test_truncated_rec(dataset, tmp_path):
    rec, _, _ = dataset
    last_image = RecordIOReader(rec).offset(6)
    cut = last_image + 8 + 12  # header of key 6 intact, 12 bytes of its payload left
    rec.write_bytes(rec.read_bytes()[:cut])
    with pytest.raises(DataError, match="lies beyond the end of train.rec"):
        RecordIOReader(rec)  # the records after key 6 now point past the end
    idx = tmp_path / "train.idx"
    kept = [line for line in idx.read_text().splitlines() if int(line.split("\t")[1]) + 8 <= cut]
    idx.write_text("".join(line + "\n" for line in kept))
    reader = RecordIOReader(rec)
    assert 6 in reader and 0 not in reader
    with pytest.raises(DataError, match=r"train\.rec: key 6: record at offset \d+ claims \d+ bytes "
                                        r"but the file ends after 12"):
        reader.read(6)
    with pytest.raises(DataError, match="key 6: .*truncated"):
        reader.unpack_header(6)


@pytest.mark.parametrize("idx_text, expected", [
    ("0\t0\n1 2 3\n", "line 2: expected 'key<TAB>offset'"),
    ("0\t0\nx\t4\n", "line 2: key and offset must be integers"),
    ("0\t0\n\n0\t0\n", "line 3: key 0 repeats (first on line 1)"),
    ("0\t-4\n", "line 1: key and offset must not be negative"),
    ("\n\n", "index holds no records"),
])
def test_malformed_idx(tmp_path, idx_text, expected):
    rec = write_raw(tmp_path, [(0, raw_record(b"data") * 2)])
    rec.with_suffix(".idx").write_text(idx_text)
    with pytest.raises(DataError) as info:
        RecordIOReader(rec)
    assert str(rec.with_suffix(".idx")) in str(info.value) and expected in str(info.value)


def test_missing_files_and_unknown_key(tmp_path):
    rec = tmp_path / "train.rec"
    rec.write_bytes(raw_record(b"data"))
    with pytest.raises(DataError, match=r"train\.idx: RecordIO index .* not found"):
        RecordIOReader(rec)
    with pytest.raises(DataError, match="RecordIO file not found"):
        RecordIOReader(tmp_path / "absent.rec")
    rec.with_suffix(".idx").write_text("0\t0\n")
    reader = RecordIOReader(rec)
    assert len(reader) == 1 and 0 in reader and 7 not in reader
    with pytest.raises(DataError, match="key 7 is not in the index"):
        reader.read(7)


def test_no_header_record_falls_back_to_all_keys(tmp_path):
    images = [png(i) for i in range(4)]
    labels = [2, 0, 1, 2]
    rec, idx = tmp_path / "plain.rec", tmp_path / "plain.idx"
    write_records(rec, idx, [(key, pack_record(float(label), image, id=key))
                             for key, (label, image) in enumerate(zip(labels, images))])
    data = read_insightface_dataset(rec)
    assert not data.has_header
    assert data.image_keys.tolist() == [0, 1, 2, 3]
    assert data.labels.tolist() == labels and data.num_classes == 3
    assert [data.image_bytes(i) for i in range(4)] == images


def test_label_vector_uses_first_value(tmp_path):
    rec, idx = tmp_path / "v.rec", tmp_path / "v.idx"
    write_records(rec, idx, [(0, pack_record(0.0, png(0))), (1, pack_record([1.0, 9.5], png(1)))])
    data = read_insightface_dataset(rec)
    assert data.labels.tolist() == [0, 1]
    header, image = RecordIOReader(rec).unpack(1)
    assert header.flag == 2 and header.label == (1.0, 9.5) and image == png(1)


@pytest.mark.parametrize("label, expected", [(1.5, "key 1: label 1.5 is not a whole number"),
                                             (float("nan"), "key 1: label nan"),
                                             (-1.0, "key 1: label -1.0 is not a whole number ≥ 0")])
def test_bad_image_labels(tmp_path, label, expected):
    rec, idx = tmp_path / "bad.rec", tmp_path / "bad.idx"
    write_records(rec, idx, [(0, pack_record(0.0, png(0))), (1, pack_record(label, png(1)))])
    with pytest.raises(DataError) as info:
        read_insightface_dataset(rec)
    assert str(rec) in str(info.value) and expected in str(info.value)


def test_label_out_of_range_of_header(tmp_path):
    rec, idx = tmp_path / "r.rec", tmp_path / "r.idx"
    records = [(1, pack_record(0.0, png(0))), (2, pack_record(5.0, png(1))),
               (3, pack_record((1, 2))), (4, pack_record((2, 3))), (0, pack_record((3, 5)))]
    write_records(rec, idx, records)
    with pytest.raises(DataError, match="key 2: label 5 is out of range: the header record declares 2 identities"):
        read_insightface_dataset(rec)


def test_header_declaring_missing_image_keys(tmp_path):
    rec, idx = tmp_path / "h.rec", tmp_path / "h.idx"
    write_records(rec, idx, [(1, pack_record(0.0, png(0))), (0, pack_record((4, 5)))])
    with pytest.raises(DataError, match="keys 1..3 but 2 are missing from the index, e.g. key 2"):
        read_insightface_dataset(rec)


def test_short_payloads(tmp_path):
    rec, idx = tmp_path / "s.rec", tmp_path / "s.idx"
    truncated_labels = struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\0\0\0\0"
    write_records(rec, idx, [(0, b"tiny"), (1, truncated_labels)])
    reader = RecordIOReader(rec)
    with pytest.raises(DataError, match="key 0: record of 4 bytes is shorter than the 24-byte"):
        reader.unpack(0)
    with pytest.raises(DataError, match="key 1: header announces 3 labels but the record holds only 28 bytes"):
        reader.unpack_header(1)


def test_unpack_record_matches_pack_record():
    header, image = unpack_record(pack_record(7, b"jpegdata", id=3, id2=4))
    assert header == IRHeader(0, 7.0, 3, 4) and image == b"jpegdata"
    assert len(pack_record(7, b"")) == 24 and len(pack_record([1, 2, 3], b"")) == 36


def test_person_ids_as_labels_are_refused_before_any_work(tmp_path):
    from facekd.errors import DataError
    from facekd.io.recordio import write_insightface_dataset

    with pytest.raises(DataError, match="too large"):
        write_insightface_dataset(tmp_path / "train.rec", [(1_000_000_023, b"x")])
    assert list(tmp_path.iterdir()) == []
