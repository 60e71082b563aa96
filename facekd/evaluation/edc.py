"""Error-versus-Discard Characteristic (EDC): a quality model judged by a face recognizer.

Following ISO/IEC 29794-1 and Schlett et al., "Considerations on the Evaluation of Biometric
Quality Assessment Algorithms" (IEEE T-BIOM 2023). Conventions, shared by every function here:

- A comparison (pair) is accepted as a match when `score >= threshold`; a genuine comparison
  with `score < threshold` is a false non-match. Scores are compared in float64.
- The threshold is fixed ONCE on the full set (at a target FMR, or at a target starting FNMR)
  and kept while comparisons are discarded. After that only the genuine comparisons are used:
  the EDC plots FNMR, and discarding does not move the threshold, so the impostor side plays
  no further part.
- A comparison's quality is the minimum of its two images' quality scores (`pair_quality`);
  higher means better. The lowest-quality comparisons are discarded first, and comparisons of
  equal quality are discarded together (a quality threshold cannot split them).
- pAUC is the area under the EDC as a step function (see `partial_auc`), as in the reference
  EDC code of Schlett et al.; it is reported raw, relative to the start
  (`pauc / (fnmr_start * limit)`) and minus the theoretical best's area.
- Bad inputs (different lengths, NaN quality, NaN or infinite similarity scores, no genuine
  comparison, too few impostors for the FMR) raise `FacekdError`; bad settings (fmr, fnmr,
  limits, max_discard, seed) raise `ConfigError`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from facekd.checks import real_number, whole_number
from facekd.errors import ConfigError, FacekdError

# slack for `rate * count` landing a rounding error below an integer (as recognition.metrics)
_COUNT_TOLERANCE = 1e-9
_PLOT_MARGIN = 0.1

ArrayLike = Sequence[float] | np.ndarray


# ---------------------------------------------------------------- validation


def _as_vector(values: ArrayLike, what: str) -> np.ndarray:
    """A 1-D float64 array, or FacekdError naming `what`."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise FacekdError(f"edc: {what} are not numbers ({exc})") from None
    if array.ndim != 1:
        raise FacekdError(f"edc: {what} must be 1-D, got shape {array.shape}")
    return array


