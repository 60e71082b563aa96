from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from facekd.errors import ConfigError, FacekdError
from facekd.evaluation.edc import (
    best_partial_auc,
    edc_curve,
    edc_report,
    pair_quality,
    partial_auc,
    pauc_summary,
    plot_edc,
    random_order_curve,
    similarity_threshold,
    theoretical_best,
    threshold_for_fnmr,
)
from facekd.recognition.metrics import tpr_at_fpr

# The hand example, at threshold 0.5 (false non-match: score < 0.5), listed by quality:
#   quality 0.1: score 0.1 (FNM)
#   quality 0.2: scores 0.9, 0.2 (FNM)          <- tied quality: discarded together
#   quality 0.5: score 0.8
#   quality 0.7: scores 0.3 (FNM), 0.95         <- tied quality
#   quality 0.9: scores 0.6, 0.7                <- the highest quality: the last kept set
# 8 genuine comparisons, 3 false non-matches. Points (discard count -> kept, FNM among kept):
#   0 -> 8 kept, 3 FNM: 3/8     1 -> 7 kept, 2 FNM: 2/7     3 -> 5 kept, 1 FNM: 1/5
#   4 -> 4 kept, 1 FNM: 1/4     6 -> 2 kept, 0 FNM: 0
HAND_SCORES = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.95, 0.6, 0.7])
HAND_QUALITY = np.array([0.1, 0.2, 0.2, 0.5, 0.7, 0.7, 0.9, 0.9])
HAND_DISCARD = [0.0, 1 / 8, 3 / 8, 4 / 8, 6 / 8]
HAND_FNMR = [3 / 8, 2 / 7, 1 / 5, 1 / 4, 0.0]
# step areas: [0, 1/8) at 3/8, [1/8, 3/8) at 2/7, [3/8, 1/2) at 1/5, [1/2, 3/4) at 1/4, then 0
HAND_PAUC_02 = 0.125 * 3 / 8 + (0.2 - 0.125) * 2 / 7  # 0.046875 + 0.0214285714 = 0.0683035714
HAND_PAUC_03 = 0.125 * 3 / 8 + (0.3 - 0.125) * 2 / 7  # 0.046875 + 0.05 = 0.096875
# theoretical best max(0, 3/8 - d): trapezoid from 0 to 0.2 -> (0.375 + 0.175) / 2 * 0.2 = 0.055
HAND_BEST_02 = 0.055
HAND_BEST_03 = (0.375 + 0.075) / 2 * 0.3  # 0.0675


def shuffled_hand(seed: int = 3):
    order = np.random.default_rng(seed).permutation(HAND_SCORES.size)
    return HAND_SCORES[order], HAND_QUALITY[order]


def brute_force_edc(scores, quality, threshold):
    """Independent EDC: for each distinct quality v, keep exactly the comparisons with quality >= v."""
    discard, fnmr = [], []
    for value in np.unique(quality):
        kept = quality >= value
        discard.append(1.0 - kept.mean())
        fnmr.append(float(np.mean(scores[kept] < threshold)))
    return np.array(discard), np.array(fnmr)


def random_set(seed: int, genuine: int = 400, impostor: int = 2000):
    """Scores with ties (rounded) and qualities with ties; quality loosely follows genuine scores."""
    rng = np.random.default_rng(seed)
    scores = np.r_[np.round(rng.normal(0.55, 0.2, genuine), 2), np.round(rng.normal(0.0, 0.15, impostor), 2)]
    issame = np.r_[np.ones(genuine, bool), np.zeros(impostor, bool)]
    quality = np.round(scores + rng.normal(0.0, 0.2, scores.size), 1)
    return scores, issame, quality


# ---------------------------------------------------------------- pair quality and thresholds


def test_pair_quality_is_the_elementwise_minimum_and_keeps_nan():
    result = pair_quality([0.2, 0.9, 0.5, np.nan], [0.4, 0.1, 0.5, 0.3])
    np.testing.assert_array_equal(result[:3], [0.2, 0.1, 0.5])
    assert np.isnan(result[3])
    with pytest.raises(FacekdError, match="3 quality scores .* but 2"):
        pair_quality([1, 2, 3], [1, 2])


