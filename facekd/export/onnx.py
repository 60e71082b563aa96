"""Export a facekd model to ONNX with the normalization inside the graph.

The exported graph takes `images`: uint8 RGB (batch, S, S, 3) at the model's input size S, so a
runtime needs no mean/std, and returns `scores` (batch,) for a quality model or `embeddings`
(batch, D) for a recognition model. Embeddings are the network's raw output, NOT L2-normalised
(normalise them before cosine similarity; `OnnxFaceEmbedder.embed` does, after its flip sum).
The batch axis is dynamic. The file's `metadata_props` hold the same facekd metadata as a
`.safetensors` model file, so `facekd.load("model.onnx")` knows what it is."""

from __future__ import annotations

import copy
import io
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facekd.version import __version__
from facekd.checks import real_number, whole_number
from facekd.errors import ConfigError, DataError, FacekdError
from facekd.inference.predictors import INPUT_NAME, OUTPUT_NAMES, first_line, make_session, preprocess, torch_outputs
from facekd.io.atomic import atomic_write_bytes
from facekd.models.artifact import model_metadata
from facekd.progress import Progress

DEFAULT_OPSET = 17
MIN_OPSET = 13  # dynamic-axis Squeeze/Unsqueeze and the ops every facekd model needs


@dataclass
class ExportReport:
    """What `export_onnx` wrote and how closely ONNX Runtime matched PyTorch on it."""

    path: Path
    opset: int
    input_name: str
    input_shape: tuple  # ("batch", S, S, 3), uint8 RGB
    output_name: str
    output_shape: tuple  # ("batch",) or ("batch", D)
    checked: bool
    max_abs_diff: float | None  # ORT vs PyTorch on random images; None when not checked
    export_seconds: float
    size_bytes: int


