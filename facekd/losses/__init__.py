"""Training losses: quality regression (quality.py); margin softmax and distillation live beside it."""

from __future__ import annotations

from facekd.losses.quality import QualityLoss, hard_rank, pearson, plcc_loss, soft_rank, srcc_loss

__all__ = ["QualityLoss", "hard_rank", "pearson", "plcc_loss", "soft_rank", "srcc_loss"]
