"""Teacher embedding cache: a frozen teacher's embeddings of every training image and of its
mirror, computed once (`facekd recognition teacher-cache`) and read by distillation instead of
running the teacher on every step (`facekd recognition distill --teacher-cache`).

A cache is a folder:
- `cache.json`: what made it (format, the teacher's hash and input convention, the training
  set's `IdentitySource.digest`, input size, embedding size, part size);
- `embeddings.f16` and `norms.f32`: float16 (N, 2, D) unit vectors and float32 (N, 2) norms
  of the teacher's raw embeddings (the product is the embedding; raw embeddings can leave
  float16's range, directions cannot), memory-mapped: row i holds image i of the set (in
  `IdentitySource` order) as the teacher sees it in training (decoded, resized to its input
  size), then mirrored. Rows of images that could not be read are NaN;
- `parts/NNNNNN.json`: one per finished part of `part_images` consecutive images, with the
  images of that part it has no embedding of (unreadable, or a non-finite teacher output).
  A killed build loses at most the parts it was working on; running it again computes only
  the missing ones, and `--shard i/n` lets n processes or machines share the parts of one
  cache (on a shared file system).

With flip as the only augmentation the distillation loss from the cache equals the live
teacher's up to float16 rounding of the targets; `TeacherCache.check` refuses a cache made for
other data, another teacher or input size, and `facekd.recognition.train` refuses one for a
`train_transform` that changes pixels beyond a flip."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facekd import __version__
from facekd.errors import ConfigError, DataError
from facekd.io.atomic import atomic_write_text
from facekd.progress import Progress

__all__ = ["TeacherCache", "build_teacher_cache", "CACHE_FORMAT"]

PathLike = str | os.PathLike
CACHE_FORMAT = "facekd-teacher-cache"
CACHE_VERSION = 1
INDEX_FILE = "cache.json"
VALUES_FILE = "embeddings.f16"
NORMS_FILE = "norms.f32"
PARTS_DIR = "parts"
DEFAULT_PART_IMAGES = 16384


def _part_file(folder: Path, part: int) -> Path:
    return folder / PARTS_DIR / f"{part:06d}.json"


def _part_count(index: dict[str, Any]) -> int:
    """How many parts a cache of `index` has: ceil(images / part_images)."""
    return -(-int(index["images"]) // int(index["part_images"]))


def _missing_parts(folder: Path, index: dict[str, Any]) -> list[int]:
    """The parts of the cache `folder` not finished yet."""
    return [p for p in range(_part_count(index)) if not _part_file(folder, p).is_file()]


def _read_index(folder: Path) -> dict[str, Any]:
    path = folder / INDEX_FILE
    if not path.is_file():
        what = "folder" if folder.is_dir() else "path"
        raise DataError(folder, f"is not a teacher cache ({what} without {INDEX_FILE}; make one with "
                                "`facekd recognition teacher-cache`)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(path, f"not a readable teacher cache index ({error})") from None
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
        raise DataError(path, f"not a teacher cache index (no \"format\": \"{CACHE_FORMAT}\")")
    if index.get("version") != CACHE_VERSION:
        raise DataError(path, f"teacher cache version {index.get('version')!r}; this facekd reads version "
                              f"{CACHE_VERSION} (make the cache again)")
    return index


def _stores(index: dict[str, Any]) -> tuple[tuple[str, np.dtype, tuple[int, ...]], ...]:
    """(file, dtype, shape per image) of the cache's arrays: directions, then norms."""
    return ((VALUES_FILE, np.dtype(np.float16), (2, int(index["dim"]))), (NORMS_FILE, np.dtype(np.float32), (2,)))


def _read_arrays(folder: Path, index: dict[str, Any]) -> list[np.memmap]:
    """The cache's arrays, memory-mapped read-only."""
    arrays = []
    for name, dtype, shape in _stores(index):
        shape = (int(index["images"]), *shape)
        path = folder / name
        expected = int(np.prod(shape)) * dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
            raise DataError(path, f"should hold {expected} bytes ({shape} {dtype}) for this teacher cache, found {found}")
        arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=shape))
    return arrays


@dataclass
class CacheSummary:
    """What a build did: `parts` done by this run, `resumed` (already done), `skipped` images."""

    out: Path
    images: int
    dim: int
    parts: int
    resumed: int
    total_parts: int
    skipped: int
    seconds: float
    images_per_second: float
    complete: bool
    backend: dict | None = None

    def to_dict(self) -> dict:
        return {**self.__dict__, "out": str(self.out)}