class _UInt8Images(nn.Module):
    """uint8 NHWC RGB images → the model's normalised NCHW input (`preprocess`) → its output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(preprocess(images, self.model.normalization))


def onnx_metadata(model) -> dict[str, str]:
    """The facekd metadata of `model` as ONNX `metadata_props` (same keys as a model file)."""
    task = model.task
    return {
        **model_metadata(model, getattr(model, "training_config", None), getattr(model, "metrics", None)),
        "onnx_input": json.dumps({"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "color": "RGB",
                                  "normalized_in_graph": True}),
        "onnx_output": json.dumps({"name": OUTPUT_NAMES[task], "l2_normalized": False}),
    }


def _check_options(opset, batch_for_check, atol) -> None:
    import onnx

    whole_number(opset, "opset", MIN_OPSET, onnx.defs.onnx_opset_version())
    whole_number(batch_for_check, "batch_for_check")
    real_number(atol, "atol", minimum=0)


def _source_model(model_or_path):
    """A CPU eval-mode FaceModel: loaded from a model file, or a copy of the given one."""
    from facekd.models.artifact import load_model
    from facekd.models.registry import FaceModel

    if isinstance(model_or_path, FaceModel):
        return copy.deepcopy(model_or_path).cpu().eval()
    if isinstance(model_or_path, (str, os.PathLike)):
        return load_model(model_or_path, device="cpu")
    raise ConfigError(f"expected a model file path or a FaceModel, got {type(model_or_path).__name__}")


def _trace_to_onnx(model, opset: int) -> bytes:
    size = model.input_size
    output = OUTPUT_NAMES[model.task]
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript-based exporter is deprecated but needs no onnxscript; keep its notes quiet
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            torch.onnx.export(
                _UInt8Images(model).eval(), (example,), buffer, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[output], do_constant_folding=True,
                dynamic_axes={INPUT_NAME: {0: "batch"}, output: {0: "batch"}},
            )
        except Exception as error:
            raise FacekdError(f"ONNX export of {model.arch!r} at opset {opset} failed: {first_line(error)}") from error
    return buffer.getvalue()


def _max_difference(data: bytes, model, batch: int) -> tuple[float, float]:
    """Max |ORT − PyTorch| on `batch` random images (and on the first alone, batch 1), and the
    largest |PyTorch output| (the scale the tolerance is relative to)."""
    size = model.input_size
    images = np.random.default_rng(0).integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
    output = OUTPUT_NAMES[model.task]
    expected = torch_outputs(model, images)
    try:
        session = make_session(data)
        got = session.run([output], {INPUT_NAME: images})[0]
        single = session.run([output], {INPUT_NAME: images[:1]})[0]
    except Exception as error:  # ONNX Runtime's own error types
        raise FacekdError(f"ONNX Runtime cannot run the exported {model.arch!r} graph: {first_line(error)}") from None
    if got.shape != expected.shape or single.shape != expected[:1].shape:
        raise FacekdError(f"ONNX output shape {got.shape} (batch 1: {single.shape}) differs from "
                          f"PyTorch's {expected.shape}")
    diff = max(float(np.max(np.abs(got - expected))), float(np.max(np.abs(single - expected[:1]))))
    return diff, float(np.max(np.abs(expected)))


def export_onnx(model_path, out_path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, check: bool = True,
                batch_for_check: int = 3, atol: float = 1e-4,
                progress: Progress | None = None) -> ExportReport:
    """Export a facekd model file (or a FaceModel) to `out_path` (.onnx) with a dynamic batch axis.

    The graph takes uint8 RGB NHWC `images` and returns `scores` (B,) or raw, un-normalised
    `embeddings` (B, D). With `check`, ONNX Runtime and PyTorch run on `batch_for_check`
    random images (and on one alone); a max abs difference above `atol` × max(1, largest
    |output|) raises `FacekdError`. The graph is checked before anything is written, and the
    file is written atomically: on any failure `out_path` is left as it was."""
    import onnx

    _check_options(opset, batch_for_check, atol)
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".onnx":
        raise ConfigError(f"{out_path}: the ONNX output file name must end in .onnx")
    if out_path.is_dir():
        raise DataError(out_path, "is a folder, expected an .onnx file name")
    progress = progress or Progress()
    with progress.task("export ONNX", total=3 if check else 2) as bar:
        model = _source_model(model_path)
        start = time.perf_counter()
        exported = onnx.load_from_string(_trace_to_onnx(model, opset))
        for key, value in onnx_metadata(model).items():
            exported.metadata_props.add(key=key, value=value)
        exported.producer_name = "facekd"
        exported.producer_version = __version__
        exported.doc_string = (f"facekd {model.task} model {model.arch}: uint8 RGB NHWC images "
                               f"(batch, {model.input_size}, {model.input_size}, 3) -> {OUTPUT_NAMES[model.task]}")
        try:
            onnx.checker.check_model(exported)
        except onnx.checker.ValidationError as error:
            raise FacekdError(f"the exported ONNX graph of {model.arch!r} is invalid: {error}") from None
        data = exported.SerializeToString()
        seconds = time.perf_counter() - start
        bar.advance()
        diff = None
        if check:
            diff, scale = _max_difference(data, model, batch_for_check)
            if not diff <= atol * max(1.0, scale):
                raise FacekdError(f"{out_path}: not written, ONNX Runtime differs from PyTorch by {diff:.3g} "
                                  f"(max abs, outputs up to {scale:.3g}), above atol {atol:g}")
            bar.advance()
        atomic_write_bytes(out_path, data)
        bar.advance()
    size = model.input_size
    output_shape = ("batch",) if model.task == "quality" else ("batch", int(model.embedding_size))
    return ExportReport(path=out_path, opset=opset, input_name=INPUT_NAME, input_shape=("batch", size, size, 3),
                        output_name=OUTPUT_NAMES[model.task], output_shape=output_shape, checked=check,
                        max_abs_diff=diff, export_seconds=seconds, size_bytes=len(data))


def read_onnx_info(path: str | os.PathLike):
    """The facekd metadata (`ModelInfo`) of an exported `.onnx` file; no inference session is built."""
    import onnx

    from facekd.models.artifact import check_model_path, parse_metadata

    path = Path(path)
    check_model_path(path, ".onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf DecodeError and friends
        raise DataError(path, f"not a readable ONNX model ({first_line(error)})") from None
    return parse_metadata(path, {prop.key: prop.value for prop in model.metadata_props})
