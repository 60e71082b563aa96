"""Configuration of the quality pipeline (`facekd quality run CONFIG.yaml`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from facekd.config import ExistingPath
from facekd.engine import TrainConfig

STAGES = ("t0", "pseudo_u1", "t1", "pseudo_u2", "student", "control")
DATA_FILES = {"labeled": "labeled.csv", "test": "test.csv", "unlabeled_1": "unlabeled_1.txt",
              "unlabeled_2": "unlabeled_2.txt"}


@dataclass
class QualityData:
    """Labeled and test sets are MOS CSVs (path,mos); unlabeled sets are image lists or folders."""

    labeled: ExistingPath
    test: ExistingPath
    unlabeled_1: ExistingPath
    unlabeled_2: ExistingPath


@dataclass
class ModelChoice:
    """An architecture of `facekd models`, its input size (None: the architecture's) and options;
    `init`: a facekd model file of the same network (e.g. from `facekd import`) to start from."""

    arch: str
    input_size: Optional[int] = None
    options: dict[str, Any] = field(default_factory=dict)
    init: Optional[ExistingPath] = None


@dataclass
class QualityLossWeights:
    """Weights of the regression terms; the paper uses MSE + PLCC. `plcc_form`: "1-r" (0…2), or
    "reference", the paper code's loss on z-scored batches ((1-r)/4 + (1-r²)/8)."""

    mse: float = 1.0
    l1: float = 0.0
    plcc: float = 1.0
    srcc: float = 0.0
    plcc_form: Literal["1-r", "reference"] = "1-r"

    def validate(self) -> None:
        for name in ("mse", "l1", "plcc", "srcc"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        if not any(getattr(self, name) > 0 for name in ("mse", "l1", "plcc", "srcc")):
            raise ValueError("at least one loss weight must be > 0")

    def as_dict(self) -> dict[str, float]:
        return {"mse": self.mse, "l1": self.l1, "plcc": self.plcc, "srcc": self.srcc}


@dataclass
class PseudoLabels:
    """How teachers label unlabeled images: raw predictions mapped to the MOS scale by a
    4-parameter logistic fitted on the labeled set; optional flip-agreement confidence."""

    confidence: Literal["none", "flip"] = "none"
    batch_size: int = 64


@dataclass
class QualityRunConfig:
    """The five stages (T0 → pseudo(U1) → T1 → pseudo(U2) → student) plus a control student."""

    teacher: ModelChoice
    student: ModelChoice
    teacher_train: TrainConfig = field(default_factory=TrainConfig)
    student_train: TrainConfig = field(default_factory=TrainConfig)
    loss: QualityLossWeights = field(default_factory=QualityLossWeights)
    pseudo: PseudoLabels = field(default_factory=PseudoLabels)
    data: Optional[QualityData] = None
    control: bool = True
    eval_batch_size: int = 64
    # "flip_shift": flip + shift of up to 4 px; "resize_random_crop": Efficient-FIQA's Resize(S) + RandomCrop(S)
    train_transform: Literal["flip_shift", "resize_random_crop"] = "flip_shift"
    train_cache: bool = False  # hold the decoded training set in memory (once per rank) instead of streaming it

    def validate(self) -> None:
        if self.eval_batch_size < 1:
            raise ValueError("eval_batch_size: must be >= 1")


def data_overrides(folder: str | Path) -> list[str]:
    """`--set` items pointing `data` at a folder laid out like `facekd synth quality` output."""
    folder = Path(folder)
    return [f"data.{key}={folder / name}" for key, name in DATA_FILES.items()]
