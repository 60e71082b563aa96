"""`facekd import FORMAT CHECKPOINT --out model.safetensors`: other people's checkpoints as
facekd model files.

- `efficient-fiqa`: the released checkpoints of Efficient-FIQA (Sun et al., VQualA 2025 FIQA
  winner) — `EdgeNeXt_XXS_checkpoint.pt` (timm `edgenext_xx_small` + GAP + 168→128→1),
  `Swin_B_checkpoint.pt` / `Swin_B_plus_checkpoint.pt` (torchvision `swin_b` + 1024→128→1).
  Keys `feature_extraction.*` (the backbone, once or twice nested), `quality.0.*`,
  `quality.1.*`; which network a file holds is recognised from its keys and shapes. The model
  file records that code's test preprocessing — Resize(shorter side S) + CenterCrop(S),
  ImageNet mean/std, S = 352 (EdgeNeXt) or 448 (Swin) — and every facekd path (score, eval,
  ONNX, `facekd.load`) applies it.
- `insightface`: arcface_torch's `backbone.pth` (`torch.save(backbone.state_dict())`) of
  `--arch r18|r34|r50|r100` (IResNet: trunk keys as facekd's, head `bn2`, `fc`, `features`)
  or `mbf` / `mbf_large` (MobileFaceNet with `scale` 2 / 4: `layers.*`, `conv_sep`, GDC
  `features`); the embedding size is read from the weights. Input 112×112 RGB,
  (x − 127.5) / 127.5, as arcface_torch trains and evaluates.
- `timm`: a timm backbone state dict (e.g. from a Hugging Face cache) as the trunk of a
  `timm/<name>` quality model, its head newly initialised: the starting point of training.

Pickles are read only with `torch.load(weights_only=True)` (`read_state_dict`); nothing is
written unless every key fits.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from facekd.errors import ConfigError, DataError
from facekd.models.backbones import describe_keys, read_state_dict

FORMATS = ("efficient-fiqa", "insightface", "timm")
#: arcface_torch's network names: facekd architecture and options.
INSIGHTFACE_ARCHS = {"r18": ("iresnet18", {}), "r34": ("iresnet34", {}), "r50": ("iresnet50", {}),
                     "r100": ("iresnet100", {}), "mbf": ("mobilefacenet", {"stage_scale": 2}),
                     "mbf_large": ("mobilefacenet", {"stage_scale": 4, "blocks": [2, 8, 12, 4]})}
EFFICIENT_FIQA_SIZES = {"timm": 352, "torchvision": 448}  # the seed's test image sizes
_EDGENEXT_CANDIDATES = ("edgenext_xx_small", "edgenext_x_small", "edgenext_small", "edgenext_base")
_SWIN_CANDIDATES = ("swin_t", "swin_s", "swin_b")


@dataclass
class ImportReport:
    """What `import_checkpoint` wrote."""

    path: Path
    format: str
    arch: str
    input_size: int
    resize: str
    params: int
    tensors: int


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _reference_shapes(make: Callable[[], torch.nn.Module]) -> dict[str, tuple]:
    with torch.device("meta"):
        return _shapes(make().state_dict())


def _match_backbone(path: Path, trunk: dict[str, torch.Tensor]) -> str:
    """The facekd arch whose backbone has exactly these keys and shapes."""
    import timm
    from torchvision import models

    shapes = _shapes(trunk)
    candidates: list[tuple[str, Callable[[], torch.nn.Module], tuple[str, ...]]] = []
    if any(k.startswith("stem.") for k in trunk):
        candidates = [(f"timm/{n}", lambda n=n: timm.create_model(n, num_classes=0), ("head.",))
                      for n in _EDGENEXT_CANDIDATES]
    elif any(k.startswith("features.") for k in trunk):
        candidates = [(f"torchvision/{n}", lambda n=n: getattr(models, n)(), ("head.",)) for n in _SWIN_CANDIDATES]
    for arch, make, ignored in candidates:
        reference = {k: v for k, v in _reference_shapes(make).items() if not k.startswith(ignored)}
        if reference == shapes:
            return arch
    kinds = "EdgeNeXt (timm)" if candidates and candidates[0][0].startswith("timm") else "Swin (torchvision)"
    if not candidates:
        raise DataError(path, f"the backbone under 'feature_extraction.' is neither timm's EdgeNeXt nor "
                              f"torchvision's Swin (first keys: {describe_keys(sorted(trunk))})")
    raise DataError(path, f"the backbone's keys or shapes match no {kinds} variant "
                          f"({', '.join(a for a, _, _ in candidates)}; first keys: {describe_keys(sorted(trunk))})")


def _efficient_fiqa(path: Path, state: dict[str, torch.Tensor], input_size: int | None):
    """The facekd model an Efficient-FIQA checkpoint holds, and its weights under facekd's names."""
    from facekd.models.registry import build_model

    state = _strip(state, "module.") if all(k.startswith("module.") for k in state) else state  # DataParallel
    trunk = _strip(state, "feature_extraction.")
    if any(k.startswith("feature_extraction.") for k in trunk):  # FIQA_Swin_B wraps Swin_b_IQA
        trunk = _strip(trunk, "feature_extraction.")
    head = _strip(state, "quality.")
    expected_head = {"0.weight", "0.bias", "1.weight", "1.bias"}
    if not trunk or set(head) != expected_head:
        found = describe_keys(sorted(state))
        raise DataError(path, "not an Efficient-FIQA checkpoint: expected keys 'feature_extraction.*' and "
                              f"'quality.0/1.weight/bias', found {found}")
    leftover = [k for k in state if not k.startswith(("feature_extraction.", "quality.", "module."))]
    if leftover:
        raise DataError(path, f"unexpected keys beside the network: {describe_keys(leftover)}")
    arch = _match_backbone(path, trunk)
    hidden = int(head["0.weight"].shape[0])
    size = EFFICIENT_FIQA_SIZES[arch.split("/")[0]] if input_size is None else input_size
    model = build_model(arch, size, head_hidden=[hidden], head_activation="none", dropout=0.0, head_norm=False,
                        resize="center_crop")
    if head["0.weight"].shape[1] != model.backbone.out_channels or tuple(head["1.weight"].shape) != (1, hidden):
        raise DataError(path, f"quality head shapes {tuple(head['0.weight'].shape)}, {tuple(head['1.weight'].shape)} "
                              f"do not fit {arch} ({model.backbone.out_channels} features → {hidden} → 1)")
    own = {"head.mlp.0.weight": head["0.weight"], "head.mlp.0.bias": head["0.bias"],
           "head.mlp.3.weight": head["1.weight"], "head.mlp.3.bias": head["1.bias"]}
    own.update({f"backbone.model.{k}": v for k, v in trunk.items()})
    return model, own


