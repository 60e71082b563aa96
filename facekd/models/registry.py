"""Architecture registry: every model is named, built from (arch, input size, options), and
rebuilt exactly from the same three values (which a model file stores).

Design for quality teachers: a quality model is its own registered name (`iresnet50_quality`
= IResNet-50 trunk + `QualityHead`), so the name alone says the task and the head. Its trunk
has the same parameter names as the recognition net's (`backbone.*`), so a trunk trained
for recognition can be loaded into it with `model.backbone.load_state_dict(...)`.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from facekd.errors import ConfigError, FacekdError
from facekd.io.images import Resize
from facekd.models.heads import EmbeddingHead, GDCHead, QualityHead
from facekd.models.iresnet import iresnet
from facekd.models.mobilefacenet import DEFAULT_BLOCKS, MobileFaceNet
from facekd.models.students import edgenext_xxs, mobilenetv3

TASKS = ("recognition", "quality")

# Pixel statistics per task, applied to RGB values in [0, 255]: (x - mean) / std.
RECOGNITION_NORMALIZATION = {"mean": [127.5, 127.5, 127.5], "std": [127.5, 127.5, 127.5]}
QUALITY_NORMALIZATION = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
_NORMALIZATION = {"recognition": RECOGNITION_NORMALIZATION, "quality": QUALITY_NORMALIZATION}

Builder = Callable[..., "tuple[nn.Module, nn.Module]"]


# --------------------------------------------------------------------------------------------
# Option checks: each option name means the same thing for every architecture.


def _int_value(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ConfigError(f"option {name!r} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _float_value(name: str, value: Any, low: float, high: float, low_open: bool = False,
                 high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"option {name!r} must be a number, got {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or value != value:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"option {name!r} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return value


def _int_list(name: str, value: Any, length: int | None = None, minimum: int = 1) -> list[int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise ConfigError(f"option {name!r} must be a list of integers, got {value!r}")
    items = [_int_value(f"{name}[{i}]", v, minimum) for i, v in enumerate(value)]
    if length is not None and len(items) != length:
        raise ConfigError(f"option {name!r} needs {length} integers, got {len(items)}")
    return items


def _bool_value(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"option {name!r} must be true or false, got {value!r}")
    return bool(value)


OPTION_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "embedding_size": lambda n, v: _int_value(n, v),
    "dropout": lambda n, v: _float_value(n, v, 0.0, 1.0, high_open=True),
    "drop_path": lambda n, v: _float_value(n, v, 0.0, 1.0, high_open=True),
    "width_mult": lambda n, v: _float_value(n, v, 0.0, 8.0, low_open=True),
    "head_hidden": lambda n, v: _int_list(n, v),
    "head_norm": _bool_value,
    "blocks": lambda n, v: _int_list(n, v, length=4),
}
OPTION_HELP = {
    "embedding_size": "embedding dimension",
    "dropout": "dropout before the embedding FC / inside the quality MLP",
    "drop_path": "stochastic depth rate (EdgeNeXt)",
    "width_mult": "channel width multiplier",
    "head_hidden": "hidden sizes of the quality MLP, e.g. [128]",
    "head_norm": "LayerNorm on the pooled features before the quality MLP",
    "blocks": "MobileFaceNet repeats per stage, four integers",
}


# --------------------------------------------------------------------------------------------
# Specs and the registry


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture: its task, default square input size, output stride (the
    input size must be a multiple of it) and builder `builder(input_size, **options)` that
    returns `(backbone, head)`."""

    name: str
    task: str
    input_size: int
    description: str
    builder: Builder = field(repr=False)
    stride: int = 32

    @property
    def default_options(self) -> dict[str, Any]:
        """Every option this architecture accepts, with its default (JSON-able)."""
        params = inspect.signature(self.builder).parameters
        return {name: OPTION_CHECKS[name](name, p.default) for name, p in params.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}

    @property
    def normalization(self) -> dict[str, list[float]]:
        return {key: list(value) for key, value in _NORMALIZATION[self.task].items()}

    def resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Defaults updated with `options`, each checked and made JSON-able."""
        resolved = self.default_options
        for name, value in options.items():
            if name not in resolved:
                valid = ", ".join(sorted(resolved)) or "none"
                hint = ""
                if name == "task":
                    hint = " (quality models are separate names, e.g. 'iresnet50_quality')"
                raise ConfigError(f"unknown option {name!r} for architecture {self.name!r}{hint}; "
                                  f"valid options: {valid}")
            resolved[name] = OPTION_CHECKS[name](name, value)
        return resolved

    def check_input_size(self, input_size: Any) -> int:
        if isinstance(input_size, bool) or not isinstance(input_size, numbers.Integral):
            raise ConfigError(f"input_size for {self.name!r} must be an integer, got {input_size!r}")
        size = int(input_size)
        if size < self.stride or size % self.stride:
            raise ConfigError(f"input_size for {self.name!r} must be a positive multiple of {self.stride}, "
                              f"got {size}")
        return size


_REGISTRY: dict[str, ArchSpec] = {}


def register_arch(name: str, task: str, input_size: int, description: str, *,
                  stride: int = 32) -> Callable[[Builder], Builder]:
    """Decorator registering `builder(input_size, *, option=default, ...) -> (backbone, head)`.

    Every keyword-only parameter is an option; its name must be one of `OPTION_CHECKS`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        for pname, param in inspect.signature(builder).parameters.items():
            if param.kind is inspect.Parameter.KEYWORD_ONLY:
                if pname not in OPTION_CHECKS:
                    raise ValueError(f"{name}: option {pname!r} has no check in OPTION_CHECKS")
                if param.default is inspect.Parameter.empty:
                    raise ValueError(f"{name}: option {pname!r} needs a default")
        _REGISTRY[name] = ArchSpec(name, task, input_size, description, builder, stride)
        return builder

    return decorate