def _check_finite_scores(scores: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(scores)
    if bad.any():
        raise FacekdError(f"edc: {int(bad.sum())} of {scores.size} {what} are NaN or infinite, "
                          f"first at index {int(np.flatnonzero(bad)[0])}")


def _as_scores_and_labels(scores: ArrayLike, issame: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(float64 finite scores, bool issame) of one equal length."""
    from facekd.recognition.metrics import comparison_arrays

    return comparison_arrays(scores, issame, where="edc", need_both=False)


def _genuine_only(scores: np.ndarray, issame: np.ndarray) -> np.ndarray:
    genuine = scores[issame]
    if genuine.size == 0:
        raise FacekdError(f"edc: no genuine (same-identity) comparison among {scores.size}")
    return genuine


def _as_rate(value: float, name: str, allow_zero: bool) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: must be a number, got {value!r}") from None
    low_ok = rate >= 0.0 if allow_zero else rate > 0.0
    if not (low_ok and rate < 1.0):  # also rejects NaN
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ConfigError(f"{name}: must be in {interval}, got {value!r}")
    return rate


def _as_threshold(threshold: float) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ConfigError(f"threshold: must be a number, got {threshold!r}") from None
    if math.isnan(value):
        raise ConfigError("threshold: must be a number, got nan")
    return value


def _as_fraction(value: float | None, name: str) -> float | None:
    return None if value is None else real_number(value, f"{name}:", 0.0, 1.0)


def _as_limits(limits: Sequence[float]) -> list[float]:
    try:
        values = [float(limit) for limit in limits]
    except (TypeError, ValueError):
        raise ConfigError(f"limits: must be a list of numbers, got {limits!r}") from None
    if not values:
        raise ConfigError("limits: at least one discard limit is needed")
    for value in values:
        if not (0.0 < value <= 1.0):
            raise ConfigError(f"limits: each limit must be in (0, 1], got {value}")
    return sorted(set(values))


# ---------------------------------------------------------------- comparison quality and threshold


def pair_quality(q_a: ArrayLike, q_b: ArrayLike) -> np.ndarray:
    """Comparison quality: the elementwise minimum of the two images' scores (NaN stays NaN)."""
    a, b = _as_vector(q_a, "quality scores"), _as_vector(q_b, "quality scores")
    if a.shape != b.shape:
        raise FacekdError(f"edc: {a.size} quality scores for the first images but {b.size} for the second")
    return np.minimum(a, b)


def similarity_threshold(scores: ArrayLike, issame: ArrayLike, fmr: float = 1e-3) -> float:
    """The lowest threshold whose false match rate (impostors with `score >= t`) is <= `fmr`.

    With `n` impostors, `k = floor(fmr * n)` false matches are allowed; the threshold is the
    next float above the (k+1)-th highest impostor score, so every genuine score above that
    impostor is accepted. Raises `FacekdError` when `fmr * n < 1` (the set cannot measure `fmr`).
    """
    rate = _as_rate(fmr, "fmr", allow_zero=False)
    score_arr, same_arr = _as_scores_and_labels(scores, issame)
    impostors = score_arr[~same_arr]
    count = impostors.size
    allowed = math.floor(rate * count + _COUNT_TOLERANCE)
    if allowed < 1:
        if count == 0:
            raise FacekdError(f"edc: fmr={rate:g} needs impostor comparisons and there are none")
        raise FacekdError(f"edc: fmr={rate:g} needs at least {math.ceil(1.0 / rate - _COUNT_TOLERANCE)} "
                          f"impostor comparisons; there are {count}, which support fmr >= {1.0 / count:.3g}")
    allowed = min(allowed, count - 1)
    highest_first = np.sort(impostors)[::-1]
    return float(np.nextafter(highest_first[allowed], np.inf))


def threshold_for_fnmr(scores: ArrayLike, issame: ArrayLike, fnmr: float) -> float:
    """The largest threshold whose FNMR (genuine with `score < t`) is <= `fnmr`.

    With `n` genuine comparisons, `m = floor(fnmr * n)` false non-matches are allowed; the
    threshold is the (m+1)-th lowest genuine score. With ties there, the FNMR it gives is below
    `fnmr` (the tied scores are accepted together). Impostors are not used.
    """
    rate = _as_rate(fnmr, "start_fnmr", allow_zero=True)
    score_arr, same_arr = _as_scores_and_labels(scores, issame)
    genuine = np.sort(_genuine_only(score_arr, same_arr))
    allowed = math.floor(rate * genuine.size + _COUNT_TOLERANCE)
    return float(genuine[min(allowed, genuine.size - 1)])


# ---------------------------------------------------------------- curves


def _genuine_scores(genuine_scores: ArrayLike) -> np.ndarray:
    scores = _as_vector(genuine_scores, "genuine scores")
    if scores.size == 0:
        raise FacekdError("edc: no genuine comparisons")
    _check_finite_scores(scores, "genuine scores")
    return scores


def edc_curve(genuine_scores: ArrayLike, genuine_quality: ArrayLike, threshold: float,
              max_discard: float | None = None) -> dict[str, np.ndarray]:
    """The EDC of the genuine comparisons: {"discard_fractions", "fnmr"}, discard ascending.

    Point 0 is discard 0 with the full-set FNMR. Each further point discards the next distinct
    (lowest remaining) quality value with all comparisons tied at it; its FNMR is the false
    non-matches among the kept over the kept count. The curve stops before everything is
    discarded: the last point keeps exactly the comparisons of the highest quality value. So
    there is one point per distinct quality value. `max_discard` drops the points whose discard
    fraction exceeds it. The threshold stays fixed; impostors are not needed.
    """
    scores = _genuine_scores(genuine_scores)
    quality = _as_vector(genuine_quality, "genuine quality scores")
    if quality.size != scores.size:
        raise FacekdError(f"edc: {scores.size} genuine scores but {quality.size} quality scores")
    nan_count = int(np.isnan(quality).sum())
    if nan_count:
        raise FacekdError(f"edc: {nan_count} of {quality.size} genuine comparisons have a NaN quality score, "
                          f"first at index {int(np.flatnonzero(np.isnan(quality))[0])}")
    limit = _as_fraction(max_discard, "max_discard")
    cut = _as_threshold(threshold)

    order = np.argsort(quality, kind="stable")
    sorted_quality = quality[order]
    errors = scores[order] < cut
    # errors_kept[i]: false non-matches among comparisons i..n-1 (the kept ones after discarding i)
    errors_kept = np.cumsum(errors[::-1])[::-1]
    # each run of equal quality starts a point: discarding that many drops whole runs only
    discard_counts = np.r_[0, np.flatnonzero(np.diff(sorted_quality) != 0) + 1]
    count = scores.size
    discard = discard_counts / count
    fnmr = errors_kept[discard_counts] / (count - discard_counts)
    if limit is not None:
        keep = discard <= limit
        discard, fnmr = discard[keep], fnmr[keep]
    return {"discard_fractions": discard.astype(np.float64), "fnmr": fnmr.astype(np.float64)}


def random_order_curve(genuine_scores: ArrayLike, threshold: float, seed: int = 0,
                       max_discard: float | None = None) -> dict[str, np.ndarray]:
    """Baseline EDC with a random quality (uniform, no ties) drawn from `default_rng(seed)`.

    One random order, not the expectation: its pAUC is close to `fnmr_start * limit`, which is
    what discarding at random gives on average.
    """
    scores = _genuine_scores(genuine_scores)
    quality = np.random.default_rng(whole_number(seed, "seed:", 0)).random(scores.size)
    return edc_curve(scores, quality, threshold, max_discard=max_discard)


def theoretical_best(genuine_scores: ArrayLike, threshold: float) -> dict[str, np.ndarray]:
    """The theoretical best EDC: {"discard", "fnmr"}, a piecewise LINEAR curve (not a step).

    The EDC literature's lower bound (Olsen et al.; Schlett et al.): FNMR falls along
    `max(0, fnmr_start - discard)`, reaching 0 at discard = fnmr_start, as if each discarded
    comparison removed one false non-match from the count over the full set. (Discarding the
    false non-matches first on the real set gives `(fnmr_start - d) / (1 - d)`, slightly above.)
    """
    scores = _genuine_scores(genuine_scores)
    start = float(np.mean(scores < _as_threshold(threshold)))
    if start == 0.0 or start == 1.0:
        discard, fnmr = [0.0, 1.0], [start, 0.0]
    else:
        discard, fnmr = [0.0, start, 1.0], [start, 0.0, 0.0]
    return {"discard": np.array(discard), "fnmr": np.array(fnmr)}


# ---------------------------------------------------------------- areas


def partial_auc(discard: ArrayLike, fnmr: ArrayLike, limit: float) -> float:
    """Area under the EDC step curve from discard 0 to `limit`.

    Step convention (stepwise interpolation, as the EDC reference code of Schlett et al.): the
    FNMR of point i holds on [discard_i, discard_{i+1}); the last point's FNMR holds until
    `limit`. So pAUC = sum_i fnmr_i * (min(discard_{i+1}, limit) - min(discard_i, limit)).
    A curve cut with `max_discard` must not be integrated past that cut.
    """
    discard_arr = np.asarray(discard, dtype=np.float64)
    fnmr_arr = np.asarray(fnmr, dtype=np.float64)
    if discard_arr.ndim != 1 or discard_arr.shape != fnmr_arr.shape or discard_arr.size == 0:
        raise ValueError(f"partial_auc: needs discard and fnmr of one equal non-zero length, "
                         f"got shapes {discard_arr.shape} and {fnmr_arr.shape}")
    if discard_arr[0] != 0.0 or np.any(np.diff(discard_arr) <= 0):
        raise ValueError("partial_auc: discard fractions must start at 0 and strictly increase")
    area_end = _as_fraction(limit, "limit")
    starts = np.minimum(discard_arr, area_end)
    ends = np.minimum(np.r_[discard_arr[1:], area_end], area_end)
    return float(np.sum(fnmr_arr * (ends - starts)))


def best_partial_auc(fnmr_start: float, limit: float) -> float:
    """Area under the theoretical best `max(0, fnmr_start - d)` from 0 to `limit`."""
    start = float(fnmr_start)
    area_end = _as_fraction(limit, "limit")
    return (start ** 2 - max(0.0, start - area_end) ** 2) / 2.0


def pauc_summary(pauc: float, fnmr_start: float, limit: float) -> dict[str, float | None]:
    """The three pAUC figures reported at one limit.

    - "pauc": the raw area (lower is better);
    - "relative_to_start": pauc / (fnmr_start * limit), the area if discarding did not help
      (a random order in expectation): 1 means no gain, 0 a perfect quality; None when
      fnmr_start is 0;
    - "minus_best": pauc - best_partial_auc(fnmr_start, limit), the excess over the theoretical
      best (0 is best);
    - "normalized": (pauc - best) / (no-gain area - best): 0 is the theoretical best, 1 no gain
      over not discarding (above 1: worse than that); None when fnmr_start is 0.
    """
    start_area = float(fnmr_start) * float(limit)
    best = best_partial_auc(fnmr_start, limit)
    return {
        "pauc": float(pauc),
        "relative_to_start": float(pauc) / start_area if start_area > 0.0 else None,
        "minus_best": float(pauc) - best,
        "normalized": (float(pauc) - best) / (start_area - best) if start_area > best else None,
    }


# ---------------------------------------------------------------- report


def _limit_key(limit: float) -> str:
    return str(float(limit))


def _step_entry(curve: dict[str, np.ndarray], fnmr_start: float, limits: list[float]) -> dict[str, Any]:
    discard, fnmr = curve["discard_fractions"], curve["fnmr"]
    return {
        "discard": [float(value) for value in discard],
        "fnmr": [float(value) for value in fnmr],
        "pauc": {_limit_key(limit): pauc_summary(partial_auc(discard, fnmr, limit), fnmr_start, limit)
                 for limit in limits},
    }


def edc_report(scores: ArrayLike, issame: ArrayLike, qualities: Mapping[str, ArrayLike],
               fmr: float = 1e-3, start_fnmr: float | None = None,
               limits: Sequence[float] = (0.2, 0.3), seed: int = 0) -> dict[str, Any]:
    """EDC of every named quality, a random order and the theoretical best, as a JSON-able dict.

    `qualities` maps a name to the comparison qualities (`pair_quality`) of ALL comparisons,
    aligned with `scores`; only the genuine entries are used. The threshold is fixed once: at
    `fmr` (`similarity_threshold`), or at `start_fnmr` (`threshold_for_fnmr`) when that is given.

    Keys: comparisons, genuine, impostor, threshold, threshold_rule ("fmr" or "start_fnmr"),
    fmr_target, fnmr_target, fmr (achieved, None without impostors), start_fnmr (achieved),
    limits, seed, qualities (name -> entry), random (entry), theoretical_best (entry). An entry
    holds discard and fnmr (lists) and pauc: str(limit) -> `pauc_summary` at that limit. The
    theoretical best's points are joined by straight lines, the others are steps.
    """
    limit_list = _as_limits(limits)
    seed_value = whole_number(seed, "seed:", 0)
    score_arr, same_arr = _as_scores_and_labels(scores, issame)
    genuine = _genuine_only(score_arr, same_arr)
    if start_fnmr is None:
        threshold = similarity_threshold(score_arr, same_arr, fmr)
        rule, fmr_target, fnmr_target = "fmr", float(fmr), None
    else:
        threshold = threshold_for_fnmr(score_arr, same_arr, start_fnmr)
        rule, fmr_target, fnmr_target = "start_fnmr", None, float(start_fnmr)
    impostors = score_arr[~same_arr]
    fnmr_start = float(np.mean(genuine < threshold))

    quality_entries: dict[str, Any] = {}
    for name, values in qualities.items():
        quality = _as_vector(values, f"quality scores of {name!r}")
        if quality.size != score_arr.size:
            raise FacekdError(f"edc: quality {name!r} has {quality.size} scores for {score_arr.size} comparisons")
        try:
            curve = edc_curve(genuine, quality[same_arr], threshold)
        except FacekdError as exc:
            raise FacekdError(f"quality {name!r}: {exc}") from None
        quality_entries[str(name)] = _step_entry(curve, fnmr_start, limit_list)

    best = theoretical_best(genuine, threshold)
    best_entry = {
        "discard": [float(value) for value in best["discard"]],
        "fnmr": [float(value) for value in best["fnmr"]],
        "pauc": {_limit_key(limit): pauc_summary(best_partial_auc(fnmr_start, limit), fnmr_start, limit)
                 for limit in limit_list},
    }
    return {
        "comparisons": int(score_arr.size),
        "genuine": int(genuine.size),
        "impostor": int(impostors.size),
        "threshold": float(threshold),
        "threshold_rule": rule,
        "fmr_target": fmr_target,
        "fnmr_target": fnmr_target,
        "fmr": float(np.mean(impostors >= threshold)) if impostors.size else None,
        "start_fnmr": fnmr_start,
        "limits": limit_list,
        "seed": seed_value,
        "qualities": quality_entries,
        "random": _step_entry(random_order_curve(genuine, threshold, seed_value), fnmr_start, limit_list),
        "theoretical_best": best_entry,
    }


# ---------------------------------------------------------------- plot


def plot_edc(report: Mapping[str, Any], path: str | os.PathLike, title: str | None = None,
             x_max: float | None = None) -> Path:
    """Save the EDCs of an `edc_report` as one PNG; returns the path.

    Every quality is a solid step curve, the random order a dashed grey step curve, the
    theoretical best a dotted line; grey vertical lines mark the limits; each legend label
    carries the pAUC at the first (smallest) limit. The x axis (discard fraction) runs to
    `x_max`, by default the largest limit + 0.1 (at most 1); pass 1.0 for the full curve.
    The file is written atomically.
    """
    from facekd.plots import new_figure, save_png

    missing = [key for key in ("limits", "qualities", "random", "theoretical_best") if key not in report]
    if missing:
        raise ValueError(f"plot_edc: not an edc_report, missing {missing}")
    limits = [float(limit) for limit in report["limits"]]
    right = _as_fraction(x_max, "x_max") if x_max is not None else min(1.0, max(limits) + _PLOT_MARGIN)
    first_key = _limit_key(limits[0])

    def label(name: str, entry: Mapping[str, Any]) -> str:
        return f"{name} (pAUC@{limits[0]:g} = {entry['pauc'][first_key]['pauc']:.4f})"

    def step_points(entry: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        discard = np.asarray(entry["discard"], dtype=np.float64)
        fnmr = np.asarray(entry["fnmr"], dtype=np.float64)
        # hold the last value to the right edge, as partial_auc does
        return np.r_[discard, max(right, discard[-1])], np.r_[fnmr, fnmr[-1]]

    figure = new_figure()
    axes = figure.add_subplot()
    shown_fnmr = []
    for name, entry in report["qualities"].items():
        x, y = step_points(entry)
        axes.step(x, y, where="post", linewidth=1.6, label=label(name, entry))
        shown_fnmr.append(y[x <= right])
    x, y = step_points(report["random"])
    axes.step(x, y, where="post", color="0.55", linestyle="--", linewidth=1.3,
              label=label("random", report["random"]))
    shown_fnmr.append(y[x <= right])
    best = report["theoretical_best"]
    axes.plot(best["discard"], best["fnmr"], color="black", linestyle=":", linewidth=1.5,
              label=label("theoretical best", best))
    shown_fnmr.append(np.asarray(best["fnmr"], dtype=np.float64))
    for limit in limits:
        if limit <= right:
            axes.axvline(limit, color="0.7", linewidth=0.9)
    top = max(float(np.max(values)) for values in shown_fnmr if values.size)
    axes.set_xlim(0.0, right)
    axes.set_ylim(0.0, max(top * 1.05, 1e-3))
    axes.set_xlabel("Fraction of genuine comparisons discarded")
    axes.set_ylabel("FNMR")
    if title:
        axes.set_title(title)
    axes.grid(True, alpha=0.4)
    axes.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    return save_png(figure, path, "EDC plot")
