"""Distillation losses for face recognition: values against independent numpy computations,
no gradient to the teacher, EKD thresholds and their moving averages (paper and bias-corrected),
top_k as a count or a fraction, ekd+feature, and EKD across two processes."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from facekd.errors import ConfigError
from facekd.losses.distill import (DISTILL_METHODS, EKDFeatureLoss, EKDLoss, FeatureDistill, RKDDistill,
                                   SimilarityPreserving, build_distill_loss, distill_options, ekd_threshold_indices)

JOBS = Path(__file__).parent / "jobs"
LEVELS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


# ----------------------------------------------------------------------------- numpy references

def np_unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_huber(a: np.ndarray, b: np.ndarray, huber: bool = True) -> float:
    d = np.abs(a - b)
    return float(np.mean(np.where((d < 1.0) | (not huber), 0.5 * d * d, d - 0.5)))


def np_rkd(student: np.ndarray, teacher: np.ndarray, huber: bool = True) -> tuple[float, float]:
    """(distance term, angle term) with explicit loops over pairs and triplets (`huber=False`: halved MSE)."""
    def distances(e):
        n = len(e)
        d = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                if i != j:
                    d[i, j] = math.sqrt(sum((e[i, k] - e[j, k]) ** 2 for k in range(e.shape[1])))
        return d / (d.sum() / (n * (n - 1)))

    def angles(e):
        n = len(e)
        a = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if j != i and k != i:
                        u, v = e[j] - e[i], e[k] - e[i]
                        a[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        return a

    s, t = np_unit(student), np_unit(teacher)
    return np_huber(distances(s), distances(t), huber), np_huber(angles(s), angles(t), huber)


def np_similarity_preserving(student: np.ndarray, teacher: np.ndarray) -> float:
    def gram(f):
        g = np.asarray(f, dtype=np.float64) @ np.asarray(f, dtype=np.float64).T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    b = len(student)
    return float(np.sum((gram(student) - gram(teacher)) ** 2) / b ** 2)


def np_pairs(emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, positive mask) of the pairs i < j, in row-major order."""
    e = np_unit(emb)
    sims, positive = [], []
    for i in range(len(e)):
        for j in range(i + 1, len(e)):
            sims.append(float(e[i] @ e[j]))
            positive.append(labels[i] == labels[j])
    return np.array(sims), np.array(positive)


