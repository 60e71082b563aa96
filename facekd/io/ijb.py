"""The IJB-B / IJB-C 1:1 verification layout, as insightface distributes it.

    ROOT/meta/<t>_face_tid_mid.txt        image_name template_id media_id       (one line an image)
    ROOT/meta/<t>_name_5pts_score.txt     image_name x1 y1 ... x5 y5 detector_score (same order)
    ROOT/meta/<t>_template_pair_label.txt template_id_1 template_id_2 label (1 genuine, 0 impostor)
    ROOT/loose_crop/<image_name>

with `<t>` = `ijbc` or `ijbb`. Fields are separated by spaces (or tabs). Every reader error
names the file and the line."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facekd.errors import ConfigError, DataError
from facekd.io.formats import absolute, line_error, require_file

__all__ = ["IJB_TARGETS", "IjbProtocol", "ijb_files", "read_ijb", "write_ijb_meta"]

IJB_TARGETS = ("IJBC", "IJBB")
PathLike = str | os.PathLike


@dataclass
class IjbProtocol:
    """One IJB set: per image (line of the meta files) its path, 5 landmarks (N, 5, 2), detector
    score, template and media; per pair (line of the pair list) its two templates and label."""

    root: Path
    target: str
    paths: list[Path]
    landmarks: np.ndarray
    detector_scores: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    first: np.ndarray
    second: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


def ijb_files(root: PathLike, target: str) -> dict[str, Path]:
    """The three meta files and the image folder of `target` ("IJBC" or "IJBB") under `root`."""
    if target not in IJB_TARGETS:
        raise ConfigError(f"IJB target must be one of {', '.join(IJB_TARGETS)}, got {target!r}")
    meta = absolute(root) / "meta"
    prefix = target.lower()
    return {"face_tid_mid": meta / f"{prefix}_face_tid_mid.txt",
            "name_5pts_score": meta / f"{prefix}_name_5pts_score.txt",
            "template_pair_label": meta / f"{prefix}_template_pair_label.txt",
            "images": absolute(root) / "loose_crop"}


def _lines(path: Path):
    """(line number, fields) of each non-blank line."""
    try:
        handle = open(path, encoding="utf-8")
    except OSError as error:
        raise DataError(path, f"cannot read: {error.strerror or error}") from None
    with handle:
        try:
            for number, text in enumerate(handle, 1):
                fields = text.split()
                if fields:
                    yield number, fields
        except UnicodeDecodeError as error:
            raise DataError(path, f"not UTF-8 text ({error.reason})") from None


def _check_count(path: Path, line: int, fields: list[str], expected: int, layout: str) -> None:
    if len(fields) != expected:
        raise line_error(path, line, f"expected {expected} fields ({layout}), got {len(fields)}")


def _integer(path: Path, line: int, name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise line_error(path, line, f"{name} {text!r} is not an integer") from None


def _real(path: Path, line: int, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
        if text.strip().lower() not in ("nan", "+nan", "-nan"):
            raise line_error(path, line, f"{name} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise line_error(path, line, f"{name} {text!r} is not a finite number")
    return value


def _read_media(path: Path) -> tuple[list[tuple[int, str]], np.ndarray, np.ndarray]:
    names, templates, medias = [], [], []
    for line, fields in _lines(path):
        _check_count(path, line, fields, 3, "image_name template_id media_id")
        names.append((line, fields[0]))
        templates.append(_integer(path, line, "template_id", fields[1]))
        medias.append(_integer(path, line, "media_id", fields[2]))
    return names, np.asarray(templates, dtype=np.int64), np.asarray(medias, dtype=np.int64)


def _read_landmarks(path: Path) -> tuple[list[tuple[int, str]], np.ndarray, np.ndarray]:
    names, points, scores = [], [], []
    axes = [f"{axis}{k}" for k in range(1, 6) for axis in "xy"]
    for line, fields in _lines(path):
        _check_count(path, line, fields, 12, "image_name x1 y1 ... x5 y5 detector_score")
        names.append((line, fields[0]))
        points.append([_real(path, line, axis, text) for axis, text in zip(axes, fields[1:11])])
        scores.append(_real(path, line, "detector_score", fields[11]))
    return (names, np.asarray(points, dtype=np.float64).reshape(-1, 5, 2),
            np.asarray(scores, dtype=np.float32))


def _pair_error(path: Path) -> DataError:
    """The first bad line of a pair list (its fast read failed)."""
    for line, fields in _lines(path):
        _check_count(path, line, fields, 3, "template_id_1 template_id_2 label")
        for name, text in zip(("template_id_1", "template_id_2", "label"), fields):
            _integer(path, line, name, text)
        if fields[2] not in ("0", "1"):
            raise line_error(path, line, f"label {fields[2]!r} must be 1 (same person) or 0")
    return DataError(path, "not a pair list (template_id_1 template_id_2 label a line)")


def _read_pairs(path: Path) -> np.ndarray:
    """(P, 3) int64: template 1, template 2, label; read in C (the IJB-C list has 15.6 M lines)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": said below
            pairs = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except ValueError:
        raise _pair_error(path) from None
    if pairs.size == 0:
        raise DataError(path, "no pairs listed")
    if pairs.shape[1] != 3 or not np.isin(pairs[:, 2], (0, 1)).all():
        raise _pair_error(path)
    return pairs


