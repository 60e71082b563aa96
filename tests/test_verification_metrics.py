from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
from sklearn import metrics as skmetrics

from facekd.errors import ConfigError, DataError, FacekdError
from facekd.recognition import metrics
from facekd.recognition.metrics import (
    FPR_LEVELS,
    all_pairs_scores,
    kfold_accuracy,
    plot_roc,
    roc_curve,
    tpr_at_fpr,
    verification_report,
)

T, F = True, False


def random_pairs(seed: int, count: int = 300, decimals: int = 2):
    """Genuine pairs score higher on average; rounding makes many ties."""
    rng = np.random.default_rng(seed)
    issame = rng.random(count) < 0.4
    scores = np.round(rng.normal(0.0, 0.25, count) + 0.35 * issame, decimals)
    return scores, issame


# ---------------------------------------------------------------- ROC


def test_roc_curve_hand_example_with_ties():
    # sorted: 0.9 (genuine), 0.8 tied (one genuine, one impostor), 0.3 (impostor)
    # >= inf: 0 TA 0 FA; >= 0.9: 1 TA; >= 0.8: 2 TA + 1 FA together (ties move at once); >= 0.3: all
    fpr, tpr, thresholds = roc_curve([0.8, 0.9, 0.3, 0.8], [F, T, F, T])
    assert thresholds.tolist() == [math.inf, 0.9, 0.8, 0.3]
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_curve_matches_sklearn(seed):
    scores, issame = random_pairs(seed)
    fpr, tpr, thresholds = roc_curve(scores, issame)
    sk_fpr, sk_tpr, sk_thresholds = skmetrics.roc_curve(issame, scores, drop_intermediate=False)
    assert len(thresholds) < len(scores)  # the rounding did make ties
    np.testing.assert_array_equal(thresholds, sk_thresholds)
    np.testing.assert_allclose(fpr, sk_fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, sk_tpr, rtol=0, atol=1e-15)


def test_roc_accepts_zero_one_labels_and_float32_scores():
    fpr, tpr, _ = roc_curve(np.array([0.9, 0.1], np.float32), np.array([1, 0]))
    assert fpr.tolist() == [0.0, 0.0, 1.0] and tpr.tolist() == [0.0, 1.0, 1.0]


# ---------------------------------------------------------------- TPR at FPR

# 10 impostors, 4 genuine pairs; descending:
# 0.95 N | 0.9 P | 0.7 P | 0.6 N | 0.55 P | 0.5 N | 0.45 P | 0.4 N | 0.35 N | ... | 0.1 N
HAND_NEG = [0.95, 0.6, 0.5, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1]
HAND_POS = [0.9, 0.7, 0.55, 0.45]
HAND_SCORES = np.array(HAND_NEG + HAND_POS)
HAND_ISSAME = np.array([F] * 10 + [T] * 4)


def test_tpr_at_fpr_hand_example():
    result = tpr_at_fpr(HAND_SCORES, HAND_ISSAME, levels=(0.1, 0.25, 0.2, 1.0, 0.01))
    by_level = {entry["fpr_level"]: entry for entry in result}
    assert [entry["fpr_level"] for entry in result] == [0.1, 0.25, 0.2, 1.0, 0.01]  # input order kept
    # 0.1 * 10 = 1 false accept allowed: accept down to 0.7 (FA 0.95), TPR 2/4
    assert by_level[0.1] == {"fpr_level": 0.1, "tpr": 0.5, "threshold": 0.7, "achieved_fpr": 0.1,
                             "supported": True, "false_accepts": 1}
    # 0.2 -> 2 FA: down to 0.55 (FA 0.95, 0.6), TPR 3/4; 0.25 -> floor(2.5) = 2: the same point
    for level in (0.2, 0.25):
        assert by_level[level]["tpr"] == 0.75 and by_level[level]["threshold"] == 0.55
        assert by_level[level]["achieved_fpr"] == 0.2 and by_level[level]["false_accepts"] == 2
    # 1.0 -> every point qualifies; TPR 1 is first reached at 0.45 with 3 FA (not at 0.1 with 10)
    assert by_level[1.0]["tpr"] == 1.0 and by_level[1.0]["threshold"] == 0.45
    assert by_level[1.0]["achieved_fpr"] == 0.3 and by_level[1.0]["false_accepts"] == 10
    # 0.01 * 10 = 0.1 < 1 false accept: 10 impostors cannot support it
    assert by_level[0.01] == {"fpr_level": 0.01, "tpr": None, "threshold": None, "achieved_fpr": None,
                              "supported": False, "false_accepts": 0}


