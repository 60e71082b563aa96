"""Configuration of recognition training and distillation (`facekd recognition train|distill`)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from facekd.config import ConfigModel, ExistingPath, NonNegative
from facekd.quality.config import TeacherStudentConfig


class RecognitionData(ConfigModel):
    """`train`: an identity folder (root/<identity>/<images>) or an insightface `.rec` (or a
    folder holding `train.rec`). `eval`: verification sets, each a `pairs.txt`, a `.bin` or an
    identity folder (every pair of its images); the first one is also used during training."""

    train: ExistingPath
    eval: list[ExistingPath] = []


class MarginHead(ConfigModel):
    """Margin softmax: ArcFace (s 64, m 0.5) or CosFace (s 64, m 0.35); None takes those defaults.
    `images`: what it is computed on, all of the batch or only its random part (TFace's EKD:
    the margin softmax on the random images, distillation on the whole batch)."""

    kind: Literal["arcface", "cosface"] = "arcface"
    scale: Optional[float] = None
    margin: Optional[float] = None
    images: Literal["all", "random"] = "all"


class Sampler(ConfigModel):
    """`images_per_identity` K ≥ 2 gives balanced batches (P identities × K images, plus
    `random_fraction` of random images); 0 gives plain shuffled batches. `epoch`: images
    (len(set) images an epoch) or random_images (len(set) random images an epoch, TFace's EKD)."""

    images_per_identity: int = 0
    random_fraction: float = Field(0.0, ge=0, lt=1)
    epoch: Literal["images", "random_images"] = "images"

    @field_validator("images_per_identity")
    @classmethod
    def _zero_or_two_at_least(cls, k: int) -> int:
        if k == 1 or k < 0:
            raise ValueError("must be 0 (plain batches) or >= 2")
        return k


class Distill(ConfigModel):
    """Distillation of `facekd recognition distill`: `method` one of none, feature, rkd,
    similarity, ekd, ekd+feature; total loss = margin softmax + `weight` × distillation loss; `options`
    go to the method (e.g. {metric: cosine} for feature, {top_k: 2000, memory: 8192} for ekd); `teacher` a
    recognition model file (or give --teacher); `teacher_cache` a cache of its embeddings of
    the training set (`facekd recognition teacher-cache`; or give --teacher-cache), read
    instead of running the teacher."""

    method: Literal["none", "feature", "rkd", "similarity", "ekd", "ekd+feature"] = "ekd"
    weight: NonNegative = 1.0
    options: dict[str, Any] = {}
    teacher: Optional[ExistingPath] = None
    teacher_cache: Optional[ExistingPath] = None


class RecognitionConfig(TeacherStudentConfig):
    """Teacher and student models, their schedules, the head, sampler, distillation and data.
    `cache`: training images decoded once and kept in memory (auto: when they fit);
    `train_transform`: the augmentation (`facekd.recognition.data.TRAIN_TRANSFORMS`)."""

    head: MarginHead = Field(default_factory=MarginHead)
    sampler: Sampler = Field(default_factory=Sampler)
    distill: Distill = Field(default_factory=Distill)
    data: Optional[RecognitionData] = None
    eval_batch_size: int = Field(128, ge=1)
    eval_flip: bool = True
    cache: Literal["auto", "yes", "no"] = "auto"
    train_transform: Literal["flip", "none", "flip_shift"] = "flip"
