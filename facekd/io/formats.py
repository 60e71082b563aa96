"""The field's plain-text dataset formats: quality-label CSVs, image lists, image folders,
identity folders and pairs files.

Paths inside a list file are relative to that file's folder, or absolute. Readers return
absolute paths (made absolute without resolving symlinks). Writers store a path relative to
the written file's folder when it lies inside that folder, and absolute otherwise, so the
file keeps working when its folder is moved together with the images in it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from facekd.errors import DataError
from facekd.io.atomic import atomic_write
from facekd.io.images import IMAGE_EXTENSIONS

LIST_EXTENSIONS = (".txt", ".lst")

# How many missing files an error message names before it only counts the rest.
_MISSING_SHOWN = 5

PathLike = str | os.PathLike


# --------------------------------------------------------------------------- shared helpers


def line_error(path: PathLike, line: int, reason: str) -> DataError:
    """The error for a bad line of a text file: "path: line N: reason"."""
    return DataError(path, f"line {line}: {reason}")


def absolute(path: PathLike) -> Path:
    """`path` made absolute and normalized, without resolving symlinks."""
    return Path(os.path.abspath(os.fspath(path)))


def resolve_relative(list_file: PathLike, entry: str) -> Path:
    """An entry of a list file: absolute as is, else relative to the list file's folder."""
    entry_path = Path(entry)
    if entry_path.is_absolute():
        return absolute(entry_path)
    return absolute(absolute(list_file).parent / entry_path)


def portable_path(path: PathLike, folder: PathLike) -> str:
    """`path` written for a file in `folder`: relative (posix) when inside it, else absolute."""
    path, folder = absolute(path), absolute(folder)
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return path.as_posix()


