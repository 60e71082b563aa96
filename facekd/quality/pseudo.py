"""Pseudo-labels: a teacher's predictions on unlabeled images, mapped to the MOS scale.

As in the reference code of the method, the teacher's raw outputs are mapped to the MOS scale
by a monotone map (`facekd.quality.metrics.ScaleMap`, a 4-parameter logistic) that the caller
fits on the labeled set: `ScaleMap.fit(predict(teacher, labeled_set), labeled_set.mos)`.

Confidence (optional, `confidence="flip"`): the teacher also scores the mirrored image; with
d = |p − p_flip| on the MOS scale and s = the median of d over the set, a sample's weight is
exp(−d / s), floored at `MIN_WEIGHT`, so weights lie in (0, 1] and a typical (median)
disagreement gives weight e⁻¹ ≈ 0.37. The label itself is always the prediction on the
original image, so "none" and "flip" give the same labels and differ only in weights.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from facekd.errors import ConfigError, DataError
from facekd.inference.predictors import QualityModel, evaluating, mirror
from facekd.io.formats import resolve_inputs, write_mos_csv
from facekd.io.decode import check_batch_size
from facekd.progress import Progress
from facekd.io.decode import ImageError, decode_batches
from facekd.quality.data import QualityDataset, QualitySample

__all__ = ["MIN_WEIGHT", "flip_confidence", "predict", "pseudo_label", "write_pseudo_labels"]

#: Smallest confidence weight given to a pseudo-label (keeps weights strictly positive).
MIN_WEIGHT = 1e-6


def predict(model, images: np.ndarray | QualityDataset, batch_size: int = 64,
            progress: Progress | None = None, flip: bool = False) -> np.ndarray:
    """Raw outputs of a quality `FaceModel` on uint8 RGB images (N, H, W, 3) at its input size,
    or on the (un-augmented) images of a `QualityDataset` (decoded batch by batch when it
    streams; an image that fails to decode then scores NaN and is added to its `.errors`).

    Returns float32 (N,), or (N, 2) with `flip=True`: column 0 the original images, column 1
    their horizontal mirrors. Runs through `facekd.inference.predictors` in eval mode on the
    model's device and restores the model's training mode afterwards."""
    batch_size = check_batch_size(batch_size)
    progress = progress or Progress()
    size = int(model.input_size)
    if isinstance(images, QualityDataset):
        if images.input_size != size:
            raise ConfigError(f"the dataset's images are {images.input_size}x{images.input_size} but the model "
                              f"takes {size}x{size}; load them at the model's geometry")
        count, batches = len(images), images.iter_batches(batch_size)
    else:
        array = images
        if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3:
            shape = getattr(array, "shape", type(array).__name__)
            dtype = getattr(array, "dtype", "")
            raise ConfigError(f"predict expects uint8 RGB images of shape (N, H, W, 3), got {dtype} {shape}")
        if array.shape[1:3] != (size, size):
            raise ConfigError(f"images are {array.shape[2]}x{array.shape[1]} but the model takes {size}x{size}; "
                              "load them at the model's input size")
        count = len(array)
        batches = ((array[start:start + batch_size], None) for start in range(0, count, batch_size))
    out = np.empty((count, 2) if flip else (count,), dtype=np.float32)
    with evaluating(model), progress.task("predicting", count) as bar:
        predictor = QualityModel(model, device=None, batch_size=batch_size)
        start = 0
        for chunk, ok in batches:
            rows = slice(start, start + len(chunk))
            if flip:
                out[rows, 0] = predictor.infer(chunk)
                out[rows, 1] = predictor.infer(mirror(chunk))
            else:
                out[rows] = predictor.infer(chunk)
            if ok is not None and not ok.all():
                out[rows][~ok] = np.nan
            start += len(chunk)
            bar.advance(len(chunk))
    return out


def flip_confidence(pred: np.ndarray, pred_flip: np.ndarray) -> np.ndarray:
    """Weights exp(−|p − p_flip| / s), s = median |p − p_flip| (see the module doc), in (0, 1].

    When the median is 0, s is the mean disagreement; when that is 0 too, every weight is 1."""
    gap = np.abs(np.asarray(pred, dtype=np.float64) - np.asarray(pred_flip, dtype=np.float64))
    if gap.size == 0:
        return gap
    scale = float(np.median(gap))
    if scale <= 0:
        scale = float(np.mean(gap))
    if scale <= 0:
        return np.ones_like(gap)
    return np.clip(np.exp(-gap / scale), MIN_WEIGHT, 1.0)


def pseudo_label(model, paths: Sequence[str | os.PathLike], scale_map, *, batch_size: int = 64,
                 confidence: Literal["none", "flip"] = "none",
                 mos_range: tuple[float, float] | None = None, progress: Progress | None = None,
                 workers: int | None = None) -> tuple[list[QualitySample], list[ImageError]]:
    """Label unlabeled images with a teacher: `(samples, errors)`.

    `paths`: image files, folders or image lists (as `resolve_inputs`, missing files reported,
    not refused), decoded at the model's geometry a batch at a time (memory O(batch_size), not
    O(len(paths))). Each label is `scale_map.apply(raw prediction)`, clipped to `mos_range`
    (pass the labeled set's (min, max) MOS; None: no clipping). `confidence="flip"` sets
    weights as described in the module doc, "none" gives 1.0. Unreadable images are skipped
    and returned in `errors` as (path, reason); if no image is readable, DataError."""
    if confidence not in ("none", "flip"):
        raise ConfigError(f"confidence must be 'none' or 'flip', got {confidence!r}")
    if mos_range is not None:
        low, high = (float(v) for v in mos_range)
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise ConfigError(f"mos_range must be two finite numbers (low <= high), got {mos_range!r}")
    files = resolve_inputs(list(paths), check_files=False)
    progress = progress or Progress()
    kept_paths: list[Path] = []
    errors: list[ImageError] = []
    parts: list[np.ndarray] = []
    pending: list[np.ndarray] = []  # decoded images not yet scored: fewer than 2 batches

    def score(count: int) -> None:
        chunk = np.concatenate(pending)
        parts.append(predict(model, chunk[:count], batch_size, flip=confidence == "flip"))
        pending[:] = [chunk[count:]] if count < len(chunk) else []

    with progress.task("pseudo-labelling", len(files), unit="img") as bar:  # O(batch) images in memory
        for batch in decode_batches(files, model.geometry, batch_size, workers):
            errors.extend(batch.errors)
            kept_paths.extend(batch.paths)
            pending.append(batch.images)
            if sum(len(p) for p in pending) >= batch_size:  # the model sees full batches of readable images
                score(batch_size)
            bar.advance(batch.size)
        if pending and sum(len(p) for p in pending):
            score(sum(len(p) for p in pending))
    if not kept_paths:
        raise DataError(files[0] if len(files) == 1 else "unlabeled images",
                        f"none of the {len(files)} images could be read (first: {errors[0][0]}: {errors[0][1]})")
    raw = np.concatenate(parts)
    labels = np.asarray(scale_map.apply(raw[:, 0] if raw.ndim == 2 else raw), dtype=np.float64).reshape(-1)
    if confidence == "flip":
        flipped = np.asarray(scale_map.apply(raw[:, 1]), dtype=np.float64).reshape(-1)
    else:
        flipped = labels
    finite = np.isfinite(labels) & np.isfinite(flipped)
    weights = np.ones(len(labels))
    if confidence == "flip" and finite.any():
        weights[finite] = flip_confidence(labels[finite], flipped[finite])
    if mos_range is not None:
        labels = np.clip(labels, low, high)
    samples: list[QualitySample] = []
    errors = list(errors)
    for row, path in enumerate(kept_paths):
        if not finite[row]:
            errors.append((path, "the teacher's prediction is not a finite number"))
            continue
        samples.append(QualitySample(path, float(labels[row]), float(weights[row])))
    if not samples:
        raise DataError("unlabeled images", "the teacher gave no finite prediction")
    order = {path: i for i, path in enumerate(files)}
    errors.sort(key=lambda item: order.get(Path(item[0]), len(order)))
    return samples, errors


def write_pseudo_labels(csv_path: str | os.PathLike, samples: Sequence[QualitySample]) -> Path:
    """Write pseudo-labels atomically as a `path,mos,weight` CSV (paths relative to the CSV's
    folder when inside it, else absolute); returns the path."""
    write_mos_csv(csv_path, samples, weight_column=True)
    return Path(csv_path)