def insightface_key(key: str, last_layer: int) -> str:
    """arcface_torch's name for the facekd key `key` of an IResNet or MobileFaceNet (whose trunk
    has `last_layer + 1` entries in `layers`)."""
    if key.startswith("head."):
        iresnet = {"head.bn.": "bn2.", "head.fc.": "fc.", "head.features.": "features."}
        mbf = {"head.gdc.": "features.layers.0.layers.0.", "head.bn.": "features.layers.0.layers.1.",
               "head.fc.": "features.layers.2.", "head.features.": "features.layers.3."}
        table = mbf if last_layer else iresnet
        prefix = next(p for p in table if key.startswith(p))
        return table[prefix] + key[len(prefix):]
    key = key[len("backbone."):]
    if not last_layer:
        return key  # IResNet: the trunk's names are arcface_torch's
    key = re.sub(rf"^layers\.{last_layer}\.", "conv_sep.", key)
    key = re.sub(r"^layers\.(\d+)\.(\d+)\.", r"layers.\1.layers.\2.", key)  # a Residual stage's blocks
    for name, index in (("expand", 0), ("depthwise", 1), ("project", 2), ("conv", 0), ("bn", 1), ("act", 2)):
        key = key.replace(f".{name}.", f".layers.{index}.")
    return key


