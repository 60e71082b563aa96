"""Batch jobs over image files: `score_files` (quality scores → CSV) and `embed_files`
(embeddings → .npz), on one engine, and `merge_outputs` for sharded jobs.

A job decodes images on worker threads while the model runs on the current batch
(`facekd.io.decode.decode_batches`), so its speed is the slower of the two, not their sum.
Next to the output `out` it writes:

- `<stem>.errors.csv` (`path,reason`): the images that could not be used (missing, corrupt,
  not an image, a non-finite model output). Only when there are some; a stale one is removed.
- `<stem>.run.json`: what made the output (model hash, backend, shard, counts, speed); `merge`
  uses it to check that shards fit together.
- while running, the hidden journal `.<name>.partial` (`facekd.inference.journal`): a killed
  job loses nothing it had flushed; `resume=True` reuses it (and an existing output) and runs
  only the images not yet done (failed ones are tried again). Without `resume` an old journal
  is discarded, and an existing output is refused unless `overwrite`.

`strict=True` raises the first bad image's DataError instead of listing it. Memory stays flat
over the run: a few batches of images, the file list and a path → journal-offset index."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from facekd import __version__
from facekd.errors import ConfigError, DataError, FacekdError
from facekd.inference.journal import Journal
from facekd.inference.outputs import EMBEDDINGS, SCORES, OutputFormat, output_format
from facekd.inference.shards import Shard, select_shard
from facekd.io.atomic import atomic_write, atomic_write_text
from facekd.io.decode import Prepare, check_workers, decode_batches
from facekd.io.formats import absolute, portable_path, resolve_inputs
from facekd.io.decode import check_batch_size
from facekd.progress import Progress

__all__ = ["JobSummary", "embed_files", "errors_path", "journal_path", "merge_outputs", "read_errors",
           "record_path", "score_files"]

PathLike = str | os.PathLike


@dataclass
class JobSummary:
    """What a job did. `total`: images of the job (of its shard); `done`: computed by this run;
    `resumed`: taken over from an interrupted run or an existing output; `skipped`: listed in
    the errors CSV."""

    kind: str
    total: int
    done: int
    resumed: int
    skipped: int
    seconds: float
    images_per_second: float
    out: Path
    errors_csv: Path | None
    backend: dict | None = None
    shard: str | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["out"] = str(self.out)
        data["errors_csv"] = None if self.errors_csv is None else str(self.errors_csv)
        return data


def journal_path(out: PathLike) -> Path:
    """The hidden journal beside `out`: `.scores.csv.partial` for `scores.csv`."""
    out = absolute(out)
    return out.with_name(f".{out.name}.partial")


def errors_path(out: PathLike) -> Path:
    """The errors CSV beside `out`: `scores.errors.csv` for `scores.csv`."""
    out = absolute(out)
    return out.with_name(f"{out.stem}.errors.csv")


def record_path(out: PathLike) -> Path:
    """The run record beside `out`: `scores.run.json` for `scores.csv`."""
    out = absolute(out)
    return out.with_name(f"{out.stem}.run.json")


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _write_errors(out: Path, errors: list[tuple[Path, str]]) -> Path | None:
    target = errors_path(out)
    if not errors:
        _remove(target)
        return None
    with atomic_write(target, "w", encoding="utf-8", errors="surrogateescape", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(["path", "reason"])
        writer.writerows((portable_path(p, out.parent), reason) for p, reason in errors)
    return target


def read_errors(out: PathLike) -> list[tuple[Path, str]]:
    """The (path, reason) rows of the errors CSV beside a job's output (none when it has none)."""
    from facekd.io.formats import resolve_relative

    target = errors_path(out)
    if not target.is_file():
        return []
    with open(target, encoding="utf-8", errors="surrogateescape", newline="") as stream:
        rows = list(csv.reader(stream))[1:]
    return [(resolve_relative(target, row[0]), row[1]) for row in rows if len(row) >= 2]