def require_file(path: PathLike, what: str = "file") -> Path:
    """`path` as a Path if it is an existing regular file, else a DataError."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DataError(path, f"{what} not found") from None
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise DataError(path, f"is a folder, expected a {what}")
    if not stat.S_ISREG(mode):
        raise DataError(path, f"is not a regular file (device, pipe or socket), expected a {what}")
    return path


def read_text(path: PathLike, what: str = "file", errors: str = "strict") -> str:
    """The whole UTF-8 text of `path` (a leading BOM is dropped); `errors="surrogateescape"`
    reads back file names that are not UTF-8, as facekd writes them."""
    path = require_file(path, what)
    try:
        return path.read_bytes().decode("utf-8-sig", errors=errors)
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror or exc}") from None


def file_digest(path: PathLike) -> str:
    """Content hash of a file, or of a folder's sorted (name, size, mtime) listing (16 hex)."""
    path = Path(path)
    hasher = hashlib.sha256()
    if path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = item.stat()
            hasher.update(f"{item.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    else:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(block)
    return hasher.hexdigest()[:16]


def csv_records(reader, path: PathLike) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank record of a csv.reader; malformed CSV is a DataError."""
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise line_error(path, reader.line_num, f"malformed CSV: {exc}") from None
        if record and any(field.strip() for field in record):
            yield reader.line_num, record


def _check_exist(path: PathLike, entries: Sequence[tuple[int, Path]]) -> None:
    """Error listing the first few (line, path) entries whose file does not exist."""
    missing = [(line, p) for line, p in entries if not p.is_file()]
    if not missing:
        return
    shown = ", ".join(f"line {line}: {p}" for line, p in missing[:_MISSING_SHOWN])
    more = f" and {len(missing) - _MISSING_SHOWN} more" if len(missing) > _MISSING_SHOWN else ""
    raise DataError(path, f"{len(missing)} referenced image(s) not found: {shown}{more}")


def _input_paths(paths: Iterable[PathLike], relative_to: PathLike | None) -> Iterable[Path]:
    """Paths given to a writer, relative ones anchored at `relative_to` (default: cwd)."""
    base = absolute(relative_to) if relative_to is not None else None
    for p in paths:
        p = Path(p)
        yield absolute(base / p if base is not None and not p.is_absolute() else p)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


# --------------------------------------------------------------------------- quality labels


@dataclass(frozen=True)
class LabeledImage:
    """One row of a quality-label CSV; `weight` (default 1.0) is a per-sample loss weight, e.g. the
    confidence of a pseudo-label."""

    path: Path
    mos: float
    weight: float = 1.0


def _parse_mos(csv_path: Path, line: int, text: str) -> float:
    text = text.strip()
    if not text:
        raise line_error(csv_path, line, "missing mos")
    try:
        value = float(text)
    except ValueError:
        raise line_error(csv_path, line, f"mos {text!r} is not a number") from None
    if not math.isfinite(value):
        raise line_error(csv_path, line, f"mos {text!r} is not a finite number")
    return value


def _parse_weight(csv_path: Path, line: int, column: str, text: str) -> float:
    text = text.strip()
    if not text:
        raise line_error(csv_path, line, f"missing {column}")
    try:
        value = float(text)
    except ValueError:
        raise line_error(csv_path, line, f"{column} {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise line_error(csv_path, line, f"{column} {text!r} must be a finite number >= 0")
    return value


def read_mos_csv(path: PathLike, check_files: bool = True,
                 weight_column: str | None = "weight") -> list[LabeledImage]:
    """Rows of a CSV with a header holding columns `path` and `mos` (others are ignored).

    When the header also holds `weight_column` (default "weight"; None to ignore it), its values
    (finite, >= 0) become `LabeledImage.weight`; otherwise every weight is 1.0."""
    path = Path(path)
    text = read_text(path, "CSV file")
    if not text.strip():
        raise DataError(path, "empty file (expected a header with columns path,mos)")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        while not header:  # blank lines before the header
            header = next(reader)
    except csv.Error as exc:
        raise line_error(path, reader.line_num, f"malformed CSV: {exc}") from None
    names = [name.strip().lower() for name in header]
    for column in ("path", "mos"):
        if names.count(column) > 1:
            raise line_error(path, reader.line_num, f"column {column!r} appears twice in the header")
    missing = [c for c in ("path", "mos") if c not in names]
    if missing:
        raise line_error(path, reader.line_num,
                         f"header lacks column(s) {', '.join(missing)} (found: {', '.join(header)})")
    path_col, mos_col = names.index("path"), names.index("mos")
    weight_name = weight_column.strip().lower() if weight_column else None
    if weight_name in ("path", "mos"):
        raise ValueError(f"weight_column must differ from 'path' and 'mos', got {weight_column!r}")
    if weight_name is not None and names.count(weight_name) > 1:
        raise line_error(path, reader.line_num, f"column {weight_name!r} appears twice in the header")
    weight_col = names.index(weight_name) if weight_name in names else None
    needed = max(path_col, mos_col, -1 if weight_col is None else weight_col)

    rows: list[LabeledImage] = []
    first_line: dict[Path, int] = {}
    entries: list[tuple[int, Path]] = []
    for line, record in csv_records(reader, path):
        if len(record) <= needed:
            raise line_error(path, line, f"expected {len(header)} fields, got {len(record)}")
        entry = record[path_col].strip()
        if not entry:
            raise line_error(path, line, "empty path")
        mos = _parse_mos(path, line, record[mos_col])
        weight = 1.0 if weight_col is None else _parse_weight(path, line, weight_name, record[weight_col])
        image = resolve_relative(path, entry)
        if image in first_line:
            raise line_error(path, line, f"duplicate path {entry!r} (first on line {first_line[image]})")
        first_line[image] = line
        rows.append(LabeledImage(image, mos, weight))
        entries.append((line, image))
    if not rows:
        raise DataError(path, "no rows after the header")
    if check_files:
        _check_exist(path, entries)
    return rows


def _finite(path: Path, number: int, name: str, value: object, minimum: float | None = None) -> float:
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(path, f"row {number}: {name} {value!r} is not a number") from None
    if not math.isfinite(result):
        raise DataError(path, f"row {number}: {name} {result!r} is not a finite number")
    if minimum is not None and result < minimum:
        raise DataError(path, f"row {number}: {name} {result!r} must be >= {minimum}")
    return result


def write_mos_csv(path: PathLike, rows: Iterable[LabeledImage | tuple],
                  relative_to: PathLike | None = None, weight_column: bool | None = None) -> None:
    """Write a `path,mos` (or `path,mos,weight`) CSV atomically.

    A row is a `LabeledImage`, a `(path, mos)` or a `(path, mos, weight)` tuple (a missing
    weight is 1.0; weights must be finite and >= 0). The `weight` column is written when
    `weight_column` is True, never when False (a weight other than 1.0 is then refused rather
    than lost), and when None only if some weight differs from 1.0. Relative input paths are
    taken relative to `relative_to` (default: the current folder); see the module doc for how
    paths are stored."""
    path = absolute(path)
    triples = []
    for number, row in enumerate(rows, start=1):
        if isinstance(row, LabeledImage):
            triples.append((row.path, row.mos, row.weight))
        elif isinstance(row, (tuple, list)) and len(row) in (2, 3):
            triples.append((row[0], row[1], row[2] if len(row) == 3 else 1.0))
        else:
            raise DataError(path, f"row {number}: expected (path, mos) or (path, mos, weight), got {row!r}")
    if not triples:
        raise DataError(path, "no rows to write")
    values = []
    for number, (_, mos, weight) in enumerate(triples, start=1):
        values.append((_finite(path, number, "mos", mos), _finite(path, number, "weight", weight, 0.0)))
    with_weight = any(w != 1.0 for _, w in values) if weight_column is None else bool(weight_column)
    if not with_weight:
        for number, (_, weight) in enumerate(values, start=1):
            if weight != 1.0:
                raise DataError(path, f"row {number}: weight {weight!r} would be lost (weight_column=False)")
    images = list(_input_paths((image for image, _, _ in triples), relative_to))
    with atomic_write(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "mos", "weight"] if with_weight else ["path", "mos"])
        for image, (mos, weight) in zip(images, values):
            text = portable_path(image, path.parent)
            writer.writerow([text, repr(mos), repr(weight)] if with_weight else [text, repr(mos)])


# --------------------------------------------------------------------------- image lists


def _list_lines(path: Path, what: str) -> Iterable[tuple[int, str]]:
    """(line number, stripped text) of the non-blank, non-comment lines of a text file."""
    for number, raw in enumerate(read_text(path, what).splitlines(), start=1):
        text = raw.strip()
        if text and not text.startswith("#"):
            yield number, text


def read_image_list(path: PathLike, check_files: bool = True) -> list[Path]:
    """Paths of a text file holding one image path a line ('#' comments, blank lines skipped)."""
    path = Path(path)
    entries = [(line, resolve_relative(path, text)) for line, text in _list_lines(path, "image list")]
    if not entries:
        raise DataError(path, "no image paths in the list")
    if check_files:
        _check_exist(path, entries)
    return [image for _, image in entries]


def write_image_list(path: PathLike, paths: Iterable[PathLike],
                     relative_to: PathLike | None = None) -> None:
    """Write one path a line, atomically (relative input paths anchored at `relative_to`)."""
    path = absolute(path)
    lines = []
    for image in _input_paths(paths, relative_to):
        text = portable_path(image, path.parent)
        if "\n" in text or "\r" in text or text != text.strip() or text.startswith("#"):
            raise DataError(path, f"path {text!r} cannot be stored in an image list "
                                  "(line break, leading '#' or surrounding spaces)")
        lines.append(text + "\n")
    if not lines:
        raise DataError(path, "no image paths to write")
    with atomic_write(path, "w", encoding="utf-8", newline="") as handle:
        handle.writelines(lines)


# --------------------------------------------------------------------------- folders


def _scan_images(folder: Path, recursive: bool) -> list[Path]:
    """Image files under `folder` (hidden entries skipped), sorted by relative posix path."""
    found: list[tuple[str, Path]] = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not _is_hidden(d)] if recursive else []
        for name in files:
            if _is_hidden(name) or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            full = Path(current, name)
            if full.is_file():
                found.append((full.relative_to(folder).as_posix(), full))
    found.sort(key=lambda item: item[0])
    return [full for _, full in found]


def _require_folder(folder: PathLike) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise DataError(folder, "folder not found")
    if not folder.is_dir():
        raise DataError(folder, "not a folder")
    return absolute(folder)


def list_images(folder: PathLike, recursive: bool = True) -> list[Path]:
    """Image files in `folder`, sorted by relative path; an empty folder is an error."""
    folder = _require_folder(folder)
    images = _scan_images(folder, recursive)
    if not images:
        where = "" if recursive else " (not searching subfolders)"
        raise DataError(folder, f"no images found{where}; extensions: {' '.join(IMAGE_EXTENSIONS)}")
    return images


def resolve_inputs(items: Sequence[PathLike], check_files: bool = True) -> list[Path]:
    """Image paths from CLI-style inputs: image files, image lists (.txt/.lst) or folders.

    Duplicates are dropped, first occurrence kept. With `check_files=False`, entries of image
    lists and named paths with an image extension are returned even when no such file exists
    (batch jobs then report them per image instead of refusing the whole input)."""
    if not items:
        raise DataError("inputs", "no image paths, lists or folders given")
    seen: set[Path] = set()
    result: list[Path] = []
    for item in items:
        item_path = Path(item)
        if item_path.is_dir():
            images = list_images(item_path)
        elif not item_path.exists():
            if check_files or item_path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DataError(item_path, "not found")
            images = [absolute(item_path)]
        else:
            suffix = item_path.suffix.lower()
            if suffix in IMAGE_EXTENSIONS:
                images = [absolute(item_path)]
            elif suffix in LIST_EXTENSIONS:
                images = read_image_list(item_path, check_files=check_files)
            else:
                raise DataError(item_path, "not an image ({}), an image list (.txt, .lst) or a folder"
                                .format(" ".join(IMAGE_EXTENSIONS)))
        for image in images:
            if image not in seen:
                seen.add(image)
                result.append(image)
    return result


@dataclass
class IdentityDataset:
    """Images of an identity folder tree; `labels[i]` indexes `class_names`."""

    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]
    skipped_empty: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def read_identity_folder(root: PathLike) -> IdentityDataset:
    """Read root/<identity>/<image...>: identities sorted by name, label = their index.

    Identity folders holding no image are skipped and listed in `skipped_empty`."""
    root = _require_folder(root)
    identity_dirs = sorted(entry.name for entry in os.scandir(root)
                           if entry.is_dir() and not _is_hidden(entry.name))
    paths: list[Path] = []
    labels: list[int] = []
    names: list[str] = []
    skipped: list[str] = []
    for name in identity_dirs:
        images = _scan_images(root / name, recursive=True)
        if not images:
            skipped.append(name)
            continue
        paths.extend(images)
        labels.extend([len(names)] * len(images))
        names.append(name)
    if not names:
        loose = len(_scan_images(root, recursive=False))
        detail = f"; {loose} image(s) lie directly in it" if loose else ""
        skipped_note = f" ({len(skipped)} empty identity folder(s))" if skipped else ""
        raise DataError(root, f"no identity folders with images{skipped_note}; "
                              f"expected root/<identity>/<image>{detail}")
    return IdentityDataset(paths, np.asarray(labels, dtype=np.int64), names, skipped)


# --------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Pair:
    """Two images and whether they show the same identity."""

    a: Path
    b: Path
    same: bool


def _split_pair_line(text: str) -> list[str]:
    """Fields of a pairs line: tab-, then comma-, then whitespace-separated, whichever gives 3."""
    for separator in ("\t", ","):
        if separator in text:
            fields = [f.strip() for f in text.split(separator)]
            if len(fields) == 3:
                return fields
    return text.split()


def read_pairs(path: PathLike, check_files: bool = True) -> list[Pair]:
    """Pairs of a text file, one `path_a path_b same` a line (same is 0 or 1).

    Fields are separated by tabs, commas or whitespace (use tabs or commas when paths hold
    spaces); '#' comments and blank lines are skipped."""
    path = Path(path)
    pairs: list[Pair] = []
    entries: list[tuple[int, Path]] = []
    for line, text in _list_lines(path, "pairs file"):
        fields = _split_pair_line(text)
        if len(fields) != 3:
            raise line_error(path, line, f"expected 3 fields (path_a path_b same), got {len(fields)}")
        first, second, same = fields
        if same not in ("0", "1"):
            raise line_error(path, line, f"same must be 0 or 1, got {same!r}")
        if not first or not second:
            raise line_error(path, line, "empty path")
        a, b = resolve_relative(path, first), resolve_relative(path, second)
        pairs.append(Pair(a, b, same == "1"))
        entries += [(line, a), (line, b)]
    if not pairs:
        raise DataError(path, "no pairs in the file")
    if check_files:
        _check_exist(path, entries)
    return pairs


def write_pairs(path: PathLike, pairs: Iterable[Pair | tuple[PathLike, PathLike, bool]],
                relative_to: PathLike | None = None) -> None:
    """Write a pairs file atomically: space-separated, or tab-separated for the whole file
    when some path holds whitespace or a comma. Paths holding tabs or line breaks are refused."""
    path = absolute(path)
    rows = []
    for pair in pairs:
        a, b, same = (pair.a, pair.b, pair.same) if isinstance(pair, Pair) else pair
        a, b = _input_paths((a, b), relative_to)
        rows.append((portable_path(a, path.parent), portable_path(b, path.parent), "1" if same else "0"))
    for text in (t for row in rows for t in row[:2]):
        if any(ch in text for ch in "\t\n\r") or text != text.strip() or text.startswith("#"):
            raise DataError(path, f"path {text!r} cannot be stored in a pairs file "
                                  "(tab, line break, leading '#' or surrounding spaces)")
    plain = all(not any(ch.isspace() or ch == "," for ch in t) for row in rows for t in row[:2])
    if not rows:
        raise DataError(path, "no pairs to write")
    separator = " " if plain else "\t"
    with atomic_write(path, "w", encoding="utf-8", newline="") as handle:
        handle.writelines(separator.join(row) + "\n" for row in rows)
