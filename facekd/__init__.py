"""facekd: knowledge distillation for face image quality assessment and face recognition.

`facekd.load(path)` returns a `QualityModel` (`.score(images)`) or a `FaceEmbedder`
(`.embed(images)`) from a model file."""

from __future__ import annotations

from facekd.version import __version__


def load(path, device="cpu", batch_size: int = 64, convention=None):
    """Load a `.safetensors` model file (PyTorch) or an `.onnx` file (ONNX Runtime, CPU) as a
    quality scorer or a face embedder; a recognizer graph from elsewhere (insightface's zoo)
    with its `convention` (`facekd.inference.InputConvention`)."""
    from facekd.inference.predictors import load as _load

    return _load(path, device=device, batch_size=batch_size, convention=convention)


__all__ = ["__version__", "load"]