def _insightface(path: Path, state: dict[str, torch.Tensor], arch: str | None):
    """The facekd model of an arcface_torch backbone state dict, and its weights under facekd's names."""
    from facekd.models.registry import build_model

    if arch not in INSIGHTFACE_ARCHS:
        raise ConfigError(f"format 'insightface' needs --arch, one of {', '.join(INSIGHTFACE_ARCHS)} "
                          f"(arcface_torch's network name), got {arch!r}")
    state = _strip(state, "module.") if all(k.startswith("module.") for k in state) else state  # DDP
    name, options = INSIGHTFACE_ARCHS[arch]
    fc = state.get("fc.weight" if name.startswith("iresnet") else "features.layers.2.weight")
    model = build_model(name, 112, embedding_size=int(fc.shape[0]) if fc is not None and fc.ndim == 2 else 512,
                        **options)
    last = len(model.backbone.layers) - 1 if name == "mobilefacenet" else 0
    names = {insightface_key(key, last): key for key in model.state_dict()}
    missing = [k for k in names if k not in state]
    unexpected = [k for k in state if k not in names]
    if missing or unexpected:
        parts = [f"missing keys: {describe_keys(missing)}"] if missing else []
        parts += [f"unexpected keys: {describe_keys(unexpected)}"] if unexpected else []
        raise DataError(path, f"not an arcface_torch {arch} backbone ({'; '.join(parts)})")
    own = model.state_dict()
    wrong = [f"{k} {tuple(state[k].shape)} ≠ {tuple(own[key].shape)}" for k, key in names.items()
             if state[k].shape != own[key].shape]
    if wrong:
        raise DataError(path, f"shapes do not fit arcface_torch {arch}: {describe_keys(wrong)}")
    return model, {key: state[k] for k, key in names.items()}


def _timm(path: Path, state: dict[str, torch.Tensor], arch: str | None, input_size: int | None):
    """A `timm/<name>` quality model whose trunk holds the timm state dict `state`."""
    from facekd.models.backbones import TimmTrunk
    from facekd.models.registry import build_model

    if not arch or not arch.startswith("timm/"):
        raise ConfigError("format 'timm' needs --arch timm/<name>, the timm model the state dict is of")
    model = build_model(arch, input_size)
    assert isinstance(model.backbone, TimmTrunk)
    model.backbone.load_timm_state_dict(state, path)
    return model


def import_checkpoint(fmt: str, checkpoint: str | os.PathLike, out: str | os.PathLike, *, arch: str | None = None,
                      input_size: int | None = None) -> ImportReport:
    """Convert `checkpoint` (format `fmt`, one of FORMATS) into the facekd model file `out`."""
    from facekd.io.formats import file_digest
    from facekd.models.artifact import save_model
    from facekd.models.cost import count_params

    if fmt not in FORMATS:
        raise ConfigError(f"unknown checkpoint format {fmt!r}; choose from {', '.join(FORMATS)}")
    path = Path(checkpoint)
    state = read_state_dict(path)
    if fmt == "timm":
        model = _timm(path, state, arch, input_size)
    else:
        if fmt == "efficient-fiqa":
            if arch is not None:
                raise ConfigError("format 'efficient-fiqa' recognises the network from its keys; drop --arch")
            model, weights = _efficient_fiqa(path, state, input_size)
        else:
            if input_size not in (None, 112):
                raise ConfigError("format 'insightface': arcface_torch networks take 112×112 faces; drop --input-size")
            model, weights = _insightface(path, state, arch)
        missing = [k for k in model.state_dict() if k not in weights]
        if missing:
            raise DataError(path, f"missing keys for {model.arch}: {describe_keys(missing)}")
        model.load_state_dict(weights, strict=True)
    source = {"format": fmt, "file": path.name, "sha256": file_digest(path)}
    written = save_model(model.eval(), out, training_config={"imported_from": source})
    return ImportReport(written, fmt, model.arch, model.input_size, model.resize, count_params(model),
                        len(model.state_dict()))