def _line_of(path: Path, index: int) -> int:
    """The line number of the `index`-th non-blank line of `path`."""
    for count, (line, _) in enumerate(_lines(path)):
        if count == index:
            return line
    return index + 1


def read_ijb(root: PathLike, target: str = "IJBC") -> IjbProtocol:
    """Read and check the meta files of an IJB set (images are not opened here)."""
    files = ijb_files(root, target)
    for key in ("face_tid_mid", "name_5pts_score", "template_pair_label"):
        require_file(files[key], f"IJB meta file ({key})")
    media_file, landmark_file, pair_file = files["face_tid_mid"], files["name_5pts_score"], files["template_pair_label"]
    names, templates, medias = _read_media(media_file)
    landmark_names, landmarks, scores = _read_landmarks(landmark_file)
    if not names:
        raise DataError(media_file, "no images listed")
    if len(names) != len(landmark_names):
        raise DataError(landmark_file, f"lists {len(landmark_names)} images but {media_file.name} lists "
                                       f"{len(names)} (the files go line by line together)")
    first_line: dict[str, int] = {}
    for (line, name), (landmark_line, landmark_name) in zip(names, landmark_names):
        if name != landmark_name:
            raise line_error(landmark_file, landmark_line, f"image {landmark_name!r} but line {line} of "
                                                           f"{media_file.name} has {name!r} (same order expected)")
        if name in first_line:
            raise line_error(media_file, line, f"image {name!r} again (first on line {first_line[name]})")
        first_line[name] = line
    pairs = _read_pairs(pair_file)
    known = np.unique(templates)
    unknown = np.flatnonzero(~(np.isin(pairs[:, 0], known) & np.isin(pairs[:, 1], known)))
    if unknown.size:
        row = pairs[unknown[0]]
        template = row[0] if row[0] not in known else row[1]
        raise line_error(pair_file, _line_of(pair_file, int(unknown[0])),
                         f"template {template} is not in {media_file.name} ({unknown.size} pair(s) name unknown "
                         "templates)")
    folder = files["images"]
    if not folder.is_dir():
        raise DataError(folder, "image folder not found (the loose crops go in ROOT/loose_crop)")
    return IjbProtocol(root=absolute(root), target=target, paths=[folder / name for _, name in names],
                       landmarks=landmarks, detector_scores=scores, templates=templates, medias=medias,
                       first=pairs[:, 0].copy(), second=pairs[:, 1].copy(), labels=pairs[:, 2].astype(bool))


def write_ijb_meta(root: PathLike, target: str, rows: list[tuple[str, int, int, np.ndarray, float]],
                   pairs: list[tuple[int, int, int]]) -> dict[str, Path]:
    """Write the three meta files of `target` under root/meta from image rows (name, template,
    media, landmarks (5, 2), detector score) and pairs (template 1, template 2, label)."""
    from facekd.io.atomic import atomic_write_text

    files = ijb_files(root, target)
    atomic_write_text(files["face_tid_mid"], "".join(f"{name} {t} {m}\n" for name, t, m, _, _ in rows))
    atomic_write_text(files["name_5pts_score"], "".join(
        f"{name} {' '.join(f'{v:.3f}' for v in np.asarray(points).reshape(-1))} {score:.6f}\n"
        for name, _, _, points, score in rows))
    atomic_write_text(files["template_pair_label"], "".join(f"{a} {b} {label}\n" for a, b, label in pairs))
    return files
