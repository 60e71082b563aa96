from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from facekd.errors import ConfigError, FacekdError
from facekd.quality.metrics import (ScaleMap, fit_logistic4, krcc, logistic4, plcc, plcc_logistic,
                                    quality_metrics, rmse, rmse_logistic, srcc)


@pytest.fixture
def noisy_pair():
    rng = np.random.default_rng(0)
    target = rng.uniform(1, 5, size=200)
    pred = 0.3 * target + rng.normal(0, 0.4, size=200)
    return pred, target


def test_correlations_match_scipy(noisy_pair):
    pred, target = noisy_pair
    assert srcc(pred, target) == pytest.approx(stats.spearmanr(pred, target)[0], abs=1e-12)
    assert plcc(pred, target) == pytest.approx(stats.pearsonr(pred, target)[0], abs=1e-12)
    assert krcc(pred, target) == pytest.approx(stats.kendalltau(pred, target)[0], abs=1e-12)
    assert rmse(pred, target) == pytest.approx(math.sqrt(np.mean((pred - target) ** 2)), abs=1e-12)


def test_ties_use_average_ranks():
    pred = [1, 1, 2, 3, 3, 3]
    target = [1, 2, 2, 4, 5, 5]
    assert srcc(pred, target) == pytest.approx(stats.spearmanr(pred, target)[0])
    assert krcc(pred, target) == pytest.approx(stats.kendalltau(pred, target)[0])


def test_quality_metrics_keys_and_score(noisy_pair):
    pred, target = noisy_pair
    result = quality_metrics(pred, target)
    assert set(result) == {"srcc", "plcc", "plcc_logistic", "krcc", "rmse", "rmse_logistic", "score", "n"}
    assert result["n"] == 200
    assert result["score"] == pytest.approx((result["srcc"] + result["plcc"]) / 2)
    assert result["srcc"] == pytest.approx(srcc(pred, target))
    assert result["plcc_logistic"] == pytest.approx(plcc_logistic(pred, target))
    assert result["rmse_logistic"] == pytest.approx(rmse_logistic(pred, target))
    # the raw predictions are on a shrunken scale; the fitted map brings them onto the MOS scale
    assert result["rmse_logistic"] < result["rmse"]
    json.dumps(result)  # plain Python numbers, storable in a report


def test_monotone_logistic_relation_is_recovered():
    x = np.linspace(-4, 4, 60)
    target = logistic4(x, (5.0, 1.0, 0.5, 0.7))
    assert srcc(x, target) == pytest.approx(1.0)
    assert plcc(x, target) < 0.97
    assert plcc_logistic(x, target) == pytest.approx(1.0, abs=1e-6)
    assert rmse_logistic(x, target) < 1e-3
    params = fit_logistic4(x, target)
    assert np.allclose(logistic4(x, params), target, atol=1e-3)


def test_decreasing_relation_fits_and_reports_positive_plcc_logistic():
    x = np.linspace(0, 10, 50)
    target = logistic4(x, (1.0, 4.0, 5.0, 1.2))  # high x -> low MOS
    assert srcc(x, target) == pytest.approx(-1.0)
    scale_map = ScaleMap.fit(x, target)
    assert scale_map.kind == "logistic4"
    assert np.allclose(scale_map.apply(x), target, atol=1e-3)
    assert plcc_logistic(x, target) == pytest.approx(1.0, abs=1e-6)


def test_constant_predictions_give_zero_not_nan():
    target = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    pred = [0.5] * 6
    result = quality_metrics(pred, target)
    for key in ("srcc", "plcc", "plcc_logistic", "krcc", "score"):
        assert result[key] == 0.0
    assert result["rmse_logistic"] == pytest.approx(np.std(target))  # best constant map: the mean
    assert ScaleMap.fit(pred, target).kind == "linear"


def test_linear_fallback_when_logistic_not_possible():
    # too few points for a 4-parameter fit
    scale_map = ScaleMap.fit([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0])
    assert scale_map.kind == "linear"
    assert scale_map.params == pytest.approx((2.0, 0.0))
    with pytest.raises(FacekdError, match="at least"):
        fit_logistic4([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0])


def test_scale_map_round_trip_through_json(noisy_pair):
    pred, target = noisy_pair
    for scale_map in (ScaleMap.fit(pred, target), ScaleMap.fit([1, 2, 3], [3, 2, 2])):
        restored = ScaleMap.from_dict(json.loads(json.dumps(scale_map.to_dict())))
        assert restored == scale_map
        assert np.array_equal(restored.apply(pred), scale_map.apply(pred))


@pytest.mark.parametrize("data, match", [
    ({"kind": "cubic", "params": [1, 2]}, "kind"),
    ({"kind": "linear", "params": [1, 2, 3]}, "params"),
    ({"kind": "logistic4", "params": "abcd"}, "params"),
    ({"kind": "linear", "params": [1, float("nan")]}, "params"),
    ({"kind": "linear"}, "params"),
    ([1, 2], "mapping"),
])
def test_scale_map_from_bad_dict(data, match):
    with pytest.raises(ConfigError, match=match):
        ScaleMap.from_dict(data)


def test_logistic_saturates_without_overflow():
    with np.errstate(all="raise"):
        values = logistic4(np.array([-1e6, 0.0, 1e6]), (5.0, 1.0, 0.0, 1e-3))
    assert values.tolist() == [1.0, 3.0, 5.0]


@pytest.mark.parametrize("pred, target, match", [
    ([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0], "pred has 1 non-finite"),
    ([1.0, 2.0, 3.0], [1.0, 2.0, float("inf")], "target has 1 non-finite"),
    ([1.0, 2.0, 3.0], [1.0, 2.0], "3 values but target has 2"),
    ([1.0, 2.0], [1.0, 2.0], "at least 3"),
    ([[1.0, 2.0], [3.0, 4.0]], [1.0, 2.0], "1-D"),
    (["a", "b", "c"], [1.0, 2.0, 3.0], "not a sequence of numbers"),
])
def test_bad_inputs_raise_clear_errors(pred, target, match):
    for fn in (srcc, plcc, krcc, rmse, plcc_logistic, quality_metrics, ScaleMap.fit):
        with pytest.raises(FacekdError, match=match):
            fn(pred, target)


def test_column_vector_accepted():
    pred = np.array([[1.0], [2.0], [4.0]])
    assert srcc(pred, [1.0, 2.0, 3.0]) == pytest.approx(1.0)


def test_fitted_map_never_worse_than_least_squares_line():
    rng = np.random.default_rng(3)
    for _ in range(5):
        target = rng.uniform(1, 5, size=80)
        pred = 1e4 + 300 * np.tanh(target - 3) + rng.normal(0, 60, size=80)  # far-off scale
        mapped = ScaleMap.fit(pred, target).apply(pred)
        slope, intercept = np.polyfit(pred, target, 1)
        sse_line = np.sum((slope * pred + intercept - target) ** 2)
        assert np.sum((mapped - target) ** 2) <= sse_line * (1 + 1e-6)