def _check_output(out: Path, fmt: OutputFormat, resume: bool, overwrite: bool) -> None:
    if out.suffix.lower() != fmt.suffix:
        raise DataError(out, f"{fmt.kind} are written to a {fmt.suffix} file")
    if out.is_dir():
        raise DataError(out, f"is a folder; give the path of the {fmt.suffix} file to write")
    if out.exists() and not (resume or overwrite):
        raise DataError(out, "already exists (resume to complete it, or overwrite to replace it)")


def _check_same_job(out: Path, identity: dict) -> None:
    """An existing output may be completed by `resume` only if its run record says the same
    model, input size, vector length and flip made it."""
    record = _read_record(out)
    if record is None:
        raise DataError(out, f"has no run record ({record_path(out).name}), so it cannot be told which model "
                             "made it; --overwrite to start over")
    found = {"model": record.get("model_digest"), "input_size": record.get("input_size"), "dim": record.get("dim"),
             "flip": record.get("flip")}
    differing = [key for key, value in found.items() if value != identity[key]]
    if differing:
        raise DataError(out, f"was made by another job (its {', '.join(differing)} differ); "
                             "--overwrite to start over")


def _run_job(model, inputs: Sequence[PathLike], out: PathLike, fmt: OutputFormat, *, flip: bool, batch_size: int,
             strict: bool, resume: bool, overwrite: bool, workers: int | None, fingerprint: str | None,
             shard: Shard | None, backend: dict | None, progress: Progress | None,
             files: Sequence[Path] | None = None, prepare: Prepare | None = None) -> JobSummary:
    batch_size = check_batch_size(batch_size)
    workers = check_workers(workers)
    progress = progress or Progress()
    out = absolute(out)
    _check_output(out, fmt, resume, overwrite)
    size = int(model.input_size)
    dim = 1 if fmt is SCORES else int(model.embedding_size)
    files = resolve_inputs(list(inputs), check_files=False) if files is None else files
    files = select_shard(files, inputs, shard)
    identity = {"kind": fmt.kind, "model": fingerprint, "input_size": size, "dim": dim, "flip": bool(flip),
                "shard": None if shard is None else str(shard)}
    out.parent.mkdir(parents=True, exist_ok=True)
    journal = Journal(journal_path(out), identity, resume)
    wanted = {str(p) for p in files}
    if resume and out.exists():
        try:
            _check_same_job(out, identity)
            journal.append([(str(p), v) for p, v in fmt.read(out) if str(p) in wanted and str(p) not in journal.index])
        except BaseException:
            journal.close()
            raise
    resumed = sum(1 for p in journal.index if p in wanted)
    todo = [p for p in files if str(p) not in journal.index]
    errors: dict[Path, str] = {}
    started = time.perf_counter()
    try:
        with progress.task(f"{fmt.verb} images", len(todo), unit="img") as bar:
            for batch in decode_batches(todo, model.geometry, batch_size, workers, prepare=prepare):
                for path, reason in batch.errors:
                    if strict:
                        raise DataError(path, reason)
                    errors[path] = reason
                rows = []
                if batch.paths:
                    values = np.asarray(model.infer(batch.images, flip=flip), dtype=np.float32)
                    values = values[:, None] if values.ndim == 1 else values
                    if values.shape != (len(batch.paths), dim):
                        raise FacekdError(f"the model returned outputs of shape {values.shape} for "
                                          f"{len(batch.paths)} images (expected {dim} values each)")
                    for path, value in zip(batch.paths, values):
                        if not np.isfinite(value).all():
                            shown = value[0] if dim == 1 else "nan or inf values"
                            reason = f"the model returned a non-finite {fmt.kind[:-1]} ({shown})"
                            if strict:
                                raise DataError(path, reason)
                            errors[path] = reason
                        else:
                            rows.append((str(path), value))
                journal.append(rows)
                bar.advance(batch.size)
    except DataError:
        journal.close() if resume else journal.remove()
        raise
    except BaseException:
        journal.close()
        raise
    seconds = time.perf_counter() - started

    done_paths = [p for p in files if str(p) in journal.index]
    error_rows = [(p, errors[p]) for p in files if p in errors]
    errors_csv = _write_errors(out, error_rows)
    if files and not done_paths:
        journal.remove()
        raise DataError(out, f"none of the {len(files)} images could be used (reasons in {errors_csv})")
    fmt.write(out, done_paths, (journal.values(str(p)) for p in done_paths), dim)
    summary = JobSummary(
        kind=fmt.kind, total=len(files), done=len(done_paths) - resumed, resumed=resumed, skipped=len(error_rows),
        seconds=seconds, images_per_second=len(todo) / seconds if seconds > 0 else 0.0, out=out,
        errors_csv=errors_csv, backend=backend, shard=None if shard is None else str(shard))
    record = {"facekd": __version__, "model_digest": fingerprint, "input_size": size, "dim": dim, "flip": bool(flip),
              "inputs": [str(absolute(i)) for i in inputs], **summary.to_dict()}
    atomic_write_text(record_path(out), json.dumps(record, indent=2) + "\n")
    journal.remove()
    return summary


