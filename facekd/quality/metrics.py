"""Agreement between predicted quality scores and MOS labels: SRCC, PLCC, KRCC, RMSE and the
4-parameter logistic map (VQEG) that puts raw predictions on the MOS scale.

Every function takes two 1-D sequences of the same length (at least 3, all finite) and raises
`FacekdError` otherwise. A correlation with a constant input is undefined; it is reported as
0.0 (never NaN), so a collapsed model scores 0 rather than poisoning a report.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from scipy import optimize, special, stats

from facekd.errors import ConfigError, FacekdError

ArrayLike = Sequence[float] | np.ndarray

MIN_VALUES = 3
LOGISTIC_MIN_VALUES = 5  # a 4-parameter fit needs more points than parameters
LOGISTIC_MAX_EVALS = 20_000


def _as_pair(pred: ArrayLike, target: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to two float64 vectors of equal length >= MIN_VALUES."""
    arrays = []
    for name, values in (("pred", pred), ("target", target)):
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise FacekdError(f"quality metrics: {name} is not a sequence of numbers ({exc})") from None
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]  # a column of scores, as a model with one output gives
        if array.ndim != 1:
            raise FacekdError(f"quality metrics: {name} must be 1-D, got shape {array.shape}")
        bad = np.flatnonzero(~np.isfinite(array))
        if bad.size:
            raise FacekdError(f"quality metrics: {name} has {bad.size} non-finite value(s), "
                              f"first at index {int(bad[0])} ({array[bad[0]]})")
        arrays.append(array)
    pred_arr, target_arr = arrays
    if pred_arr.shape != target_arr.shape:
        raise FacekdError(f"quality metrics: pred has {pred_arr.size} values but target has {target_arr.size}")
    if pred_arr.size < MIN_VALUES:
        raise FacekdError(f"quality metrics: need at least {MIN_VALUES} values, got {pred_arr.size}")
    return pred_arr, target_arr


def _is_constant(values: np.ndarray) -> bool:
    return bool(np.ptp(values) == 0.0)


def _correlation(fn, pred: np.ndarray, target: np.ndarray) -> float:
    if _is_constant(pred) or _is_constant(target):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(pred, target)[0])
    return value if math.isfinite(value) else 0.0


def srcc(pred: ArrayLike, target: ArrayLike) -> float:
    """Spearman rank correlation (ties get average ranks); 0.0 when either input is constant."""
    return _correlation(stats.spearmanr, *_as_pair(pred, target))


def plcc(pred: ArrayLike, target: ArrayLike) -> float:
    """Pearson linear correlation of the raw values; 0.0 when either input is constant."""
    return _correlation(stats.pearsonr, *_as_pair(pred, target))


def krcc(pred: ArrayLike, target: ArrayLike) -> float:
    """Kendall rank correlation (tau-b); 0.0 when either input is constant."""
    return _correlation(stats.kendalltau, *_as_pair(pred, target))


def rmse(pred: ArrayLike, target: ArrayLike) -> float:
    """Root mean squared error of the raw values (meaningful when pred is on the MOS scale)."""
    pred_arr, target_arr = _as_pair(pred, target)
    return float(np.sqrt(np.mean((pred_arr - target_arr) ** 2)))


def logistic4(x: ArrayLike, params: ArrayLike) -> np.ndarray:
    """VQEG 4-parameter logistic: `(b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2`.

    b1 and b2 are the asymptotes at +inf and -inf, b3 the midpoint, |b4| the width.
    Computed with `expit`, so extreme inputs saturate instead of overflowing.
    """
    b1, b2, b3, b4 = (float(p) for p in params)
    x_arr = np.asarray(x, dtype=np.float64)
    scale = abs(b4) if b4 != 0.0 else np.finfo(np.float64).tiny
    return (b1 - b2) * special.expit((x_arr - b3) / scale) + b2