def test_tpr_at_fpr_tied_top_impostors_give_the_origin():
    # 10 impostors, two tied at the top score 0.9: at FPR 0.1 (1 FA allowed) the threshold 0.9 already
    # makes 2 FA, so only "accept nothing" qualifies: TPR 0 at a threshold above every score
    scores = [0.9, 0.9] + [0.1] * 8 + [0.5, 0.6]
    issame = [F] * 10 + [T, T]
    (entry,) = tpr_at_fpr(scores, issame, levels=(0.1,))
    assert entry["supported"] and entry["tpr"] == 0.0 and entry["achieved_fpr"] == 0.0
    assert entry["threshold"] > 0.9 and math.isfinite(entry["threshold"])
    # 0.2 allows 2 FA: the tied pair is accepted together, with both genuine pairs
    (entry,) = tpr_at_fpr(scores, issame, levels=(0.2,))
    assert (entry["tpr"], entry["threshold"], entry["achieved_fpr"]) == (1.0, 0.5, 0.2)


def test_default_levels_support_follows_the_impostor_count():
    # 1000 impostors: 1e-3 allows exactly 1 false accept; 1e-4 and below allow none
    rng = np.random.default_rng(3)
    scores = np.r_[rng.normal(0, 0.1, 1000), rng.normal(0.5, 0.1, 50)]
    issame = np.r_[np.zeros(1000, bool), np.ones(50, bool)]
    result = tpr_at_fpr(scores, issame)
    assert [entry["fpr_level"] for entry in result] == list(FPR_LEVELS)
    assert [entry["supported"] for entry in result] == [True, True, True, False, False, False]
    assert [entry["false_accepts"] for entry in result] == [100, 10, 1, 0, 0, 0]
    assert all(entry["tpr"] is None for entry in result[3:])


@pytest.mark.parametrize("seed", [4, 5])
def test_tpr_at_fpr_matches_a_brute_force_search(seed):
    scores, issame = random_pairs(seed, count=400)
    negatives, positives = int((~issame).sum()), int(issame.sum())
    levels = (0.3, 0.1, 0.05, 0.01)
    for entry in tpr_at_fpr(scores, issame, levels):
        allowed = math.floor(entry["fpr_level"] * negatives)
        best = (0.0, 0.0, math.inf)  # (tpr, -fpr, threshold): most TPR, then fewest false accepts
        for threshold in sorted(set(scores.tolist())):
            accepted = scores >= threshold
            false_accepts = int((accepted & ~issame).sum())
            if false_accepts <= allowed:
                candidate = ((accepted & issame).sum() / positives, -false_accepts / negatives, threshold)
                best = max(best, candidate)
        assert entry["tpr"] == pytest.approx(best[0])
        assert entry["achieved_fpr"] == pytest.approx(-best[1])
        assert entry["threshold"] == best[2]
        assert entry["achieved_fpr"] <= entry["fpr_level"]


# ---------------------------------------------------------------- k-fold accuracy

# 7 pairs in 3 folds of sizes 3, 2, 2 (numpy.array_split): {0,1,2} {3,4} {5,6}
KFOLD_SCORES = [0.9, 0.2, 0.6, 0.85, 0.4, 0.7, 0.25]
KFOLD_ISSAME = [T, F, F, T, T, F, F]