def build_teacher_cache(teacher: PathLike, data: PathLike, out: PathLike, *, convention=None,
                        backend: str = "auto", device: str = "cpu", threads: int | None = None,
                        batch_size: int = 128, workers: int | None = None,
                        part_images: int = DEFAULT_PART_IMAGES, shard=None, overwrite: bool = False,
                        progress: Progress | None = None) -> CacheSummary:
    """Embed every image of the training set `data` (an identity folder or a `.rec`) and its
    mirror with `teacher` (a facekd model file or an `.onnx` recognizer, with `convention` for
    one from elsewhere) into the cache folder `out` (see the module doc). An existing cache of
    the same teacher and data is completed; one of another is refused unless `overwrite`.
    `shard` (a `facekd.inference.Shard`): only the parts p with p % count == index."""
    from facekd.checks import whole_number
    from facekd.inference import open_model
    from facekd.inference.conventions import model_fingerprint
    from facekd.inference.predictors import mirror
    from facekd.io.decode import attempt, check_batch_size, decode_batches
    from facekd.io.images import resize_to
    from facekd.recognition.data import IdentitySource

    progress = progress or Progress()
    part_images = whole_number(part_images, "part_images")
    check_batch_size(batch_size)
    out = Path(out)
    source = IdentitySource(data, progress=progress)
    predictor, choice = open_model(teacher, backend=backend, device=device, threads=threads, batch_size=batch_size,
                                   progress=progress, convention=convention)
    if predictor.task != "recognition":
        raise ConfigError(f"{teacher}: the teacher is a {predictor.task} model, not a recognition model")
    if predictor.geometry.mode != "stretch":
        raise ConfigError(f"{teacher}: its inputs are made by {predictor.geometry.mode}, training images are "
                          "stretched to the input size; the cache would not match what the student sees")
    size = predictor.input_size
    index = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "facekd": __version__,
             "teacher": {"path": str(teacher), "digest": model_fingerprint(teacher, convention),
                         "arch": predictor.info["arch"]},
             "data": {"path": str(source.path), "kind": source.kind, "digest": source.digest(),
                      "classes": int(source.num_classes)},
             "images": len(source), "input_size": size, "dim": int(predictor.embedding_size),
             "part_images": part_images}
    total_parts = _part_count(index)
    _open_for_build(out, index, overwrite)
    parts = [p for p in range(total_parts) if shard is None or p % shard.count == shard.index]
    todo = [p for p in parts if not _part_file(out, p).is_file()]
    resumed = len(parts) - len(todo)
    if resumed:
        progress.log(f"{out}: {resumed} of {len(parts)} parts already done")

    def load(item: int) -> np.ndarray | str:
        return attempt(lambda: resize_to(source.read(item), (size, size)))

    started = time.perf_counter()
    skipped = done_images = 0
    stores = _stores(index)
    with progress.task("embedding training images with the teacher",
                       sum(min(part_images, len(source) - p * part_images) for p in todo), unit="img") as bar, \
            contextlib.ExitStack() as files:
        handles = [files.enter_context(open(out / name, "r+b")) for name, _, _ in stores]
        for part in todo:
            first = part * part_images
            items = list(range(first, min(len(source), first + part_images)))
            raw = np.full((len(items), 2, index["dim"]), np.nan, dtype=np.float32)  # NaN: could not be read
            errors: list[list] = []
            for batch in decode_batches(items, size, choice.batch_size, workers, load=load):
                errors += [[item, source.name(item), reason] for item, reason in batch.errors]
                if batch.paths:
                    at = np.asarray(batch.paths) - first
                    raw[at, 0] = predictor.raw(batch.images)
                    raw[at, 1] = predictor.raw(mirror(batch.images))
                    for item in at[~np.isfinite(raw[at]).all(axis=(1, 2))]:
                        raw[item] = np.nan
                        errors.append([first + int(item), source.name(first + int(item)),
                                       "the teacher returned a non-finite embedding"])
                bar.advance(batch.size)
            norms = np.linalg.norm(raw, axis=2)
            directions = raw / np.maximum(norms, 1e-12)[..., None]
            # the part's own bytes only: processes sharing the cache never write over each other's
            for handle, (_, dtype, shape), array in zip(handles, stores, (directions, norms)):
                os.pwrite(handle.fileno(), array.astype(dtype).tobytes(), first * int(np.prod(shape)) * dtype.itemsize)
                os.fsync(handle.fileno())
            skipped += len(errors)
            done_images += len(items)
            atomic_write_text(_part_file(out, part), json.dumps({"images": len(items), "errors": errors}) + "\n")
    seconds = time.perf_counter() - started
    complete = not _missing_parts(out, index)
    return CacheSummary(out, len(source), index["dim"], len(todo), resumed, total_parts, skipped, seconds,
                        done_images / seconds if seconds > 0 else 0.0, complete, choice.to_dict())


