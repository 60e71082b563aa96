"""Input conventions of recognizers from elsewhere: an ONNX graph without facekd metadata
(insightface's model zoo, e.g. `w600k_r50.onnx`) takes float32 (batch, 3, S, S) images, RGB or
BGR, normalised (x − mean) / std outside the graph; its size S is read from the graph. A facekd
export needs none of this: its metadata and uint8 input say everything.

Preset `insightface`: RGB, mean = std = 127.5, as insightface's `ArcFaceONNX` feeds its zoo's
recognizers — or mean 0, std 1 when the graph's first nodes subtract and multiply (the
normalisation is inside), the same test that class makes."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from facekd.checks import real_number
from facekd.errors import ConfigError, DataError

PRESETS = ("insightface",)


@dataclass(frozen=True)
class InputConvention:
    """RGB or BGR channel order and the per-channel (mean, std) a foreign graph expects."""

    color: str = "RGB"
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)
    preset: str | None = None
    check_graph: bool = False  # the insightface preset's in-graph normalisation test is still to make

    def __post_init__(self) -> None:
        if self.color not in ("RGB", "BGR"):
            raise ConfigError(f"color must be RGB or BGR, got {self.color!r}")
        for name, values in (("input mean", self.mean), ("input std", self.std)):
            if len(values) != 3:
                raise ConfigError(f"{name} needs 1 or 3 numbers, got {list(values)}")
            for value in values:
                real_number(value, name, positive=name == "input std")

    @classmethod
    def from_options(cls, preset: str | None = None, mean: float | Sequence[float] | None = None,
                     std: float | Sequence[float] | None = None, bgr: bool = False) -> InputConvention | None:
        """The convention of `preset` with `mean`/`std`/`bgr` given on top; None when nothing is given."""
        if preset is None and mean is None and std is None and not bgr:
            return None
        if preset is not None and preset not in PRESETS:
            raise ConfigError(f"unknown input preset {preset!r}; choose from {', '.join(PRESETS)}")
        if preset is None and (mean is None or std is None):
            raise ConfigError("a recognizer without facekd metadata needs --input-mean and --input-std "
                              f"(or --preset {PRESETS[0]})")
        three = (lambda v: (float(v),) * 3 if np.ndim(v) == 0 else tuple(float(x) for x in v))
        defaults = cls()
        return cls("BGR" if bgr else "RGB", defaults.mean if mean is None else three(mean),
                   defaults.std if std is None else three(std), preset,
                   check_graph=preset == "insightface" and mean is None and std is None)

    def for_graph(self, path: str | os.PathLike) -> InputConvention:
        """This convention for the graph `path`, after the `insightface` preset's in-graph test."""
        if not self.check_graph:
            return self
        inside = _normalises_inside(Path(path))
        return InputConvention(self.color, (0.0,) * 3 if inside else self.mean, (1.0,) * 3 if inside else self.std,
                               self.preset)

    def apply(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) RGB → float32 (N, 3, S, S) in this convention."""
        x = images[..., ::-1] if self.color == "BGR" else images
        x = (x.astype(np.float32) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def model_fingerprint(path: str | os.PathLike, convention: InputConvention | None) -> str:
    """What makes a model file's outputs: its content hash, with the input convention given
    for a recognizer from elsewhere. Batch jobs and teacher caches compare it to resume."""
    from facekd.io.formats import file_digest

    digest = file_digest(path)
    return digest if convention is None else digest + json.dumps(convention.to_dict())


def _normalises_inside(path: Path) -> bool:
    """insightface's test: a Sub and a Mul among the graph's first 8 nodes (by node name)."""
    import onnx

    try:
        nodes = onnx.load(str(path), load_external_data=False).graph.node[:8]
    except Exception as error:  # protobuf DecodeError and friends
        raise DataError(path, f"not a readable ONNX model ({type(error).__name__})") from None
    names = [node.name for node in nodes]
    return any(n.startswith(("Sub", "_minus")) for n in names) and any(n.startswith(("Mul", "_mul")) for n in names)


def foreign_info(path: Path, session, convention: InputConvention):
    """The `ModelInfo` of a recognizer graph without facekd metadata, from its input and output
    shapes; DataError when they are not (batch, 3, S, S) float32 → (batch, D)."""
    from facekd.models.artifact import ModelInfo

    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = list(inputs[0].shape) if len(inputs) == 1 else []
    if len(inputs) != 1 or inputs[0].type != "tensor(float)" or len(shape) != 4 or shape[1] != 3 \
            or not isinstance(shape[2], int) or shape[2] != shape[3]:
        found = ", ".join(f"{i.name}: {i.type} {i.shape}" for i in inputs) or "none"
        raise DataError(path, f"no facekd metadata, and its input is not one float32 (batch, 3, S, S) tensor "
                              f"as a recognizer's from elsewhere should be (found {found})")
    out_shape = list(outputs[0].shape)
    if len(out_shape) != 2:
        raise DataError(path, f"no facekd metadata, and its output {outputs[0].name} {out_shape} is not "
                              "(batch, D) embeddings")
    size = out_shape[1]
    if not isinstance(size, int):  # a dynamic embedding axis: run one blank image to see it
        blank = np.zeros((1, 3, shape[2], shape[2]), dtype=np.float32)
        size = int(session.run([outputs[0].name], {inputs[0].name: blank})[0].shape[1])
    return ModelInfo(path=path, task="recognition", arch=f"onnx/{path.name}", input_size=shape[2], options={},
                     normalization={"mean": list(convention.mean), "std": list(convention.std)},
                     embedding_size=size, facekd_version="",
                     training_config={"input_convention": convention.to_dict()})