def test_kfold_accuracy_hand_example():
    # fold 0, train {3..6}: 0.25N 0.4P 0.7N 0.85P. Train accuracy per candidate:
    #   below min 2/4 | 0.325 3/4 | 0.55 2/4 | 0.775 3/4 | above max 2/4  -> tie, smallest: 0.325
    #   test: 0.9P accepted (ok), 0.2N rejected (ok), 0.6N accepted (wrong)  -> 2/3
    # fold 1, train {0,1,2,5,6}: 0.2N 0.25N 0.6N 0.7N 0.9P
    #   below 1/5 | 0.225 2/5 | 0.425 3/5 | 0.65 4/5 | 0.8 5/5 | above 4/5  -> 0.8
    #   test: 0.85P accepted (ok), 0.4P rejected (wrong)  -> 1/2
    # fold 2, train {0..4}: 0.2N 0.4P 0.6N 0.85P 0.9P
    #   below 3/5 | 0.3 4/5 | 0.5 3/5 | 0.725 4/5 | 0.875 3/5 | above 2/5  -> tie, smallest: 0.3
    #   test: 0.7N accepted (wrong), 0.25N rejected (ok)  -> 1/2
    # mean = (2/3 + 1/2 + 1/2) / 3 = 5/9; deviations 1/9, -1/18, -1/18 -> variance 1/162
    result = kfold_accuracy(KFOLD_SCORES, KFOLD_ISSAME, folds=3)
    assert result["thresholds"] == pytest.approx([0.325, 0.8, 0.3], abs=1e-12)
    assert result["fold_accuracies"] == pytest.approx([2 / 3, 1 / 2, 1 / 2])
    assert result["mean"] == pytest.approx(5 / 9)
    assert result["std"] == pytest.approx(1 / math.sqrt(162))


def test_kfold_accuracy_perfect_separation_and_extreme_thresholds():
    # 20 pairs, 10 folds of 2: genuine pairs score 0.6..0.9, impostors 0.1..0.4 -> accuracy 1 everywhere
    scores = np.r_[np.linspace(0.6, 0.9, 10), np.linspace(0.1, 0.4, 10)]
    issame = np.r_[np.ones(10, bool), np.zeros(10, bool)]
    order = np.random.default_rng(6).permutation(20)
    result = kfold_accuracy(scores[order], issame[order])
    assert result["mean"] == 1.0 and result["std"] == 0.0
    assert len(result["thresholds"]) == 10 and all(0.4 < t < 0.6 for t in result["thresholds"])
    # 4 folds of 1: folds 0-2 train on 2 impostors + the genuine 0.9 and pick 0.6 (3/3), rejecting the
    # held-out impostor; fold 3 trains on impostors only, so "accept none" (above 0.3) rejects the 0.9
    result = kfold_accuracy([0.1, 0.2, 0.3, 0.9], [F, F, F, T], folds=4)
    assert result["thresholds"][3] > 0.3 and result["fold_accuracies"] == [1.0, 1.0, 1.0, 0.0]


def brute_force_kfold(scores, issame, folds):
    """An independent, literal version of the insightface protocol (smallest best threshold)."""
    accuracies, thresholds = [], []
    for test in np.array_split(np.arange(len(scores)), folds):
        train = [i for i in range(len(scores)) if i not in set(test.tolist())]
        distinct = sorted({float(scores[i]) for i in train})
        candidates = [distinct[0] - 1.0] + [(a + b) / 2 for a, b in zip(distinct, distinct[1:])] + [distinct[-1] + 1.0]
        best_threshold, best_correct = None, -1
        for threshold in candidates:
            correct = sum((scores[i] >= threshold) == issame[i] for i in train)
            if correct > best_correct:
                best_threshold, best_correct = threshold, correct
        thresholds.append(best_threshold)
        accuracies.append(sum((scores[i] >= best_threshold) == issame[i] for i in test) / len(test))
    return accuracies, thresholds