def _open_for_build(out: Path, index: dict[str, Any], overwrite: bool) -> None:
    """Create the cache `out` (index, zero-filled values, parts folder), or check that the one
    there is of the same teacher and data (another is removed with `overwrite`, else refused).
    Processes started together on one cache (`--shard`) agree on which one creates it."""
    if not (out / INDEX_FILE).is_file() and (out / VALUES_FILE).is_file():
        _wait_for(out / INDEX_FILE)  # another process is creating it
    if (out / INDEX_FILE).is_file():
        existing = _read_index(out)
        differing = [key for key in ("teacher", "data") if existing.get(key, {}).get("digest") != index[key]["digest"]]
        differing += [key for key in ("input_size", "dim", "part_images") if existing.get(key) != index[key]]
        if not differing:
            return
        if not overwrite:
            raise DataError(out, f"holds a teacher cache of another teacher or data ({', '.join(differing)} "
                                 "differ); give another --out, or --overwrite to replace it")
        shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
        for name in (INDEX_FILE, VALUES_FILE, NORMS_FILE):
            (out / name).unlink(missing_ok=True)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(out, "exists and is not a teacher cache; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    try:
        with open(out / VALUES_FILE, "xb"):  # exclusive: one process creates the cache
            pass
    except FileExistsError:
        _wait_for(out / INDEX_FILE)
        return _open_for_build(out, index, overwrite=False)
    for name, dtype, shape in _stores(index):
        with open(out / name, "r+b" if name == VALUES_FILE else "wb") as handle:
            handle.truncate(int(index["images"]) * int(np.prod(shape)) * dtype.itemsize)
    (out / PARTS_DIR).mkdir(exist_ok=True)
    atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=2) + "\n")


def _wait_for(path: Path, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.is_file():
        if time.monotonic() > deadline:
            raise DataError(path.parent, f"has {VALUES_FILE} but no {INDEX_FILE} after {seconds:.0f} s: a build "
                                         "was killed while creating it; remove the folder and start again")
        time.sleep(0.5)


class TeacherCache(nn.Module):
    """A finished teacher cache, read-only, as the frozen teacher of a distillation:
    `lookup(samples, flips)` gives the teacher's float32 embeddings of those training images."""

    def __init__(self, folder: PathLike):
        super().__init__()
        self.folder = Path(folder)
        self.index = _read_index(self.folder)
        total_parts = _part_count(self.index)
        missing = _missing_parts(self.folder, self.index)
        if missing:
            raise DataError(self.folder, f"teacher cache is incomplete: {len(missing)} of {total_parts} parts are "
                                         "missing (run `facekd recognition teacher-cache` again to finish it)")
        #: image index → (name, reason) of the images the cache has no embedding of
        self.missing = {int(row[0]): (row[1], row[2]) for p in range(total_parts)
                        for row in json.loads(_part_file(self.folder, p).read_text(encoding="utf-8"))["errors"]}
        self.directions, self.norms = _read_arrays(self.folder, self.index)
        self.task, self.arch = "recognition", self.index["teacher"]["arch"]
        self.input_size, self.embedding_size = int(self.index["input_size"]), int(self.index["dim"])

    @property
    def teacher_digest(self) -> str:
        return self.index["teacher"]["digest"]

    def check(self, source, input_size: int, teacher_digest: str | None = None) -> None:
        """DataError unless this cache was made for `source` (an IdentitySource), at
        `input_size`, and (when given) by the teacher whose `model_fingerprint` is `teacher_digest`."""
        data = self.index["data"]
        if data["digest"] != source.digest():
            raise DataError(self.folder, f"teacher cache of other training data ({data['path']}, {self.index['images']} "
                                         f"images), not {source.path} ({len(source)} images): make one for this set")
        if self.input_size != int(input_size):
            raise DataError(self.folder, f"teacher cache of {self.input_size}px images; the student takes "
                                         f"{input_size}px (distillation feeds both the same images)")
        if teacher_digest is not None and teacher_digest != self.teacher_digest:
            raise DataError(self.folder, f"teacher cache made by another teacher ({self.index['teacher']['path']}) "
                                         "than the one given: make one with this teacher, or leave --teacher out")

    def lookup(self, samples: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """float32 (B, D): the teacher's embeddings of training images `samples` (their
        IdentitySource indices), mirrored where `flips`."""
        at = (samples.cpu().numpy(), flips.cpu().numpy().astype(np.int64))
        rows = self.directions[at].astype(np.float32) * self.norms[at][:, None]
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            name, reason = self.missing.get(int(at[0][~finite][0]), ("?", "not recorded"))
            raise DataError(name, f"has no teacher embedding in {self.folder} ({reason})")
        return torch.from_numpy(rows).to(samples.device)

    def embeddings(self, flip: int) -> np.ndarray:
        """float32 (N, D): every image's embedding (flip 0), or its mirror's (flip 1)."""
        return np.asarray(self.directions[:, flip], dtype=np.float32) * self.norms[:, flip, None]
