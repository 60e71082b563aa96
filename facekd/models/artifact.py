"""One self-describing model file: a `.safetensors` whose metadata says how to rebuild the model.

Metadata keys (all strings, JSON where structured): `format` ("facekd-model"), `format_version`,
`task`, `arch`, `input_size`, `options`, `normalization`, `embedding_size`, `facekd_version`,
`training_config`, `metrics`. Nothing is ever unpickled."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from facekd.version import __version__
from facekd.errors import DataError, FacekdError
from facekd.io.atomic import atomic_write_bytes

FORMAT = "facekd-model"
FORMAT_VERSION = 1
_JSON_KEYS = ("options", "normalization", "training_config", "metrics")


@dataclass
class ModelInfo:
    """What a model file says about itself (no weights)."""

    path: Path
    task: str
    arch: str
    input_size: int
    options: dict[str, Any]
    normalization: dict[str, list[float]]
    embedding_size: int | None
    facekd_version: str
    training_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def geometry(self):
        """How an image becomes this model's input (`facekd.io.images.Resize`)."""
        from facekd.io.images import Resize

        return Resize(self.input_size, self.options.get("resize", "stretch"))


def model_metadata(model, training_config: dict | None = None, metrics: dict | None = None) -> dict[str, str]:
    """The string metadata that describes `model` (a FaceModel) in a model file or an ONNX graph."""
    described = model.metadata()
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "task": described["task"],
        "arch": described["arch"],
        "input_size": str(described["input_size"]),
        "options": json.dumps(described["options"], sort_keys=True),
        "normalization": json.dumps(described["normalization"], sort_keys=True),
        "embedding_size": "" if described["embedding_size"] is None else str(described["embedding_size"]),
        "facekd_version": __version__,
        "training_config": json.dumps(training_config or {}, sort_keys=True, default=str),
        "metrics": json.dumps(metrics or {}, sort_keys=True, default=str),
    }


def save_model(model, path: str | os.PathLike, *, training_config: dict | None = None,
               metrics: dict | None = None) -> Path:
    """Write `model` (a FaceModel) and its description to `path` atomically."""
    path = Path(path)
    metadata = model_metadata(model, training_config, metrics)
    from safetensors.torch import save

    tensors = {name: value.detach().to("cpu").contiguous().clone() for name, value in model.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def check_model_path(path: Path, suffix: str = ".safetensors") -> None:
    """DataError unless `path` is an existing file (not a folder)."""
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        raise DataError(path, f"is a folder, expected {'an' if suffix == '.onnx' else 'a'} {suffix} model file")


def _open(path: Path):
    from safetensors import safe_open

    check_model_path(path)
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as error:  # safetensors raises its own error types for every malformed file
        raise DataError(path, f"not a readable safetensors model file ({error})") from None


def read_model_info(path: str | os.PathLike) -> ModelInfo:
    """Read and validate a model file's metadata without loading the weights."""
    path = Path(path)
    with _open(path) as handle:
        metadata = handle.metadata() or {}
    return parse_metadata(path, metadata)


def parse_metadata(path: Path, metadata: dict[str, str]) -> ModelInfo:
    """The `ModelInfo` of a model file's (or ONNX graph's) string metadata; DataError naming `path`."""
    if metadata.get("format") != FORMAT:
        raise DataError(path, "not a facekd model file (its metadata has no 'format: facekd-model'; "
                              "weights from other tools must be converted first)")
    version = metadata.get("format_version", "")
    if version != str(FORMAT_VERSION):
        raise DataError(path, f"model file format version {version!r} is not supported by facekd "
                              f"{__version__} (expected {FORMAT_VERSION})")
    try:
        parsed = {key: json.loads(metadata.get(key) or "{}") for key in _JSON_KEYS}
        not_objects = [key for key, value in parsed.items() if not isinstance(value, dict)]
        if not_objects:
            raise ValueError(f"{', '.join(not_objects)} must be JSON objects")
        input_size = int(metadata["input_size"])
        if input_size <= 0:
            raise ValueError(f"input_size must be positive, got {input_size}")
        embedding = metadata.get("embedding_size", "")
        return ModelInfo(
            path=path, task=metadata["task"], arch=metadata["arch"], input_size=input_size,
            embedding_size=int(embedding) if embedding else None,
            facekd_version=metadata.get("facekd_version", "?"), **parsed,
        )
    except (KeyError, ValueError) as error:
        raise DataError(path, f"damaged facekd metadata ({type(error).__name__}: {error})") from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild the FaceModel described by `path` and load its weights (eval mode)."""
    from facekd.models.registry import build_model

    path = Path(path)
    with _open(path) as handle:
        info = parse_metadata(path, handle.metadata() or {})
        try:
            state = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:
            raise DataError(path, f"truncated or damaged weights ({error})") from None
    try:
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten: draw nothing from the caller's stream
            model = build_model(info.arch, input_size=info.input_size, load_pretrained=False, **info.options)
    except (FacekdError, TypeError) as error:
        raise DataError(path, f"cannot rebuild the model: {error}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0:3]
        raise DataError(path, f"weights do not match architecture {info.arch!r}: {' '.join(first)}") from None
    model.training_config = info.training_config
    model.metrics = info.metrics
    return model.to(device).eval()
