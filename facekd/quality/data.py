"""Quality-labelled image sets for training, pseudo-labelling and evaluation.

A `QualityDataset` holds its sample list and, by default for training, decodes each image when
an item is read: in the trainer's DataLoader worker processes (`TrainConfig.num_workers`), or
in the training process with `num_workers=0`. Memory per rank then does not grow with the set
beyond the sample list. `cache=True` instead decodes every image once, at construction, and
keeps the uint8 result (N·S·S·3 bytes: 10 000 images at 128 px ≈ 0.5 GB, 40 000 at 448 px
≈ 24 GB per process); evaluation sets cache by default (see `QualityDataset`). Normalisation
to float happens per item either way, so the float copy (4× larger) is never held for a set.

Unreadable files are never fatal and never dropped silently: at construction a threaded pass
checks every file without decoding it (`facekd.io.images.probe_image`: exists, readable,
recognised and complete, sane size) and the failures are skipped and listed in `.errors`. A
file that passes but fails to decode later (corrupt compressed data) stays in the set: its item
gets weight 0 (ignored by every term of `facekd.losses.quality.QualityLoss`) and carries
`"failed"` and the reason in `"error"`; the trainer hands each batch to `note_batch`, which
records the failure into `.errors`, and keeps those records in its checkpoints. Decoding is a
function of the file alone, so the failure, and hence training, is deterministic and resumes
exactly.

Training transforms (`transform`), both drawing from `facekd.engine.sample_rng(index)`, so an
item depends only on (seed, epoch, index), whatever the number of workers or processes:
- "flip_shift" (default): the image at the set's geometry, a horizontal flip (p = 0.5) and a
  shift of up to `max_shift` pixels in each direction (reflect-pad then crop back). Nothing is
  resampled, blurred, noised or re-compressed, since quality depends on fine detail.
- "resize_random_crop": Efficient-FIQA's training transform, torchvision's `Resize(S)` +
  `RandomCrop(S)` (no flip): the shorter side resized to S (`resize_shorter_side`), then an
  S×S crop at top in [0, h-S], left in [0, w-S], uniform. A cached set holds the
  shorter-side-resized images.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from facekd.checks import whole_number
from facekd.errors import ConfigError, DataError, FacekdError
from facekd.inference.predictors import check_normalization, preprocess
from facekd.io.decode import (ImageError, check_batch_size, check_geometry, check_workers, load_images, load_one,
                              map_ordered)
from facekd.io.formats import LabeledImage, absolute, read_image_list, read_mos_csv
from facekd.io.images import Resize, center_crop_offsets, probe_image, read_image, resize_shorter_side
from facekd.progress import Progress

__all__ = ["TRANSFORMS", "QualityDataset", "QualitySample", "concat_samples", "from_csv", "from_list"]

#: One quality sample: path, mos (NaN when unlabeled) and loss weight (1.0 unless a pseudo-label).
QualitySample = LabeledImage

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- sample lists


def from_csv(csv_path: PathLike, check_files: bool = False) -> list[QualitySample]:
    """Samples of a `path,mos[,weight]` CSV. Missing images are left for the dataset to skip
    and report, unless `check_files` refuses the CSV outright."""
    return read_mos_csv(csv_path, check_files=check_files)


def from_list(list_path: PathLike, mos: float = math.nan, check_files: bool = False) -> list[QualitySample]:
    """Samples of an image list (one path a line), all with the same `mos` (NaN: unlabeled)."""
    return [QualitySample(path, float(mos)) for path in read_image_list(list_path, check_files=check_files)]


def concat_samples(*sets: Iterable[QualitySample],
                   duplicates: Literal["first", "error"] = "first") -> list[QualitySample]:
    """The samples of several sets in order (e.g. labeled ∪ pseudo-labelled sets).

    An image present in more than one set is kept once: `duplicates="first"` keeps its first
    occurrence (pass the ground-truth set first so its label wins), "error" raises DataError."""
    if duplicates not in ("first", "error"):
        raise ConfigError(f"duplicates must be 'first' or 'error', got {duplicates!r}")
    seen: set[Path] = set()
    result: list[QualitySample] = []
    for samples in sets:
        for sample in samples:
            if sample.path in seen:
                if duplicates == "error":
                    raise DataError(sample.path, "appears in more than one sample set")
                continue
            seen.add(sample.path)
            result.append(sample)
    return result


# ----------------------------------------------------------------------------- dataset

#: Training transforms of `QualityDataset` (see the module doc).
TRANSFORMS = ("flip_shift", "resize_random_crop")


class QualityDataset(Dataset):
    """Images with MOS labels and weights, decoded per item (streaming) or once (`cache=True`).

    Item `i` is a dict: "image" float32 (3, S, S) normalised with `normalization` ({"mean",
    "std"} per RGB channel over [0, 255]), "mos" and "weight" float32 scalars, "index" int64,
    "failed" bool and "error" str (the reason, "" unless the image failed to decode; then the
    image is zeros and the weight 0). `geometry` is a `facekd.io.images.Resize` (a side
    length: stretch to S×S), e.g. `model.geometry`.

    With `train=True` the `transform` of the module doc is applied; it draws from
    `facekd.engine.sample_rng`, so it works only when the facekd trainer reads the set.
    `cache` (None: `not train`): training streams, as a training set is read once an epoch and
    may not fit in memory once per rank; an evaluation set is cached, since it is scored again
    at every evaluation, is read by `predict` on rank 0 alone, and is decoded completely up
    front, so its metrics always cover the same readable images. `workers`: threads of the
    construction pass (decoding with the cache, the header check without).
    Files that fail the construction pass are skipped and listed in `.errors` as (path,
    reason); if none is left, DataError. A training set refuses a NaN/infinite MOS (an
    unlabeled sample) or weight.
    """

    def __init__(self, samples: Sequence[QualitySample], geometry: int | Resize,
                 normalization: Mapping[str, Sequence[float]], train: bool = False, *,
                 cache: bool | None = None, transform: str = "flip_shift",
                 progress: Progress | None = None, workers: int | None = None, max_shift: int = 4,
                 source: PathLike = "quality dataset"):
        self.geometry = check_geometry(geometry)
        self.input_size = self.geometry.size
        self.train = bool(train)
        if transform not in TRANSFORMS:
            raise ConfigError(f"transform must be one of {', '.join(TRANSFORMS)}, got {transform!r}")
        self.transform = transform
        self.max_shift = whole_number(max_shift, "max_shift", 0, self.input_size - 1)
        if cache is not None and not isinstance(cache, bool):
            raise ConfigError(f"cache must be true, false or None, got {cache!r}")
        self.cache = (not self.train) if cache is None else cache
        self.normalization = check_normalization(normalization)
        samples = list(samples)
        if not samples:
            raise DataError(source, "no samples given")
        if self.train:
            for sample in samples:
                if not math.isfinite(sample.mos):
                    raise DataError(sample.path, f"mos {sample.mos!r} is not a finite number (unlabeled "
                                                 "sample in a training set)")
                if not (math.isfinite(sample.weight) and sample.weight >= 0):
                    raise DataError(sample.path, f"weight {sample.weight!r} must be a finite number >= 0")
        self.images: np.ndarray | list[np.ndarray] | None = None
        paths = [s.path for s in samples]
        if self.cache and not self._crops:
            self.images, kept, errors = load_images(paths, self.geometry, progress, workers)
        elif self.cache:
            kept, errors, self.images = self._load_all(paths, progress, workers)
        else:
            kept, errors = _probe_all(paths, progress, workers)
        self._skipped: list[ImageError] = errors
        if len(kept) == 0:
            first_path, first_reason = errors[0]
            raise DataError(source, f"none of the {len(samples)} images could be read "
                                    f"(first: {first_path}: {first_reason})")
        self.samples: list[QualitySample] = [samples[int(i)] for i in kept]
        self._failed: dict[int, str] = {}

    @property
    def _crops(self) -> bool:
        """Items are random crops of shorter-side-resized images ("resize_random_crop" training)."""
        return self.train and self.transform == "resize_random_crop"

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.samples]

    @property
    def mos(self) -> np.ndarray:
        """The labels (float64, NaN where unlabeled), aligned with the samples."""
        return np.asarray([s.mos for s in self.samples], dtype=np.float64)

    @property
    def weights(self) -> np.ndarray:
        return np.asarray([s.weight for s in self.samples], dtype=np.float64)

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the decoded image cache (0 when streaming)."""
        if self.images is None:
            return 0
        if isinstance(self.images, np.ndarray):
            return int(self.images.nbytes)
        return int(sum(image.nbytes for image in self.images))

    # ------------------------------------------------------------------ failures

    @property
    def errors(self) -> list[ImageError]:
        """(path, reason) of every unusable image: those skipped at construction, then those of
        the set that failed to decode when read (recorded by `note_batch`/`iter_batches`)."""
        failed = [(self.samples[i].path, reason) for i, reason in sorted(self._failed.items())]
        return self._skipped + failed

    def note_batch(self, batch: Mapping[str, Any]) -> None:
        """Record the decode failures a collated batch reports (the trainer calls this for every
        batch it loads, in the training process, as items are decoded in worker processes)."""
        failed = batch.get("failed") if isinstance(batch, Mapping) else None
        if failed is None or not bool(failed.any()):
            return
        for row in torch.nonzero(failed.reshape(-1)).reshape(-1).tolist():
            self._failed[int(batch["index"][row])] = str(batch["error"][row])

    def failures(self) -> list[tuple[int, str]]:
        """(index, reason) of the items that failed to decode so far (part of the trainer's checkpoint)."""
        return sorted(self._failed.items())

    def add_failures(self, failures: Iterable[tuple[int, str]]) -> None:
        """Merge (index, reason) records, e.g. restored from a checkpoint or another rank."""
        for index, reason in failures:
            self._failed[int(index)] = str(reason)

    # ------------------------------------------------------------------ decoding

    def _load(self, path: PathLike) -> np.ndarray | str:
        """The image as this set keeps it (shorter side resized for random crops, else at the
        geometry), or the reason it cannot be decoded."""
        if not self._crops:
            return load_one(path, self.geometry)
        try:
            return resize_shorter_side(read_image(path), self.input_size)
        except FacekdError as error:
            return error.reason if isinstance(error, DataError) else str(error)

    def _load_all(self, paths: list[Path], progress: Progress | None, workers: int | None):
        kept: list[int] = []
        errors: list[ImageError] = []
        images: list[np.ndarray] = []
        paths = [absolute(p) for p in paths]
        with (progress or Progress()).task("decoding images", len(paths), unit="img") as bar:
            for index, result in enumerate(map_ordered(self._load, paths, check_workers(workers))):
                if isinstance(result, str):
                    errors.append((paths[index], result))
                else:
                    images.append(result)
                    kept.append(index)
                bar.advance()
        return kept, errors, images

    def _stored(self, index: int) -> np.ndarray | str:
        if self.images is not None:
            return self.images[index]
        return self._load(self.samples[index].path)

    def image(self, index: int) -> np.ndarray | str:
        """The un-augmented model input of item `index` (uint8 S×S×3; the centre crop for
        "resize_random_crop", i.e. Resize(S) + CenterCrop(S)), or the reason it cannot be decoded."""
        stored = self._stored(int(index))
        if isinstance(stored, str) or not self._crops:
            return stored
        top, left = center_crop_offsets(stored.shape[0], stored.shape[1], self.input_size)
        return np.ascontiguousarray(stored[top:top + self.input_size, left:left + self.input_size])

    def iter_batches(self, batch_size: int, workers: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The un-augmented images in order, `batch_size` at a time: (uint8 (B, S, S, 3), ok (B,)
        bool). With the cache, slices of it; streaming, decoded by `workers` threads one batch
        ahead, failures given as zeros with ok False and recorded into `.errors`."""
        batch_size = check_batch_size(batch_size)
        starts = range(0, len(self), batch_size)
        if isinstance(self.images, np.ndarray):
            for start in starts:
                chunk = self.images[start:start + batch_size]
                yield chunk, np.ones(len(chunk), dtype=bool)
            return
        workers = check_workers(workers)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="facekd-decode") if workers else None

        def submit(start: int):
            indices = range(start, min(start + batch_size, len(self)))
            if pool is None:
                return indices, [self.image(i) for i in indices]
            return indices, [pool.submit(self.image, i) for i in indices]

        try:
            pending = submit(0) if len(self) else None
            for start in starts:
                indices, results = pending
                pending = submit(start + batch_size) if start + batch_size < len(self) else None
                size = self.input_size
                images = np.zeros((len(indices), size, size, 3), dtype=np.uint8)
                ok = np.ones(len(indices), dtype=bool)
                for row, (index, result) in enumerate(zip(indices, results)):
                    result = result.result() if pool is not None else result
                    if isinstance(result, str):
                        ok[row] = False
                        self._failed[index] = result
                    else:
                        images[row] = result
                yield images, ok
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ items

    def augment(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Flip (p = 0.5), then shift by up to `max_shift` pixels (reflect padding): no resampling."""
        if rng.random() < 0.5:
            image = image[:, ::-1]
        if self.max_shift:
            s = self.max_shift
            dy, dx = (int(v) for v in rng.integers(-s, s + 1, size=2))
            padded = cv2.copyMakeBorder(np.ascontiguousarray(image), s, s, s, s, cv2.BORDER_REFLECT_101)
            image = padded[s + dy: s + dy + self.input_size, s + dx: s + dx + self.input_size]
        return image

    def random_crop(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """An S×S crop of a shorter-side-resized image, top in [0, h-S] and left in [0, w-S]
        uniform (torchvision's `RandomCrop.get_params`, drawn from `rng`)."""
        size = self.input_size
        top = int(rng.integers(0, image.shape[0] - size + 1))
        left = int(rng.integers(0, image.shape[1] - size + 1))
        return image[top:top + size, left:left + size]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        index = int(index)
        sample = self.samples[index]
        stored = self._stored(index)
        failed = isinstance(stored, str)
        if failed:
            chw = torch.zeros((3, self.input_size, self.input_size), dtype=torch.float32)
        else:
            image = stored
            if self.train:
                from facekd.engine import sample_rng

                rng = sample_rng(index)
                image = self.random_crop(image, rng) if self._crops else self.augment(image, rng)
            chw = preprocess(image, self.normalization)[0]
        return {
            "image": chw,
            "mos": torch.tensor(sample.mos, dtype=torch.float32),
            "weight": torch.tensor(0.0 if failed else sample.weight, dtype=torch.float32),
            "index": torch.tensor(index, dtype=torch.int64),
            "failed": torch.tensor(failed),
            "error": stored if failed else "",
        }


def _probe_one(path: Path) -> str | None:
    try:
        probe_image(path)
    except FacekdError as error:
        return error.reason if isinstance(error, DataError) else str(error)
    return None


def _probe_all(paths: Sequence[PathLike], progress: Progress | None,
               workers: int | None) -> tuple[list[int], list[ImageError]]:
    """Indices of the files that pass the header check, and (path, reason) of the others."""
    paths = [absolute(p) for p in paths]
    kept: list[int] = []
    errors: list[ImageError] = []
    with (progress or Progress()).task("checking images", len(paths), unit="img") as bar:
        for index, reason in enumerate(map_ordered(_probe_one, paths, check_workers(workers))):
            if reason is None:
                kept.append(index)
            else:
                errors.append((paths[index], reason))
            bar.advance()
    return kept, errors
