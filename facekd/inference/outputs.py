"""The files batch jobs write: scores CSVs and embedding archives, streamed row by row.

- Scores: `scores.csv` with columns `path,score` (paths relative to the CSV's folder when
  inside it, else absolute; scores as the shortest text that reads back as the same float32).
- Embeddings: `emb.npz` with `paths` (absolute, unicode) and `embeddings` (float32 (N, D),
  L2-normalised), loadable with `numpy.load`. It is written member by member, so a job never
  holds all its embeddings in memory.
Both appear whole or not at all."""

from __future__ import annotations

import csv
import io
import math
import os
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from facekd.errors import DataError
from facekd.io.atomic import atomic_write
from facekd.io.formats import csv_records, line_error, portable_path, read_text, resolve_relative

__all__ = ["EMBEDDINGS", "SCORES", "OutputFormat", "output_format", "read_scores"]

Row = tuple[Path, np.ndarray]


def _score_text(value: float) -> str:
    """Shortest text that reads back as the same float32."""
    return str(np.float32(value))


def read_scores(csv_path: str | os.PathLike) -> dict[Path, float]:
    """A `path,score` CSV (as written by `score_files`) as {absolute path: score}, in file order."""
    csv_path = Path(csv_path)
    text = read_text(csv_path, "scores CSV", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise line_error(csv_path, reader.line_num, f"malformed CSV: {exc}") from None
    names = [name.strip().lower() for name in header or []]
    if "path" not in names or "score" not in names:
        raise DataError(csv_path, "expected a header with columns path,score")
    path_col, score_col = names.index("path"), names.index("score")
    scores: dict[Path, float] = {}
    for line, record in csv_records(reader, csv_path):
        if len(record) <= max(path_col, score_col) or not record[path_col].strip():
            raise line_error(csv_path, line, "expected a path and a score")
        try:
            value = float(record[score_col])
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise line_error(csv_path, line, f"score {record[score_col]!r} is not a finite number")
        scores[resolve_relative(csv_path, record[path_col].strip())] = value
    return scores


class OutputFormat:
    """How one kind of job output is named, read back and written."""

    kind = ""
    suffix = ""
    verb = ""

    def read(self, path: Path) -> Iterator[Row]:
        raise NotImplementedError

    def read_paths(self, path: Path) -> list[Path]:
        return [p for p, _ in self.read(path)]

    def write(self, out: Path, paths: list[Path], values: Iterable[np.ndarray], dim: int) -> None:
        raise NotImplementedError


class _Scores(OutputFormat):
    kind, suffix, verb = "scores", ".csv", "scoring"

    def read(self, path: Path) -> Iterator[Row]:
        for image, value in read_scores(path).items():
            yield image, np.asarray([value], dtype=np.float32)

    def write(self, out: Path, paths: list[Path], values: Iterable[np.ndarray], dim: int) -> None:
        with atomic_write(out, "w", encoding="utf-8", errors="surrogateescape", newline="") as stream:
            writer = csv.writer(stream, lineterminator="\n")
            writer.writerow(["path", "score"])
            for path, value in zip(paths, values):
                writer.writerow([portable_path(path, out.parent), _score_text(float(value[0]))])


def _write_member(archive: zipfile.ZipFile, name: str, dtype: np.dtype, shape: tuple,
                  chunks: Iterable[np.ndarray]) -> None:
    """One `.npy` member of an `.npz`, its data written chunk by chunk."""
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(member, header)
        for chunk in chunks:
            member.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


class _Embeddings(OutputFormat):
    kind, suffix, verb = "embeddings", ".npz", "embedding"

    def _open(self, path: Path):
        try:
            archive = np.load(path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise DataError(path, f"not a readable embeddings archive ({error})") from None
        if not {"paths", "embeddings"} <= set(archive.files):
            raise DataError(path, "expected arrays 'paths' and 'embeddings'")
        return archive

    def read_paths(self, path: Path) -> list[Path]:
        with self._open(path) as archive:
            return [Path(p) for p in archive["paths"].tolist()]

    def read(self, path: Path) -> Iterator[Row]:
        with self._open(path) as archive:
            paths, embeddings = archive["paths"], archive["embeddings"]
        if embeddings.ndim != 2 or len(embeddings) != len(paths):
            raise DataError(path, f"{len(paths)} paths but embeddings of shape {embeddings.shape}")
        for image, vector in zip(paths.tolist(), embeddings):
            yield Path(image), vector.astype(np.float32)

    def write(self, out: Path, paths: list[Path], values: Iterable[np.ndarray], dim: int) -> None:
        names = [p.as_posix() for p in paths]
        width = max((len(n) for n in names), default=1)
        text_type = np.dtype(f"<U{width}")

        def encoded_paths(step: int = 4096) -> Iterator[np.ndarray]:
            for start in range(0, len(names), step):
                yield np.array(names[start:start + step], dtype=text_type)

        def vectors(step: int = 1024) -> Iterator[np.ndarray]:
            chunk: list[np.ndarray] = []
            for vector in values:
                chunk.append(vector)
                if len(chunk) == step:
                    yield np.stack(chunk)
                    chunk = []
            if chunk:
                yield np.stack(chunk)

        with atomic_write(out, "wb") as stream:
            with zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                _write_member(archive, "paths", text_type, (len(names),), encoded_paths())
                _write_member(archive, "embeddings", np.dtype("<f4"), (len(names), dim), vectors())


SCORES = _Scores()
EMBEDDINGS = _Embeddings()


def output_format(path: str | os.PathLike) -> OutputFormat:
    """The format of an output file, by its suffix (.csv: scores, .npz: embeddings)."""
    suffix = Path(path).suffix.lower()
    for fmt in (SCORES, EMBEDDINGS):
        if suffix == fmt.suffix:
            return fmt
    raise DataError(path, "expected a scores .csv or an embeddings .npz")
