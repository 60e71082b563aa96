"""facekd: knowledge distillation for face image quality assessment and face recognition."""

__version__ = "0.1.0"