@pytest.mark.parametrize("seed, folds", [(7, 10), (8, 10), (9, 4)])
def test_kfold_accuracy_matches_a_brute_force_protocol(seed, folds):
    scores, issame = random_pairs(seed, count=123)  # 123 = 3 folds of 13 + 7 of 12
    accuracies, thresholds = brute_force_kfold(scores, issame, folds)
    result = kfold_accuracy(scores, issame, folds=folds)
    assert result["fold_accuracies"] == pytest.approx(accuracies)
    assert result["thresholds"] == pytest.approx(thresholds, abs=1e-12)
    assert result["mean"] == pytest.approx(np.mean(accuracies))
    assert result["std"] == pytest.approx(np.std(accuracies))


def test_kfold_accuracy_folds_errors():
    with pytest.raises(FacekdError, match="5 pair.*10 folds"):
        kfold_accuracy([0.1, 0.2, 0.3, 0.4, 0.5], [F, T, F, T, F])
    for folds in (1, 0, 2.5, True):
        with pytest.raises(ConfigError, match="folds"):
            kfold_accuracy(KFOLD_SCORES, KFOLD_ISSAME, folds=folds)


# ---------------------------------------------------------------- report, AUC, EER


def test_report_hand_example_eer_on_a_roc_point():
    # descending 0.9P 0.8P 0.7P 0.6N 0.5N 0.3P 0.2N 0.1N; ROC (FPR, TPR):
    # (0,0) (0,.25) (0,.5) (0,.75) (.25,.75) (.5,.75) (.5,1) (.75,1) (1,1)
    # at (.25,.75): FPR = FNR = 0.25 -> EER 0.25 exactly
    # AUC = P(genuine > impostor) = (4 + 4 + 4 + 2) / 16 = 0.875
    scores = [0.9, 0.8, 0.7, 0.3, 0.6, 0.5, 0.2, 0.1]
    issame = [T, T, T, T, F, F, F, F]
    report = verification_report(scores, issame, levels=(0.25, 0.5, 0.1), folds=2)
    assert report["eer"] == 0.25 and report["auc"] == 0.875
    assert (report["pairs"], report["positives"], report["negatives"], report["folds"]) == (8, 4, 4, 2)
    # levels: 0.25 -> 1 FA: TPR .75 at 0.7; 0.5 -> 2 FA: TPR 1 at 0.3; 0.1 -> 0.4 FA: unsupported
    assert [(e["tpr"], e["threshold"]) for e in report["tpr_at_fpr"]] == [(0.75, 0.7), (1.0, 0.3), (None, None)]
    # folds {0..3} (all genuine) and {4..7} (all impostors): fold 0 trains on impostors only, so
    # "accept none" wins and rejects every genuine test pair (0/4); fold 1 trains on genuine pairs
    # only, "accept all" wins and accepts every impostor (0/4)
    assert report["accuracy"] == 0.0 and report["accuracy_std"] == 0.0


def test_report_eer_interpolated_between_points_and_ties():
    # 0.9P, then 0.5 tied (one genuine, one impostor), then 0.1N: ROC (0,0) (0,.5) (.5,1) (1,1)
    # FPR - FNR along the curve: -1, -.5, +.5 -> halfway along (0,.5)-(.5,1): FPR .25, TPR .75, FNR .25
    # AUC: 0.5 * (0.5 + 1) / 2 + 0.5 * 1 = 0.875 (the tie counts half: (1 + 1 + 0.5 + 1) / 4)
    report = verification_report([0.9, 0.5, 0.5, 0.1], [T, T, F, F], folds=10)
    assert report["eer"] == pytest.approx(0.25) and report["auc"] == pytest.approx(0.875)
    assert report["accuracy"] is None and report["accuracy_std"] is None  # 4 pairs < 10 folds
    # every level is unsupported by 2 impostors except 1e-1 (0.2 < 1 too): all unsupported
    assert [e["supported"] for e in report["tpr_at_fpr"]] == [False] * 6


