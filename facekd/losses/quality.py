"""Losses for quality regression: MSE/L1 to the MOS, and batch-correlation terms (PLCC and a
soft SRCC) that reward getting the order and linear shape right whatever the scale.

Per-sample weights (confidence-weighted pseudo-labels) enter every term: a weighted mean for
MSE/L1 and a weighted Pearson correlation for PLCC/SRCC. Weights must be >= 0 (not checked at
each step, which would cost a device sync); all-zero weights give a zero loss.
Everything is computed in float32 whatever the autocast precision of the model.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional

import torch
from torch import nn

from facekd.checks import real_number
from facekd.errors import ConfigError, FacekdError

TERMS = ("mse", "l1", "plcc", "srcc")
PLCC_FORMS = ("1-r", "reference")
PEARSON_EPS = 1e-8

PlccForm = Literal["1-r", "reference"]


def _normalised_weight(weight: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Weights summing to 1 (uniform when None); all-zero weights stay zero."""
    if weight is None:
        return torch.full_like(like, 1.0 / like.numel())
    weight = weight.to(device=like.device, dtype=like.dtype).reshape(like.shape)
    return weight / weight.sum().clamp_min(torch.finfo(like.dtype).tiny)


def pearson(x: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor] = None,
            eps: float = PEARSON_EPS) -> torch.Tensor:
    """(Weighted) Pearson correlation of two 1-D tensors, differentiable.

    `eps` is added to both variances, so a constant input gives 0 with finite gradients
    (it is negligible for scores whose batch variance is well above 1e-8).
    """
    w = _normalised_weight(weight, x)
    dx = x - (w * x).sum()
    dy = y - (w * y).sum()
    cov = (w * dx * dy).sum()
    var_x = (w * dx * dx).sum()
    var_y = (w * dy * dy).sum()
    return cov / torch.sqrt((var_x + eps) * (var_y + eps))


def _zero_like(pred: torch.Tensor) -> torch.Tensor:
    # keeps the graph, so every parameter still gets a (zero) gradient (DDP needs that)
    return pred.sum() * 0.0


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.dim() == 2 and pred.shape[1] == 1:
        pred = pred[:, 0]
    if pred.dim() != 1 or pred.shape != target.shape:
        raise FacekdError(f"quality loss: a quality model must give one score per image; predictions have "
                          f"shape {tuple(pred.shape)}, labels {tuple(target.shape)}")
    return pred.float(), target.to(device=pred.device, dtype=torch.float32)


def plcc_loss(pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
              form: PlccForm = "1-r") -> torch.Tensor:
    """Batch PLCC loss from the Pearson correlation r of predictions and labels.

    form '1-r': 1 - r, in [0, 2] (0 perfectly correlated, 1 uncorrelated, 2 anti-correlated).
    form 'reference': the Efficient-FIQA/LIQE code's loss on z-scored batches,
    (mse(z_pred, z_y) / 4 + mse(r * z_pred, z_y) / 4) / 2, which equals
    (1 - r) / 4 + (1 - r^2) / 8 and lies in [0, 0.5] (about (1 - r) / 2 near r = 1).
    A batch of fewer than 2 samples gives 0.
    """
    if form not in PLCC_FORMS:
        raise ConfigError(f"plcc_loss: form must be one of {PLCC_FORMS}, got {form!r}")
    pred, target = _check_pair(pred, target)
    if pred.numel() < 2:
        return _zero_like(pred)
    r = pearson(pred, target, weight)
    if form == "1-r":
        return 1.0 - r
    return (1.0 - r) / 4.0 + (1.0 - r * r) / 8.0


def _check_temperature(temperature: float) -> float:
    return real_number(temperature, "soft rank: temperature", positive=True)