def score_files(model, inputs: Sequence[PathLike], out_csv: PathLike, *, batch_size: int = 64, strict: bool = False,
                resume: bool = False, overwrite: bool = False, workers: int | None = None,
                fingerprint: str | None = None, shard: Shard | None = None, backend: dict | None = None,
                progress: Progress | None = None, files: Sequence[Path] | None = None,
                prepare: Prepare | None = None) -> JobSummary:
    """Score image files, folders (recursive) and image lists into the CSV `out_csv` (see the
    module doc). `model`: a quality predictor from `facekd.load`, `load_onnx` or
    `facekd.inference.open_model`; images are decoded and resized by `workers` threads (None:
    up to 8, 0: none). `fingerprint` (the model file's hash) guards `resume` against mixing
    models; `shard` keeps only that shard's files. `files`: `resolve_inputs(inputs)` when the
    caller already has it (a large folder is then walked once). `prepare(path, image)`: a
    per-file step between decoding and resizing (e.g. an alignment); it changes the outputs, so
    make it part of `fingerprint`."""
    if getattr(model, "task", "quality") != "quality":
        raise ConfigError(f"score needs a quality model, got a {model.task} model")
    return _run_job(model, inputs, out_csv, SCORES, flip=False, batch_size=batch_size, strict=strict, resume=resume,
                    overwrite=overwrite, workers=workers, fingerprint=fingerprint, shard=shard, backend=backend,
                    progress=progress, files=files, prepare=prepare)


def embed_files(model, inputs: Sequence[PathLike], out_npz: PathLike, *, flip: bool = False, batch_size: int = 128,
                strict: bool = False, resume: bool = False, overwrite: bool = False, workers: int | None = None,
                fingerprint: str | None = None, shard: Shard | None = None, backend: dict | None = None,
                progress: Progress | None = None, files: Sequence[Path] | None = None,
                prepare: Prepare | None = None) -> JobSummary:
    """Embed image files, folders and image lists into `out_npz` (`paths`, float32 `embeddings`:
    what `model.infer` gives, L2-normalised for facekd's embedders); `flip` adds each mirrored
    image's embedding first. Otherwise as `score_files`, with a recognition predictor."""
    if getattr(model, "task", "recognition") != "recognition":
        raise ConfigError(f"embed needs a recognition model, got a {model.task} model")
    return _run_job(model, inputs, out_npz, EMBEDDINGS, flip=flip, batch_size=batch_size, strict=strict,
                    resume=resume, overwrite=overwrite, workers=workers, fingerprint=fingerprint, shard=shard,
                    backend=backend, progress=progress, files=files, prepare=prepare)


# ----------------------------------------------------------------------------- merge


def _read_record(path: Path) -> dict | None:
    target = record_path(path)
    if not target.is_file():
        return None
    try:
        record = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(target, f"not a readable run record ({error})") from None
    return record if isinstance(record, dict) else None


