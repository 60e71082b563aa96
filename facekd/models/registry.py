"""Architecture registry: every model is named, built from (arch, input size, options), and
rebuilt exactly from the same three values (which a model file stores).

Architectures register themselves where they are defined (timm's style): `register_arch` for
a named net (`facekd.models.iresnet`, `facekd.models.mobilefacenet`), `register_family` for a
whole library of backbones resolved by prefix (`timm/<name>`, `torchvision/<name>`, in
`facekd.models.backbones`). A quality model is its own name (`iresnet50_quality` = IResNet-50
trunk + `QualityHead`), so the name alone says the task and the head.

Options shared by every architecture: `resize` (how an image becomes the input, see
`facekd.io.images.Resize`). `pretrained` (where offered) is honoured when a model is built
for training; `facekd.load` rebuilds with `load_pretrained=False`, so it never downloads.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal, Union

import torch
from pydantic import BeforeValidator, Field, PlainValidator, create_model
from torch import nn

from facekd.config import ConfigModel, validated
from facekd.checks import whole_number
from facekd.errors import ConfigError
from facekd.io.images import RESIZE_MODES, Resize

TASKS = ("recognition", "quality")

# Pixel statistics per task, applied to RGB values in [0, 255]: (x - mean) / std.
RECOGNITION_NORMALIZATION = {"mean": [127.5, 127.5, 127.5], "std": [127.5, 127.5, 127.5]}
QUALITY_NORMALIZATION = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
_NORMALIZATION = {"recognition": RECOGNITION_NORMALIZATION, "quality": QUALITY_NORMALIZATION}

Builder = Callable[..., "tuple[nn.Module, nn.Module]"]


# --------------------------------------------------------------------------------------------
# Option types: each option name means the same thing for every architecture.


def _as_list(value: Any) -> Any:
    """One integer, or a tuple of them, as a list (so `head_hidden: 128` reads [128])."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    return list(value) if isinstance(value, tuple) else value


def _pretrained(value: Any) -> bool | str:
    """`pretrained`: true/false (the library's own weights), or the path of a local weights file."""
    if isinstance(value, bool) or (isinstance(value, str) and value.strip()):
        return value
    raise ValueError(f"must be true, false or the path of a .safetensors/.pth file, got {value!r}")


_Fraction = Annotated[float, Field(ge=0, lt=1)]
_Sizes = Annotated[list[Annotated[int, Field(ge=1)]], BeforeValidator(_as_list)]

OPTION_TYPES: dict[str, Any] = {
    "embedding_size": Annotated[int, Field(ge=1)],
    "dropout": _Fraction,
    "drop_path": _Fraction,
    "width_mult": Annotated[float, Field(gt=0, le=8)],
    "stage_scale": Annotated[int, Field(ge=1, le=8)],
    "head_hidden": _Sizes,
    "head_norm": bool,
    "blocks": Annotated[_Sizes, Field(min_length=4, max_length=4)],
    "head_activation": Literal["gelu", "none"],
    "pretrained": Annotated[Union[bool, str], PlainValidator(_pretrained)],
    "resize": Literal[RESIZE_MODES],
}
OPTION_HELP = {
    "embedding_size": "embedding dimension",
    "dropout": "dropout before the embedding FC / inside the quality MLP",
    "drop_path": "stochastic depth rate (timm / torchvision backbones)",
    "width_mult": "channel width multiplier",
    "stage_scale": "MobileFaceNet stage channels ×s, expansions kept (arcface_torch's scale: mbf 2, mbf_large 4)",
    "head_hidden": "hidden sizes of the quality MLP, e.g. [128]",
    "head_norm": "LayerNorm on the pooled features before the quality MLP",
    "blocks": "MobileFaceNet repeats per stage, four integers",
    "head_activation": "activation between the quality MLP's layers: gelu, or none (Efficient-FIQA's linear head)",
    "pretrained": "true: the library's ImageNet weights (downloaded once); or a local .safetensors/.pth state dict",
    "resize": "stretch (to S×S), or center_crop (shorter side to S + centre crop, torchvision's Resize+CenterCrop)",
}

