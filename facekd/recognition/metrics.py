"""Face verification metrics: ROC, TPR at fixed FPR levels, LFW-style k-fold accuracy, AUC,
EER, the scores of every pair of an identity set, and ROC plots.

Conventions, shared by every function here:
- `scores` is a 1-D array of pair similarities (higher = more likely the same person) and
  `issame` a matching 1-D array of booleans (0/1 accepted) marking the genuine pairs.
- A threshold `t` accepts a pair when `score >= t`.
- Bad inputs (different lengths, no genuine or no impostor pair, NaN or infinite scores)
  raise `FacekdError`; bad settings (FPR levels, folds, max_pairs) raise `ConfigError`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from facekd.checks import whole_number
from facekd.errors import ConfigError, FacekdError

FPR_LEVELS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)

# all_pairs_scores computes the similarity matrix in row blocks of at most this many entries
_BLOCK_ELEMENTS = 1 << 22  # 32 MiB of float64
# slack for `level * negatives` landing a rounding error below an integer
_COUNT_TOLERANCE = 1e-9
_PLOT_MIN_FPR = 1e-6

ArrayLike = Sequence[float] | np.ndarray


# ---------------------------------------------------------------- validation


def comparison_arrays(scores: ArrayLike, issame: ArrayLike, where: str = "verification metrics",
                      need_both: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (float64 finite scores, bool issame) of one length; with
    `need_both`, at least one genuine and one impostor pair. Errors start with `where`."""
    try:
        score_arr = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise FacekdError(f"{where}: scores are not numbers ({exc})") from None
    if score_arr.ndim != 1:
        raise FacekdError(f"{where}: scores must be 1-D, got shape {score_arr.shape}")
    same_arr = np.asarray(issame)
    if same_arr.ndim != 1:
        raise FacekdError(f"{where}: issame must be 1-D, got shape {same_arr.shape}")
    if same_arr.dtype != bool:
        if not np.issubdtype(same_arr.dtype, np.number) or not np.isin(same_arr, (0, 1)).all():
            raise FacekdError(f"{where}: issame must hold booleans or 0/1 values")
        same_arr = same_arr.astype(bool)
    if score_arr.size != same_arr.size:
        raise FacekdError(f"{where}: {score_arr.size} scores but {same_arr.size} issame labels")
    if score_arr.size == 0 and need_both:
        raise FacekdError(f"{where}: no pairs")
    nan_count = int(np.isnan(score_arr).sum())
    inf_count = int(np.isinf(score_arr).sum())
    if nan_count or inf_count:
        first = int(np.flatnonzero(~np.isfinite(score_arr))[0])
        raise FacekdError(f"{where}: {nan_count} NaN and {inf_count} infinite score(s) "
                          f"among {score_arr.size} pairs, first at index {first}")
    if need_both:
        positives = int(same_arr.sum())
        if positives == 0:
            raise FacekdError(f"{where}: no genuine (same-identity) pair among {same_arr.size}")
        if positives == same_arr.size:
            raise FacekdError(f"{where}: no impostor (different-identity) pair among {same_arr.size}")
    return score_arr, same_arr



def _as_levels(levels: Sequence[float]) -> list[float]:
    try:
        values = [float(level) for level in levels]
    except (TypeError, ValueError):
        raise ConfigError(f"fpr levels: must be a list of numbers, got {levels!r}") from None
    for value in values:
        if not (0.0 < value <= 1.0):  # also rejects NaN
            raise ConfigError(f"fpr levels: each level must be in (0, 1], got {value}")
    return values


def _just_below(value: float) -> float:
    """A threshold strictly below `value` (value - 1, or the next float down at huge magnitudes)."""
    lower = value - 1.0
    return float(lower if lower < value else np.nextafter(value, -np.inf))


def _just_above(value: float) -> float:
    """A threshold strictly above `value` (value + 1, or the next float up at huge magnitudes)."""
    upper = value + 1.0
    return float(upper if upper > value else np.nextafter(value, np.inf))


# ---------------------------------------------------------------- ROC