def _logistic4_curve(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    return logistic4(x, (b1, b2, b3, b4))


def _logistic4_jacobian(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    # analytic: MINPACK's finite differences step relative to |param| and stall at a parameter near 0
    scale = max(abs(b4), np.finfo(np.float64).tiny)
    s = special.expit((x - b3) / scale)
    slope = (b1 - b2) * s * (1.0 - s)
    return np.stack([s, 1.0 - s, -slope / scale, -slope * (x - b3) / scale**2 * np.sign(b4)], axis=1)


def fit_logistic4(pred: ArrayLike, target: ArrayLike) -> np.ndarray:
    """Least-squares fit of `logistic4` mapping `pred` onto `target`; returns (b1, b2, b3, b4).

    Initial guess as the usual IQA code (pyiqa): asymptotes at max/min of the target (swapped
    when the relation is decreasing), midpoint at mean(pred), width std(pred)/4.
    Raises `FacekdError` when there are too few points, an input is constant, the optimiser
    does not converge, or the result is degenerate (non-finite, or a width so small that the map
    is a step function). `ScaleMap.fit` catches this and falls back to a linear map.
    """
    pred_arr, target_arr = _as_pair(pred, target)
    if pred_arr.size < LOGISTIC_MIN_VALUES:
        raise FacekdError(f"logistic fit: need at least {LOGISTIC_MIN_VALUES} values, got {pred_arr.size}")
    if _is_constant(pred_arr) or _is_constant(target_arr):
        raise FacekdError("logistic fit: constant input")
    high, low = float(target_arr.max()), float(target_arr.min())
    if _correlation(stats.pearsonr, pred_arr, target_arr) < 0:
        high, low = low, high
    spread = float(np.std(pred_arr))
    initial = [high, low, float(np.mean(pred_arr)), spread / 4.0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # OptimizeWarning (covariance) and overflow are not failures
            params, _ = optimize.curve_fit(_logistic4_curve, pred_arr, target_arr, p0=initial,
                                           jac=_logistic4_jacobian, maxfev=LOGISTIC_MAX_EVALS)
    except (RuntimeError, ValueError, FloatingPointError, optimize.OptimizeWarning) as exc:
        raise FacekdError(f"logistic fit did not converge: {exc}") from None
    params = np.asarray(params, dtype=np.float64)
    if not np.all(np.isfinite(params)):
        raise FacekdError("logistic fit: non-finite parameters")
    if abs(params[3]) < 1e-6 * float(np.ptp(pred_arr)):
        raise FacekdError("logistic fit: degenerate (step function)")
    return params


@dataclass(frozen=True)
class ScaleMap:
    """A monotone map from raw predictions to the MOS scale, storable as JSON.

    kind 'logistic4': params (b1, b2, b3, b4) of `logistic4`.
    kind 'linear': params (slope, intercept), used when the logistic fit fails, is degenerate,
    or fits worse than a straight line.
    """

    kind: Literal["logistic4", "linear"]
    params: tuple[float, ...]

    @classmethod
    def fit(cls, pred: ArrayLike, target: ArrayLike) -> "ScaleMap":
        """Fit the logistic map of `pred` onto `target`, falling back to a linear one."""
        pred_arr, target_arr = _as_pair(pred, target)
        linear = cls._fit_linear(pred_arr, target_arr)
        try:
            logistic = cls("logistic4", tuple(float(p) for p in fit_logistic4(pred_arr, target_arr)))
        except FacekdError:
            return linear
        sse_logistic = float(np.sum((logistic.apply(pred_arr) - target_arr) ** 2))
        sse_linear = float(np.sum((linear.apply(pred_arr) - target_arr) ** 2))
        if not math.isfinite(sse_logistic) or sse_logistic > sse_linear * (1 + 1e-9):
            return linear
        return logistic

    @classmethod
    def _fit_linear(cls, pred: np.ndarray, target: np.ndarray) -> "ScaleMap":
        if _is_constant(pred):
            return cls("linear", (0.0, float(np.mean(target))))
        centred = pred - pred.mean()
        slope = float(np.dot(centred, target - target.mean()) / np.dot(centred, centred))
        return cls("linear", (slope, float(target.mean() - slope * pred.mean())))

    def apply(self, pred: ArrayLike) -> np.ndarray:
        """Map raw predictions (any shape) to the MOS scale; returns float64."""
        if self.kind == "logistic4":
            return logistic4(pred, self.params)
        slope, intercept = self.params
        return slope * np.asarray(pred, dtype=np.float64) + intercept

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": [float(p) for p in self.params]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ScaleMap":
        """Inverse of `to_dict`; a malformed mapping raises `ConfigError` naming the key."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"scale map: expected a mapping, got {type(data).__name__}")
        expected = {"logistic4": 4, "linear": 2}
        kind = data.get("kind")
        if kind not in expected:
            raise ConfigError(f"scale map: 'kind' must be one of {sorted(expected)}, got {kind!r}")
        params = data.get("params")
        try:
            values = tuple(float(p) for p in params)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ConfigError(f"scale map: 'params' must be a list of numbers, got {params!r}") from None
        if len(values) != expected[kind] or not all(math.isfinite(v) for v in values):
            raise ConfigError(f"scale map: 'params' of a {kind} map must be {expected[kind]} finite numbers, "
                              f"got {params!r}")
        return cls(kind, values)


def plcc_logistic(pred: ArrayLike, target: ArrayLike) -> float:
    """PLCC after nonlinear regression: Pearson of `ScaleMap.fit(pred, target).apply(pred)` and target.

    The map is monotone and fitted to the target, so a decreasing relation also scores >= 0.
    """
    pred_arr, target_arr = _as_pair(pred, target)
    return _correlation(stats.pearsonr, ScaleMap.fit(pred_arr, target_arr).apply(pred_arr), target_arr)


def rmse_logistic(pred: ArrayLike, target: ArrayLike) -> float:
    """RMSE on the MOS scale after the fitted logistic (or fallback linear) map."""
    pred_arr, target_arr = _as_pair(pred, target)
    mapped = ScaleMap.fit(pred_arr, target_arr).apply(pred_arr)
    return float(np.sqrt(np.mean((mapped - target_arr) ** 2)))


def quality_metrics(pred: ArrayLike, target: ArrayLike) -> dict[str, float]:
    """All metrics at once: srcc, plcc, plcc_logistic, krcc, rmse, rmse_logistic, score, n.

    `score` is the VQualA 2025 FIQA challenge score (SRCC + PLCC) / 2 with the *raw* PLCC: the
    challenge report defines Score = (SROCC + PLCC) / 2 and mentions no fitting step, so no
    map is assumed; `plcc_logistic` (the usual "PLCC after logistic regression", which the
    Efficient-FIQA reference code reports as PLCC) is given beside it. `n` is the sample count.
    """
    pred_arr, target_arr = _as_pair(pred, target)
    mapped = ScaleMap.fit(pred_arr, target_arr).apply(pred_arr)
    result = {
        "srcc": _correlation(stats.spearmanr, pred_arr, target_arr),
        "plcc": _correlation(stats.pearsonr, pred_arr, target_arr),
        "plcc_logistic": _correlation(stats.pearsonr, mapped, target_arr),
        "krcc": _correlation(stats.kendalltau, pred_arr, target_arr),
        "rmse": float(np.sqrt(np.mean((pred_arr - target_arr) ** 2))),
        "rmse_logistic": float(np.sqrt(np.mean((mapped - target_arr) ** 2))),
    }
    result["score"] = (result["srcc"] + result["plcc"]) / 2.0
    result["n"] = int(pred_arr.size)
    return result
