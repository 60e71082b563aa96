"""Heads that turn a trunk's feature map into an embedding or a quality score.

- `EmbeddingHead` (IResNet): BN2d → dropout → flatten → FC → BN1d; the FC size depends on
  the feature map size, so the head is built for one input size.
- `GDCHead` (MobileFaceNet): global depthwise conv over the whole map (+BN) → FC → BN1d.
- `QualityHead` (any trunk): global average pooling → optional LayerNorm → MLP → one score.

Embeddings are returned unnormalised; L2 normalisation happens at inference.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class EmbeddingHead(nn.Module):
    """insightface embedding head: BN2d → dropout → flatten → Linear(C·h·w → D) → BN1d.

    The last BN keeps its scale fixed at 1 (not trained), as in arcface_torch."""

    def __init__(self, in_channels: int, feature_size: int, embedding_size: int = 512, dropout: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_channels * feature_size * feature_size, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)
        self.embedding_size = embedding_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.bn(x))
        return self.features(self.fc(torch.flatten(x, 1)))


class GDCHead(nn.Module):
    """MobileFaceNet head: k×k global depthwise conv + BN (linear) → flatten → dropout →
    Linear(C → D, no bias) → BN1d."""

    def __init__(self, in_channels: int, feature_size: int, embedding_size: int = 512, dropout: float = 0.0):
        super().__init__()
        self.gdc = nn.Conv2d(in_channels, in_channels, feature_size, groups=in_channels, bias=False)
        self.bn = nn.BatchNorm2d(in_channels)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_channels, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        self.embedding_size = embedding_size
        nn.init.kaiming_normal_(self.gdc.weight, mode="fan_out", nonlinearity="relu")
        nn.init.kaiming_normal_(self.fc.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.bn(self.gdc(x)), 1)
        return self.features(self.fc(self.dropout(x)))


class QualityHead(nn.Module):
    """Global average pooling → (LayerNorm) → [Linear → GELU → dropout]* → Linear → score.

    `hidden=(128,)`, `activation="none"`, no norm, no dropout on EdgeNeXt-XXS's 168 channels is
    the 168→128→1 head of the VQualA winner (Efficient-FIQA: two Linear layers in a row)."""

    def __init__(self, in_channels: int, hidden: Sequence[int] = (128,), dropout: float = 0.0,
                 norm: bool = False, activation: str = "gelu"):
        super().__init__()
        self.norm: nn.Module = nn.LayerNorm(in_channels, eps=1e-6) if norm else nn.Identity()
        layers: list[nn.Module] = []
        width = in_channels
        for size in hidden:
            layers += [nn.Linear(width, int(size)), nn.GELU() if activation == "gelu" else nn.Identity(),
                       nn.Dropout(p=dropout)]
            width = int(size)
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        return self.mlp(self.norm(pooled)).squeeze(-1)
