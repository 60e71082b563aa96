"""facekd.export: ONNX export and ONNX Runtime inference.

    report = export_onnx("student.safetensors", "student.onnx")   # checked against PyTorch
    scorer = load_onnx("student.onnx")                             # or facekd.load("student.onnx")
    scores = scorer.score("faces/")

The graph takes uint8 RGB NHWC images at the model's input size (normalization inside) and
returns `scores` (B,) or raw `embeddings` (B, D); `onnx` and `onnxruntime` load only when used."""

from __future__ import annotations

from facekd.export.onnx import ExportReport, export_onnx, onnx_metadata
from facekd.export.runtime import OnnxFaceEmbedder, OnnxQualityModel, load_onnx, read_onnx_info

__all__ = ["ExportReport", "OnnxFaceEmbedder", "OnnxQualityModel", "export_onnx", "load_onnx",
           "onnx_metadata", "read_onnx_info"]