def test_similarity_threshold_is_just_above_the_first_impostor_that_must_be_rejected():
    # 10 impostors, fmr 0.2 -> 2 false matches allowed (0.95, 0.9); the 3rd highest (0.8) must be rejected
    impostors = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    scores = np.r_[impostors, [0.8, 0.85]]
    issame = np.r_[np.zeros(10, bool), [True, True]]
    threshold = similarity_threshold(scores, issame, fmr=0.2)
    assert threshold == np.nextafter(0.8, np.inf)  # the lowest threshold rejecting 0.8
    assert np.mean(np.array(impostors) >= threshold) == pytest.approx(0.2)
    assert np.mean(np.array(impostors) >= np.nextafter(threshold, -np.inf)) == pytest.approx(0.3)
    # the genuine 0.85 is accepted, the genuine tied with the rejected impostor is not
    assert 0.85 >= threshold > 0.8


def test_similarity_threshold_with_tied_impostors_rejects_the_whole_tie():
    # fmr 0.2 of 10 allows 2; the 2nd..4th highest tie at 0.7, so only 0.9 may pass: FMR 0.1
    impostors = np.array([0.9, 0.7, 0.7, 0.7, 0.1, 0.1, 0.0, 0.0, -0.1, -0.2])
    scores = np.r_[impostors, 0.75]
    issame = np.r_[np.zeros(10, bool), True]
    threshold = similarity_threshold(scores, issame, fmr=0.2)
    assert threshold == np.nextafter(0.7, np.inf)
    assert np.mean(impostors >= threshold) == pytest.approx(0.1)


def test_similarity_threshold_agrees_with_tpr_at_fpr_of_the_recognition_metrics():
    scores, issame, _ = random_set(0)
    for fmr in (1e-1, 1e-2, 1e-3):
        threshold = similarity_threshold(scores, issame, fmr)
        start_fnmr = float(np.mean(scores[issame] < threshold))
        (entry,) = tpr_at_fpr(scores, issame, [fmr])
        assert 1.0 - start_fnmr == pytest.approx(entry["tpr"])
        assert np.mean(scores[~issame] >= threshold) <= fmr


def test_similarity_threshold_refuses_an_fmr_the_impostors_cannot_support():
    scores = np.r_[np.linspace(-1, 0, 500), [0.9]]
    issame = np.r_[np.zeros(500, bool), True]
    with pytest.raises(FacekdError, match=r"1000 impostor comparisons; there are 500.*fmr >= 0\.002"):
        similarity_threshold(scores, issame, fmr=1e-3)
    assert similarity_threshold(scores, issame, fmr=2e-3) == np.nextafter(np.linspace(-1, 0, 500)[-2], np.inf)
    with pytest.raises(FacekdError, match="there are none"):
        similarity_threshold([0.5, 0.6], [1, 1], fmr=0.1)
    for bad in (0.0, 1.0, -0.1, float("nan"), "x"):
        with pytest.raises(ConfigError, match="^fmr:"):
            similarity_threshold(scores, issame, fmr=bad)


