"""insightface RecordIO (`train.rec` + `train.idx`) read and written without mxnet.

On disk (dmlc-core recordio): each record is `uint32 magic 0xced7230a`, `uint32 lrecord`
(upper 3 bits: continuation flag, lower 29 bits: length), the data, zero padding to 4 bytes.
A payload holding the magic at a 4-byte-aligned position is split there into parts
(flag 1 = first, 2 = middle, 3 = last; the magic itself is dropped and restored on read).
The `.idx` file holds one `key<TAB>offset` line per record.

A payload (mxnet `recordio.pack`) is the header `struct.pack('<IfQQ', flag, label, id, id2)`,
then `flag` float32 labels when flag > 0, then the encoded image.

insightface layout: key 0 is a header record (flag 2, labels = (first identity key, end key),
no image); keys 1..N are images whose float label is the identity; keys [first, end) are one
record per identity with labels = (its first image key, end image key).
"""

from __future__ import annotations

import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from facekd.errors import DataError
from facekd.io.atomic import atomic_write, atomic_write_text
from facekd.io.formats import line_error, read_text, require_file
from facekd.progress import Progress

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_RECORD_HEAD = struct.Struct("<II")
_LENGTH_MASK = (1 << 29) - 1
_MAX_RECORD = _LENGTH_MASK
_IR = struct.Struct("<IfQQ")
_FLOAT32_EXACT = 1 << 24  # whole numbers above this are not exact in a float32 label
_QUICK_LABELS = 4  # labels read by the fast header path before falling back to a full read


class IRHeader(NamedTuple):
    """mxnet's image-record header. `label` is a float when flag == 0, else a tuple of floats."""

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


def _padded(length: int) -> int:
    return (length + 3) & ~3