def test_report_single_impostor_eer_is_half_way():
    # one genuine and one impostor with the same score: ROC (0,0) -> (1,1), EER 0.5, AUC 0.5
    report = verification_report([0.3, 0.3], [T, F], folds=2)
    assert report["eer"] == 0.5 and report["auc"] == 0.5


@pytest.mark.parametrize("seed", [10, 11])
def test_report_auc_and_eer_against_independent_computations(seed):
    scores, issame = random_pairs(seed, count=500)
    report = verification_report(scores, issame)
    assert report["auc"] == pytest.approx(skmetrics.roc_auc_score(issame, scores), abs=1e-12)
    # EER by bisection on the linearly interpolated sklearn ROC: FNR(x) = 1 - tpr(x) equals x
    fpr, tpr, _ = skmetrics.roc_curve(issame, scores)
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if 1.0 - np.interp(middle, fpr, tpr) > middle:
            low = middle
        else:
            high = middle
    assert report["eer"] == pytest.approx(low, abs=1e-9)


def test_report_is_json_with_plain_python_types():
    scores, issame = random_pairs(12, count=200)
    report = verification_report(scores, issame)
    decoded = json.loads(json.dumps(report, allow_nan=False))
    assert decoded == report
    assert isinstance(report["accuracy"], float) and isinstance(report["pairs"], int)
    for entry in report["tpr_at_fpr"]:
        assert all(type(value) in (float, int, bool, type(None)) for value in entry.values())


# ---------------------------------------------------------------- input validation


@pytest.mark.parametrize("scores, issame, message", [
    ([0.1, float("nan"), float("nan"), float("inf")], [T, F, T, F], "2 NaN and 1 infinite score.*first at index 1"),
    ([0.1, 0.2, 0.3], [T, F], "3 scores but 2 issame"),
    ([0.1, 0.2], [F, F], "no genuine"),
    ([0.1, 0.2], [T, 1], "no impostor"),
    ([], [], "no pairs"),
    ([[0.1, 0.2]], [[T, F]], "1-D"),
    ([0.1, 0.2], [2, 0], "booleans or 0/1"),
    (["a", "b"], [T, F], "not numbers"),
])
def test_bad_inputs_raise_facekd_errors(scores, issame, message):
    for function in (roc_curve, tpr_at_fpr, kfold_accuracy, verification_report):
        with pytest.raises(FacekdError, match=message):
            function(scores, issame)


@pytest.mark.parametrize("levels", [(0.0,), (1.5,), (float("nan"),), ("x",), (-1e-3,)])
def test_bad_fpr_levels_are_config_errors(levels):
    with pytest.raises(ConfigError, match="fpr levels"):
        tpr_at_fpr([0.1, 0.9], [F, T], levels)
    with pytest.raises(ConfigError, match="fpr levels"):
        verification_report([0.1, 0.9], [F, T], levels)


# ---------------------------------------------------------------- all pairs


def brute_force_pairs(embeddings, labels):
    scores, issame = [], []
    for i in range(len(embeddings)):
        for j in range(i + 1, len(embeddings)):
            a, b = embeddings[i], embeddings[j]
            scores.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
            issame.append(bool(labels[i] == labels[j]))
    return np.array(scores), np.array(issame)


@pytest.mark.parametrize("block_elements", [1 << 22, 5 * 37, 1])  # one block; 5 rows a block; 1 row a block
def test_all_pairs_scores_match_a_loop(monkeypatch, block_elements):
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", block_elements)
    rng = np.random.default_rng(13)
    embeddings = rng.normal(size=(37, 8)) * rng.uniform(0.1, 5.0, (37, 1))  # lengths vary
    labels = np.array([f"id{k}" for k in rng.integers(0, 6, 37)])
    scores, issame = all_pairs_scores(embeddings, labels)
    expected_scores, expected_issame = brute_force_pairs(embeddings, labels)
    assert scores.shape == (37 * 36 // 2,) and issame.dtype == bool
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(issame, expected_issame)


def test_all_pairs_scores_blocks_of_several_rows(monkeypatch):
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 3 * 11)  # 3 rows of 11 per block: blocks 0-2, 3-5, 6-8, 9
    embeddings = np.random.default_rng(14).normal(size=(11, 4)).astype(np.float32)
    labels = [0, 1, 0, 2, 1, 1, 3, 0, 2, 2, 3]
    scores, issame = all_pairs_scores(embeddings, labels)
    expected_scores, expected_issame = brute_force_pairs(embeddings.astype(np.float64), labels)
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(issame, expected_issame)


