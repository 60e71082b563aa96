"""Training losses: quality regression (quality.py), margin softmax heads (margin.py) and
recognition distillation (distill.py)."""

from __future__ import annotations

from facekd.losses.distill import (DISTILL_METHODS, EKDLoss, FeatureDistill, RKDDistill, SimilarityPreserving,
                                   build_distill_loss)
from facekd.losses.margin import MARGIN_KINDS, MarginSoftmax
from facekd.losses.quality import QualityLoss, hard_rank, pearson, plcc_loss, soft_rank, srcc_loss

__all__ = ["DISTILL_METHODS", "EKDLoss", "FeatureDistill", "MARGIN_KINDS", "MarginSoftmax", "QualityLoss",
           "RKDDistill", "SimilarityPreserving", "build_distill_loss", "hard_rank", "pearson", "plcc_loss",
           "soft_rank", "srcc_loss"]