def _roc_counts(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true accept counts at every distinct threshold, highest first, from (0, 0) at +inf.

    scikit-learn's `roc_curve` walks the sorted scores (tied pairs are accepted together); its
    rates are turned back into exact counts."""
    from sklearn.metrics import roc_curve as sklearn_roc_curve  # lazy: a heavy import

    fpr, tpr, thresholds = sklearn_roc_curve(issame, scores, drop_intermediate=False)
    positives = int(issame.sum())
    return np.rint(fpr * (issame.size - positives)), np.rint(tpr * positives), thresholds


def roc_curve(scores: ArrayLike, issame: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC: (fpr, tpr, thresholds), one point per distinct score, highest threshold first.

    Point k accepts every pair with `score >= thresholds[k]`; the curve starts at (0, 0) with
    threshold +inf and ends at (1, 1): `sklearn.metrics.roc_curve(..., drop_intermediate=False)`
    after facekd's input checks.
    """
    score_arr, same_arr = comparison_arrays(scores, issame)
    fps, tps, thresholds = _roc_counts(score_arr, same_arr)
    return fps / fps[-1], tps / tps[-1], thresholds


def _tpr_at_fpr_from_counts(fps: np.ndarray, tps: np.ndarray, thresholds: np.ndarray,
                            levels: list[float]) -> list[dict[str, Any]]:
    negatives, positives = int(fps[-1]), int(tps[-1])
    results = []
    for level in levels:
        allowed = math.floor(level * negatives + _COUNT_TOLERANCE)
        entry: dict[str, Any] = {"fpr_level": level, "tpr": None, "threshold": None,
                                 "achieved_fpr": None, "supported": allowed >= 1,
                                 "false_accepts": allowed}
        if allowed >= 1:
            last = int(np.searchsorted(fps, allowed, side="right")) - 1  # fps is non-decreasing
            best = int(np.searchsorted(tps, tps[last], side="left"))  # same TPR, fewest false accepts
            threshold = thresholds[best]
            entry.update(
                tpr=float(tps[best] / positives),
                # +inf (nothing accepted) is reported as a finite value above every score
                threshold=float(threshold) if np.isfinite(threshold) else _just_above(float(thresholds[1])),
                achieved_fpr=float(fps[best] / negatives),
            )
        results.append(entry)
    return results


def tpr_at_fpr(scores: ArrayLike, issame: ArrayLike,
               levels: Sequence[float] = FPR_LEVELS) -> list[dict[str, Any]]:
    """TPR at each FPR level, one dict per level, in the given order.

    Rule: with `negatives` impostor pairs a level allows `false_accepts = floor(level *
    negatives)` false accepts. The reported operating point is the ROC point with the highest
    TPR among those with at most that many false accepts (achieved FPR <= level, never
    interpolated); among points of equal TPR, the one with the fewest false accepts (highest
    threshold). When `false_accepts` is 0 (`level * negatives < 1`) the pair count cannot
    support the level: `supported` is False and `tpr`, `threshold`, `achieved_fpr` are None.
    When even the highest score's run of ties holds too many impostors, the point is (0, 0) and
    the threshold a finite value above every score.

    Keys: fpr_level, tpr, threshold (accept `score >= threshold`), achieved_fpr, supported,
    false_accepts (the number allowed).
    """
    level_list = _as_levels(levels)
    score_arr, same_arr = comparison_arrays(scores, issame)
    return _tpr_at_fpr_from_counts(*_roc_counts(score_arr, same_arr), level_list)


def _eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Where the ROC, linear between points, crosses FPR = FNR (= 1 - TPR)."""
    gap = fpr + tpr - 1.0  # FPR - FNR: non-decreasing along the curve, -1 at (0, 0) and +1 at (1, 1)
    cross = int(np.argmax(gap >= 0.0))
    if gap[cross] == 0.0:
        return float(fpr[cross])
    before = cross - 1
    fraction = -gap[before] / (gap[cross] - gap[before])
    return float(fpr[before] + fraction * (fpr[cross] - fpr[before]))


# ---------------------------------------------------------------- k-fold accuracy


def _best_threshold(scores: np.ndarray, issame: np.ndarray) -> float:
    """The threshold maximising accuracy on (scores, issame); ties go to the smallest.

    Candidates, ascending: below the minimum (accept all), midpoints of consecutive distinct
    scores, above the maximum (accept none)."""
    distinct = np.unique(scores)
    positives = np.sort(scores[issame])
    negatives = np.sort(scores[~issame])
    # candidate k < len(distinct) accepts exactly the scores >= distinct[k]
    positives_rejected = np.searchsorted(positives, distinct, side="left")
    negatives_rejected = np.searchsorted(negatives, distinct, side="left")
    correct = np.r_[positives.size - positives_rejected + negatives_rejected, negatives.size]
    best = int(np.argmax(correct))  # first maximum = smallest threshold
    if best == 0:
        return _just_below(float(distinct[0]))
    if best == distinct.size:
        return _just_above(float(distinct[-1]))
    low, high = float(distinct[best - 1]), float(distinct[best])
    middle = low / 2 + high / 2
    return middle if middle > low else high  # adjacent floats: the midpoint may round onto `low`


def _kfold_accuracy(scores: np.ndarray, issame: np.ndarray, folds: int) -> dict[str, Any]:
    if scores.size < folds:
        raise FacekdError(f"verification accuracy: {scores.size} pair(s) cannot be split into {folds} folds")
    thresholds, accuracies = [], []
    for test in np.array_split(np.arange(scores.size), folds):
        train = np.ones(scores.size, dtype=bool)
        train[test] = False
        threshold = _best_threshold(scores[train], issame[train])
        accepted = scores[test] >= threshold
        thresholds.append(threshold)
        accuracies.append(float(np.mean(accepted == issame[test])))
    return {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
            "thresholds": thresholds, "fold_accuracies": accuracies}


def kfold_accuracy(scores: ArrayLike, issame: ArrayLike, folds: int = 10) -> dict[str, Any]:
    """LFW-style verification accuracy, as insightface reports it.

    The pairs are cut, in input order, into `folds` contiguous folds (sizes as
    `numpy.array_split`, i.e. sklearn's KFold without shuffling). For each fold the threshold
    that maximises accuracy on the other folds is chosen (see `_best_threshold`) and the
    accuracy of `score >= threshold` is measured on the held-out fold.
    Returns {"mean", "std" (population, ddof=0), "thresholds", "fold_accuracies"}.
    """
    fold_count = whole_number(folds, "folds:", 2)
    score_arr, same_arr = comparison_arrays(scores, issame)
    return _kfold_accuracy(score_arr, same_arr, fold_count)


# ---------------------------------------------------------------- report


def verification_report(scores: ArrayLike, issame: ArrayLike, levels: Sequence[float] = FPR_LEVELS,
                        folds: int | None = 10) -> dict[str, Any]:
    """Every verification figure in one JSON-able dict (Python ints, floats, bools and None).

    Keys: pairs, positives, negatives, folds, accuracy and accuracy_std (k-fold mean and std,
    None when there are fewer pairs than folds or `folds` is None), tpr_at_fpr (as
    `tpr_at_fpr`), auc (trapezoid rule over the exact ROC, ties counting half), eer (equal error
    rate, interpolated on the ROC).
    """
    level_list = _as_levels(levels)
    fold_count = None if folds is None else whole_number(folds, "folds:", 2, note=" or None")
    score_arr, same_arr = comparison_arrays(scores, issame)
    from sklearn.metrics import auc as sklearn_auc

    fps, tps, thresholds = _roc_counts(score_arr, same_arr)
    fpr, tpr = fps / fps[-1], tps / tps[-1]
    accuracy = (_kfold_accuracy(score_arr, same_arr, fold_count)
                if fold_count is not None and score_arr.size >= fold_count else None)
    return {
        "pairs": int(score_arr.size),
        "positives": int(tps[-1]),
        "negatives": int(fps[-1]),
        "folds": fold_count,
        "accuracy": accuracy["mean"] if accuracy else None,
        "accuracy_std": accuracy["std"] if accuracy else None,
        "tpr_at_fpr": _tpr_at_fpr_from_counts(fps, tps, thresholds, level_list),
        "auc": float(sklearn_auc(fpr, tpr)),
        "eer": _eer(fpr, tpr),
    }


# ---------------------------------------------------------------- all pairs


def all_pairs_scores(embeddings: np.ndarray, labels: ArrayLike,
                     max_pairs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity and same-identity flag of every pair i < j (row-major: (0,1), (0,2), ...).

    The embeddings are L2-normalised; the similarity matrix is computed in row blocks of at
    most `_BLOCK_ELEMENTS` entries, so memory beyond the two outputs stays bounded.
    `max_pairs` refuses sets whose N·(N-1)/2 pairs would exceed it.
    """
    if max_pairs is not None:
        whole_number(max_pairs, "max_pairs:", note=" or None")
    try:
        vectors = np.asarray(embeddings, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise FacekdError(f"all pairs: embeddings are not numbers ({exc})") from None
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise FacekdError(f"all pairs: embeddings must have shape (N, D), got {vectors.shape}")
    label_arr = np.asarray(labels)
    count = vectors.shape[0]
    if label_arr.shape != (count,):
        raise FacekdError(f"all pairs: {count} embeddings but labels of shape {label_arr.shape}")
    if count < 2:
        raise FacekdError(f"all pairs: need at least 2 embeddings, got {count}")
    if np.issubdtype(label_arr.dtype, np.floating) and not np.isfinite(label_arr).all():
        raise FacekdError(f"all pairs: {int((~np.isfinite(label_arr)).sum())} label(s) are NaN or infinite")
    bad_rows = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad_rows.size:
        raise FacekdError(f"all pairs: {bad_rows.size} embedding(s) hold NaN or infinite values, "
                          f"first at index {int(bad_rows[0])}")
    norms = np.linalg.norm(vectors, axis=1)
    zero_rows = np.flatnonzero(norms == 0.0)
    if zero_rows.size:
        raise FacekdError(f"all pairs: {zero_rows.size} embedding(s) are all zeros and cannot be "
                          f"normalised, first at index {int(zero_rows[0])}")
    pair_count = count * (count - 1) // 2
    if max_pairs is not None and pair_count > max_pairs:
        raise FacekdError(f"all pairs: {count} embeddings make {pair_count:,} pairs, more than "
                          f"max_pairs={max_pairs:,}")
    unit = vectors / norms[:, None]
    scores = np.empty(pair_count, dtype=np.float64)
    issame = np.empty(pair_count, dtype=bool)
    rows_per_block = max(1, _BLOCK_ELEMENTS // count)
    for start in range(0, count - 1, rows_per_block):  # the last row has no pair of its own
        stop = min(start + rows_per_block, count - 1)
        block = unit[start:stop] @ unit[start:].T  # row r is embedding start + r against start..N-1
        upper = np.arange(count - start)[None, :] > np.arange(stop - start)[:, None]
        offset = start * count - start * (start + 1) // 2  # pairs of the rows before `start`
        end = stop * count - stop * (stop + 1) // 2
        scores[offset:end] = block[upper]
        issame[offset:end] = (label_arr[start:stop, None] == label_arr[None, start:])[upper]
    return scores, issame


# ---------------------------------------------------------------- plot


def plot_roc(curves: Mapping[str, tuple[ArrayLike, ArrayLike]], path: str | os.PathLike,
             title: str | None = None) -> Path:
    """Save ROC curves (name -> (fpr, tpr)) as a PNG with a log FPR axis; returns the path.

    The FPR axis runs from the smallest positive FPR of any curve (1e-6 when there is none
    below 1) to 1; points at lower FPR (FPR = 0) are drawn at its left edge. Dotted lines mark
    the `FPR_LEVELS` in range. The file is written atomically.
    """
    from facekd.plots import new_figure, save_png

    if not curves:
        raise ValueError("plot_roc: no curves to plot")
    prepared = []
    for name, (fpr, tpr) in curves.items():
        fpr_arr, tpr_arr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
        if fpr_arr.ndim != 1 or fpr_arr.shape != tpr_arr.shape or fpr_arr.size == 0:
            raise ValueError(f"plot_roc: curve {name!r} needs fpr and tpr of one equal length, "
                             f"got shapes {fpr_arr.shape} and {tpr_arr.shape}")
        prepared.append((str(name), fpr_arr, tpr_arr))
    positive = [float(fpr[(fpr > 0) & (fpr < 1)].min()) for _, fpr, _ in prepared if ((fpr > 0) & (fpr < 1)).any()]
    x_min = min(positive) if positive else _PLOT_MIN_FPR

    figure = new_figure()
    axes = figure.add_subplot()
    for level in FPR_LEVELS:
        if x_min <= level <= 1.0:
            axes.axvline(level, color="0.5", linestyle=":", linewidth=0.9)
    for name, fpr, tpr in prepared:
        axes.plot(np.maximum(fpr, x_min), tpr, label=name, linewidth=1.6)
    axes.set_xscale("log")
    axes.set_xlim(x_min, 1.0)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("False positive rate")
    axes.set_ylabel("True positive rate")
    if title:
        axes.set_title(title)
    axes.grid(True, which="major", alpha=0.5)
    axes.grid(True, which="minor", alpha=0.15)
    axes.legend(loc="lower right")
    figure.tight_layout()
    return save_png(figure, path, "ROC plot")