def pack_record(label: float | Sequence[float], image: bytes = b"", id: int = 0, id2: int = 0) -> bytes:
    """A payload: header, labels when `label` is a sequence, then the image bytes."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        head = _IR.pack(0, float(label), id, id2)
        extra = b""
    else:
        values = np.asarray(label, dtype="<f4").ravel()
        head = _IR.pack(len(values), 0.0, id, id2)
        extra = values.tobytes()
    return head + extra + bytes(image)


def unpack_record(payload: bytes, source: str | os.PathLike = "record", key: int | None = None
                  ) -> tuple[IRHeader, bytes]:
    """Split a payload into its header and the image bytes."""
    where = "" if key is None else f"key {key}: "
    if len(payload) < _IR.size:
        raise DataError(source, f"{where}record of {len(payload)} bytes is shorter than the "
                                f"{_IR.size}-byte image-record header")
    flag, label, ident, ident2 = _IR.unpack_from(payload)
    start = _IR.size
    if flag > 0:
        end = start + 4 * flag
        if end > len(payload):
            raise DataError(source, f"{where}header announces {flag} labels but the record "
                                    f"holds only {len(payload)} bytes")
        label = tuple(float(v) for v in np.frombuffer(payload, dtype="<f4", count=flag, offset=start))
        start = end
    return IRHeader(flag, label, ident, ident2), payload[start:]


def encode_record(payload: bytes) -> bytes:
    """The on-disk bytes of one record, split into parts wherever the magic is aligned."""
    if len(payload) > _MAX_RECORD:
        raise ValueError(f"record of {len(payload)} bytes exceeds the RecordIO limit of {_MAX_RECORD}")
    parts = []
    start = 0
    found = payload.find(_MAGIC_BYTES)
    while found != -1:
        if found % 4 == 0:
            parts.append(payload[start:found])
            start = found + 4
            found = payload.find(_MAGIC_BYTES, start)
        else:
            found = payload.find(_MAGIC_BYTES, found + 1)
    parts.append(payload[start:])
    chunks = []
    for number, part in enumerate(parts):
        if len(parts) == 1:
            flag = 0
        else:
            flag = 1 if number == 0 else 3 if number == len(parts) - 1 else 2
        chunks.append(_RECORD_HEAD.pack(MAGIC, (flag << 29) | len(part)))
        chunks.append(part)
        chunks.append(b"\0" * (_padded(len(part)) - len(part)))
    return b"".join(chunks)


class RecordIOReader:
    """Random access to the records of a `.rec` file through its `.idx`.

    Reads use `os.pread` on a descriptor opened lazily in each process, so one reader can be
    shared by threads and pickled into DataLoader workers."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = require_file(rec_path, "RecordIO file")
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        require_file(self.idx_path, f"RecordIO index (expected beside {self.rec_path.name})")
        self._size = os.path.getsize(self.rec_path)
        self._keys, self._sorted_keys, self._sorted_offsets = self._read_index()
        self._fd: int | None = None
        self._fd_pid: int | None = None
        self._lock = threading.Lock()

    # -- index

    def _read_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys: list[int] = []
        offsets: list[int] = []
        lines: list[int] = []
        for number, raw in enumerate(read_text(self.idx_path, "RecordIO index").splitlines(), start=1):
            fields = raw.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise line_error(self.idx_path, number, f"expected 'key<TAB>offset', got {raw.strip()!r}")
            try:
                key, offset = int(fields[0]), int(fields[1])
            except ValueError:
                raise line_error(self.idx_path, number,
                                 f"key and offset must be integers, got {raw.strip()!r}") from None
            if key < 0 or offset < 0:
                raise line_error(self.idx_path, number, "key and offset must not be negative")
            if offset + _RECORD_HEAD.size > self._size:
                raise line_error(self.idx_path, number,
                                 f"offset {offset} of key {key} lies beyond the end of "
                                 f"{self.rec_path.name} ({self._size} bytes): truncated or mismatched .rec")
            keys.append(key)
            offsets.append(offset)
            lines.append(number)
        if not keys:
            raise DataError(self.idx_path, "index holds no records")
        key_array = np.asarray(keys, dtype=np.int64)
        order = np.argsort(key_array, kind="stable")
        sorted_keys = key_array[order]
        repeats = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if repeats.size:
            first, second = lines[order[repeats[0]]], lines[order[repeats[0] + 1]]
            raise line_error(self.idx_path, second,
                             f"key {int(sorted_keys[repeats[0]])} repeats (first on line {first})")
        return key_array, sorted_keys, np.asarray(offsets, dtype=np.int64)[order]

    @property
    def keys(self) -> list[int]:
        """Keys in the order of the index file."""
        return self._keys.tolist()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        try:
            self.offset(key)  # type: ignore[arg-type]
        except (DataError, TypeError, ValueError):
            return False
        return True

    def has_keys(self, keys: np.ndarray) -> np.ndarray:
        """Boolean mask: which of `keys` the index holds."""
        keys = np.asarray(keys, dtype=np.int64)
        at = np.clip(np.searchsorted(self._sorted_keys, keys), 0, len(self._sorted_keys) - 1)
        return self._sorted_keys[at] == keys

    def offset(self, key: int) -> int:
        """Byte offset of record `key` in the `.rec` file."""
        key = int(key)
        at = int(np.searchsorted(self._sorted_keys, key))
        if at >= len(self._sorted_keys) or self._sorted_keys[at] != key:
            raise DataError(self.idx_path, f"key {key} is not in the index")
        return int(self._sorted_offsets[at])

    # -- file access

    def _descriptor(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._fd_pid != pid:
            with self._lock:
                if self._fd is None or self._fd_pid != pid:
                    try:
                        self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                    except OSError as exc:
                        raise DataError(self.rec_path, f"cannot open: {exc.strerror or exc}") from None
                    self._fd_pid = pid
        return self._fd

    def _pread(self, size: int, offset: int) -> bytes:
        fd = self._descriptor()
        try:
            if hasattr(os, "pread"):
                return os.pread(fd, size, offset)
            with self._lock:  # no pread (Windows): serialize seek + read
                os.lseek(fd, offset, os.SEEK_SET)
                return os.read(fd, size)
        except OSError as exc:
            raise DataError(self.rec_path, f"cannot read at offset {offset}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd = self._fd_pid = None

    def __enter__(self) -> "RecordIOReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_fd=None, _fd_pid=None, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- records

    def _part_head(self, key: int, position: int) -> tuple[int, int]:
        head = self._pread(_RECORD_HEAD.size, position)
        if len(head) < _RECORD_HEAD.size:
            raise DataError(self.rec_path, f"key {key}: record at offset {position} lies past the end "
                                           f"of the file ({self._size} bytes): the file is truncated")
        magic, lrecord = _RECORD_HEAD.unpack(head)
        if magic != MAGIC:
            raise DataError(self.rec_path, f"key {key}: no record at offset {position} (magic "
                                           f"0x{magic:08x}, expected 0x{MAGIC:08x}): the file is "
                                           f"corrupt or {self.idx_path.name} does not belong to it")
        return lrecord >> 29, lrecord & _LENGTH_MASK

    def read(self, key: int) -> bytes:
        """The payload of record `key`, its parts joined."""
        position = self.offset(key)
        chunks: list[bytes] = []
        while True:
            flag, length = self._part_head(key, position)
            if flag > 3:
                raise DataError(self.rec_path, f"key {key}: invalid continuation flag {flag} at offset {position}")
            if not chunks and flag in (2, 3):
                raise DataError(self.rec_path, f"key {key}: record at offset {position} starts "
                                               "with a continuation part")
            if chunks and flag in (0, 1):
                raise DataError(self.rec_path, f"key {key}: multi-part record broken at offset "
                                               f"{position} (a new record starts before the last part)")
            data = self._pread(length, position + _RECORD_HEAD.size)
            if len(data) < length:
                raise DataError(self.rec_path, f"key {key}: record at offset {position} claims "
                                               f"{length} bytes but the file ends after {len(data)}: "
                                               "the file is truncated")
            if chunks:
                chunks.append(_MAGIC_BYTES)
            chunks.append(data)
            if flag in (0, 3):
                return b"".join(chunks)
            position += _RECORD_HEAD.size + _padded(length)

    def unpack(self, key: int) -> tuple[IRHeader, bytes]:
        """The header and the image bytes of record `key`."""
        return unpack_record(self.read(key), self.rec_path, key)

    def unpack_header(self, key: int) -> IRHeader:
        """The header of record `key`, reading only its first bytes when possible."""
        position = self.offset(key)
        head = self._pread(_RECORD_HEAD.size + _IR.size + 4 * _QUICK_LABELS, position)
        if len(head) >= _RECORD_HEAD.size + _IR.size:
            magic, lrecord = _RECORD_HEAD.unpack_from(head)
            length = lrecord & _LENGTH_MASK
            body = head[_RECORD_HEAD.size:_RECORD_HEAD.size + length]
            complete = position + _RECORD_HEAD.size + length <= self._size
            if magic == MAGIC and lrecord >> 29 == 0 and complete and len(body) >= _IR.size:
                flag = _IR.unpack_from(body)[0]
                if _IR.size + 4 * flag <= len(body):
                    return unpack_record(body, self.rec_path, key)[0]
        return self.unpack(key)[0]  # multi-part, long label or broken: the full path explains


def _whole_number(value: float) -> int | None:
    """`value` as an int when it is a finite whole number, else None."""
    if not math.isfinite(value) or value != math.floor(value):
        return None
    return int(value)


def _first_label(header: IRHeader) -> float:
    return header.label if header.flag == 0 else header.label[0]  # type: ignore[index, return-value]


@dataclass
class RecordIODataset:
    """Images of an insightface `.rec`: `image_keys[i]` holds an image of class `labels[i]`."""

    reader: RecordIOReader
    image_keys: np.ndarray
    labels: np.ndarray
    num_classes: int
    has_header: bool

    def __len__(self) -> int:
        return len(self.image_keys)

    def image_bytes(self, index: int) -> bytes:
        """The encoded image of the index-th image."""
        key = int(self.image_keys[index])
        _, image = self.reader.unpack(key)
        if not image:
            raise DataError(self.reader.rec_path, f"key {key}: record holds no image data")
        return image


def read_insightface_dataset(rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None,
                             progress: Progress | None = None) -> RecordIODataset:
    """Open an insightface `.rec`/`.idx` pair and read every image's label.

    With a header record at key 0 (flag ≥ 2, no image) the images are keys 1..first-1 and the
    class count is end - first; otherwise every key is an image and the class count is the
    largest label + 1."""
    progress = progress or Progress()
    reader = RecordIOReader(rec_path, idx_path)
    rec = reader.rec_path
    header_range: tuple[int, int] | None = None
    if 0 in reader:
        header, rest = reader.unpack(0)
        if header.flag >= 2 and not rest:
            first, end = (_whole_number(v) for v in header.label[:2])  # type: ignore[index]
            if first is None or end is None or first < 1 or end < first:
                raise DataError(rec, f"key 0: header record labels {header.label[:2]} are not a "  # type: ignore[index]
                                     "valid (first identity key, end key) range")
            header_range = (first, end)
    if header_range is not None:
        image_keys = np.arange(1, header_range[0], dtype=np.int64)
        if not len(image_keys):
            raise DataError(rec, "header record declares no images")
        present = reader.has_keys(image_keys)
        if not present.all():
            missing = image_keys[~present]
            raise DataError(reader.idx_path, f"header record declares images at keys 1..{header_range[0] - 1} "
                                             f"but {len(missing)} are missing from the index, e.g. key {missing[0]}")
        num_classes = header_range[1] - header_range[0]
    else:
        image_keys = np.asarray(reader.keys, dtype=np.int64)
        num_classes = 0
    labels = np.empty(len(image_keys), dtype=np.int64)
    for i, key in enumerate(progress.track(image_keys.tolist(), "reading labels")):
        value = _first_label(reader.unpack_header(key))
        label = _whole_number(value)
        if label is None or label < 0:
            raise DataError(rec, f"key {key}: label {value!r} is not a whole number ≥ 0")
        if header_range is not None and label >= num_classes:
            raise DataError(rec, f"key {key}: label {label} is out of range: the header record "
                                 f"declares {num_classes} identities")
        labels[i] = label
    if header_range is None:
        num_classes = int(labels.max()) + 1
    return RecordIODataset(reader, image_keys, labels, num_classes, header_range is not None)


def write_records(rec_path: str | os.PathLike, idx_path: str | os.PathLike,
                  payloads: Iterable[tuple[int, bytes]]) -> int:
    """Write (key, payload) records and their index; both files appear only on success.

    Returns the number of records written."""
    rec_path, idx_path = Path(rec_path), Path(idx_path)
    seen: set[int] = set()
    count = 0
    # The inner file is renamed into place first: the .rec, then its .idx, so an index never
    # describes records that are not there yet.
    with atomic_write(idx_path, "w", encoding="ascii", newline="") as idx, atomic_write(rec_path, "wb") as rec:
        offset = 0
        for key, payload in payloads:
            key = int(key)
            if key < 0 or key in seen:
                raise DataError(rec_path, f"key {key} is negative or written twice")
            seen.add(key)
            try:
                data = encode_record(bytes(payload))
            except ValueError as exc:
                raise DataError(rec_path, f"key {key}: {exc}") from None
            rec.write(data)
            idx.write(f"{key}\t{offset}\n")
            offset += len(data)
            count += 1
    return count


def _image_size(path: Path, image_size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from one int or a pair; anything else is refused."""
    try:
        sizes = [int(image_size)] * 2 if np.ndim(image_size) == 0 else [int(v) for v in image_size]  # type: ignore[arg-type, union-attr]
    except (TypeError, ValueError):
        sizes = []
    if len(sizes) != 2 or min(sizes) <= 0:
        raise DataError(path, f"image_size must be a positive int or (height, width), got {image_size!r}")
    return sizes[0], sizes[1]


def write_insightface_dataset(rec_path: str | os.PathLike, items: Iterable[tuple[int, bytes]],
                              progress: Progress | None = None, image_size: int | Sequence[int] | None = None,
                              idx_path: str | os.PathLike | None = None) -> tuple[int, int]:
    """Write (label, encoded image) items, ordered by label, in insightface layout.

    Labels must be whole numbers ≥ 0 in non-decreasing order (unsorted input is refused, not
    sorted: items are streamed); a label with no image gets an empty identity record. The
    header record is written last in the file (key 0 all the same). With `image_size`
    ((height, width) or one int) a `property` file `num_classes,height,width` is written beside.
    Returns (number of images, number of classes)."""
    progress = progress or Progress()
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path is not None else rec_path.with_suffix(".idx")
    counts = {"images": 0, "classes": 0}

    def records() -> Iterable[tuple[int, bytes]]:
        starts: list[int] = []  # first image key of each label
        previous = 0
        key = 0
        for number, (label, image) in enumerate(progress.track(items, "writing records")):
            try:
                label = int(label) if float(label) == int(label) else None
            except (TypeError, ValueError, OverflowError):
                label = None
            if label is None or label < 0:
                raise DataError(rec_path, f"item {number}: label must be a whole number ≥ 0")
            if label < previous:
                raise DataError(rec_path, f"item {number}: label {label} follows label {previous}; "
                                          "items must be ordered by label")
            key += 1
            if label + 1 + key > _FLOAT32_EXACT:
                raise DataError(rec_path, f"item {number}: label {label} is too large: insightface stores record "
                                          f"keys as float32 (labels must be 0..N-1 class indices)")
            starts.extend([key] * (label + 1 - len(starts)))
            previous = label
            yield key, pack_record(float(label), bytes(image), id=key)
        if key == 0:
            raise DataError(rec_path, "no images to write")
        first = key + 1
        end = first + len(starts)
        if end > _FLOAT32_EXACT:
            raise DataError(rec_path, f"{end} records exceed what insightface's float32 labels "
                                      f"hold exactly ({_FLOAT32_EXACT})")
        bounds = starts + [first]
        for label in range(len(starts)):
            yield first + label, pack_record((bounds[label], bounds[label + 1]), id=first + label)
        yield 0, pack_record((first, end))
        counts.update(images=key, classes=len(starts))

    size = _image_size(rec_path, image_size) if image_size is not None else None
    write_records(rec_path, idx_path, records())
    if size is not None:
        height, width = size
        atomic_write_text(rec_path.parent / "property", f"{counts['classes']},{height},{width}\n")
    return counts["images"], counts["classes"]
