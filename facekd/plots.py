"""Matplotlib figures without pyplot's global state: an Agg-backed `Figure`, its PNG bytes, and
an atomic PNG write that names the file when it fails."""

from __future__ import annotations

import io
import os
from pathlib import Path

from facekd.errors import DataError


def new_figure(width: float = 6.4, height: float = 4.8, layout: str | None = None):
    """A `matplotlib.figure.Figure` drawn by the Agg canvas (thread-safe, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def save_png(figure, path: str | os.PathLike, what: str) -> Path:
    """Write `figure` to `path` as PNG atomically; DataError("cannot write the <what>") on failure."""
    from facekd.io.atomic import atomic_write_bytes

    try:
        atomic_write_bytes(path, png_bytes(figure))
    except OSError as exc:
        raise DataError(path, f"cannot write the {what}: {exc.strerror or exc}") from None
    return Path(path)
