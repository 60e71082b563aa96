"""Configuration of recognition training and distillation (`facekd recognition train|distill`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from facekd.config import ExistingPath
from facekd.engine import TrainConfig
from facekd.quality.config import ModelChoice


@dataclass
class RecognitionData:
    """`train`: an identity folder (root/<identity>/<images>) or an insightface `.rec` (or a
    folder holding `train.rec`). `eval`: verification sets, each a `pairs.txt`, a `.bin` or an
    identity folder (every pair of its images); the first one is also used during training."""

    train: ExistingPath
    eval: list[ExistingPath] = field(default_factory=list)


@dataclass
class MarginHead:
    """Margin softmax: ArcFace (s 64, m 0.5) or CosFace (s 64, m 0.35); None takes those defaults."""

    kind: Literal["arcface", "cosface"] = "arcface"
    scale: Optional[float] = None
    margin: Optional[float] = None


@dataclass
class Sampler:
    """`images_per_identity` K ≥ 2 gives balanced batches (P identities × K images, plus
    `random_fraction` of random images); 0 gives plain shuffled batches."""

    images_per_identity: int = 0
    random_fraction: float = 0.0

    def validate(self) -> None:
        if self.images_per_identity == 1 or self.images_per_identity < 0:
            raise ValueError("images_per_identity: must be 0 (plain batches) or >= 2")
        if not 0.0 <= self.random_fraction < 1.0:
            raise ValueError("random_fraction: must be in [0, 1)")


@dataclass
class Distill:
    """Distillation of `facekd recognition distill`: `method` one of none, feature, rkd,
    similarity, ekd; total loss = margin softmax + `weight` × distillation loss; `options`
    go to the method (e.g. {metric: cosine} for feature, {top_k: 2000} for ekd); `teacher` a
    recognition model file (or give --teacher)."""

    method: Literal["none", "feature", "rkd", "similarity", "ekd"] = "ekd"
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    teacher: Optional[ExistingPath] = None

    def validate(self) -> None:
        if not self.weight >= 0:
            raise ValueError("weight: must be >= 0")


@dataclass
class RecognitionConfig:
    """Teacher and student models, their schedules, the head, sampler, distillation and data."""

    teacher: ModelChoice
    student: ModelChoice
    teacher_train: TrainConfig = field(default_factory=TrainConfig)
    student_train: TrainConfig = field(default_factory=TrainConfig)
    head: MarginHead = field(default_factory=MarginHead)
    sampler: Sampler = field(default_factory=Sampler)
    distill: Distill = field(default_factory=Distill)
    data: Optional[RecognitionData] = None
    eval_batch_size: int = 128
    eval_flip: bool = True
    cache: Literal["auto", "yes", "no"] = "auto"

    def validate(self) -> None:
        if self.eval_batch_size < 1:
            raise ValueError("eval_batch_size: must be >= 1")
