from __future__ import annotations

import pytest
import torch
from scipy import stats
from torch import nn

from facekd.errors import ConfigError, FacekdError
from facekd.losses import QualityLoss, hard_rank, pearson, plcc_loss, soft_rank, srcc_loss


def _target(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 4 + 1


def test_pearson_matches_scipy_and_weights_act_as_repeats():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, generator=g, dtype=torch.float64), torch.randn(30, generator=g, dtype=torch.float64)
    assert pearson(x, y).item() == pytest.approx(stats.pearsonr(x.numpy(), y.numpy())[0], abs=1e-6)
    # integer weights are the same as repeating samples
    counts = torch.randint(1, 4, (30,), generator=g)
    repeated = stats.pearsonr(x.repeat_interleave(counts).numpy(), y.repeat_interleave(counts).numpy())[0]
    assert pearson(x, y, counts.double()).item() == pytest.approx(repeated, abs=1e-6)


def test_plcc_loss_range():
    target = _target()
    assert plcc_loss(3 * target + 7, target).item() == pytest.approx(0.0, abs=1e-5)
    assert plcc_loss(-2 * target, target).item() == pytest.approx(2.0, abs=1e-5)
    assert plcc_loss(target.flip(0) * 0 + 1, target).item() == pytest.approx(1.0, abs=1e-5)  # constant


def test_plcc_loss_reference_form_matches_z_score_formula():
    target = _target()
    pred = target + torch.randn(16, generator=torch.Generator().manual_seed(2))
    # the reference code's loss written out on z-scored batches
    z_pred = (pred - pred.mean()) / pred.std(unbiased=False)
    z_y = (target - target.mean()) / target.std(unbiased=False)
    rho = (z_pred * z_y).mean()
    expected = (nn.functional.mse_loss(z_pred, z_y) / 4 + nn.functional.mse_loss(rho * z_pred, z_y) / 4) / 2
    assert plcc_loss(pred, target, form="reference").item() == pytest.approx(expected.item(), abs=1e-5)
    assert plcc_loss(-target, target, form="reference").item() == pytest.approx(0.5, abs=1e-5)


@pytest.mark.parametrize("loss_fn", [plcc_loss, srcc_loss])
def test_correlation_losses_have_finite_gradients(loss_fn):
    target = _target()
    for start in (torch.randn(16), torch.full((16,), 0.3)):  # ordinary and constant predictions
        pred = start.clone().requires_grad_(True)
        loss = loss_fn(pred, target)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    # descent increases the correlation
    pred = torch.randn(16, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    first = loss_fn(pred, target)
    first.backward()
    with torch.no_grad():
        pred -= 0.05 * pred.grad
    assert loss_fn(pred, target).item() < first.item()


@pytest.mark.parametrize("loss_fn", [plcc_loss, srcc_loss])
def test_tiny_batches_give_zero_with_gradient(loss_fn):
    pred = torch.tensor([0.7], requires_grad=True)
    loss = loss_fn(pred, torch.tensor([3.0]))
    loss.backward()
    assert loss.item() == 0.0 and pred.grad.tolist() == [0.0]


def test_soft_rank_approaches_hard_rank():
    x = torch.tensor([0.3, -1.0, 2.0, 0.3, 0.9])
    expected = torch.tensor(stats.rankdata(x.numpy()), dtype=torch.float32)  # ties averaged
    assert torch.equal(hard_rank(x), expected)
    errors = [(soft_rank(x, t) - expected).abs().max().item() for t in (1.0, 0.1, 0.001)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-4


def test_srcc_loss_decreases_as_predictions_get_more_monotone():
    target = torch.arange(12, dtype=torch.float32)
    shuffled = target[torch.randperm(12, generator=torch.Generator().manual_seed(0))]
    losses = [srcc_loss((1 - a) * shuffled + a * target, target, temperature=0.05).item()
              for a in (0.0, 0.5, 0.9, 1.0)]
    assert losses == sorted(losses, reverse=True)
    assert losses[-1] < 0.01
    hard = 1 - stats.spearmanr(shuffled.numpy(), target.numpy())[0]
    assert losses[0] == pytest.approx(hard, abs=0.01)  # well-separated values: soft == hard


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), "0.1"])
def test_bad_temperature(temperature):
    with pytest.raises(ConfigError, match="temperature"):
        soft_rank(torch.zeros(3), temperature)


