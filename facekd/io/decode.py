"""Threaded decoding of image files to uint8 RGB arrays at a model's input size.

OpenCV decodes and resizes with the GIL released, so threads scale over cores without the
pickling of worker processes. `load_images` decodes a whole set into one array (training and
evaluation sets); `decode_batches` streams batches with a bounded number decoding ahead, so a
batch job overlaps decoding with inference and holds O(batch) images whatever its length."""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from facekd.checks import whole_number
from facekd.errors import DataError, FacekdError
from facekd.io.formats import absolute
from facekd.io.images import Resize, read_image
from facekd.progress import Progress

__all__ = ["DecodedBatch", "Prepare", "attempt", "check_batch_size", "check_geometry", "check_workers", "decode_batches",
           "default_workers", "load_images", "load_one", "map_ordered"]

PathLike = str | os.PathLike
ImageError = tuple[Path, str]


def default_workers() -> int:
    """Decoding threads used when `workers` is None: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def check_workers(workers: object) -> int:
    """`workers` as an int (None: `default_workers()`), or a ConfigError."""
    if workers is None:
        return default_workers()
    return whole_number(workers, "workers", 0, note=" (0: decode in the calling thread)")


def check_batch_size(batch_size: object) -> int:
    """`batch_size` as an int if it is a positive integer (Python or numpy), else a ConfigError."""
    return whole_number(batch_size, "batch_size")


def check_size(size: object) -> int:
    """An image side length as an int, or a ConfigError."""
    return whole_number(size, "image size")


def check_geometry(size: object) -> Resize:
    """A side length (resized to size×size) or a `Resize`, as a `Resize`; else a ConfigError."""
    return size if isinstance(size, Resize) else Resize(check_size(size))


#: A per-file step between decoding and resizing: `prepare(path, rgb image) -> image` (e.g. a
#: 5-point alignment with that file's landmarks); a FacekdError it raises marks the file bad.
Prepare = Callable[[Path, np.ndarray], np.ndarray]


def attempt(load: Callable[..., np.ndarray], *args) -> np.ndarray | str:
    """`load(*args)`, or the reason it failed when it raises a FacekdError (a DataError's reason,
    without the path: the caller lists it beside the item)."""
    try:
        return load(*args)
    except FacekdError as error:
        return error.reason if isinstance(error, DataError) else str(error)


def _load_file(path: PathLike, size: int | Resize, prepare: Prepare | None) -> np.ndarray:
    image = read_image(path)
    return check_geometry(size)(image if prepare is None else prepare(Path(path), image))


def load_one(path: PathLike, size: int | Resize, prepare: Prepare | None = None) -> np.ndarray | str:
    """`path` decoded to RGB uint8 at the model's input (`size`: a side length to stretch to,
    or a `Resize`), after `prepare` when given, or the reason it cannot be."""
    return attempt(_load_file, path, size, prepare)


def map_ordered(function: Callable, items: Sequence, workers: int) -> Iterable:
    """`function` over `items`, results in input order; threads when workers > 0."""
    if workers == 0 or len(items) <= 1:
        return map(function, items)
    pool = ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="facekd-decode")

    def results():
        try:
            yield from pool.map(function, items)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    return results()


def load_images(paths: Sequence[PathLike], size: int | Resize, progress: Progress | None = None,
                workers: int | None = None) -> tuple[np.ndarray, np.ndarray, list[ImageError]]:
    """Decode and resize each image once: `(images, kept, errors)`.

    `images` is uint8 (K, size, size, 3) RGB in input order; `kept` (int64, K) gives the index
    into `paths` of each image; `errors` lists `(path, reason)` for the files skipped (missing,
    corrupt, not an image...). Memory: K·size²·3 bytes (plus a copy of that when files were
    skipped). `workers` decoding threads (None: `default_workers()`, 0: none). `size` is a
    side length or a `Resize` (see `load_one`)."""
    geometry = check_geometry(size)
    size = geometry.size
    workers = check_workers(workers)
    progress = progress or Progress()
    paths = [absolute(p) for p in paths]
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    kept: list[int] = []
    errors: list[ImageError] = []
    with progress.task("decoding images", len(paths), unit="img") as bar:
        for index, result in enumerate(map_ordered(lambda p: load_one(p, geometry), paths, workers)):
            if isinstance(result, str):
                errors.append((paths[index], result))
            else:
                images[len(kept)] = result
                kept.append(index)
            bar.advance()
    if len(kept) < len(paths):
        images = images[: len(kept)].copy()
    return images, np.asarray(kept, dtype=np.int64), errors


@dataclass
class DecodedBatch:
    """One batch of `decode_batches`: the images that decoded (uint8 (K, S, S, 3), in input
    order, with their `paths`) and the `(path, reason)` of those that did not. `size` is the
    number of input paths the batch covers (K + len(errors)). With a `load` of its own, the
    "paths" are the items it was given."""

    paths: list[Path]
    images: np.ndarray
    errors: list[ImageError] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.paths) + len(self.errors)


def _assemble(batch: Sequence[Path], results: Iterable[np.ndarray | str], size: int) -> DecodedBatch:
    images = np.empty((len(batch), size, size, 3), dtype=np.uint8)
    good: list[Path] = []
    errors: list[ImageError] = []
    for path, result in zip(batch, results):
        if isinstance(result, str):
            errors.append((path, result))
        else:
            images[len(good)] = result
            good.append(path)
    return DecodedBatch(good, images[: len(good)], errors)


DECODER_NICENESS = 10


def _lower_priority() -> None:
    """Run this (decoding) thread at a lower OS priority: the caller's inference is the serial
    step of a job, and with fair shares on busy cores it would wait behind the decoders
    (+25 % throughput for a small model beside JPEG decoding on 2 cores). Linux only."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODER_NICENESS)
    except (AttributeError, OSError):
        pass


def decode_batches(paths: Sequence[Path], size: int | Resize, batch_size: int, workers: int | None = None,
                   ahead: int = 2, prepare: Prepare | None = None,
                   load: Callable[[object], np.ndarray | str] | None = None) -> Iterator[DecodedBatch]:
    """`paths` decoded and resized to size×size, `batch_size` at a time, in input order.

    With `workers` > 0 threads (at a lower OS priority than the caller), up to `ahead` batches
    decode while the caller works on the current one: memory stays at (ahead + 1) batches of
    images however many paths there are. `size`: a side length or a `Resize`; `prepare`: a
    per-file step before the resize (see `Prepare`), run on the decoding threads. `load(item)`
    replaces `load_one` for items that are not image files (e.g. the indices of a RecordIO
    set): it returns the size×size image or the reason it cannot."""
    geometry = check_geometry(size)
    size = geometry.size
    workers = check_workers(workers)
    batch_size = check_batch_size(batch_size)
    starts = range(0, len(paths), batch_size)
    if load is None:
        load_args = (geometry,) if prepare is None else (geometry, prepare)  # after the path

        def load(path):
            return load_one(path, *load_args)
    if workers == 0:
        for start in starts:
            batch = paths[start:start + batch_size]
            yield _assemble(batch, map(load, batch), size)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="facekd-decode", initializer=_lower_priority)
    pending: deque[tuple[Sequence[Path], list[Future]]] = deque()
    next_start = iter(starts)

    def submit() -> None:
        start = next(next_start, None)
        if start is not None:
            batch = paths[start:start + batch_size]
            pending.append((batch, [pool.submit(load, p) for p in batch]))

    try:
        for _ in range(max(1, ahead)):
            submit()
        while pending:
            batch, futures = pending.popleft()
            submit()
            yield _assemble(batch, (future.result() for future in futures), size)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