def test_all_pairs_scores_small_exact_case():
    # unit vectors along x, x, y and (1,1)/sqrt2: pair order (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    embeddings = [[2.0, 0.0], [0.5, 0.0], [0.0, 3.0], [1.0, 1.0]]
    scores, issame = all_pairs_scores(embeddings, [7, 7, 8, 8])
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(scores, [1.0, 0.0, r, 0.0, r, r], atol=1e-15)
    assert issame.tolist() == [T, F, F, F, F, T]


def test_all_pairs_scores_errors():
    embeddings = np.ones((5, 3))
    with pytest.raises(FacekdError, match="make 10 pairs, more than max_pairs=9"):
        all_pairs_scores(embeddings, range(5), max_pairs=9)
    assert all_pairs_scores(embeddings, range(5), max_pairs=10)[0].shape == (10,)
    with pytest.raises(ConfigError, match="max_pairs"):
        all_pairs_scores(embeddings, range(5), max_pairs=0)
    zero = embeddings.copy()
    zero[[2, 4]] = 0.0
    with pytest.raises(FacekdError, match="2 embedding.*all zeros.*index 2"):
        all_pairs_scores(zero, range(5))
    broken = embeddings.copy()
    broken[3, 1] = np.nan
    with pytest.raises(FacekdError, match="1 embedding.*NaN.*index 3"):
        all_pairs_scores(broken, range(5))
    with pytest.raises(FacekdError, match="5 embeddings but labels"):
        all_pairs_scores(embeddings, range(4))
    with pytest.raises(FacekdError, match="at least 2"):
        all_pairs_scores(np.ones((1, 3)), [0])
    with pytest.raises(FacekdError, match=r"shape \(N, D\)"):
        all_pairs_scores(np.ones(5), range(5))
    with pytest.raises(FacekdError, match="label"):
        all_pairs_scores(embeddings, [0.0, 1.0, np.nan, 1.0, 0.0])


# ---------------------------------------------------------------- plot


def test_plot_roc_writes_a_png(tmp_path):
    scores, issame = random_pairs(15, count=400, decimals=4)
    student = roc_curve(scores, issame)[:2]
    teacher = roc_curve(scores + 0.3 * issame, issame)[:2]
    path = tmp_path / "plots" / "roc.png"
    returned = plot_roc({"student": student, "teacher": teacher}, path, title="ROC")
    assert returned == path
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (480, 640, 3)
    assert image.std() > 10  # lines, labels and grid: not a blank canvas
    assert sorted(p.name for p in path.parent.iterdir()) == ["roc.png"]  # no temporary file left


def test_plot_roc_without_positive_fpr_and_bad_curves(tmp_path):
    # a perfect curve has no FPR strictly between 0 and 1: the axis falls back to 1e-6..1
    path = plot_roc({"perfect": ([0.0, 0.0, 1.0], [0.0, 1.0, 1.0])}, tmp_path / "perfect.png")
    assert cv2.imread(str(path)) is not None
    with pytest.raises(ValueError, match="no curves"):
        plot_roc({}, tmp_path / "none.png")
    with pytest.raises(ValueError, match="equal length"):
        plot_roc({"bad": ([0.0, 1.0], [0.0])}, tmp_path / "bad.png")
    assert not (tmp_path / "none.png").exists() and not (tmp_path / "bad.png").exists()


def test_plot_roc_unwritable_path_is_a_data_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="cannot write"):
        plot_roc({"c": ([0.0, 0.5, 1.0], [0.0, 0.7, 1.0])}, blocker / "roc.png")
