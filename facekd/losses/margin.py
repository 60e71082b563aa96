"""Margin softmax heads for face recognition training: ArcFace and CosFace.

Both hold one learnable centre per identity, compare L2-normalised embeddings with
L2-normalised centres by cosine, add the margin to the target class only, scale by `s` and
take the cross-entropy:

- ArcFace (Deng et al., CVPR 2019): target logit s·cos(θ + m). Where θ + m would pass π
  (cos θ < cos(π − m)) the curve is no longer monotonic; as insightface does, the target
  logit there is s·(cos θ − m·sin m) instead.
- CosFace (Wang et al., CVPR 2018): target logit s·(cos θ − m).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from facekd.errors import ConfigError

MARGIN_KINDS = ("arcface", "cosface")
DEFAULTS = {"arcface": (64.0, 0.5), "cosface": (64.0, 0.35)}


class MarginSoftmax(nn.Module):
    """Class centres (num_classes, D) + ArcFace or CosFace margin + cross-entropy.

    `forward(embeddings, labels) -> (loss, {"accuracy": training top-1 on the plain cosines})`.
    The centres are the head's only parameters (`trainable_parameters()`)."""

    def __init__(self, embedding_size: int, num_classes: int, kind: Literal["arcface", "cosface"] = "arcface",
                 scale: float | None = None, margin: float | None = None):
        super().__init__()
        if kind not in MARGIN_KINDS:
            raise ConfigError(f"head.kind: expected one of {', '.join(MARGIN_KINDS)}, got {kind!r}")
        default_scale, default_margin = DEFAULTS[kind]
        self.kind = kind
        self.scale = float(default_scale if scale is None else scale)
        self.margin = float(default_margin if margin is None else margin)
        if not self.scale > 0:
            raise ConfigError(f"head.scale: must be > 0, got {self.scale}")
        upper = math.pi / 2 if kind == "arcface" else 1.0
        if not 0 <= self.margin < upper:
            raise ConfigError(f"head.margin: must be in [0, {upper:.4g}) for {kind}, got {self.margin}")
        if num_classes < 2:
            raise ConfigError(f"a margin softmax needs at least 2 identities, got {num_classes}")
        self.num_classes = int(num_classes)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def trainable_parameters(self):
        return [self.weight]

    def cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) cosine of each embedding with each centre."""
        return F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def logits(self, cosines: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits with the margin applied to each row's target class."""
        target = cosines.gather(1, labels.view(-1, 1)).clamp(-1.0, 1.0)
        if self.kind == "arcface":
            m = self.margin
            sin = torch.sqrt((1.0 - target * target).clamp_min(0.0))
            with_margin = target * math.cos(m) - sin * math.sin(m)
            with_margin = torch.where(target > math.cos(math.pi - m), with_margin, target - m * math.sin(m))
        else:
            with_margin = target - self.margin
        return self.scale * cosines.scatter(1, labels.view(-1, 1), with_margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor):
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes}), got [{int(labels.min())}, "
                             f"{int(labels.max())}]")
        cosines = self.cosines(embeddings)
        loss = F.cross_entropy(self.logits(cosines, labels), labels)
        accuracy = (cosines.argmax(dim=1) == labels).float().mean().detach()
        return loss, {"accuracy": accuracy}

    def extra_repr(self) -> str:
        return f"kind={self.kind}, classes={self.num_classes}, s={self.scale:g}, m={self.margin:g}"
