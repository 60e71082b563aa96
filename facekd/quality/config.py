"""Configuration of the quality pipeline (`facekd quality run CONFIG.yaml`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from facekd.config import ConfigModel, ExistingPath, NonNegative
from facekd.engine import TrainConfig

STAGES = ("t0", "pseudo_u1", "t1", "pseudo_u2", "student", "control")
DATA_FILES = {"labeled": "labeled.csv", "test": "test.csv", "unlabeled_1": "unlabeled_1.txt",
              "unlabeled_2": "unlabeled_2.txt"}


class QualityData(ConfigModel):
    """Labeled and test sets are MOS CSVs (path,mos); unlabeled sets are image lists or folders."""

    labeled: ExistingPath
    test: ExistingPath
    unlabeled_1: ExistingPath
    unlabeled_2: ExistingPath


class ModelChoice(ConfigModel):
    """An architecture of `facekd models`, its input size (None: the architecture's) and options;
    `init`: a facekd model file of the same network (e.g. from `facekd import`) to start from."""

    arch: str
    input_size: Optional[int] = None
    options: dict[str, Any] = {}
    init: Optional[ExistingPath] = None


class TeacherStudentConfig(ConfigModel):
    """A teacher and a student, the schedules that train them and the evaluation batch size."""

    teacher: ModelChoice
    student: ModelChoice
    teacher_train: TrainConfig = Field(default_factory=TrainConfig)
    student_train: TrainConfig = Field(default_factory=TrainConfig)
    eval_batch_size: int = Field(64, ge=1)


class QualityLossWeights(ConfigModel):
    """Weights of the regression terms; the paper uses MSE + PLCC. `plcc_form`: "1-r" (0…2), or
    "reference", the paper code's loss on z-scored batches ((1-r)/4 + (1-r²)/8)."""

    mse: NonNegative = 1.0
    l1: NonNegative = 0.0
    plcc: NonNegative = 1.0
    srcc: NonNegative = 0.0
    plcc_form: Literal["1-r", "reference"] = "1-r"

    @model_validator(mode="after")
    def _one_term_at_least(self) -> "QualityLossWeights":
        if not any(weight > 0 for weight in self.as_dict().values()):
            raise ValueError("at least one loss weight must be > 0")
        return self

    def as_dict(self) -> dict[str, float]:
        return {"mse": self.mse, "l1": self.l1, "plcc": self.plcc, "srcc": self.srcc}


class PseudoLabels(ConfigModel):
    """How teachers label unlabeled images: raw predictions mapped to the MOS scale by a
    4-parameter logistic fitted on the labeled set; optional flip-agreement confidence."""

    confidence: Literal["none", "flip"] = "none"
    batch_size: int = Field(64, ge=1)


class QualityRunConfig(TeacherStudentConfig):
    """The five stages (T0 → pseudo(U1) → T1 → pseudo(U2) → student) plus a control student."""

    loss: QualityLossWeights = Field(default_factory=QualityLossWeights)
    pseudo: PseudoLabels = Field(default_factory=PseudoLabels)
    data: Optional[QualityData] = None
    control: bool = True
    # "flip_shift": flip + shift of up to 4 px; "resize_random_crop": Efficient-FIQA's Resize(S) + RandomCrop(S)
    train_transform: Literal["flip_shift", "resize_random_crop"] = "flip_shift"
    train_cache: bool = False  # hold the decoded training set in memory (once per rank) instead of streaming it


def data_overrides(folder: str | Path) -> list[str]:
    """`--set` items pointing `data` at a folder laid out like `facekd synth quality` output."""
    folder = Path(folder)
    return [f"data.{key}={folder / name}" for key, name in DATA_FILES.items()]
