"""Inference objects returned by `facekd.load`: `QualityModel.score` and `FaceEmbedder.embed`.

Images may be paths, a folder (recursive), an image-list file (.txt/.lst), an RGB uint8 array
(HxWx3), a batch array (NxHxWx3), or a sequence of any of these. Inputs are resized to the
model's input as the model file says (`Resize`: stretched, or shorter side + centre crop);
faces are assumed to be already cropped/aligned."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch

from facekd.errors import ConfigError, FacekdError
from facekd.io.decode import check_batch_size

ImageInput = Union[str, os.PathLike, np.ndarray]


def _expand(images: ImageInput | Sequence[ImageInput]) -> list[Path | np.ndarray]:
    from facekd.io.formats import resolve_inputs

    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, (str, os.PathLike)):
        return list(resolve_inputs([images]))
    items: list[Path | np.ndarray] = []
    for item in images:
        if isinstance(item, np.ndarray):
            items.extend(_expand(item))
        else:
            items.extend(resolve_inputs([item]))
    return items


class _BatchPredictor:
    """Shared input handling: expand inputs, read and resize images, run them in batches.

    Subclasses implement `_run_batch(uint8 NHWC RGB array at the input size) -> raw outputs`
    and `_finish(raw float32 outputs) -> scores or embeddings`."""

    task = ""

    def __init__(self, geometry, batch_size: int = 64):
        self.batch_size = check_batch_size(batch_size)
        self.geometry = geometry  # facekd.io.images.Resize
        self.input_size = geometry.size

    def _run_batch(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _finish(self, raw: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _load(self, item: Path | np.ndarray) -> np.ndarray:
        from facekd.io.images import read_image, to_rgb_uint8

        image = to_rgb_uint8(item) if isinstance(item, np.ndarray) else read_image(item)
        return self.geometry(image)

    def _batches(self, items: list[Path | np.ndarray]) -> Iterator[np.ndarray]:
        for start in range(0, len(items), self.batch_size):
            yield np.stack([self._load(item) for item in items[start:start + self.batch_size]])

    def infer(self, batch: np.ndarray, flip: bool = False) -> np.ndarray:
        """Outputs for one uint8 (N, S, S, 3) RGB batch already at the input size: scores (N,)
        or L2-normalised embeddings (N, D); `flip` adds the mirrored images' raw outputs first."""
        out = self._run_batch(batch)
        if flip:
            out = out + self._run_batch(np.ascontiguousarray(batch[:, :, ::-1]))
        return self._finish(np.asarray(out, dtype=np.float32))

    def _forward(self, images, flip: bool = False) -> np.ndarray:
        items = _expand(images)
        if not items:
            raise FacekdError("no images given")
        return np.concatenate([self.infer(batch, flip) for batch in self._batches(items)])


class QualityOutputs:
    """`score` for a quality predictor (torch or ONNX)."""

    task = "quality"

    def _finish(self, raw: np.ndarray) -> np.ndarray:
        return raw.reshape(-1).astype(np.float32)

    def score(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Scores (N,) float32, one per image; higher = better quality."""
        return self._forward(images)


class EmbeddingOutputs:
    """`embed` for a recognition predictor (torch or ONNX)."""

    task = "recognition"

    def _finish(self, raw: np.ndarray) -> np.ndarray:
        return raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)

    def embed(self, images: ImageInput | Sequence[ImageInput], flip: bool = False) -> np.ndarray:
        """L2-normalised embeddings (N, D); `flip` adds the flipped image's embedding first."""
        return self._forward(images, flip=flip)


class _Predictor(_BatchPredictor):
    def __init__(self, model, device: str | torch.device = "cpu", batch_size: int = 64):
        super().__init__(model.geometry, batch_size)
        self.model = model.to(device).eval()
        self.device = torch.device(device)

    @property
    def info(self) -> dict:
        return {"task": self.model.task, "arch": self.model.arch, "input_size": self.input_size,
                "metrics": getattr(self.model, "metrics", {})}

    @torch.inference_mode()
    def _run_batch(self, batch: np.ndarray) -> np.ndarray:
        images = torch.from_numpy(batch)
        if self.device.type == "cuda":
            images = images.pin_memory().to(self.device, non_blocking=True)
        return self.model(self.model.normalize(images.to(self.device))).float().cpu().numpy()


class QualityModel(QualityOutputs, _Predictor):
    """A face image quality regressor: higher score = better quality (MOS scale when trained on MOS)."""


class FaceEmbedder(EmbeddingOutputs, _Predictor):
    """A face recognition network: L2-normalised embeddings compared by cosine similarity."""

    @property
    def embedding_size(self) -> int:
        return int(self.model.embedding_size)


def load(path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 64):
    """Load a facekd model file as a `QualityModel` or a `FaceEmbedder`, by its task.

    A `.onnx` file (from `facekd.export.export_onnx`) loads with ONNX Runtime on the CPU as an
    `OnnxQualityModel` or `OnnxFaceEmbedder` with the same `score`/`embed` API."""
    if Path(path).suffix.lower() == ".onnx":
        if torch.device(device).type != "cpu":
            raise ConfigError(f"{path}: ONNX models run with ONNX Runtime on the CPU; device {device!r} "
                              "is not supported (load the .safetensors file for other devices)")
        from facekd.export.runtime import load_onnx

        return load_onnx(path, batch_size=batch_size)
    from facekd.models.artifact import load_model

    model = load_model(path, device=device)
    predictor = {"quality": QualityModel, "recognition": FaceEmbedder}.get(model.task)
    if predictor is None:
        raise FacekdError(f"{path}: unknown model task {model.task!r}")
    return predictor(model, device=device, batch_size=batch_size)