#: Architectures facekd once had, and what replaces them.
RETIRED_ARCHS = {
    "edgenext_xxs": "timm/edgenext_xx_small",
    "mobilenetv3_small": "timm/mobilenetv3_small_100",
    "mobilenetv3_large_050": "timm/mobilenetv3_large_075",
    "mobilenetv3_large": "timm/mobilenetv3_large_100",
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
    mean_std: dict[str, list[float]] | None = None  # None: the task's default
    fixed_input_size: bool = False

    @functools.cached_property
    def options_model(self) -> type[ConfigModel]:
        """The model of this architecture's options: the builder's keyword-only parameters
        (types from OPTION_TYPES, defaults from the signature) and `resize`."""
        params = inspect.signature(self.builder).parameters
        fields = {name: (OPTION_TYPES[name], Field(p.default, validate_default=True)) for name, p in params.items()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY}
        return create_model("Options", __base__=ConfigModel, **fields, resize=(OPTION_TYPES["resize"], "stretch"))

    @property
    def default_options(self) -> dict[str, Any]:
        """Every option this architecture accepts, with its default (JSON-able)."""
        return self.options_model().model_dump()

    @property
    def normalization(self) -> dict[str, list[float]]:
        source = self.mean_std or _NORMALIZATION[self.task]
        return {key: [float(v) for v in value] for key, value in source.items()}

    def resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Defaults updated with `options`, each checked and made JSON-able."""
        known = self.options_model.model_fields
        for name in options:
            if name not in known:
                hint = " (quality models are separate names, e.g. 'iresnet50_quality')" if name == "task" else ""
                raise ConfigError(f"unknown option {name!r} for architecture {self.name!r}{hint}; "
                                  f"valid options: {', '.join(sorted(known))}")
        return validated(self.options_model, options, where="options").model_dump()

    def check_input_size(self, input_size: Any) -> int:
        size = whole_number(input_size, f"input_size for {self.name!r}")
        if self.fixed_input_size and size != self.input_size:
            raise ConfigError(f"{self.name!r} takes only {self.input_size}×{self.input_size} input, got {size}")
        if size < self.stride or size % self.stride:
            raise ConfigError(f"input_size for {self.name!r} must be a positive multiple of {self.stride}, "
                              f"got {size}")
        return size


_REGISTRY: dict[str, ArchSpec] = {}


@dataclass(frozen=True)
class ArchFamily:
    """A library of backbones named `prefix/<name>`: `resolve(name)` returns the ArchSpec of
    `prefix/name` (or raises ConfigError), `names()` lists the names it can build."""

    prefix: str
    description: str
    resolve: Callable[[str], ArchSpec] = field(repr=False)
    names: Callable[[], list[str]] = field(repr=False)


_FAMILIES: dict[str, ArchFamily] = {}
_RESOLVED: dict[str, ArchSpec] = {}  # family members already resolved


def register_family(prefix: str, description: str, resolve: Callable[[str], ArchSpec],
                    names: Callable[[], list[str]]) -> None:
    """Make every `prefix/<name>` an architecture, resolved (and cached) on first use."""
    if prefix in _FAMILIES:
        raise ValueError(f"architecture family {prefix!r} is already registered")
    _FAMILIES[prefix] = ArchFamily(prefix, description, resolve, names)


def available_families() -> list[ArchFamily]:
    """The registered backbone families (timm, torchvision), in registration order."""
    return list(_FAMILIES.values())


def check_builder(name: str, builder: Builder) -> None:
    """Every keyword-only parameter of `builder` is an option with a check and a default."""
    for pname, param in inspect.signature(builder).parameters.items():
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            if pname not in OPTION_TYPES:
                raise ValueError(f"{name}: option {pname!r} has no check (add its type to OPTION_TYPES)")
            if param.default is inspect.Parameter.empty:
                raise ValueError(f"{name}: option {pname!r} needs a default")


def register_arch(name: str, task: str, input_size: int, description: str, *,
                  stride: int = 32) -> Callable[[Builder], Builder]:
    """Decorator registering `builder(input_size, *, option=default, ...) -> (backbone, head)`.

    Every keyword-only parameter is an option; its name must be one of `OPTION_TYPES`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        check_builder(name, builder)
        _REGISTRY[name] = ArchSpec(name, task, input_size, description, builder, stride)
        return builder

    return decorate


def available_archs(task: str | None = None) -> list[ArchSpec]:
    """Named architectures (all, or those of one task), in registration order; family
    members (`timm/...`) are not listed (see `available_families`)."""
    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return [spec for spec in _REGISTRY.values() if task is None or spec.task == task]


def get_arch(name: str) -> ArchSpec:
    """The spec of a registered architecture; a clear error with suggestions otherwise."""
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    if isinstance(name, str) and name in RETIRED_ARCHS:
        raise ConfigError(f"architecture {name!r} (facekd's hand-written copy) was retired; use "
                          f"{RETIRED_ARCHS[name]!r}, timm's own, and retrain or import the model")
    prefix, _, member = str(name).partition("/")
    if member and prefix in _FAMILIES:
        if name not in _RESOLVED:
            _RESOLVED[name] = _FAMILIES[prefix].resolve(member)
        return _RESOLVED[name]
    choices = sorted(n for n in _REGISTRY if "/" not in n) + [f"{p}/<name>" for p in _FAMILIES]
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
    `facekd.inference.predictors.preprocess` applies."""

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

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, task={self.task!r}, input_size={self.input_size}"


def build_model(arch: str, input_size: int | None = None, *, load_pretrained: bool = True,
                **options: Any) -> FaceModel:
    """Build a registered architecture at `input_size` (its default when None).

    `load_pretrained=False` builds with random weights whatever the `pretrained` option says
    (the option is still recorded): for rebuilding a saved model, with no download.
    Unknown architectures, unknown options and bad values raise `ConfigError`."""
    spec = get_arch(arch)
    size = spec.check_input_size(spec.input_size if input_size is None else input_size)
    resolved = spec.resolve_options(options)
    builder_options = {name: value for name, value in resolved.items() if name != "resize"}
    if not load_pretrained and "pretrained" in builder_options:
        builder_options["pretrained"] = False
    backbone, head = spec.builder(size, **builder_options)
    return FaceModel(spec.name, spec.task, size, backbone, head, resolved, spec.normalization,
                     resize=resolved["resize"])
