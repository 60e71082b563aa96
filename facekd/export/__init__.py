"""facekd.export: write a model as ONNX and check the graph against PyTorch.

    report = export_onnx("student.safetensors", "student.onnx")   # checked against PyTorch
    scorer = facekd.load("student.onnx")                          # ONNX Runtime, facekd.inference

The graph takes uint8 RGB NHWC images at the model's input size (normalization inside) and
returns `scores` (B,) or raw `embeddings` (B, D); `onnx` and `onnxruntime` load only when used."""

from __future__ import annotations

from facekd.export.onnx import ExportReport, export_onnx, onnx_metadata, read_onnx_info

__all__ = ["ExportReport", "export_onnx", "onnx_metadata", "read_onnx_info"]