def _check_shards(parts: list[Path], records: list[dict | None], partial: bool) -> tuple[list[Path], list[int]]:
    """The parts in shard order and the missing shard indices, after checking that the parts
    are shards of one job."""
    if any(r is None for r in records):
        missing = [str(p) for p, r in zip(parts, records) if r is None]
        raise DataError(missing[0], f"has no run record ({record_path(missing[0]).name}); cannot check it "
                                    "belongs with the others")
    for key in ("kind", "model_digest", "flip", "input_size"):
        values = {json.dumps(r.get(key)) for r in records}
        if len(values) > 1:
            raise DataError(parts[0], f"the outputs come from different jobs ({key} differs: {', '.join(sorted(values))})")
    shards = [r.get("shard") for r in records]
    if None in shards:
        if len(parts) > 1:
            raise DataError(parts[shards.index(None)], "is not a shard (run without --shard); nothing to merge it with")
        return parts, []
    parsed = [tuple(int(v) for v in s.split("/")) for s in shards]
    counts = {n for _, n in parsed}
    if len(counts) > 1:
        raise DataError(parts[0], f"the shards split the job differently ({', '.join(sorted(set(shards)))})")
    count = counts.pop()
    seen: dict[int, Path] = {}
    for part, (index, _) in zip(parts, parsed):
        if index in seen:
            raise DataError(part, f"is shard {index}/{count} again (also {seen[index]})")
        seen[index] = part
    missing = sorted(set(range(count)) - set(seen))
    if missing and not partial:
        listed = ", ".join(map(str, missing[:10])) + ("…" if len(missing) > 10 else "")
        raise DataError(parts[0], f"shards {listed} of {count} are missing (merge them all, or allow a partial merge)")
    return [seen[i] for i in sorted(seen)], missing


def merge_outputs(parts: Sequence[PathLike], out: PathLike, *, partial: bool = False,
                  overwrite: bool = False) -> dict:
    """Join the outputs of a sharded job (scores CSVs or embedding archives) into `out`, in
    shard order, with their errors CSVs; checks with the run records that the parts are the
    shards of one job, each once and (unless `partial`) all of them. Returns a summary."""
    parts = [absolute(p) for p in parts]
    listed_errors = {errors_path(p) for p in parts}
    parts = [p for p in parts if p not in listed_errors]  # a glob like scores.*.csv matches them too
    out = absolute(out)
    if not parts:
        raise ConfigError("merge needs at least one output to read")
    fmt = output_format(out)
    for part in parts:
        if output_format(part) is not fmt:
            raise DataError(part, f"is not a {fmt.suffix} file like {out.name}")
        if not part.is_file():
            raise DataError(part, "not found")
        if part == out:
            raise DataError(part, "is both an input and the output of the merge")
    if out.exists() and not overwrite:
        raise DataError(out, "already exists (overwrite to replace it)")
    records = [_read_record(p) for p in parts]
    ordered, missing = _check_shards(parts, records, partial)
    dim = int(records[0]["dim"])

    owner: dict[str, Path] = {}
    paths: list[Path] = []
    for part in ordered:
        for image in fmt.read_paths(part):
            if (key := str(image)) in owner:
                raise DataError(part, f"{image} is also in {owner[key]}")
            owner[key] = part
            paths.append(image)
    del owner

    def values():
        for part in ordered:
            for _, vector in fmt.read(part):
                if len(vector) != dim:
                    raise DataError(part, f"holds vectors of {len(vector)} values, its run record says {dim}")
                yield vector

    fmt.write(out, paths, values(), dim)
    errors = [row for part in ordered for row in read_errors(part)]
    errors_csv = _write_errors(out, errors)
    summary = {"out": str(out), "parts": len(ordered), "rows": len(paths), "skipped": len(errors),
               "missing_shards": missing, "errors_csv": None if errors_csv is None else str(errors_csv)}
    first = records[0]
    record = {"facekd": __version__, "kind": fmt.kind, "model_digest": first.get("model_digest"),
              "input_size": first.get("input_size"), "dim": dim, "flip": first.get("flip"),
              "merged_from": [str(p) for p in ordered], "shard": None, "missing_shards": missing,
              "total": len(paths) + len(errors)}
    atomic_write_text(record_path(out), json.dumps(record, indent=2) + "\n")
    return summary