def test_threshold_for_fnmr_is_the_largest_threshold_within_the_target():
    genuine = np.arange(1, 11) / 10  # 0.1 .. 1.0
    scores = np.r_[genuine, [0.0, 0.05]]
    issame = np.r_[np.ones(10, bool), False, False]
    # fnmr 0.25 of 10 allows 2 non-matches: t = 0.3 rejects 0.1 and 0.2 only; anything above 0.3 rejects 3
    assert threshold_for_fnmr(scores, issame, 0.25) == 0.3
    assert threshold_for_fnmr(scores, issame, 0.0) == 0.1
    # ties at the 3rd lowest: t = 0.3 is still the largest with FNMR <= 0.25, and gives 1/10
    tied = np.array([0.1, 0.3, 0.3, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert threshold_for_fnmr(tied, np.ones(10, bool), 0.25) == 0.3
    with pytest.raises(ConfigError, match="^start_fnmr:"):
        threshold_for_fnmr(scores, issame, 1.0)
    with pytest.raises(FacekdError, match="no genuine"):
        threshold_for_fnmr([0.1, 0.2], [0, 0], 0.1)


# ---------------------------------------------------------------- curves


def test_edc_curve_hand_example_with_tied_qualities():
    scores, quality = shuffled_hand()
    curve = edc_curve(scores, quality, threshold=0.5)
    np.testing.assert_allclose(curve["discard_fractions"], HAND_DISCARD)
    np.testing.assert_allclose(curve["fnmr"], HAND_FNMR)
    cut = edc_curve(scores, quality, threshold=0.5, max_discard=0.4)
    np.testing.assert_allclose(cut["discard_fractions"], HAND_DISCARD[:3])
    np.testing.assert_allclose(cut["fnmr"], HAND_FNMR[:3])


def test_edc_curve_counts_a_score_equal_to_the_threshold_as_a_match():
    # t = 0.5: 0.5 is a match, only 0.49 is a non-match. Qualities 1..4, all distinct:
    # discard 0: 1/4; discard 1 (the 0.5, a match): 1/3; discard 2 (the 0.49): 0/2; discard 3: 0/1
    curve = edc_curve([0.5, 0.49, 0.5, 0.7], [1, 2, 3, 4], threshold=0.5)
    np.testing.assert_allclose(curve["discard_fractions"], [0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(curve["fnmr"], [0.25, 1 / 3, 0, 0])
    # step area to 0.3: 0.25 * 0.25 + (1/3) * 0.05
    assert partial_auc(curve["discard_fractions"], curve["fnmr"], 0.3) == pytest.approx(0.0625 + 0.05 / 3)


def test_edc_curve_with_one_quality_value_is_a_single_point():
    curve = edc_curve([0.1, 0.9, 0.8, 0.2], [0.5, 0.5, 0.5, 0.5], threshold=0.5)
    np.testing.assert_array_equal(curve["discard_fractions"], [0.0])
    np.testing.assert_array_equal(curve["fnmr"], [0.5])
    assert partial_auc(curve["discard_fractions"], curve["fnmr"], 0.2) == pytest.approx(0.1)  # held


def test_edc_curve_matches_a_brute_force_quality_threshold_sweep():
    scores, issame, quality = random_set(1)
    threshold = similarity_threshold(scores, issame, 1e-2)
    curve = edc_curve(scores[issame], quality[issame], threshold)
    discard, fnmr = brute_force_edc(scores[issame], quality[issame], threshold)
    assert np.unique(quality[issame]).size < issame.sum()  # the set does have ties
    np.testing.assert_allclose(curve["discard_fractions"], discard)
    np.testing.assert_allclose(curve["fnmr"], fnmr)


def test_edc_curve_rejects_bad_inputs():
    with pytest.raises(FacekdError, match="no genuine comparisons"):
        edc_curve([], [], 0.5)
    with pytest.raises(FacekdError, match="2 of 8 genuine comparisons have a NaN quality"):
        edc_curve(HAND_SCORES, np.r_[HAND_QUALITY[:6], np.nan, np.nan], 0.5)
    with pytest.raises(FacekdError, match="1 of 8 genuine scores are NaN or infinite"):
        edc_curve(np.r_[HAND_SCORES[:7], np.inf], HAND_QUALITY, 0.5)
    with pytest.raises(FacekdError, match="8 genuine scores but 7 quality"):
        edc_curve(HAND_SCORES, HAND_QUALITY[:7], 0.5)
    with pytest.raises(ConfigError, match="^max_discard:"):
        edc_curve(HAND_SCORES, HAND_QUALITY, 0.5, max_discard=1.5)


def test_theoretical_best_falls_linearly_to_zero_at_the_start_fnmr():
    best = theoretical_best(HAND_SCORES, 0.5)
    np.testing.assert_allclose(best["discard"], [0, 3 / 8, 1])
    np.testing.assert_allclose(best["fnmr"], [3 / 8, 0, 0])
    assert best_partial_auc(3 / 8, 0.2) == pytest.approx(HAND_BEST_02)
    assert best_partial_auc(3 / 8, 0.5) == pytest.approx(3 / 8 * 3 / 8 / 2)  # the whole triangle
    perfect = theoretical_best([0.6, 0.7], 0.5)
    np.testing.assert_array_equal(perfect["fnmr"], [0, 0])
    assert best_partial_auc(0.0, 0.3) == 0.0


def test_random_order_curve_is_deterministic_per_seed_and_near_the_start_area():
    scores, issame, _ = random_set(2, genuine=3000, impostor=3000)
    genuine = scores[issame]
    threshold = threshold_for_fnmr(scores, issame, 0.3)
    first = random_order_curve(genuine, threshold, seed=7)
    again = random_order_curve(genuine, threshold, seed=7)
    other = random_order_curve(genuine, threshold, seed=8)
    np.testing.assert_array_equal(first["fnmr"], again["fnmr"])
    assert not np.array_equal(first["fnmr"], other["fnmr"])
    assert first["discard_fractions"].size == genuine.size  # no ties: one point per comparison
    start = float(np.mean(genuine < threshold))
    assert first["fnmr"][0] == start
    relative = partial_auc(first["discard_fractions"], first["fnmr"], 0.2) / (start * 0.2)
    assert relative == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ConfigError, match="^seed:"):
        random_order_curve(genuine, threshold, seed=-1)


# ---------------------------------------------------------------- areas


def test_partial_auc_is_the_area_under_the_step_curve():
    assert partial_auc(HAND_DISCARD, HAND_FNMR, 0.2) == pytest.approx(HAND_PAUC_02)
    # a limit exactly on a point: [0, 1/8) at 3/8 and [1/8, 3/8) at 2/7
    assert partial_auc(HAND_DISCARD, HAND_FNMR, 3 / 8) == pytest.approx(0.125 * 3 / 8 + 0.25 * 2 / 7)
    full = 0.125 * 3 / 8 + 0.25 * 2 / 7 + 0.125 / 5 + 0.25 / 4 + 0.25 * 0
    assert partial_auc(HAND_DISCARD, HAND_FNMR, 1.0) == pytest.approx(full)
    assert partial_auc(HAND_DISCARD, HAND_FNMR, 0.0) == 0.0
    with pytest.raises(ValueError):
        partial_auc([0.1, 0.2], [0.3, 0.2], 0.2)  # must start at discard 0
    with pytest.raises(ConfigError, match="^limit:"):
        partial_auc(HAND_DISCARD, HAND_FNMR, 1.2)


def test_pauc_summary_reports_raw_relative_and_minus_best():
    summary = pauc_summary(HAND_PAUC_02, 3 / 8, 0.2)
    assert summary["pauc"] == pytest.approx(HAND_PAUC_02)
    assert summary["relative_to_start"] == pytest.approx(HAND_PAUC_02 / 0.075)  # 0.9107142857
    assert summary["minus_best"] == pytest.approx(HAND_PAUC_02 - HAND_BEST_02)  # 0.0133035714
    assert pauc_summary(0.0, 0.0, 0.2)["relative_to_start"] is None


# ---------------------------------------------------------------- report and plot


def hand_report_set():
    """The hand example's genuine comparisons plus 10 impostors; impostor qualities are NaN (unused)."""
    impostors = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.45, 0.97]
    scores = np.r_[HAND_SCORES, impostors]
    issame = np.r_[np.ones(8, bool), np.zeros(10, bool)]
    quality = np.r_[HAND_QUALITY, np.full(10, np.nan)]
    return scores, issame, quality


def test_edc_report_on_the_hand_example():
    scores, issame, quality = hand_report_set()
    # fmr 0.1 of 10 allows 1 false match (0.97): t just above 0.45, so 0.1, 0.2, 0.3 fail as at 0.5
    report = edc_report(scores, issame, {"mine": quality, "reversed": -np.r_[HAND_QUALITY, np.zeros(10)]},
                        fmr=0.1, limits=(0.3, 0.2), seed=0)
    json.dumps(report, allow_nan=False)
    assert report["threshold"] == np.nextafter(0.45, np.inf)
    assert report["threshold_rule"] == "fmr" and report["fmr"] == pytest.approx(0.1)
    assert (report["genuine"], report["impostor"], report["comparisons"]) == (8, 10, 18)
    assert report["start_fnmr"] == pytest.approx(3 / 8)
    assert report["limits"] == [0.2, 0.3]
    mine = report["qualities"]["mine"]
    np.testing.assert_allclose(mine["discard"], HAND_DISCARD)
    np.testing.assert_allclose(mine["fnmr"], HAND_FNMR)
    assert mine["pauc"]["0.2"]["pauc"] == pytest.approx(HAND_PAUC_02)
    assert mine["pauc"]["0.3"]["pauc"] == pytest.approx(HAND_PAUC_03)
    assert mine["pauc"]["0.3"]["relative_to_start"] == pytest.approx(HAND_PAUC_03 / (3 / 8 * 0.3))
    assert mine["pauc"]["0.3"]["minus_best"] == pytest.approx(HAND_PAUC_03 - HAND_BEST_03)
    best = report["theoretical_best"]["pauc"]["0.2"]
    assert best["pauc"] == pytest.approx(HAND_BEST_02) and best["minus_best"] == pytest.approx(0.0)
    # the reversed quality discards the best first: quality -0.9 (0.6, 0.7) goes first -> 3/6
    assert report["qualities"]["reversed"]["fnmr"][:2] == pytest.approx([3 / 8, 3 / 6])
    expected_random = random_order_curve(HAND_SCORES, report["threshold"], seed=0)
    np.testing.assert_allclose(report["random"]["fnmr"], expected_random["fnmr"])


def test_edc_report_at_a_start_fnmr():
    scores, issame, quality = hand_report_set()
    # start_fnmr 0.3 of 8 allows floor(2.4) = 2 non-matches: t = 3rd lowest genuine = 0.3 -> FNMR 2/8
    report = edc_report(scores, issame, {"mine": quality}, start_fnmr=0.3)
    assert report["threshold_rule"] == "start_fnmr" and report["threshold"] == 0.3
    assert report["start_fnmr"] == pytest.approx(0.25)
    assert report["fmr"] == pytest.approx(4 / 10)  # impostors >= 0.3: 0.3, 0.35, 0.45, 0.97
    assert report["fmr_target"] is None and report["fnmr_target"] == 0.3


def test_edc_report_errors_name_the_problem():
    scores, issame, quality = hand_report_set()
    bad = quality.copy()
    bad[[0, 3, 5]] = np.nan
    with pytest.raises(FacekdError, match="quality 'mine': .*3 of 8 genuine comparisons have a NaN"):
        edc_report(scores, issame, {"mine": bad}, fmr=0.1)
    with pytest.raises(FacekdError, match="no genuine"):
        edc_report(scores[~issame], issame[~issame], {}, fmr=0.1)
    with pytest.raises(FacekdError, match="impostor comparisons; there are 10"):
        edc_report(scores, issame, {"mine": quality}, fmr=1e-3)
    with pytest.raises(FacekdError, match="has 17 scores for 18"):
        edc_report(scores, issame, {"mine": quality[:-1]}, fmr=0.1)
    with pytest.raises(ConfigError, match="^limits:"):
        edc_report(scores, issame, {"mine": quality}, fmr=0.1, limits=(0.0,))


def test_plot_edc_writes_a_valid_png(tmp_path):
    scores, issame, quality = random_set(4)
    report = edc_report(scores, issame, {"noisy": quality, "oracle": scores}, fmr=1e-2)
    target = tmp_path / "plots" / "edc.png"
    returned = plot_edc(report, target, title="EDC test")
    assert returned == target
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(target), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image.std()) > 1.0
    assert sorted(path.name for path in target.parent.iterdir()) == ["edc.png"]  # no temp file left
    plot_edc(report, tmp_path / "full.png", x_max=1.0)
    assert cv2.imread(str(tmp_path / "full.png")) is not None


def test_a_quality_that_ranks_by_error_beats_random_and_not_the_theoretical_best():
    scores, issame, _ = random_set(5, genuine=600)
    report = edc_report(scores, issame, {"oracle": scores}, fmr=1e-2, limits=(0.2,))
    oracle = report["qualities"]["oracle"]["pauc"]["0.2"]
    assert oracle["minus_best"] >= -1e-12  # the theoretical best is a lower bound
    assert oracle["pauc"] < report["random"]["pauc"]["0.2"]["pauc"]
    assert math.isclose(report["theoretical_best"]["pauc"]["0.2"]["minus_best"], 0.0, abs_tol=1e-15)


def test_pauc_normalised_by_the_theoretical_best():
    from facekd.evaluation.edc import pauc_summary

    # start FNMR 0.1, limit 0.2: no-gain area 0.02, best area 0.1²/2 = 0.005
    summary = pauc_summary(0.0125, 0.1, 0.2)
    assert summary["normalized"] == pytest.approx(0.5)
    assert summary["relative_to_start"] == pytest.approx(0.625)
    assert summary["minus_best"] == pytest.approx(0.0075)
    assert pauc_summary(0.0, 0.0, 0.2)["normalized"] is None
