"""Batch scoring of image files with a quality model (`facekd quality score`).

Outputs, for `out = scores.csv`:

- `scores.csv`, columns `path,score`, in input order; paths relative to the CSV's folder when
  inside it, else absolute (as `write_mos_csv`). It appears whole or not at all.
- `scores.errors.csv`, columns `path,reason`: the images that could not be scored (missing,
  corrupt, not an image...). Written only when there are some; a stale one from an earlier run
  is removed.
- While the job runs, a hidden journal `.scores.csv.partial` beside it: every batch's scores
  are appended, flushed and fsynced, so a crashed or killed job loses at most one batch.
  `resume=True` reuses the journal (and an existing `scores.csv`) and scores only the images
  not yet scored (images that failed before are tried again); without `resume` an old journal
  is discarded. An existing `scores.csv` is refused unless `resume` or `overwrite` is given.

`strict=True` raises the first unreadable image's DataError instead of listing it, and leaves
no output (the journal of a run without `resume` is removed too).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Sequence

import numpy as np

from facekd.errors import ConfigError, DataError, FacekdError
from facekd.io.atomic import atomic_write
from facekd.io.formats import absolute, csv_records, line_error, portable_path, read_text, resolve_inputs, resolve_relative
from facekd.progress import Progress
from facekd.quality.data import _check_workers, load_one

__all__ = ["ScoreSummary", "journal_path", "errors_path", "read_scores", "score_files"]

_JOURNAL_MAGIC = "# facekd score journal v1"


@dataclass
class ScoreSummary:
    """What a `score_files` run did. `scored`: images scored by this run; `resumed`: scores
    taken over from an interrupted run; `skipped`: images listed in the errors CSV."""

    total: int
    scored: int
    resumed: int
    skipped: int
    seconds: float
    images_per_second: float
    scores_csv: Path
    errors_csv: Path | None

    def to_dict(self) -> dict:
        return {"total": self.total, "scored": self.scored, "resumed": self.resumed, "skipped": self.skipped,
                "seconds": self.seconds, "images_per_second": self.images_per_second,
                "scores_csv": str(self.scores_csv), "errors_csv": None if self.errors_csv is None else str(self.errors_csv)}


def journal_path(out_csv: str | os.PathLike) -> Path:
    """The hidden journal beside `out_csv`: `.scores.csv.partial` for `scores.csv`."""
    out = absolute(out_csv)
    return out.with_name(f".{out.name}.partial")


def errors_path(out_csv: str | os.PathLike) -> Path:
    """The errors CSV beside `out_csv`: `scores.errors.csv` for `scores.csv`."""
    out = absolute(out_csv)
    return out.with_name(f"{out.stem}.errors.csv")


def _score_text(value: float) -> str:
    """Shortest text that reads back as the same float32."""
    return str(np.float32(value))


def read_scores(csv_path: str | os.PathLike) -> dict[Path, float]:
    """A `path,score` CSV (as written by `score_files`) as {absolute path: score}, in file order."""
    csv_path = Path(csv_path)
    text = read_text(csv_path, "scores CSV")
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


# ----------------------------------------------------------------------------- journal


def _journal_header(input_size: int, fingerprint: str | None) -> str:
    fields = [_JOURNAL_MAGIC, f"input_size={input_size}"]
    if fingerprint:
        fields.append(f"model={fingerprint}")
    return "; ".join(fields).replace("\n", " ").replace("\r", " ") + "\n"


def _read_journal(journal: Path, header: str) -> dict[Path, str] | None:
    """Scores of a journal ({path: score text}); its torn last line (a crash mid-write) is cut
    off the file. None when there is no usable journal."""
    try:
        data = journal.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DataError(journal, f"cannot read the scoring journal: {exc.strerror or exc}") from None
    end = data.rfind(b"\n") + 1
    text = data[:end].decode("utf-8", errors="surrogateescape")
    first, _, body = text.partition("\n")
    if not first.startswith(_JOURNAL_MAGIC):
        return None
    if first + "\n" != header:
        raise DataError(journal, f"was written by another model or input size ({first.split('; ', 1)[-1]!r}); "
                                 "run without resume to start over")
    if end != len(data):
        with open(journal, "r+b") as handle:
            handle.truncate(end)
    scores: dict[Path, str] = {}
    reader = csv.reader(io.StringIO(body, newline=""))
    with contextlib.suppress(csv.Error):
        for record in reader:
            if len(record) != 2:
                continue
            with contextlib.suppress(ValueError):
                if math.isfinite(float(record[1])):
                    scores[Path(record[0])] = record[1]
    return scores


def _open_journal(journal: Path, header: str, append: bool) -> IO[str]:
    handle = open(journal, "a" if append else "w", encoding="utf-8", errors="surrogateescape", newline="")
    if not append:
        handle.write(header)
        handle.flush()
        os.fsync(handle.fileno())
    return handle


def _append(handle: IO[str], rows: list[tuple[Path, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for path, text in rows:
        writer.writerow([path.as_posix(), text])
    handle.write(buffer.getvalue())
    handle.flush()
    os.fsync(handle.fileno())


# ----------------------------------------------------------------------------- scoring


def _decoded_batches(paths: list[Path], size: int, batch_size: int,
                     workers: int) -> Iterator[list[tuple[Path, np.ndarray | str]]]:
    """Batches of (path, image or reason); with threads, the next batch decodes while the
    caller scores the current one."""
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    if workers == 0:
        for batch in batches:
            yield [(p, load_one(p, size)) for p in batch]
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="facekd-score")
    queue: deque[tuple[list[Path], list[Future]]] = deque()
    remaining = iter(batches)

    def submit_next() -> None:
        batch = next(remaining, None)
        if batch is not None:
            queue.append((batch, [pool.submit(load_one, p, size) for p in batch]))

    try:
        submit_next()
        while queue:
            batch, futures = queue.popleft()
            submit_next()  # decode one batch ahead
            yield [(p, future.result()) for p, future in zip(batch, futures)]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _model_scores(model, images: list[np.ndarray]) -> np.ndarray:
    values = np.asarray(model.score(images), dtype=np.float64).reshape(-1)
    if len(values) != len(images):
        raise FacekdError(f"the model returned {len(values)} scores for {len(images)} images")
    return values


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def score_files(model, inputs: Sequence[str | os.PathLike], out_csv: str | os.PathLike, *, batch_size: int = 64,
                strict: bool = False, resume: bool = False, overwrite: bool = False, workers: int | None = None,
                fingerprint: str | None = None, progress: Progress | None = None) -> ScoreSummary:
    """Score image files, folders (recursive) and image lists into `out_csv` (see the module doc).

    `model` is anything with `.input_size` and `.score(list of uint8 RGB arrays) -> (N,)`
    (`facekd.load(...)` of a quality model, torch or ONNX); each image is decoded and resized
    to its input size here, by `workers` threads (None: up to 8, 0: none). `fingerprint`
    (e.g. the model file's hash) is stored in the journal; resuming with a different one, or
    a model of a different input size, is refused."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    workers = _check_workers(workers)
    size = int(model.input_size)
    progress = progress or Progress()
    out = absolute(out_csv)
    errors_csv, journal = errors_path(out), journal_path(out)
    if out.is_dir():
        raise DataError(out, "is a folder; give the path of the scores CSV to write")
    if out.exists() and not (resume or overwrite):
        raise DataError(out, "already exists (resume to complete it, or overwrite to replace it)")
    files = resolve_inputs(list(inputs), check_files=False)
    header = _journal_header(size, fingerprint)

    done: dict[Path, str] = {}
    journal_scores = _read_journal(journal, header) if resume else None
    if resume and out.exists():
        previous = read_scores(out)
        done.update((p, _score_text(v)) for p, v in previous.items())
    if journal_scores is not None:
        done.update(journal_scores)
    wanted = set(files)
    done = {p: text for p, text in done.items() if p in wanted}
    resumed = len(done)
    todo = [p for p in files if p not in done]

    started = time.perf_counter()
    errors: dict[Path, str] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    handle = _open_journal(journal, header, append=journal_scores is not None)
    try:
        with progress.task("scoring images", len(todo)) as bar:
            for batch in _decoded_batches(todo, size, batch_size, workers):
                good: list[tuple[Path, np.ndarray]] = []
                for path, result in batch:
                    if isinstance(result, str):
                        if strict:
                            raise DataError(path, result)
                        errors[path] = result
                    else:
                        good.append((path, result))
                rows: list[tuple[Path, str]] = []
                if good:
                    values = _model_scores(model, [image for _, image in good])
                    for (path, _), value in zip(good, values):
                        if not math.isfinite(value):
                            if strict:
                                raise DataError(path, f"the model returned a non-finite score ({value})")
                            errors[path] = f"the model returned a non-finite score ({value})"
                        else:
                            rows.append((path, _score_text(value)))
                _append(handle, rows)
                done.update(rows)
                bar.advance(len(batch))
    except DataError:
        handle.close()
        if not resume:
            _remove(journal)
        raise
    finally:
        handle.close()
    seconds = time.perf_counter() - started

    scored_rows = [(p, done[p]) for p in files if p in done]
    error_rows = [(p, errors[p]) for p in files if p in errors]
    if error_rows:
        with atomic_write(errors_csv, "w", encoding="utf-8", newline="") as stream:
            writer = csv.writer(stream, lineterminator="\n")
            writer.writerow(["path", "reason"])
            writer.writerows((portable_path(p, out.parent), reason) for p, reason in error_rows)
    else:
        _remove(errors_csv)
    if not scored_rows:
        _remove(journal)
        raise DataError(out, f"none of the {len(files)} images could be scored (reasons in {errors_csv})")
    with atomic_write(out, "w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(["path", "score"])
        writer.writerows((portable_path(p, out.parent), text) for p, text in scored_rows)
    _remove(journal)
    processed = len(todo)
    return ScoreSummary(
        total=len(files), scored=len(scored_rows) - resumed, resumed=resumed, skipped=len(error_rows),
        seconds=seconds, images_per_second=processed / seconds if seconds > 0 else 0.0,
        scores_csv=out, errors_csv=errors_csv if error_rows else None,
    )
