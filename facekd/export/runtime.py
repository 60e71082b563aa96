"""ONNX Runtime inference for models exported by `facekd.export.export_onnx`.

`load_onnx(path)` returns an `OnnxQualityModel` (`.score(images)`) or an `OnnxFaceEmbedder`
(`.embed(images, flip=False)`) with the same inputs and outputs as the PyTorch predictors of
`facekd.load`: paths, folders, image lists, arrays. The graph takes uint8 RGB NHWC images at the
model's input size with the normalization inside it; resizing happens here, as in PyTorch."""

from __future__ import annotations

import os
from pathlib import Path
import numpy as np

from facekd.errors import ConfigError, DataError
from facekd.models.artifact import ModelInfo, _parse_metadata
from facekd.io.decode import check_batch_size
from facekd.models.predictor import EmbeddingOutputs, QualityOutputs, _BatchPredictor

INPUT_NAME = "images"
OUTPUT_NAMES = {"quality": "scores", "recognition": "embeddings"}


def available_threads() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def session_options(threads: int | None = None, spinning: bool = True):
    """ONNX Runtime settings for CPU inference: `threads` intra-op threads (all available cores
    when None), one inter-op thread, every graph optimisation, warnings not printed.
    `spinning=False` makes idle threads sleep instead of busy-waiting, which leaves the cores
    to other work (image decoding) between runs."""
    import onnxruntime as ort

    check_threads(threads)
    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads or available_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: the library never prints
    return options


def check_threads(threads) -> None:
    """`threads` must be None or a positive integer (ConfigError otherwise)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer or None, got {threads!r}")


def make_session(model: bytes | str | os.PathLike, threads: int | None = None, spinning: bool = True):
    """A CPU `InferenceSession` for ONNX bytes or a file (errors are ONNX Runtime's own)."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=session_options(threads, spinning),
                                providers=["CPUExecutionProvider"])


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _open_session(path: str | os.PathLike, threads: int | None, spinning: bool = True):
    path = Path(path)
    check_threads(threads)
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        raise DataError(path, "is a folder, expected an .onnx model file")
    try:
        session = make_session(path, threads, spinning)
    except Exception as error:  # ONNX Runtime raises its own types (InvalidProtobuf, Fail, ...)
        raise DataError(path, f"not a readable ONNX model ({_first_line(error)})") from None
    info = _parse_metadata(path, dict(session.get_modelmeta().custom_metadata_map))
    _check_signature(path, session, info)
    return session, info


def _check_signature(path: Path, session, info: ModelInfo) -> None:
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


class _OnnxPredictor(_BatchPredictor):
    def __init__(self, path: str | os.PathLike, threads: int | None = None, batch_size: int = 64):
        check_batch_size(batch_size)
        session, info = _open_session(path, threads)
        self._attach(session, info, batch_size)

    @classmethod
    def _from_session(cls, session, info: ModelInfo, batch_size: int) -> "_OnnxPredictor":
        predictor = cls.__new__(cls)
        predictor._attach(session, info, batch_size)
        return predictor

    def _attach(self, session, info: ModelInfo, batch_size: int) -> None:
        if info.task != self.task:
            other = "OnnxFaceEmbedder" if info.task == "recognition" else "OnnxQualityModel"
            raise DataError(info.path, f"is a {info.task} model, not {self.task}; use {other} or load_onnx")
        _BatchPredictor.__init__(self, info.geometry, batch_size)
        self.path = info.path
        self.model_info = info
        self._session = session
        self._output = OUTPUT_NAMES[info.task]

    @property
    def info(self) -> dict:
        return {"task": self.model_info.task, "arch": self.model_info.arch, "input_size": self.input_size,
                "metrics": self.model_info.metrics, "format": "onnx", "path": str(self.path)}

    def _run_batch(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run([self._output], {INPUT_NAME: batch})[0]


class OnnxQualityModel(QualityOutputs, _OnnxPredictor):
    """A face image quality regressor on ONNX Runtime: higher score = better quality."""


class OnnxFaceEmbedder(EmbeddingOutputs, _OnnxPredictor):
    """A face recognition network on ONNX Runtime: L2-normalised embeddings (the graph's raw
    embeddings are normalised here, after the optional flip sum, exactly as `FaceEmbedder`)."""

    @property
    def embedding_size(self) -> int:
        return int(self.model_info.embedding_size or 0)


def load_onnx(path: str | os.PathLike, threads: int | None = None, batch_size: int = 64,
              spinning: bool = True) -> OnnxQualityModel | OnnxFaceEmbedder:
    """Open a facekd `.onnx` file with ONNX Runtime (CPU) as the predictor its task calls for.

    `threads`: intra-op threads (None = every core this process may use); `spinning`: see
    `session_options`. Unreadable, foreign or mismatched files raise `DataError` naming the file."""
    check_batch_size(batch_size)
    session, info = _open_session(path, threads, spinning)
    predictor = OnnxQualityModel if info.task == "quality" else OnnxFaceEmbedder
    return predictor._from_session(session, info, batch_size)


def read_onnx_info(path: str | os.PathLike) -> ModelInfo:
    """The facekd metadata of an exported `.onnx` file (no inference session is built)."""
    import onnx

    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        raise DataError(path, "is a folder, expected an .onnx model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf DecodeError and friends
        raise DataError(path, f"not a readable ONNX model ({_first_line(error)})") from None
    return _parse_metadata(path, {prop.key: prop.value for prop in model.metadata_props})