def np_thresholds(negatives: np.ndarray, levels=LEVELS) -> np.ndarray:
    """The reference code's rule: sorted descending, position N // (1 / level) (0-based)."""
    ordered = np.sort(negatives)[::-1]
    return np.array([ordered[len(ordered) // round(1 / level)] for level in levels])


def np_ekd(student, teacher, labels, thr_s, thr_t, temperature=0.01, top_k=2000, pw=0.02, nw=0.01,
           extra_negatives=None) -> float:
    """EKD by the paper's formulas; `extra_negatives` (student, teacher similarities) join the batch's."""
    sim_s, pos = np_pairs(student, labels)
    sim_t, _ = np_pairs(teacher, labels)

    def rank(x, thr):
        return (1.0 / (1.0 + np.exp(-(x[:, None] - thr[None, :]) / temperature))).sum(axis=1)

    pos_term = np.mean((rank(sim_s[pos], thr_s) - rank(sim_t[pos], thr_t)) ** 2) if pos.any() else 0.0
    neg_s, neg_t = sim_s[~pos], sim_t[~pos]
    if extra_negatives is not None:
        neg_s, neg_t = np.concatenate([neg_s, extra_negatives[0]]), np.concatenate([neg_t, extra_negatives[1]])
    hard = np.argsort(-neg_s, kind="stable")[:top_k]
    neg_term = np.mean((rank(neg_s[hard], thr_s) - rank(neg_t[hard], thr_t)) ** 2)
    return pw * pos_term + nw * neg_term


def clustered_batch(identities: int, images: int, dim_s: int, dim_t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(identities).repeat_interleave(images)
    student = torch.randn(identities, dim_s, generator=g)[labels] + 0.7 * torch.randn(len(labels), dim_s, generator=g)
    teacher = torch.randn(identities, dim_t, generator=g)[labels] + 0.5 * torch.randn(len(labels), dim_t, generator=g)
    return student, teacher, labels


# ----------------------------------------------------------------------------- every method

ALL_LOSSES = {
    "feature-l2": lambda: FeatureDistill("l2"),
    "feature-cosine": lambda: FeatureDistill("cosine"),
    "rkd": RKDDistill,
    "similarity": SimilarityPreserving,
    "ekd": lambda: EKDLoss(top_k=50),
    "ekd+feature": lambda: EKDFeatureLoss(feature_weight=0.5, top_k=0.3),
}


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_no_gradient_reaches_the_teacher(name):
    loss_fn = ALL_LOSSES[name]().train()
    student_raw, _, labels = clustered_batch(4, 4, 8, 8)
    student = student_raw.clone().requires_grad_(True)
    # a teacher tensor that itself requires grad
    teacher = torch.randn(16, 8).requires_grad_(True)
    loss, _ = loss_fn(student, teacher, labels)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    # a teacher module run WITH autograd on: its parameters still get no gradient
    torch.manual_seed(0)
    teacher_net = nn.Linear(8, 8)
    loss, _ = loss_fn(student, teacher_net(torch.randn(16, 8)), labels)
    loss.backward()
    assert all(p.grad is None for p in teacher_net.parameters())


# ----------------------------------------------------------------------------- feature

def test_feature_distill_hand_computed():
    student = torch.tensor([[3.0, 4.0], [1.0, 0.0]])   # unit: (0.6, 0.8), (1, 0)
    teacher = torch.tensor([[0.0, 2.0], [5.0, 0.0]])   # unit: (0, 1),     (1, 0)
    # l2: ||(0.6, -0.2)||^2 = 0.4 and 0 -> mean 0.2; cosine: 1 - 0.8 = 0.2 and 0 -> mean 0.1
    l2, metrics = FeatureDistill("l2")(student, teacher, torch.tensor([0, 1]))
    cosine, _ = FeatureDistill("cosine")(student, teacher, torch.tensor([0, 1]))
    assert l2.item() == pytest.approx(0.2, abs=1e-6)
    assert cosine.item() == pytest.approx(0.1, abs=1e-6)
    assert metrics == {}


def test_feature_distill_refuses_different_sizes_and_bad_metric():
    with pytest.raises(ConfigError, match="feature: student embedding size 4 differs"):
        FeatureDistill()(torch.randn(3, 4), torch.randn(3, 6), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match="feature.metric"):
        FeatureDistill("l1")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- rkd

def test_rkd_against_loops_in_numpy():
    student = np.array([[1.0, 0.2, -0.5], [0.3, 1.0, 0.1], [-0.7, 0.4, 0.9], [0.2, -1.0, 0.3]])
    teacher = np.array([[0.9, 0.1, 0.0, 0.2], [0.0, 1.0, 0.3, -0.1], [-1.0, 0.0, 0.8, 0.5],
                        [0.1, 0.2, -0.9, 1.0]])  # D' = 4 != D = 3: relations only
    distance, angle = np_rkd(student, teacher)
    loss, metrics = RKDDistill(distance_weight=1.0, angle_weight=2.0)(
        torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32),
        torch.arange(4))
    assert distance > 1e-3 and angle > 1e-3  # the example is not trivial
    assert metrics["rkd_distance"].item() == pytest.approx(distance, rel=1e-4)
    assert metrics["rkd_angle"].item() == pytest.approx(angle, rel=1e-4)
    assert loss.item() == pytest.approx(distance + 2.0 * angle, rel=1e-4)


def test_rkd_is_scale_invariant_and_zero_for_the_same_embeddings():
    x = torch.randn(6, 5)
    loss, _ = RKDDistill()(x, 3.0 * x, torch.arange(6))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_rkd_huber_branch_beyond_one():
    # student: three close points and one opposite; teacher: three spread points and the fourth next to
    # the first -> the normalised distance of pair (0, 3) is about 1.9 for the student and 0 for the teacher
    student = np.array([[1.0, 0.0], [0.999, 0.045], [0.999, -0.045], [-1.0, 0.0]])
    teacher = np.array([[1.0, 0.0], [-0.5, 0.866], [-0.5, -0.866], [0.999, 0.045]])
    distance, angle = np_rkd(student, teacher)
    squared = np_rkd(student, teacher, huber=False)[0]
    assert abs(distance - squared) > 1e-3  # the linear branch of the Huber loss matters here
    _, metrics = RKDDistill()(torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32),
                              torch.arange(4))
    assert metrics["rkd_distance"].item() == pytest.approx(distance, rel=1e-4)
    assert metrics["rkd_angle"].item() == pytest.approx(angle, rel=1e-4)


# ----------------------------------------------------------------------------- similarity preserving

def test_similarity_preserving_hand_computed():
    # student (1,0), (1,0): G = [[1,1],[1,1]] -> rows / sqrt(2)
    # teacher (1,0), (0,2): G = [[1,0],[0,4]] -> rows [1,0], [0,1]
    # diff = [[1/sqrt2 - 1, 1/sqrt2], [1/sqrt2, 1/sqrt2 - 1]]; ||.||_F^2 = 2(1/sqrt2 - 1)^2 + 2 * 1/2
    expected = (2 * (1 / math.sqrt(2) - 1) ** 2 + 1.0) / 4
    loss, metrics = SimilarityPreserving()(torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
                                           torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics == {}


def test_similarity_preserving_against_numpy_with_different_dims():
    rng = np.random.default_rng(3)
    student, teacher = rng.normal(size=(4, 3)), rng.normal(size=(4, 5))
    loss, _ = SimilarityPreserving()(torch.tensor(student, dtype=torch.float32),
                                     torch.tensor(teacher, dtype=torch.float32), torch.arange(4))
    assert loss.item() == pytest.approx(np_similarity_preserving(student, teacher), rel=1e-5)


# ----------------------------------------------------------------------------- ekd

def test_threshold_positions_follow_the_reference_code():
    # N // (1/level): 3000 negatives -> 300, 30, 3 then the largest negative for the levels below 1/N
    assert ekd_threshold_indices(3000, LEVELS) == [300, 30, 3, 0, 0, 0]
    assert ekd_threshold_indices(96, LEVELS) == [9, 0, 0, 0, 0, 0]
    assert ekd_threshold_indices(1_000_000, LEVELS) == [100_000, 10_000, 1000, 100, 10, 1]
    assert ekd_threshold_indices(5, [0.5, 0.99]) == [2, 4]


def test_ekd_is_zero_when_student_equals_teacher():
    student, _, labels = clustered_batch(4, 4, 8, 8)
    loss, metrics = EKDLoss().train()(student, student.clone(), labels)
    assert loss.item() == 0.0
    assert metrics["ekd_pos"].item() == 0.0 and metrics["ekd_neg"].item() == 0.0
    assert metrics["ekd_thr_student"].item() == metrics["ekd_thr_teacher"].item()


def test_ekd_matches_numpy_and_gives_student_gradients():
    student, teacher, labels = clustered_batch(4, 6, 8, 12, seed=5)  # 24 samples: 276 pairs, 216 negatives
    s = student.clone().requires_grad_(True)
    loss_fn = EKDLoss(top_k=40, temperature=0.05).train()
    loss, metrics = loss_fn(s, teacher, labels)
    loss.backward()

    sim_s, pos = np_pairs(student.numpy(), labels.numpy())
    sim_t, _ = np_pairs(teacher.numpy(), labels.numpy())
    assert pos.sum() == 4 * 15 and (~pos).sum() == 216
    expected = np_ekd(student.numpy(), teacher.numpy(), labels.numpy(), np_thresholds(sim_s[~pos]),
                      np_thresholds(sim_t[~pos]), temperature=0.05, top_k=40)
    assert expected > 1e-4
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert (metrics["ekd_pos"] + metrics["ekd_neg"]).item() == pytest.approx(loss.item(), rel=1e-6)
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_ekd_paper_thresholds_are_negative_quantiles_then_a_moving_average():
    levels = (1e-1, 1e-2, 1e-3)
    loss_fn = EKDLoss(levels=[1e-3, 1e-1, 1e-2], momentum=0.25, threshold_average="paper").train()  # unsorted
    assert loss_fn.levels == levels
    student, teacher, labels = clustered_batch(5, 4, 8, 10, seed=1)  # 20 samples: 190 pairs, 160 negatives
    _, metrics = loss_fn(student, teacher, labels)
    sim_s, pos = np_pairs(student.numpy(), labels.numpy())
    sim_t, _ = np_pairs(teacher.numpy(), labels.numpy())
    first_s, first_t = np_thresholds(sim_s[~pos], levels), np_thresholds(sim_t[~pos], levels)
    # 160 negatives: positions 16, 1 and 0 (1e-3 * 160 < 1: the largest negative)
    assert first_s[2] == pytest.approx(sim_s[~pos].max(), abs=1e-12)
    np.testing.assert_allclose(loss_fn.student_thresholds.numpy(), first_s, atol=1e-6)
    np.testing.assert_allclose(loss_fn.teacher_thresholds.numpy(), first_t, atol=1e-6)
    assert metrics["ekd_thr_student"].item() == pytest.approx(first_s[2], abs=1e-6)
    assert metrics["ekd_thr_teacher"].item() == pytest.approx(first_t[2], abs=1e-6)

    student2, teacher2, labels2 = clustered_batch(5, 4, 8, 10, seed=2)
    loss2, _ = loss_fn(student2, teacher2, labels2)
    sim_s2, pos2 = np_pairs(student2.numpy(), labels2.numpy())
    sim_t2, _ = np_pairs(teacher2.numpy(), labels2.numpy())
    ema_s = 0.75 * first_s + 0.25 * np_thresholds(sim_s2[~pos2], levels)
    ema_t = 0.75 * first_t + 0.25 * np_thresholds(sim_t2[~pos2], levels)
    np.testing.assert_allclose(loss_fn.student_thresholds.numpy(), ema_s, atol=1e-6)
    np.testing.assert_allclose(loss_fn.teacher_thresholds.numpy(), ema_t, atol=1e-6)
    # and the second step's loss uses the smoothed thresholds
    expected = np_ekd(student2.numpy(), teacher2.numpy(), labels2.numpy(), ema_s, ema_t)
    assert loss2.item() == pytest.approx(expected, rel=1e-4)


def test_ekd_buffers_are_checkpointed_and_eval_mode_leaves_them():
    loss_fn = EKDLoss().train()
    state = loss_fn.state_dict()
    assert {"student_thresholds", "teacher_thresholds", "threshold_updates"} <= set(state)
    for seed in range(2):
        loss_fn(*clustered_batch(4, 4, 8, 8, seed=seed))
    saved = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    assert int(saved["threshold_updates"]) == 2

    restored = EKDLoss()
    restored.load_state_dict(saved)
    for key in saved:
        assert torch.equal(restored.state_dict()[key], saved[key]), key

    restored.eval()
    batch = clustered_batch(4, 4, 8, 8, seed=9)
    loss_eval, metrics = restored(*batch)
    for key in saved:
        assert torch.equal(restored.state_dict()[key], saved[key]), key
    # eval mode uses the stored thresholds
    assert metrics["ekd_thr_student"].item() == pytest.approx(saved["student_thresholds"][2].item())
    # a fresh loss in eval mode uses the batch's thresholds without storing them
    fresh = EKDLoss().eval()
    _, metrics = fresh(*batch)
    assert int(fresh.threshold_updates) == 0 and fresh.student_thresholds.abs().sum() == 0
    sim_s, pos = np_pairs(batch[0].numpy(), batch[2].numpy())
    assert metrics["ekd_thr_student"].item() == pytest.approx(sim_s[~pos].max(), abs=1e-6)


def test_ekd_uses_all_negatives_when_fewer_than_top_k_and_handles_one_identity():
    student, teacher, labels = clustered_batch(3, 3, 6, 6, seed=4)  # 27 negatives < top_k 2000
    sim_s, pos = np_pairs(student.numpy(), labels.numpy())
    sim_t, _ = np_pairs(teacher.numpy(), labels.numpy())
    loss, _ = EKDLoss().train()(student, teacher, labels)
    expected = np_ekd(student.numpy(), teacher.numpy(), labels.numpy(), np_thresholds(sim_s[~pos]),
                      np_thresholds(sim_t[~pos]))
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # a single identity: no negatives, thresholds not updated, only the positive term
    one = EKDLoss().train()
    s = torch.randn(4, 6, requires_grad=True)
    loss, metrics = one(s, torch.randn(4, 6), torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert metrics["ekd_neg"].item() == 0.0 and int(one.threshold_updates) == 0
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("options, field", [
    ({"levels": [0.1, 1.0]}, "ekd.levels"), ({"levels": []}, "ekd.levels"), ({"levels": [0.1, 0.1]}, "ekd.levels"),
    ({"levels": ["1e-3"]}, "ekd.levels"), ({"levels": 0.1}, "ekd.levels"), ({"temperature": 0}, "ekd.temperature"),
    ({"top_k": 0}, "ekd.top_k: a count must be >= 1"), ({"top_k": -5}, "ekd.top_k: a count must be >= 1"),
    ({"top_k": 2.5}, "ekd.top_k: a float is a fraction"), ({"top_k": 0.0}, "ekd.top_k: a float is a fraction"),
    ({"top_k": -0.5}, "ekd.top_k: a float is a fraction"), ({"top_k": float("nan")}, "ekd.top_k"),
    ({"top_k": 1.0}, "ekd.top_k: a float is a fraction of the negatives and must lie in (0, 1), got 1.0 "
                     "(for a count write 1)"),
    ({"top_k": 2000.0}, "got 2000.0 (for a count write 2000)"),
    ({"top_k": True}, "ekd.top_k: expected an int"), ({"top_k": "0.5"}, "ekd.top_k: expected an int"),
    ({"positive_weight": -1}, "ekd.positive_weight"),
    ({"negative_weight": float("nan")}, "ekd.negative_weight"), ({"momentum": 0}, "ekd.momentum"),
    ({"momentum": 1.5}, "ekd.momentum"), ({"threshold_average": "adam"}, "ekd.threshold_average"),
    ({"memory": -1}, "ekd.memory"), ({"memory": 2.5}, "ekd.memory"), ({"memory": True}, "ekd.memory"),
])
def test_ekd_rejects_bad_settings(options, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        EKDLoss(**options)


def np_ema(batches: list[np.ndarray], momentum: float) -> np.ndarray:
    """Adam's bias-corrected moving average, in closed form: sum_i m (1-m)^(t-i) x_i / (1 - (1-m)^t)."""
    t = len(batches)
    weights = np.array([momentum * (1 - momentum) ** (t - i) for i in range(1, t + 1)])
    return (weights[:, None] * np.stack(batches)).sum(axis=0) / (1 - (1 - momentum) ** t)


def test_ekd_bias_corrected_thresholds_equal_the_closed_form():
    levels = (1e-1, 1e-2)
    loss_fn = EKDLoss(levels=levels, momentum=0.1).train()  # the default threshold_average
    assert loss_fn.threshold_average == "bias_corrected"
    seen_s, seen_t = [], []
    for step in range(6):
        student, teacher, labels = clustered_batch(5, 4, 8, 10, seed=20 + step)
        sim_s, pos = np_pairs(student.numpy(), labels.numpy())
        sim_t, _ = np_pairs(teacher.numpy(), labels.numpy())
        seen_s.append(np_thresholds(sim_s[~pos], levels))
        seen_t.append(np_thresholds(sim_t[~pos], levels))
        loss, _ = loss_fn(student, teacher, labels)
        expected_s, expected_t = np_ema(seen_s, 0.1), np_ema(seen_t, 0.1)
        np.testing.assert_allclose(loss_fn.student_thresholds.numpy(), expected_s, atol=1e-6)
        np.testing.assert_allclose(loss_fn.teacher_thresholds.numpy(), expected_t, atol=1e-6)
        assert int(loss_fn.threshold_updates) == step + 1
        assert loss.item() == pytest.approx(np_ekd(student.numpy(), teacher.numpy(), labels.numpy(), expected_s,
                                                   expected_t), rel=1e-4)
    # after 6 updates with momentum 0.1 the weights are within a factor 0.9^5 ≈ 0.6 of each other;
    # the paper's average would still give the first batch 0.9^5 ≈ 0.59 of the weight
    paper = (0.9 ** 5) * seen_s[0] + sum(0.1 * 0.9 ** (5 - i) * seen_s[i] for i in range(1, 6))
    assert np.abs(paper - loss_fn.student_thresholds.numpy()).max() > 1e-3


def test_ekd_paper_preset_is_the_previous_update_bit_for_bit():
    """threshold_average 'paper': the batch value at the first update, then thr <- (1-m) thr + m x,
    with the very tensor operations of the code before bias correction existed."""
    loss_fn = EKDLoss(threshold_average="paper").train()
    reference_s = reference_t = None
    for step in range(4):
        student, teacher, labels = clustered_batch(6, 4, 8, 10, seed=40 + step)
        _, metrics = loss_fn(student, teacher, labels)
        s, t = (torch.nn.functional.normalize(x, dim=1, eps=1e-12) for x in (student, teacher))
        rows, cols = torch.triu_indices(len(labels), len(labels), offset=1)
        negative = labels[rows] != labels[cols]
        batch_s = loss_fn.batch_thresholds((s @ s.t())[rows, cols][negative])
        batch_t = loss_fn.batch_thresholds((t @ t.t())[rows, cols][negative])
        if reference_s is None:
            reference_s, reference_t = batch_s.clone(), batch_t.clone()
        else:
            reference_s.mul_(1.0 - 0.01).add_(batch_s, alpha=0.01)
            reference_t.mul_(1.0 - 0.01).add_(batch_t, alpha=0.01)
        assert torch.equal(loss_fn.student_thresholds, reference_s)
        assert torch.equal(loss_fn.teacher_thresholds, reference_t)
        assert metrics["ekd_thr_student"].item() == reference_s[2].item()


@pytest.mark.parametrize("threshold_average", ["bias_corrected", "paper"])
def test_ekd_state_dict_round_trip_continues_identically(threshold_average):
    options = dict(momentum=0.2, top_k=0.25, threshold_average=threshold_average)
    batches = [clustered_batch(5, 4, 8, 10, seed=60 + step) for step in range(5)]
    original = EKDLoss(**options).train()
    for batch in batches[:3]:
        original(*batch)
    restored = EKDLoss(**options).train()
    restored.load_state_dict(original.state_dict())
    assert int(restored.threshold_updates) == 3
    # the same thresholds without the update count would continue differently (bias-corrected)
    forgetful = EKDLoss(**options).train()
    forgetful.load_state_dict({**original.state_dict(), "threshold_updates": torch.tensor(1)})
    for batch in batches[3:]:
        loss_a, metrics_a = original(*batch)
        loss_b, metrics_b = restored(*batch)
        loss_c, _ = forgetful(*batch)
        assert torch.equal(loss_a, loss_b) and metrics_a.keys() == metrics_b.keys()
        assert all(torch.equal(metrics_a[k], metrics_b[k]) for k in metrics_a)
        for key, value in original.state_dict().items():
            assert torch.equal(value, restored.state_dict()[key]), key
    assert int(original.threshold_updates) == 5
    assert (loss_c.item() != loss_a.item()) == (threshold_average == "bias_corrected")


def test_ekd_top_k_fraction_takes_the_ceiling_of_the_share_of_negatives():
    student, teacher, labels = clustered_batch(4, 6, 8, 12, seed=5)  # 216 negatives
    assert EKDLoss(top_k=0.1).num_hardest(216) == 22  # ceil(21.6)
    assert EKDLoss(top_k=0.1).num_hardest(30) == 3  # 0.1 * 30 is 3.0000000000000004 in floats: still 3
    assert EKDLoss(top_k=0.5).num_hardest(3) == 2 and EKDLoss(top_k=1e-9).num_hardest(216) == 1
    assert EKDLoss(top_k=0.999).num_hardest(216) == 216 and EKDLoss(top_k=3).num_hardest(216) == 3
    assert EKDLoss(top_k=5000).num_hardest(216) == 216
    fraction, _ = EKDLoss(top_k=0.1, temperature=0.05).train()(student, teacher, labels)
    count, _ = EKDLoss(top_k=22, temperature=0.05).train()(student, teacher, labels)
    fewer, _ = EKDLoss(top_k=21, temperature=0.05).train()(student, teacher, labels)
    assert torch.equal(fraction, count) and fewer.item() != count.item()
    sim_s, pos = np_pairs(student.numpy(), labels.numpy())
    sim_t, _ = np_pairs(teacher.numpy(), labels.numpy())
    expected = np_ekd(student.numpy(), teacher.numpy(), labels.numpy(), np_thresholds(sim_s[~pos]),
                      np_thresholds(sim_t[~pos]), temperature=0.05, top_k=22)
    assert fraction.item() == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------- ekd cross-batch memory

def test_ekd_memory_zero_is_plain_ekd_exactly():
    options = dict(top_k=30, momentum=0.3, temperature=0.05)
    plain, zero, filling = EKDLoss(**options).train(), EKDLoss(memory=0, **options).train(), \
        EKDLoss(memory=64, **options).train()
    assert "memory_student" not in zero.state_dict() and zero.state_dict().keys() == plain.state_dict().keys()
    for step in range(3):
        student, teacher, labels = clustered_batch(4, 4, 8, 10, seed=70 + step)
        grads, losses = [], []
        for loss_fn in (plain, zero, filling):
            s = student.clone().requires_grad_(True)
            loss, metrics = loss_fn(s, teacher, labels)
            loss.backward()
            losses.append(loss)
            grads.append(s.grad)
        assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])
        assert torch.equal(plain.student_thresholds, zero.student_thresholds)
        # a memory starts empty: its first step is plain EKD too, and then it differs
        assert torch.equal(losses[0], losses[2]) == (step == 0)
        assert metrics["ekd_memory"].item() == min(64, 16 * step)


def _unit(x: torch.Tensor) -> np.ndarray:
    return np_unit(x.numpy())


def test_ekd_memory_negatives_join_the_thresholds_and_the_hard_negatives():
    """After two batches into a memory of 24 (FIFO: the last 24 of 32 entries), a third batch's
    thresholds are the direct quantiles of its own negatives plus its pairs with the memory's
    entries of other identities, and the loss is EKD's on that union."""
    batches = [clustered_batch(4, 4, 8, 10, seed=80 + step) for step in range(3)]
    batches[1][2].add_(2)  # identities 2..5: 2 and 3 recur in the third batch (labels 0..3), 4 and 5 do not
    loss_fn = EKDLoss(memory=24, momentum=1.0, top_k=150, temperature=0.05).train()  # momentum 1: batch thresholds
    for batch in batches[:2]:
        loss_fn(*batch)
    assert loss_fn.memory_entries == 24
    queued = lambda i: torch.cat([batches[0][i], batches[1][i]])[-24:]  # noqa: E731
    np.testing.assert_allclose(loss_fn.memory_student.numpy(), _unit(queued(0)), atol=1e-6)
    np.testing.assert_allclose(loss_fn.memory_teacher.numpy(), _unit(queued(1)), atol=1e-6)
    assert torch.equal(loss_fn.memory_labels, queued(2))

    student, teacher, labels = batches[2]
    s = student.clone().requires_grad_(True)
    loss, metrics = loss_fn(s, teacher, labels)
    loss.backward()
    other = labels.numpy()[:, None] != queued(2).numpy()[None, :]
    cross_s = (_unit(student) @ _unit(queued(0)).T)[other]
    cross_t = (_unit(teacher) @ _unit(queued(1)).T)[other]
    sim_s, pos = np_pairs(student.numpy(), labels.numpy())
    sim_t, _ = np_pairs(teacher.numpy(), labels.numpy())
    # the memory: batch 0's last 8 (labels 2, 3) and batch 1 (2..5): 4 x 8 same-identity pairs each for 2 and 3
    assert other.sum() == 16 * 24 - 2 * 4 * 8 and (~pos).sum() == 96
    thr_s = np_thresholds(np.concatenate([sim_s[~pos], cross_s]))
    thr_t = np_thresholds(np.concatenate([sim_t[~pos], cross_t]))
    np.testing.assert_allclose(loss_fn.student_thresholds.numpy(), thr_s, atol=1e-6)
    np.testing.assert_allclose(loss_fn.teacher_thresholds.numpy(), thr_t, atol=1e-6)
    assert not np.allclose(thr_s, np_thresholds(sim_s[~pos]))  # the memory changed them
    expected = np_ekd(student.numpy(), teacher.numpy(), labels.numpy(), thr_s, thr_t, temperature=0.05,
                      top_k=150, extra_negatives=(cross_s, cross_t))
    assert loss.item() == pytest.approx(expected, rel=1e-4) and expected > 1e-4
    assert metrics["ekd_memory"].item() == 24

    def numeric(x: np.ndarray) -> float:  # the same loss of a moved student batch (memory and thresholds fixed)
        cross = (np_unit(x) @ _unit(queued(0)).T)[other]
        return np_ekd(x, teacher.numpy(), labels.numpy(), thr_s, thr_t, temperature=0.05, top_k=150,
                      extra_negatives=(cross, cross_t))

    base, step, gradient = student.numpy().astype(np.float64), 1e-6, np.zeros(tuple(student.shape))
    for index in np.ndindex(*base.shape):
        up, down = base.copy(), base.copy()
        up[index] += step
        down[index] -= step
        gradient[index] = (numeric(up) - numeric(down)) / (2 * step)
    np.testing.assert_allclose(s.grad.numpy(), gradient, atol=2e-3 * np.abs(gradient).max())
    assert not loss_fn.memory_student.requires_grad  # the memory's side carries no gradient
    # the third batch is now queued (FIFO), and eval mode leaves the memory as it is
    assert torch.equal(loss_fn.memory_labels, torch.cat([queued(2), labels])[-24:])
    before = loss_fn.state_dict()
    loss_fn.eval()(*batches[0])
    assert all(torch.equal(v, loss_fn.state_dict()[k]) for k, v in before.items())


def test_ekd_memory_is_checkpointed_and_resumes_exactly():
    options = dict(memory=40, top_k=0.2, momentum=0.2)
    batches = [clustered_batch(4, 4, 8, 10, seed=90 + step) for step in range(6)]
    original = EKDLoss(**options).train()
    for batch in batches[:3]:
        original(*batch)
    state = original.state_dict()
    assert state["memory_student"].shape == (40, 8) and state["memory_teacher"].shape == (40, 10)
    restored = EKDLoss(**options).train()  # a fresh loss, as a resumed run builds it: sized by the state
    restored.load_state_dict(state)
    forgetful = EKDLoss(**options).train()  # the same thresholds, an empty memory
    forgetful.load_state_dict({k: v for k, v in state.items() if not k.startswith("memory_")}, strict=False)
    for batch in batches[3:]:
        loss_a, metrics_a = original(*batch)
        loss_b, metrics_b = restored(*batch)
        loss_c, _ = forgetful(*batch)
        assert torch.equal(loss_a, loss_b) and all(torch.equal(metrics_a[k], metrics_b[k]) for k in metrics_a)
        assert not torch.equal(loss_a, loss_c)
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in original.state_dict().items())
    combined = build_distill_loss("ekd+feature", memory=40, feature_weight=1.0).train()
    combined(*clustered_batch(4, 4, 8, 8))
    assert combined.state_dict()["ekd.memory_labels"].shape == (16,)


def test_ekd_feature_is_ekd_plus_weighted_feature_exactly():
    options = dict(top_k=0.2, momentum=0.3, temperature=0.05)
    combined = build_distill_loss("ekd+feature", feature_weight=3.0, metric="cosine", **options).train()
    ekd, feature = EKDLoss(**options).train(), FeatureDistill("cosine")
    for step in range(3):
        student, teacher, labels = clustered_batch(4, 4, 8, 8, seed=80 + step)
        s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
        loss, metrics = combined(s1, teacher, labels)
        ekd_loss, ekd_metrics = ekd(s2, teacher, labels)
        feature_loss, _ = feature(s2, teacher, labels)
        expected = ekd_loss + 3.0 * feature_loss
        assert torch.equal(loss, expected)
        assert torch.equal(metrics["feature"], 3.0 * feature_loss.detach()) and feature_loss.item() > 1e-3
        assert all(torch.equal(metrics[k], v) for k, v in ekd_metrics.items())
        assert (metrics["ekd_pos"] + metrics["ekd_neg"] + metrics["feature"]).item() == pytest.approx(loss.item())
        loss.backward()
        expected.backward()
        torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-6, atol=1e-9)
    assert torch.equal(combined.ekd.student_thresholds, ekd.student_thresholds)
    assert int(combined.state_dict()["ekd.threshold_updates"]) == 3


def test_ekd_feature_rejects_bad_settings_and_different_sizes():
    with pytest.raises(ConfigError, match=r"ekd\+feature\.feature_weight: must be >= 0"):
        EKDFeatureLoss(feature_weight=-1.0)
    with pytest.raises(ConfigError, match=r"feature\.metric"):
        EKDFeatureLoss(metric="l1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"ekd\.top_k"):
        build_distill_loss("ekd+feature", top_k=1.0)
    student, teacher, labels = clustered_batch(3, 3, 6, 10)
    with pytest.raises(ConfigError, match="feature: student embedding size 6 differs"):
        EKDFeatureLoss().train()(student, teacher, labels)


# ----------------------------------------------------------------------------- registry

def test_build_distill_loss_by_name():
    assert DISTILL_METHODS == ("none", "feature", "rkd", "similarity", "ekd", "ekd+feature")
    assert build_distill_loss("none") is None
    feature = build_distill_loss("feature", metric="cosine")
    assert isinstance(feature, FeatureDistill) and feature.metric == "cosine"
    rkd = build_distill_loss("rkd", angle_weight=0.5)
    assert isinstance(rkd, RKDDistill) and rkd.angle_weight == 0.5 and rkd.distance_weight == 1.0
    assert isinstance(build_distill_loss("similarity"), SimilarityPreserving)
    ekd = build_distill_loss("ekd", top_k=10, levels=[1e-2, 1e-1])
    assert isinstance(ekd, EKDLoss) and ekd.top_k == 10 and ekd.levels == (1e-1, 1e-2)
    fraction = build_distill_loss("ekd", top_k=0.25, threshold_average="paper")
    assert fraction.top_k == 0.25 and fraction.threshold_average == "paper"
    both = build_distill_loss("ekd+feature", feature_weight=2.0, metric="cosine", top_k=7)
    assert isinstance(both, EKDFeatureLoss) and both.feature_weight == 2.0 and both.feature.metric == "cosine"
    assert both.ekd.top_k == 7 and both.ekd.threshold_average == "bias_corrected"
    assert distill_options("ekd+feature") == distill_options("ekd") + ("feature_weight", "metric")
    assert "threshold_average" in distill_options("ekd")


def test_build_distill_loss_errors_list_the_choices():
    with pytest.raises(ConfigError, match="distill.method: unknown method 'kd'.*none, feature, rkd, similarity, "
                                          r"ekd, ekd\+feature"):
        build_distill_loss("kd")
    with pytest.raises(ConfigError, match="distill.tau: unknown option for method 'ekd'.*temperature"):
        build_distill_loss("ekd", tau=0.1)
    with pytest.raises(ConfigError, match="distill.metric: unknown option for method 'none'"):
        build_distill_loss("none", metric="l2")
    with pytest.raises(ConfigError, match="rkd.angle_weight"):
        build_distill_loss("rkd", angle_weight=-1)
    with pytest.raises(ConfigError, match="distill.top_k: unknown option for method 'feature'"):
        build_distill_loss("feature", top_k=10)


@pytest.mark.parametrize("method", DISTILL_METHODS)
def test_every_method_is_accepted_by_the_config_and_the_cli(method):
    from facekd.cli import build_parser
    from facekd.config import validated
    from facekd.recognition.config import Distill

    assert validated(Distill, {"method": method}).method == method
    args = build_parser().parse_args(["recognition", "distill", "c.yaml", "--out", "o", "--method", method])
    assert args.method == method


# ----------------------------------------------------------------------------- ekd across processes

def _load_job():
    spec = importlib.util.spec_from_file_location("ekd_ddp_job", JOBS / "ekd_ddp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_ekd_in_two_processes_equals_one_process_on_the_global_batch_with_and_without_memory(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(JOBS / "ekd_ddp.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    job = _load_job()
    for name, options in job.RUNS.items():
        _check_against_one_process(job, ranks, name, EKDLoss(**options).train())


def _check_against_one_process(job, ranks: list[dict], name: str, reference: EKDLoss) -> None:
    for step in range(job.STEPS):
        student, teacher, labels = job.global_batch(step)
        full = student.clone().requires_grad_(True)
        loss, metrics = reference(full, teacher, labels)
        loss.backward()
        half = len(labels) // 2
        for r, seen in enumerate(ranks):
            assert seen["rank"] == r and seen["world_size"] == 2
            got = seen["runs"][name][step]
            assert got["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-9)
            assert got["metrics"] == pytest.approx({k: v.item() for k, v in metrics.items()}, rel=1e-5, abs=1e-7)
            state = reference.state_dict()
            assert got["state"].keys() == state.keys()
            for key, value in state.items():  # thresholds, their update count, the memory (every rank's the same)
                np.testing.assert_allclose(np.array(got["state"][key]), value.numpy(), atol=1e-6, err_msg=key)
            # Every rank computes the same loss on the gathered batch; all_gather_with_grad sums the
            # gradients of every rank's copy of rank r's rows back to rank r. So rank r's raw gradient
            # is world_size (2) x the one-process gradient of its rows (DDP's averaging then makes
            # the parameter gradients equal to the one-process ones).
            expected = 2.0 * full.grad[r * half:(r + 1) * half]
            np.testing.assert_allclose(np.array(got["grad"]), expected.numpy(), rtol=1e-4, atol=1e-7)
        assert loss.item() > 0
    assert reference.memory_entries == reference.memory  # 0, or full and cycled by the third step
