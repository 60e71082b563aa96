"""General vision backbones from timm and torchvision as quality trunks.

- `timm/<name>`: any timm model (`timm.list_models()`), built by `timm.create_model` without
  its classifier. The trunk is `forward_features` (a feature map, NCHW or NHWC); a model whose
  features are tokens (ViT-style) is pooled by its own `forward_head(pre_logits=True)`. Modules
  that forward never calls (e.g. MobileNetV3's `conv_head`, EdgeNeXt's head norm) are replaced
  by identities, so every parameter is trained and counted: timm's `edgenext_xx_small` with a
  168→128→1 head is Efficient-FIQA's student, 1 179 641 parameters.
- `torchvision/swin_t|swin_s|swin_b`: torchvision's Swin Transformer, `features` + `norm` as a
  (B, C, h, w) map; Efficient-FIQA's teacher is `torchvision/swin_b` + a 1024→128→1 head.

`pretrained: true` fetches the library's own ImageNet weights through its own download and
cache (timm: the Hugging Face hub; torchvision: `torch.hub`); `pretrained: PATH` loads a local
`.safetensors` or `.pth` state dict of the backbone (its classifier keys are ignored).
Normalization and the default input size come from the backbone's pretrained config.
Parameter names are the library's own under `backbone.model.`, so state dicts map 1:1.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from facekd.errors import ConfigError, DataError
from facekd.models.heads import QualityHead
from facekd.models.registry import ArchSpec, check_builder, register_family

TORCHVISION_SWIN = {"swin_t": "Swin-T", "swin_s": "Swin-S", "swin_b": "Swin-B"}
#: Listed by `facekd models` beside the named architectures: Efficient-FIQA's pair and the demo's.
FEATURED_BACKBONES = ("timm/edgenext_xx_small", "torchvision/swin_b", "timm/mobilenetv3_large_100",
                      "timm/mobilenetv3_small_100")


def _imagenet_mean_std(mean: Sequence[float], std: Sequence[float]) -> dict[str, list[float]]:
    """A [0, 1]-scale mean/std (timm, torchvision) on facekd's [0, 255] scale."""
    return {"mean": [float(m) * 255.0 for m in mean], "std": [float(s) * 255.0 for s in std]}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file, or of a pickled `.pt`/`.pth` state dict read with
    `torch.load(weights_only=True)`: a file that needs more (code) is refused, never run.
    A checkpoint dict holding the weights under "state_dict" or "model" is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found" if not path.exists() else "not a file")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own types for every malformed file
            raise DataError(path, f"not a readable safetensors file ({error})") from None
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(path, f"refused: the pickle holds more than tensors, and facekd loads checkpoints only "
                              f"with torch.load(weights_only=True), which never runs code ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise DataError(path, f"not a readable PyTorch checkpoint ({str(error).splitlines()[0]})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(path, "not a state dict (a mapping of parameter names to tensors)")
    return state


def describe_keys(keys: Sequence[str], limit: int = 4) -> str:
    """The first `limit` of `keys`, and how many more."""
    keys = list(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path,
                          ignore_prefixes: Sequence[str] = ()) -> None:
    """Load `state` into `model` strictly, except keys under `ignore_prefixes` (a classifier);
    missing, unexpected or mis-shaped keys raise one DataError naming the first few."""
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore_prefixes)}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {describe_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {describe_keys(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {describe_keys(shapes, 2)}")
    if problems:
        raise DataError(path, "weights do not fit the backbone: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------
# timm


@functools.lru_cache(maxsize=None)
def _timm_probe(name: str) -> tuple[frozenset[str], int, str]:
    """(children the trunk's forward calls, its output channels, its output kind) of timm
    model `name`, found by one forward on the meta device (no memory, no computation), or on
    the CPU for the rare model whose code cannot run there."""
    try:
        return _probe_on(name, torch.device("meta"))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return _probe_on(name, torch.device("cpu"))


def _probe_on(name: str, device: torch.device) -> tuple[frozenset[str], int, str]:
    import timm

    with device:
        model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[1:]
    called: set[str] = set()
    hooks = [child.register_forward_hook(lambda *_, n=n: called.add(n)) for n, child in model.named_children()]
    try:
        with torch.no_grad():
            out = model.forward_features(torch.zeros(1, 3, *size, device=device))
            kind = "NHWC" if getattr(model, "output_fmt", "NCHW") == "NHWC" else "NCHW"
            if out.ndim == 3:
                out, kind = model.forward_head(out, pre_logits=True), "pooled"
    finally:
        for hook in hooks:
            hook.remove()
    channels = {"NCHW": 1, "NHWC": -1, "pooled": -1}[kind]
    return frozenset(called), int(out.shape[channels]), kind


class TimmTrunk(nn.Module):
    """A timm model without its classifier, returning a (B, C, h, w) feature map."""

    def __init__(self, name: str, pretrained: bool | str = False, drop_path: float = 0.0):
        super().__init__()
        import timm

        kwargs: dict[str, Any] = {"num_classes": 0}
        if drop_path:
            kwargs["drop_path_rate"] = drop_path
        try:
            self.model = timm.create_model(name, pretrained=pretrained is True, **kwargs)
        except TypeError as error:
            raise ConfigError(f"timm/{name}: {error}") from None
        used, self.out_channels, self.kind = _timm_probe(name)
        self.pruned = [child for child, _ in self.model.named_children()
                       if child not in used and (self.kind != "pooled" or child != "head")]
        for child in self.pruned:
            setattr(self.model, child, nn.Identity())
        if isinstance(pretrained, str):  # read here, safely: timm's own file loader unpickles freely
            path = Path(pretrained).expanduser()
            self.load_timm_state_dict(read_state_dict(path), path)

    def load_timm_state_dict(self, state: dict[str, torch.Tensor], path: str | Path) -> None:
        """Load a timm state dict of this model (strictly), leaving out its classifier and the
        modules the trunk does not use."""
        classifier = self.model.pretrained_cfg.get("classifier") or "head"
        unused = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        load_backbone_weights(self.model, state, path, ignore_prefixes=tuple(f"{c}." for c in (*unused, *self.pruned)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.forward_features(x)
        if self.kind == "NHWC":
            return x.permute(0, 3, 1, 2)
        if self.kind == "pooled":
            return self.model.forward_head(x, pre_logits=True)[:, :, None, None]
        return x


def _timm_names() -> list[str]:
    import timm

    return list(timm.list_models())


def _quality_builder(make_trunk, pretrained_default: bool | str = False, drop_path_default: float = 0.0):
    def build(input_size: int, *, pretrained: bool | str = pretrained_default, drop_path: float = drop_path_default,
              head_hidden: Sequence[int] = (128,), dropout: float = 0.0, head_norm: bool = False,
              head_activation: str = "gelu"):
        trunk = make_trunk(pretrained, drop_path)
        return trunk, QualityHead(trunk.out_channels, head_hidden, dropout, head_norm, head_activation)
    return build


def _resolve_timm(name: str) -> ArchSpec:
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, _timm_names(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join('timm/' + c for c in close)}?)" if close else ""
        raise ConfigError(f"unknown architecture 'timm/{name}': timm has no model {name!r}{hint}; "
                          "list them with `facekd models --family timm`")
    cfg = timm.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    _, _, kind = _timm_probe(name)
    builder = _quality_builder(lambda pretrained, drop_path: TimmTrunk(name, pretrained, drop_path))
    check_builder(f"timm/{name}", builder)
    return ArchSpec(f"timm/{name}", "quality", int(cfg.get("input_size", (3, 224, 224))[1]),
                    f"timm {name} trunk + quality MLP", builder, stride=1 if kind == "pooled" else 32,
                    mean_std=_imagenet_mean_std(cfg.get("mean", (0.485, 0.456, 0.406)),
                                                cfg.get("std", (0.229, 0.224, 0.225))),
                    fixed_input_size=bool(cfg.get("fixed_input_size", False)))


# --------------------------------------------------------------------------------------------
# torchvision


class SwinTrunk(nn.Module):
    """torchvision's Swin Transformer without its head: `features` → `norm` → (B, C, h, w)."""

    def __init__(self, name: str, pretrained: bool | str = False, drop_path: float | None = None):
        super().__init__()
        from torchvision import models

        from torchvision.ops import StochasticDepth

        model = getattr(models, name)(weights="DEFAULT" if pretrained is True else None)
        if drop_path is not None:  # its builder fixes the rate: rescale the linear per-block ramp
            default = _swin_stochastic_depth(name)
            for module in model.modules():
                if isinstance(module, StochasticDepth):
                    module.p = module.p * drop_path / default if default else 0.0
        if isinstance(pretrained, str):
            load_backbone_weights(model, read_state_dict(Path(pretrained).expanduser()), pretrained,
                                  ignore_prefixes=("head.",))
        model.head = nn.Identity()
        self.model = model
        self.out_channels = model.norm.normalized_shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(self.model.features(x)).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=None)
def _swin_stochastic_depth(name: str) -> float:
    """torchvision's own default stochastic depth of `name` (0.2 / 0.3 / 0.5), read from its builder."""
    from torchvision import models

    with torch.device("meta"):
        return float(getattr(models, name)().features[-1][-1].stochastic_depth.p)


def _resolve_torchvision(name: str) -> ArchSpec:
    if name not in TORCHVISION_SWIN:
        raise ConfigError(f"unknown architecture 'torchvision/{name}'; torchvision backbones: "
                          f"{', '.join('torchvision/' + n for n in TORCHVISION_SWIN)}")
    from torchvision import models

    transforms = models.get_model_weights(name).DEFAULT.transforms()
    builder = _quality_builder(lambda pretrained, drop_path: SwinTrunk(name, pretrained, drop_path),
                               drop_path_default=_swin_stochastic_depth(name))
    check_builder(f"torchvision/{name}", builder)
    return ArchSpec(f"torchvision/{name}", "quality", int(transforms.crop_size[0]),
                    f"torchvision {TORCHVISION_SWIN[name]} (features + norm) + quality MLP", builder, stride=32,
                    mean_std=_imagenet_mean_std(transforms.mean, transforms.std))


register_family("timm", "any timm model without its classifier (timm.list_models())", _resolve_timm, _timm_names)
register_family("torchvision", "torchvision Swin Transformers", _resolve_torchvision,
                lambda: list(TORCHVISION_SWIN))