def available_archs(task: str | None = None) -> list[ArchSpec]:
    """Registered architectures (all, or those of one task), in registration order."""
    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return [spec for spec in _REGISTRY.values() if task is None or spec.task == task]


def get_arch(name: str) -> ArchSpec:
    """The spec of a registered architecture; a clear error with suggestions otherwise."""
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    choices = sorted(_REGISTRY)
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown architecture {name!r}{hint}; choose from {', '.join(choices)}")


# --------------------------------------------------------------------------------------------
# The model


class FaceModel(nn.Module):
    """Backbone + head. `forward` takes normalised float images (B, 3, H, W) and returns
    embeddings (B, D) for recognition or scores (B,) for quality.

    `arch`, `input_size` and `options` rebuild the same model with `build_model`;
    `normalization` ({'mean', 'std'} per RGB channel, on values in [0, 255]) is what
    `normalize` applies."""

    def __init__(self, arch: str, task: str, input_size: int, backbone: nn.Module, head: nn.Module,
                 options: dict[str, Any], normalization: dict[str, list[float]], resize: str = "stretch"):
        super().__init__()
        self.arch = arch
        self.task = task
        self.input_size = input_size
        self.options = dict(options)
        self.normalization = {key: [float(v) for v in value] for key, value in normalization.items()}
        self.resize = Resize(input_size, resize).mode
        self.backbone = backbone
        self.head = head
        self.embedding_size: int | None = getattr(head, "embedding_size", None) if task == "recognition" else None

    @property
    def geometry(self) -> Resize:
        """How a decoded image becomes this model's input (`facekd.io.images.Resize`)."""
        return Resize(self.input_size, self.resize)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's feature map (B, C, h, w)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def metadata(self) -> dict[str, Any]:
        """JSON-able description: arch, task, input_size, options, embedding_size, normalization."""
        return {
            "arch": self.arch,
            "task": self.task,
            "input_size": self.input_size,
            "options": dict(self.options),
            "embedding_size": self.embedding_size,
            "normalization": {k: list(v) for k, v in self.normalization.items()},
        }

    def normalize(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """RGB images in [0, 255] (uint8 or float; HWC, CHW, NHWC or NCHW) → normalised float32
        NCHW on the model's device (see `normalize_images`)."""
        return normalize_images(images, self.normalization, device=_device_of(self))

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, task={self.task!r}, input_size={self.input_size}"


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def normalize_images(images: torch.Tensor | np.ndarray, normalization: dict[str, Sequence[float]],
                     device: torch.device | str | None = None) -> torch.Tensor:
    """RGB images in [0, 255] → float32 NCHW `(x - mean) / std`.

    Accepts (H, W, 3), (3, H, W), (B, H, W, 3) or (B, 3, H, W); when both the last and the
    channel-first axes have size 3, the last axis is taken as channels (NHWC)."""
    if isinstance(images, np.ndarray):
        if images.dtype.kind not in "uif":
            raise FacekdError(f"images must be numeric (uint8 or float), got dtype {images.dtype}")
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise FacekdError(f"images must be a tensor or numpy array, got {type(images).__name__}")
    if images.dtype == torch.bool or images.is_complex():
        raise FacekdError(f"images must be uint8 or float, got {images.dtype}")
    batch = images
    if batch.ndim == 3:
        batch = batch.unsqueeze(0)
    if batch.ndim != 4:
        raise FacekdError(f"images must have 3 or 4 dimensions (HWC/CHW or NHWC/NCHW), got shape "
                          f"{tuple(images.shape)}")
    if batch.shape[-1] == 3:
        batch = batch.permute(0, 3, 1, 2)
    elif batch.shape[1] != 3:
        raise FacekdError(f"images must have 3 RGB channels (first or last axis), got shape "
                          f"{tuple(images.shape)}")
    if device is not None:
        batch = batch.to(device)
    batch = batch.float()
    mean = torch.tensor(normalization["mean"], dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(normalization["std"], dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    return ((batch - mean) / std).contiguous()


def build_model(arch: str, input_size: int | None = None, **options: Any) -> FaceModel:
    """Build a registered architecture at `input_size` (its default when None).

    Unknown architectures, unknown options and bad values raise `ConfigError`."""
    spec = get_arch(arch)
    size = spec.check_input_size(spec.input_size if input_size is None else input_size)
    resolved = spec.resolve_options(options)
    backbone, head = spec.builder(size, **resolved)
    return FaceModel(spec.name, spec.task, size, backbone, head, resolved, spec.normalization)


# --------------------------------------------------------------------------------------------
# Registered architectures


def _register_iresnet(depth: int, gflops: float, mparams: float) -> None:
    @register_arch(f"iresnet{depth}", "recognition", 112,
                   f"IResNet-{depth} (insightface), 512-d embedding; ~{mparams:g} M params, "
                   f"~{gflops:g} GFLOPs at 112", stride=16)
    def _build(input_size: int, *, embedding_size: int = 512, dropout: float = 0.0):
        backbone = iresnet(depth)
        head = EmbeddingHead(backbone.out_channels, input_size // backbone.stride, embedding_size, dropout)
        return backbone, head


for _depth, _gflops, _mparams in ((18, 2.6, 24), (34, 4.5, 34), (50, 6.3, 43.6), (100, 12.1, 65)):
    _register_iresnet(_depth, _gflops, _mparams)


@register_arch("mobilefacenet", "recognition", 112,
               "MobileFaceNet (Chen et al. 2018), GDC head, 512-d embedding; ~1.2 M params, ~0.23 GFLOPs",
               stride=16)
def _build_mobilefacenet(input_size: int, *, embedding_size: int = 512, dropout: float = 0.0,
                         width_mult: float = 1.0, blocks: Sequence[int] = DEFAULT_BLOCKS):
    backbone = MobileFaceNet(width_mult=width_mult, blocks=blocks)
    head = GDCHead(backbone.out_channels, input_size // backbone.stride, embedding_size, dropout)
    return backbone, head


def _register_quality_teacher(depth: int, cost: str) -> None:
    @register_arch(f"iresnet{depth}_quality", "quality", 224,
                   f"IResNet-{depth} trunk + quality MLP (quality teacher), trunk loadable from "
                   f"iresnet{depth}; {cost}", stride=16)
    def _build(input_size: int, *, head_hidden: Sequence[int] = (128,), dropout: float = 0.1,
               head_norm: bool = True):
        backbone = iresnet(depth)
        return backbone, QualityHead(backbone.out_channels, head_hidden, dropout, head_norm)


for _depth, _cost in ((18, "~11 M params, ~10 GFLOPs at 224"), (50, "~31 M params, ~25 GFLOPs at 224")):
    _register_quality_teacher(_depth, _cost)


@register_arch("mobilenetv3_small", "quality", 224,
               "MobileNetV3-Small trunk + quality MLP (student); ~1.0 M params, ~0.06 GFLOPs at 224")
def _build_mobilenetv3_small(input_size: int, *, width_mult: float = 1.0, head_hidden: Sequence[int] = (128,),
                             dropout: float = 0.1, head_norm: bool = False):
    backbone = mobilenetv3("small", width_mult)
    return backbone, QualityHead(backbone.out_channels, head_hidden, dropout, head_norm)


def _build_mobilenetv3_large(input_size: int, *, width_mult: float, head_hidden: Sequence[int] = (128,),
                             dropout: float = 0.1, head_norm: bool = False):
    backbone = mobilenetv3("large", width_mult)
    return backbone, QualityHead(backbone.out_channels, head_hidden, dropout, head_norm)


@register_arch("mobilenetv3_large_050", "quality", 224,
               "MobileNetV3-Large ×0.5 trunk + quality MLP (student); ~0.85 M params, ~0.064 GFLOPs at 224")
def _build_mobilenetv3_large_050(input_size: int, *, width_mult: float = 0.5, head_hidden: Sequence[int] = (128,),
                                 dropout: float = 0.1, head_norm: bool = False):
    return _build_mobilenetv3_large(input_size, width_mult=width_mult, head_hidden=head_hidden, dropout=dropout,
                                    head_norm=head_norm)


@register_arch("mobilenetv3_large", "quality", 224,
               "MobileNetV3-Large trunk + quality MLP (a teacher small enough for CPU demos); "
               "~3.1 M params, ~0.22 GFLOPs at 224")
def _build_mobilenetv3_large_100(input_size: int, *, width_mult: float = 1.0, head_hidden: Sequence[int] = (128,),
                                 dropout: float = 0.1, head_norm: bool = False):
    return _build_mobilenetv3_large(input_size, width_mult=width_mult, head_hidden=head_hidden, dropout=dropout,
                                    head_norm=head_norm)


@register_arch("edgenext_xxs", "quality", 288,
               "EdgeNeXt-XXS trunk + 168→128→1 quality MLP (the VQualA winner's student); "
               "~1.18 M params, ~0.33 GFLOPs at 288")
def _build_edgenext_xxs(input_size: int, *, width_mult: float = 1.0, drop_path: float = 0.0,
                        head_hidden: Sequence[int] = (128,), dropout: float = 0.1, head_norm: bool = True):
    backbone = edgenext_xxs(width_mult=width_mult, drop_path=drop_path)
    return backbone, QualityHead(backbone.out_channels, head_hidden, dropout, head_norm)
