"""The crash journal of a batch job: every batch's results appended as they are made.

File layout: the line `facekd journal v2\n`, a uint32 (little-endian) length and that many
bytes of JSON (the job's identity: kind, model, input size, vector length...), then records:
uint32 path length, uint32 CRC-32 of (path + values), the path (UTF-8), `dim` float32 values.
A record is only trusted whole and with its CRC; a torn tail (a crash mid-write) is cut off
when the journal is reopened. Records are flushed after every batch (a killed process loses
nothing written) and fsynced at most every `SYNC_SECONDS` and on close (a power cut loses at
most that much work)."""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np

from facekd.errors import DataError

__all__ = ["Journal"]

MAGIC = b"facekd journal v2\n"
_RECORD = struct.Struct("<II")
SYNC_SECONDS = 2.0


def _encode(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


class Journal:
    """Append-only (path → float32 vector) records; `index` maps each path to its values'
    offset, so `values(path)` reads them back without holding them in memory."""

    def __init__(self, path: Path, identity: dict, resume: bool):
        self.path = Path(path)
        self.identity = dict(identity)
        self.dim = int(identity["dim"])
        self.index: dict[str, int] = {}
        header = MAGIC + struct.pack("<I", len(blob := json.dumps(self.identity, sort_keys=True).encode())) + blob
        existing = self._scan(header) if resume else None
        if existing is None:
            self._handle = open(self.path, "wb")
            self._handle.write(header)
            self._sync()
        else:
            self._handle = open(self.path, "r+b")
            self._handle.truncate(existing)
            self._handle.seek(existing)
        self._reader = None
        self._last_sync = time.monotonic()

    def _scan(self, header: bytes) -> int | None:
        """Index an existing journal; returns where its trusted records end (None: start anew)."""
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            return None
        except OSError as error:
            raise DataError(self.path, f"cannot read the job journal: {error.strerror or error}") from None
        with handle:
            start = handle.read(len(header))
            if not start.startswith(MAGIC):
                return None
            if start != header:
                self._refuse(start + handle.read(1 << 16))
            position, value_bytes = len(header), 4 * self.dim
            while len(fixed := handle.read(_RECORD.size)) == _RECORD.size:
                path_length, crc = _RECORD.unpack(fixed)
                body = handle.read(path_length + value_bytes)
                if path_length == 0 or len(body) != path_length + value_bytes or zlib.crc32(body) != crc:
                    break
                self.index[body[:path_length].decode("utf-8", "surrogateescape")] = \
                    position + _RECORD.size + path_length
                position += _RECORD.size + len(body)
        return position

    def _refuse(self, start: bytes) -> None:
        """A journal of another job: say which of its settings differ."""
        try:
            (length,) = struct.unpack_from("<I", start, len(MAGIC))
            found = json.loads(start[len(MAGIC) + 4:len(MAGIC) + 4 + length])
            differing = sorted(k for k in set(found) | set(self.identity) if found.get(k) != self.identity.get(k))
        except (struct.error, ValueError, TypeError, AttributeError):
            differing = ["header"]
        raise DataError(self.path, f"belongs to a different job (its {', '.join(differing)} differ); "
                                   "run without --resume to start over")

    def append(self, rows: list[tuple[str, np.ndarray]]) -> None:
        """Add (path, values) rows and flush them to the OS."""
        chunks = []
        offset = self._handle.tell()
        for path, values in rows:
            name = _encode(path)
            body = name + np.asarray(values, dtype="<f4").reshape(self.dim).tobytes()
            chunks.append(_RECORD.pack(len(name), zlib.crc32(body)) + body)
            offset += _RECORD.size + len(name)
            self.index[path] = offset
            offset += 4 * self.dim
        self._handle.write(b"".join(chunks))
        self._handle.flush()
        if time.monotonic() - self._last_sync >= SYNC_SECONDS:
            self._sync()

    def _sync(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._last_sync = time.monotonic()

    def values(self, path: str) -> np.ndarray:
        """The float32 values recorded for `path` (KeyError if none)."""
        offset = self.index[path]
        if self._reader is None:
            self._handle.flush()
            self._reader = open(self.path, "rb")
        self._reader.seek(offset)
        return np.frombuffer(self._reader.read(4 * self.dim), dtype="<f4").astype(np.float32)

    def close(self) -> None:
        if not self._handle.closed:
            self._sync()
            self._handle.close()
        if self._reader is not None:
            self._reader.close()

    def remove(self) -> None:
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