def _rank_weight(weight: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if weight is None:
        return torch.ones_like(x)
    return weight.to(device=x.device, dtype=x.dtype).reshape(x.shape)


def soft_rank(x: torch.Tensor, temperature: float = 0.1, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Differentiable 1-based ranks of a 1-D tensor: rank_i = 0.5 + sum_j w_j sigmoid((x_i - x_j) / t).

    As t -> 0 this tends to `hard_rank(x, weight)` (ties get the average rank). With weights
    (default 1) a sample of weight k counts as k copies, and one of weight 0 does not move the
    others' ranks. `temperature` is in the units of `x`. Memory is O(n^2) in the batch size.
    """
    temperature = _check_temperature(temperature)
    diff = (x.unsqueeze(1) - x.unsqueeze(0)) / temperature
    return 0.5 + torch.sigmoid(diff) @ _rank_weight(weight, x)


def hard_rank(x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties averaged (as scipy's `rankdata`); weights as `soft_rank`.

    No gradient.
    """
    x = x.detach()
    if not x.is_floating_point():
        x = x.float()
    step = (x.unsqueeze(1) > x.unsqueeze(0)).to(x.dtype) + 0.5 * (x.unsqueeze(1) == x.unsqueeze(0)).to(x.dtype)
    return 0.5 + step @ _rank_weight(None if weight is None else weight.detach(), x)


def srcc_loss(pred: torch.Tensor, target: torch.Tensor, temperature: float = 0.1,
              weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft Spearman loss: 1 - Pearson(soft_rank(pred), hard_rank(target)), in [0, 2].

    With `weight`, ranks and correlation are both weighted, so a sample of integer weight k
    counts as k copies. A batch of fewer than 2 samples gives 0.
    """
    temperature = _check_temperature(temperature)
    pred, target = _check_pair(pred, target)
    if pred.numel() < 2:
        return _zero_like(pred)
    if weight is not None:
        weight = weight.to(device=pred.device, dtype=pred.dtype).reshape(pred.shape)
    return 1.0 - pearson(soft_rank(pred, temperature, weight), hard_rank(target, weight), weight)


def _weighted_mean(values: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    if weight is None:
        return values.mean()
    return (_normalised_weight(weight, values) * values).sum()


class QualityLoss(nn.Module):
    """Weighted sum of quality terms, following the trainer's `loss_fn(model, batch)` convention.

    `weights` maps term names (`mse`, `l1`, `plcc`, `srcc`) to non-negative weights; terms with
    weight 0 are not computed. The default {"mse": 1, "plcc": 1} is the paper's loss.
    `plcc_form` picks the PLCC term's form (see `plcc_loss`); `srcc_temperature` the soft-rank
    temperature in prediction units.
    The batch is a dict: "image" (B, 3, H, W) normalised, "mos" (B,) and optionally "weight" (B,).
    Returns (loss, metrics), metrics holding each computed term's detached value.
    """

    def __init__(self, weights: Optional[Mapping[str, float]] = None, *, plcc_form: PlccForm = "1-r",
                 srcc_temperature: float = 0.1):
        super().__init__()
        self.weights = self._check_weights({"mse": 1.0, "plcc": 1.0} if weights is None else weights)
        if plcc_form not in PLCC_FORMS:
            raise ConfigError(f"quality loss: plcc_form must be one of {PLCC_FORMS}, got {plcc_form!r}")
        self.plcc_form = plcc_form
        self.srcc_temperature = _check_temperature(srcc_temperature)

    @staticmethod
    def _check_weights(weights: Mapping[str, Any]) -> dict[str, float]:
        if not isinstance(weights, Mapping):
            raise ConfigError(f"quality loss: weights must be a mapping of term name to weight, "
                              f"got {type(weights).__name__}")
        checked = {}
        for name, value in weights.items():
            if name not in TERMS:
                raise ConfigError(f"quality loss: unknown term {name!r} (known: {', '.join(TERMS)})")
            if real_number(value, f"quality loss: weight of {name!r}", minimum=0) > 0:
                checked[name] = float(value)
        if not checked:
            raise ConfigError(f"quality loss: at least one term weight must be > 0, got {dict(weights)!r}")
        return checked

    def extra_repr(self) -> str:
        return f"weights={self.weights}, plcc_form={self.plcc_form!r}, srcc_temperature={self.srcc_temperature}"

    def terms(self, pred: torch.Tensor, target: torch.Tensor,
              weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted loss of predictions against labels, and each term's detached value."""
        pred, target = _check_pair(pred, target)
        if weight is not None:
            weight = weight.to(device=pred.device, dtype=torch.float32).reshape(pred.shape)
        values: dict[str, torch.Tensor] = {}
        for name in self.weights:
            if name == "mse":
                values[name] = _weighted_mean((pred - target) ** 2, weight)
            elif name == "l1":
                values[name] = _weighted_mean((pred - target).abs(), weight)
            elif name == "plcc":
                values[name] = plcc_loss(pred, target, weight, form=self.plcc_form)
            else:
                values[name] = srcc_loss(pred, target, self.srcc_temperature, weight)
        loss = sum(self.weights[name] * value for name, value in values.items())
        return loss, {name: value.detach() for name, value in values.items()}

    def forward(self, model: nn.Module, batch: Mapping[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not isinstance(batch, Mapping) or "image" not in batch or "mos" not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise FacekdError(f"quality loss: a batch must be a dict with 'image' and 'mos' "
                              f"(and optionally 'weight'), got {keys}")
        pred = model(batch["image"])
        return self.terms(pred, batch["mos"], batch.get("weight"))
