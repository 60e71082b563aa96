"""insightface verification sets (`lfw.bin`, `agedb_30.bin`, ...): a pickled pair
(list of encoded images, list of issame bools); pair i is images 2i and 2i+1.

The files are read with a restricted unpickler that builds only bytes, strings, numbers,
bools, lists and tuples, so a `.bin` can never run code. Python 2 wrote the originals
(their `str` becomes `bytes` with encoding="bytes"); Python 3 pickles of protocol < 3 encode
bytes through `_codecs.encode` and `bytes()`/`bytearray()`, which are replaced by type-checked
stand-ins that can only turn a latin-1 string into bytes. Every other global is refused.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from facekd.errors import DataError
from facekd.io.atomic import atomic_write
from facekd.io.formats import require_file

_REFUSAL = ".bin files may only hold bytes, lists, tuples and bools"
_LATIN1_NAMES = {"latin1", "latin_1", "latin-1", "iso-8859-1", "iso8859-1", "iso8859_1", "l1"}


@dataclass
class VerificationSet:
    """Encoded images and, for pair i = (images[2i], images[2i+1]), whether it is one identity."""

    images: list[bytes]
    issame: np.ndarray

    def __len__(self) -> int:
        return len(self.issame)

    def pair(self, index: int) -> tuple[bytes, bytes, bool]:
        return self.images[2 * index], self.images[2 * index + 1], bool(self.issame[index])


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves no global except latin-1 → bytes stand-ins."""

    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data), encoding="bytes")
        self._path = path

    def _as_bytes(self, *args: Any) -> bytes:
        """Stand-in for `_codecs.encode(text, 'latin1')`, `bytes(...)` and `bytearray(...)`."""
        if not args:
            return b""
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
            return bytes(args[0])
        if (len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], (str, bytes))
                and (args[1].decode("ascii", "replace") if isinstance(args[1], bytes) else args[1]).lower()
                in _LATIN1_NAMES):
            try:
                return args[0].encode("latin-1")
            except UnicodeEncodeError:
                pass
        raise DataError(self._path, f"refused a byte-string constructor with arguments of types "
                                    f"{[type(a).__name__ for a in args]}: {_REFUSAL}")

    def find_class(self, module: str, name: str) -> Callable[..., bytes]:
        if (module, name) in {("_codecs", "encode"), ("builtins", "bytes"), ("__builtin__", "bytes"),
                              ("builtins", "bytearray"), ("__builtin__", "bytearray")}:
            return self._as_bytes
        raise DataError(self._path, f"refused to unpickle {module}.{name}: {_REFUSAL}")


def _load(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror or exc}") from None
    if not data:
        raise DataError(path, "empty file")
    try:
        return _RestrictedUnpickler(data, path).load()
    except DataError:
        raise
    except MemoryError:
        raise DataError(path, "not a verification .bin (its pickle asks for more memory than exists)") from None
    except Exception as exc:  # pickle raises many types on garbage: all mean "not a valid file"
        raise DataError(path, f"not a verification .bin or truncated ({type(exc).__name__}: {exc})") from None


def _validate(path: Path, loaded: Any) -> VerificationSet:
    if not isinstance(loaded, (tuple, list)) or len(loaded) != 2:
        raise DataError(path, f"expected a pickled pair (images, issame), found {type(loaded).__name__}"
                              + (f" of length {len(loaded)}" if isinstance(loaded, (tuple, list)) else ""))
    images, issame = loaded
    if not isinstance(images, (list, tuple)):
        raise DataError(path, f"images must be a list of encoded images, found {type(images).__name__}")
    if not isinstance(issame, (list, tuple)):
        raise DataError(path, f"issame must be a list of bools, found {type(issame).__name__}")
    for index, image in enumerate(images):
        if not isinstance(image, (bytes, bytearray)):
            raise DataError(path, f"image {index} is a {type(image).__name__}, expected encoded image bytes")
        if not image:
            raise DataError(path, f"image {index} is empty")
    flags = []
    for index, value in enumerate(issame):
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            flags.append(bool(value))
        else:
            raise DataError(path, f"issame[{index}] is {value!r}, expected a bool (or 0/1)")
    if not flags:
        raise DataError(path, "holds no pairs")
    if len(images) != 2 * len(flags):
        raise DataError(path, f"{len(images)} images for {len(flags)} pairs (expected {2 * len(flags)})")
    return VerificationSet([bytes(image) for image in images], np.asarray(flags, dtype=bool))


def read_verification_bin(path: str | os.PathLike) -> VerificationSet:
    """Load an insightface verification `.bin` safely and check its structure."""
    path = require_file(path, "verification .bin")
    return _validate(path, _load(path))


def write_verification_bin(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write a verification `.bin` (pickle protocol 4 of (list of bytes, list of bools)), atomically."""
    path = Path(path)
    checked = _validate(path, (list(images), [bool(v) if isinstance(v, np.bool_) else v for v in issame]))
    with atomic_write(path, "wb") as handle:
        pickle.dump((checked.images, [bool(v) for v in checked.issame]), handle, protocol=4)