def test_weighted_mse_and_l1_equal_hand_computation():
    pred = torch.tensor([1.0, 2.0, 4.0])
    target = torch.tensor([1.5, 2.0, 1.0])
    weight = torch.tensor([2.0, 1.0, 0.5])
    loss, metrics = QualityLoss({"mse": 1.0, "l1": 0.5}).terms(pred, target, weight)
    mse = (2.0 * 0.25 + 1.0 * 0.0 + 0.5 * 9.0) / 3.5
    l1 = (2.0 * 0.5 + 0.0 + 0.5 * 3.0) / 3.5
    assert metrics["mse"].item() == pytest.approx(mse)
    assert metrics["l1"].item() == pytest.approx(l1)
    assert loss.item() == pytest.approx(mse + 0.5 * l1)
    unweighted, _ = QualityLoss({"mse": 1.0}).terms(pred, target)
    assert unweighted.item() == pytest.approx((0.25 + 0.0 + 9.0) / 3)
    zero, _ = QualityLoss({"mse": 1.0}).terms(pred, target, torch.zeros(3))
    assert zero.item() == 0.0


def test_zero_weight_sample_is_ignored_by_every_term():
    target = _target(8)
    pred = target * 2 + 1
    outlier_pred, outlier_target = pred.clone(), target.clone()
    outlier_pred[0] = -50.0
    weight = torch.ones(8)
    weight[0] = 0.0
    loss_fn = QualityLoss({"mse": 1.0, "plcc": 1.0, "srcc": 1.0})
    clean, _ = loss_fn.terms(pred[1:], target[1:])
    masked, _ = loss_fn.terms(outlier_pred, outlier_target, weight)
    assert masked.item() == pytest.approx(clean.item(), abs=1e-4)


class _TinyQualityModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 1)

    def forward(self, x):
        return self.fc(x.flatten(1))  # (B, 1): the loss accepts a column


def test_quality_loss_trains_a_tiny_model_on_a_dict_batch():
    torch.manual_seed(0)
    images = torch.randn(32, 3, 4, 4)
    mos = images[:, 0].mean(dim=(1, 2)) * 2 + 3  # learnable from the pixels
    batch = {"image": images, "mos": mos, "weight": torch.rand(32) + 0.5}
    model = _TinyQualityModel()
    loss_fn = QualityLoss({"mse": 1.0, "plcc": 1.0, "srcc": 0.5})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    first, metrics = loss_fn(model, batch)
    assert set(metrics) == {"mse", "plcc", "srcc"}
    assert all(not value.requires_grad for value in metrics.values())
    expected = metrics["mse"] + metrics["plcc"] + 0.5 * metrics["srcc"]
    assert first.item() == pytest.approx(expected.item(), rel=1e-5)
    for _ in range(60):
        optimizer.zero_grad()
        loss, _ = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first.item()


def test_default_is_mse_plus_plcc():
    loss_fn = QualityLoss()
    _, metrics = loss_fn.terms(_target() + 0.1, _target())
    assert set(metrics) == {"mse", "plcc"}


@pytest.mark.parametrize("kwargs, match", [
    ({"weights": {"mse": 1.0, "huber": 1.0}}, "unknown term 'huber'"),
    ({"weights": {"mse": 0.0, "plcc": 0}}, "at least one"),
    ({"weights": {}}, "at least one"),
    ({"weights": {"mse": -1.0}}, "'mse' must be a finite number >= 0"),
    ({"weights": {"mse": "1"}}, "'mse' must be a finite number"),
    ({"weights": ["mse"]}, "mapping"),
    ({"plcc_form": "fancy"}, "plcc_form"),
    ({"srcc_temperature": 0.0}, "temperature"),
])
def test_bad_configuration(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QualityLoss(**kwargs)


def test_bad_batches():
    loss_fn = QualityLoss()
    with pytest.raises(FacekdError, match="'image' and 'mos'"):
        loss_fn(_TinyQualityModel(), {"image": torch.randn(2, 3, 4, 4)})
    with pytest.raises(FacekdError, match="one score per image"):
        loss_fn.terms(torch.randn(4, 2), torch.randn(4))


def test_weighted_srcc_equals_srcc_of_repeated_samples():
    g = torch.Generator().manual_seed(7)
    pred, target = torch.randn(10, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    counts = torch.randint(1, 4, (10,), generator=g)
    weighted = srcc_loss(pred, target, temperature=1e-4, weight=counts.double())
    repeated = 1 - stats.spearmanr(pred.repeat_interleave(counts).numpy(), target.repeat_interleave(counts).numpy())[0]
    assert weighted.item() == pytest.approx(repeated, abs=1e-5)
    assert torch.equal(hard_rank(torch.tensor([2.0, 1.0, 2.0]), torch.tensor([1.0, 3.0, 0.0])),
                       torch.tensor([4.0, 2.0, 4.0]))
