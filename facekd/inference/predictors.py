"""One home for inference: preprocessing, flip, and the predictors on PyTorch and ONNX Runtime.

`facekd.load(path)` returns a `QualityModel` (`.score(images)`) or a `FaceEmbedder`
(`.embed(images, flip=False)`); `load_onnx(path)` their ONNX Runtime twins with the same API.
Images may be paths, a folder (recursive), an image-list file (.txt/.lst), an RGB uint8 array
(HxWx3), a batch array (NxHxWx3), or a sequence of any of these; they are resized to the model's
input as the model file says (`Resize`) and are assumed to be cropped/aligned faces.

Every batch prediction of the package goes through `BatchPredictor.infer` / `raw` on uint8 NHWC
RGB batches at the input size: `preprocess` is the one normalisation (also used by the
training sets and the ONNX graph), `mirror` the one horizontal flip. The ONNX graph takes the
uint8 images with the normalisation inside it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn

from facekd.checks import whole_number
from facekd.errors import ConfigError, DataError, FacekdError
from facekd.inference.conventions import InputConvention, foreign_info
from facekd.io.decode import check_batch_size
from facekd.models.cost import model_device

__all__ = ["EmbeddingOutputs", "FaceEmbedder", "InputConvention", "OnnxFaceEmbedder", "OnnxQualityModel", "QualityModel",
           "QualityOutputs", "available_threads", "check_normalization", "evaluating", "load", "load_onnx",
           "make_session", "mirror", "model_device", "preprocess", "torch_outputs"]

ImageInput = Union[str, os.PathLike, np.ndarray]
INPUT_NAME = "images"
OUTPUT_NAMES = {"quality": "scores", "recognition": "embeddings"}


# --------------------------------------------------------------------------------------------
# Preprocessing and flip


def check_normalization(normalization: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """`{'mean': [3 numbers], 'std': [3 numbers]}` (finite means, positive stds) as lists of floats."""
    try:
        mean = np.asarray(normalization["mean"], dtype=np.float32).reshape(-1)
        std = np.asarray(normalization["std"], dtype=np.float32).reshape(-1)
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"normalization must be {{'mean': [3 numbers], 'std': [3 numbers]}}, "
                          f"got {normalization!r}") from None
    if mean.shape != (3,) or std.shape != (3,) or not np.isfinite(mean).all() or not (std > 0).all():
        raise ConfigError(f"normalization needs 3 finite means and 3 positive stds, got {dict(normalization)!r}")
    return {"mean": [float(v) for v in normalization["mean"]], "std": [float(v) for v in normalization["std"]]}


def preprocess(images: torch.Tensor | np.ndarray, normalization: Mapping[str, Sequence[float]],
               device: torch.device | str | None = None) -> torch.Tensor:
    """RGB images in [0, 255] (uint8 or float) → float32 NCHW `(x - mean) / std` on `device`.

    Accepts (H, W, 3), (3, H, W), (B, H, W, 3) or (B, 3, H, W); when both the last and the
    channel-first axes have size 3, the last axis is taken as channels (NHWC)."""
    if isinstance(images, np.ndarray):
        if images.dtype.kind not in "uif":
            raise FacekdError(f"images must be numeric (uint8 or float), got dtype {images.dtype}")
        images = torch.from_numpy(np.require(images, requirements=("C", "W")))  # a read-only array is copied
    if not isinstance(images, torch.Tensor):
        raise FacekdError(f"images must be a tensor or numpy array, got {type(images).__name__}")
    if images.dtype == torch.bool or images.is_complex():
        raise FacekdError(f"images must be uint8 or float, got {images.dtype}")
    batch = images.unsqueeze(0) if images.ndim == 3 else images
    if batch.ndim != 4:
        raise FacekdError(f"images must have 3 or 4 dimensions (HWC/CHW or NHWC/NCHW), got shape "
                          f"{tuple(images.shape)}")
    if batch.shape[-1] == 3:
        batch = batch.permute(0, 3, 1, 2)
    elif batch.shape[1] != 3:
        raise FacekdError(f"images must have 3 RGB channels (first or last axis), got shape "
                          f"{tuple(images.shape)}")
    if device is not None:
        batch = batch.to(device, non_blocking=True)
    batch = batch.float()
    mean = torch.tensor(normalization["mean"], dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(normalization["std"], dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    return ((batch - mean) / std).contiguous()


def mirror(images: np.ndarray) -> np.ndarray:
    """The horizontal mirror of a uint8 NHWC batch (the flip of flip-augmented inference)."""
    return np.ascontiguousarray(images[:, :, ::-1])


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode for the block, its training mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def torch_outputs(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """A FaceModel's raw float32 outputs on a uint8 NHWC batch, on the model's device, under
    `torch.inference_mode()` (the caller sets eval mode: see `evaluating`)."""
    device = model_device(model)
    batch = torch.from_numpy(np.require(images, requirements=("C", "W")))  # a read-only array is copied
    if device.type == "cuda":
        batch = batch.pin_memory()
    with torch.inference_mode():
        return model(preprocess(batch, model.normalization, device)).float().cpu().numpy()


# --------------------------------------------------------------------------------------------
# Predictors


def _expand(images: ImageInput | Sequence[ImageInput]) -> list[Path | np.ndarray]:
    from facekd.io.formats import resolve_inputs

    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, (str, os.PathLike)):
        return list(resolve_inputs([images]))
    items: list[Path | np.ndarray] = []
    for item in images:
        items.extend(_expand(item) if isinstance(item, np.ndarray) else resolve_inputs([item]))
    return items


class BatchPredictor:
    """Input handling shared by every predictor: expand inputs, read and resize images, run
    them in batches. Subclasses give `run_batch(uint8 NHWC batch) -> raw outputs` and the
    task's `finish(raw, count) -> scores or embeddings`."""

    task = ""

    def __init__(self, geometry, batch_size: int = 64):
        self.batch_size = check_batch_size(batch_size)
        self.geometry = geometry  # facekd.io.images.Resize
        self.input_size = geometry.size

    def run_batch(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def finish(self, raw: np.ndarray, count: int) -> np.ndarray:
        raise NotImplementedError

    def raw(self, batch: np.ndarray, flip: bool = False) -> np.ndarray:
        """Raw float32 outputs for one uint8 (N, S, S, 3) RGB batch at the input size; `flip`
        adds those of the mirrored images."""
        out = np.asarray(self.run_batch(batch), dtype=np.float32)
        if flip:
            out = out + np.asarray(self.run_batch(mirror(batch)), dtype=np.float32)
        return out

    def infer(self, batch: np.ndarray, flip: bool = False) -> np.ndarray:
        """Scores (N,) or L2-normalised embeddings (N, D) for one batch (see `raw`)."""
        return self.finish(self.raw(batch, flip), len(batch))

    def _load(self, item: Path | np.ndarray) -> np.ndarray:
        from facekd.io.images import read_image, to_rgb_uint8

        return self.geometry(to_rgb_uint8(item) if isinstance(item, np.ndarray) else read_image(item))

    def _forward(self, images, flip: bool = False) -> np.ndarray:
        items = _expand(images)
        if not items:
            raise FacekdError("no images given")
        batches = (np.stack([self._load(item) for item in items[start:start + self.batch_size]])
                   for start in range(0, len(items), self.batch_size))
        return np.concatenate([self.infer(batch, flip) for batch in batches])


class QualityOutputs:
    """`score` for a quality predictor (torch or ONNX)."""

    task = "quality"

    def finish(self, raw: np.ndarray, count: int) -> np.ndarray:
        if raw.size != count:
            raise FacekdError(f"the model returned {raw.shape} for {count} images; "
                              "expected one score per image (is it a quality model?)")
        return raw.reshape(-1)

    def score(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Scores (N,) float32, one per image; higher = better quality."""
        return self._forward(images)


class EmbeddingOutputs:
    """`embed` for a recognition predictor (torch or ONNX)."""

    task = "recognition"

    def finish(self, raw: np.ndarray, count: int) -> np.ndarray:
        return raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)

    def embed(self, images: ImageInput | Sequence[ImageInput], flip: bool = False) -> np.ndarray:
        """L2-normalised embeddings (N, D); `flip` adds the flipped image's embedding first."""
        return self._forward(images, flip=flip)


class TorchPredictor(BatchPredictor):
    """A FaceModel in eval mode on `device` (None: where it is, not moved)."""

    def __init__(self, model, device: str | torch.device | None = "cpu", batch_size: int = 64):
        super().__init__(model.geometry, batch_size)
        self.model = (model if device is None else model.to(device)).eval()
        self.device = model_device(self.model)

    @property
    def info(self) -> dict:
        return {"task": self.model.task, "arch": self.model.arch, "input_size": self.input_size,
                "metrics": getattr(self.model, "metrics", {})}

    def run_batch(self, batch: np.ndarray) -> np.ndarray:
        return torch_outputs(self.model, batch)


class QualityModel(QualityOutputs, TorchPredictor):
    """A face image quality regressor: higher score = better quality (MOS scale when trained on MOS)."""


class FaceEmbedder(EmbeddingOutputs, TorchPredictor):
    """A face recognition network: L2-normalised embeddings compared by cosine similarity."""

    @property
    def embedding_size(self) -> int:
        return int(self.model.embedding_size)


# --------------------------------------------------------------------------------------------
# ONNX Runtime


def available_threads() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def check_threads(threads) -> None:
    """`threads` must be None or a positive integer (ConfigError otherwise)."""
    if threads is not None:
        whole_number(threads, "threads", note=" or None")


def make_session(model: bytes | str | os.PathLike, threads: int | None = None, spinning: bool = True):
    """A CPU `InferenceSession` for ONNX bytes or a file (errors are ONNX Runtime's own):
    `threads` intra-op threads (all available cores when None), one inter-op thread, every graph
    optimisation, warnings not printed. `spinning=False` makes idle threads sleep instead of
    busy-waiting, which leaves the cores to other work (image decoding) between runs."""
    import onnxruntime as ort

    check_threads(threads)
    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads or available_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: the library never prints
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def first_line(error: Exception) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _check_signature(path: Path, session, info) -> None:
    """The graph must take uint8 (batch, S, S, 3) `images` and give the task's output."""
    expected_output = OUTPUT_NAMES.get(info.task)
    if expected_output is None:
        raise DataError(path, f"unknown model task {info.task!r} in its facekd metadata")
    inputs, outputs = session.get_inputs(), session.get_outputs()
    size = info.input_size
    problems = []
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].type != "tensor(uint8)":
        found = ", ".join(f"{i.name}: {i.type}" for i in inputs) or "none"
        problems.append(f"expected one input '{INPUT_NAME}' of uint8, found {found}")
    elif list(inputs[0].shape[1:]) != [size, size, 3]:
        problems.append(f"input shape {inputs[0].shape} is not (batch, {size}, {size}, 3)")
    if expected_output not in [o.name for o in outputs]:
        found = ", ".join(o.name for o in outputs) or "none"
        problems.append(f"expected output '{expected_output}', found {found}")
    if problems:
        raise DataError(path, "ONNX graph does not match its facekd metadata: " + "; ".join(problems))


def _open_session(path: Path, threads: int | None, spinning: bool, convention: InputConvention | None):
    """(session, ModelInfo, convention) of a checked `.onnx` file: a facekd export (convention
    None), or a recognizer from elsewhere in the given `InputConvention`."""
    from facekd.models.artifact import FORMAT, check_model_path, parse_metadata

    check_threads(threads)
    check_model_path(path, ".onnx")
    try:
        session = make_session(path, threads, spinning)
    except Exception as error:  # ONNX Runtime raises its own types (InvalidProtobuf, Fail, ...)
        raise DataError(path, f"not a readable ONNX model ({first_line(error)})") from None
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    if metadata.get("format") != FORMAT:
        if convention is None:
            raise DataError(path, "not a facekd model file (no facekd metadata); as a recognizer from elsewhere it "
                                  "needs its input convention (--preset insightface, or --input-mean/--input-std "
                                  "[--bgr])")
        convention = convention.for_graph(path)
        return session, foreign_info(path, session, convention), convention
    if convention is not None:
        raise ConfigError(f"{path}: a facekd export carries its input convention; drop --preset, --input-mean, "
                          "--input-std and --bgr")
    info = parse_metadata(path, metadata)
    _check_signature(path, session, info)
    return session, info, None


class OnnxPredictor(BatchPredictor):
    """An exported `.onnx` file on ONNX Runtime (CPU); see `load_onnx`."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, batch_size: int = 64,
                 spinning: bool = True, *, convention: InputConvention | None = None, opened: tuple | None = None):
        path = Path(path)
        check_batch_size(batch_size)
        session, info, self.convention = opened or _open_session(path, threads, spinning, convention)
        if info.task != self.task:
            other = "OnnxFaceEmbedder" if info.task == "recognition" else "OnnxQualityModel"
            raise DataError(path, f"is a {info.task} model, not {self.task}; use {other} or load_onnx")
        super().__init__(info.geometry, batch_size)
        self.path, self.model_info, self._session = path, info, session
        foreign = self.convention is not None
        self._input = session.get_inputs()[0].name if foreign else INPUT_NAME
        self._output = session.get_outputs()[0].name if foreign else OUTPUT_NAMES[info.task]

    @property
    def info(self) -> dict:
        convention = {"input_convention": self.convention.to_dict()} if self.convention else {}
        return {"task": self.model_info.task, "arch": self.model_info.arch, "input_size": self.input_size,
                "metrics": self.model_info.metrics, "format": "onnx", "path": str(self.path), **convention}

    def run_batch(self, batch: np.ndarray) -> np.ndarray:
        images = batch if self.convention is None else self.convention.apply(batch)
        return self._session.run([self._output], {self._input: images})[0]


class OnnxQualityModel(QualityOutputs, OnnxPredictor):
    """A face image quality regressor on ONNX Runtime: higher score = better quality."""


class OnnxFaceEmbedder(EmbeddingOutputs, OnnxPredictor):
    """A face recognition network on ONNX Runtime: L2-normalised embeddings (the graph's raw
    embeddings are normalised here, after the optional flip sum, exactly as `FaceEmbedder`)."""

    @property
    def embedding_size(self) -> int:
        return int(self.model_info.embedding_size or 0)


def load_onnx(path: str | os.PathLike, threads: int | None = None, batch_size: int = 64,
              spinning: bool = True, convention: InputConvention | None = None) -> OnnxQualityModel | OnnxFaceEmbedder:
    """Open an `.onnx` file with ONNX Runtime (CPU) as the predictor its task calls for: a facekd
    export, or (with its `convention`) a recognizer from elsewhere, e.g. insightface's zoo.

    `threads`: intra-op threads (None = every core this process may use); `spinning`: see
    `make_session`. Unreadable or mismatched files raise `DataError` naming the file."""
    check_batch_size(batch_size)
    opened = _open_session(Path(path), threads, spinning, convention)
    predictor = OnnxQualityModel if opened[1].task == "quality" else OnnxFaceEmbedder
    return predictor(path, threads, batch_size, spinning, opened=opened)


def load(path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 64,
         convention: InputConvention | None = None):
    """Load a facekd model file as a `QualityModel` or a `FaceEmbedder`, by its task.

    A `.onnx` file loads with ONNX Runtime on the CPU as an `OnnxQualityModel` or
    `OnnxFaceEmbedder` with the same `score`/`embed` API: a facekd export as it is, a
    recognizer from elsewhere with its `convention` (`InputConvention.from_options(preset=
    "insightface")` for insightface's model zoo)."""
    if Path(path).suffix.lower() == ".onnx":
        if torch.device(device).type != "cpu":
            raise ConfigError(f"{path}: ONNX models run with ONNX Runtime on the CPU; device {device!r} "
                              "is not supported (load the .safetensors file for other devices)")
        return load_onnx(path, batch_size=batch_size, convention=convention)
    if convention is not None:
        raise ConfigError(f"{path}: a facekd model file carries its input convention; drop --preset, "
                          "--input-mean, --input-std and --bgr")
    from facekd.models.artifact import load_model

    model = load_model(path, device=device)
    predictor = {"quality": QualityModel, "recognition": FaceEmbedder}.get(model.task)
    if predictor is None:
        raise FacekdError(f"{path}: unknown model task {model.task!r}")
    return predictor(model, device=device, batch_size=batch_size)
