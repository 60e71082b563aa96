"""Quality-labelled image sets held in memory, for training, pseudo-labelling and evaluation.

A `QualityDataset` decodes and resizes every image once, at construction, and keeps the
uint8 result: N images at S×S pixels take N·S·S·3 bytes (10 000 images at 128 px ≈ 0.5 GB,
at 288 px ≈ 2.5 GB). Normalisation to float happens per sample in `__getitem__`, so the
float copy (4× larger) is never held for the whole set. Files that cannot be read are skipped
and listed in `.errors`.

Training augmentation leaves image quality untouched: a horizontal flip (p = 0.5) and a shift
of up to `max_shift` pixels in each direction (reflect-pad then crop back to the input size).
Nothing is resampled, blurred, noised or re-compressed, since quality depends on fine detail.
The random draws come from `facekd.engine.sample_rng(index)`, so a sample's augmentation
depends only on (seed, epoch, index), whatever the number of workers or processes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from facekd.errors import ConfigError, DataError
from facekd.io.decode import ImageError, check_size, load_images
from facekd.io.formats import LabeledImage, read_image_list, read_mos_csv
from facekd.progress import Progress

__all__ = ["QualityDataset", "QualitySample", "concat_samples", "from_csv", "from_list"]

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


class QualityDataset(Dataset):
    """Images with MOS labels and weights, decoded once and held as uint8 in memory.

    Item `i` is a dict: "image" float32 (3, H, W) normalised with `normalization` ({"mean",
    "std"} per RGB channel over [0, 255]), "mos" and "weight" float32 scalars, "index" int64.
    With `train=True` the flip + shift augmentation of the module doc is applied; it draws
    from `facekd.engine.sample_rng`, so it works only when the facekd trainer reads the set.
    Unreadable files are skipped and listed in `.errors` as (path, reason); if none is left,
    DataError. A training set refuses a NaN/infinite MOS (an unlabeled sample) or weight.
    """

    def __init__(self, samples: Sequence[QualitySample], input_size: int,
                 normalization: Mapping[str, Sequence[float]], train: bool = False,
                 progress: Progress | None = None, workers: int | None = None, max_shift: int = 4,
                 source: PathLike = "quality dataset"):
        self.input_size = check_size(input_size)
        self.train = bool(train)
        if isinstance(max_shift, bool) or not isinstance(max_shift, int) or not 0 <= max_shift < self.input_size:
            raise ConfigError(f"max_shift must be an integer in [0, input_size), got {max_shift!r}")
        self.max_shift = max_shift
        self._mean, self._std = _normalization_arrays(normalization)
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
        images, kept, errors = load_images([s.path for s in samples], self.input_size, progress, workers)
        self.errors: list[ImageError] = errors
        if len(kept) == 0:
            first_path, first_reason = errors[0]
            raise DataError(source, f"none of the {len(samples)} images could be read "
                                    f"(first: {first_path}: {first_reason})")
        self.images = images
        self.samples: list[QualitySample] = [samples[i] for i in kept]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.samples]

    @property
    def mos(self) -> np.ndarray:
        """The labels (float64, NaN where unlabeled), aligned with the images."""
        return np.asarray([s.mos for s in self.samples], dtype=np.float64)

    @property
    def weights(self) -> np.ndarray:
        return np.asarray([s.weight for s in self.samples], dtype=np.float64)

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the decoded image cache."""
        return int(self.images.nbytes)

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

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        image = self.images[index]
        if self.train:
            from facekd.engine import sample_rng

            image = self.augment(image, sample_rng(index))
        chw = ((image.astype(np.float32) - self._mean) / self._std).transpose(2, 0, 1)
        sample = self.samples[index]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(chw)),
            "mos": torch.tensor(sample.mos, dtype=torch.float32),
            "weight": torch.tensor(sample.weight, dtype=torch.float32),
            "index": torch.tensor(index, dtype=torch.int64),
        }


def _normalization_arrays(normalization: Mapping[str, Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    try:
        mean = np.asarray(normalization["mean"], dtype=np.float32).reshape(-1)
        std = np.asarray(normalization["std"], dtype=np.float32).reshape(-1)
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"normalization must be {{'mean': [3 numbers], 'std': [3 numbers]}}, "
                          f"got {normalization!r}") from None
    if mean.shape != (3,) or std.shape != (3,) or not np.isfinite(mean).all() or not (std > 0).all():
        raise ConfigError(f"normalization needs 3 finite means and 3 positive stds, got {dict(normalization)!r}")
    return mean, std
