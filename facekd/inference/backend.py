"""Open a model file for batch inference on the fastest backend of this machine.

`open_model(path, backend="auto")` returns a predictor (`QualityModel`, `FaceEmbedder` or their
ONNX Runtime twins) and a `BackendChoice` saying what runs it and why. On the CPU, "auto"
exports the model to ONNX once (cached by the model file's hash, see `cache_dir`), times one
batch on PyTorch and on ONNX Runtime with the thread settings the job will use, and keeps the
faster. On a GPU it is PyTorch (the ONNX Runtime wheel here is CPU-only)."""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from facekd.errors import ConfigError, DataError, FacekdError
from facekd.io.formats import file_digest
from facekd.progress import Progress

__all__ = ["BACKENDS", "BackendChoice", "cache_dir", "cached_onnx", "open_model", "resolve_device"]

BACKENDS = ("auto", "torch", "onnx")
SMALL_BATCH = 8  # "auto" also times this batch size: with one thread it often beats a big batch
PROBE_SECONDS = 0.5  # time each candidate gets after a warm-up batch (at least two runs)


@dataclass
class BackendChoice:
    """What runs a job: `backend` ("torch" or "onnx"), `device`, intra-op `threads`, the
    `batch_size` the job should use, and the images/s of each "backend/threads/batch" that
    "auto" timed (else empty)."""

    backend: str
    device: str
    threads: int
    batch_size: int
    reason: str
    probe: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def cache_dir() -> Path:
    """Where exported models are cached: $FACEKD_CACHE_DIR, else $XDG_CACHE_HOME/facekd, else
    ~/.cache/facekd."""
    if os.environ.get("FACEKD_CACHE_DIR"):
        return Path(os.environ["FACEKD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "facekd"


def cached_onnx(model_path: str | os.PathLike, digest: str | None = None) -> Path:
    """The ONNX export of a `.safetensors` model file, made once and kept in `cache_dir()`
    under the file's content hash (a changed model file gets a new export)."""
    from facekd.export import export_onnx

    digest = digest or file_digest(model_path)
    target = cache_dir() / "onnx" / f"{digest}.onnx"
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DataError(target.parent, f"cannot create the model cache ({error.strerror or error}); "
                                           "set FACEKD_CACHE_DIR to a writable folder") from None
        export_onnx(model_path, target)
    return target


def resolve_device(device: str) -> str:
    """"auto" → "cuda:<LOCAL_RANK>" when CUDA is available (one GPU per torchrun process), else
    "cpu"; any other value is checked and returned."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
        return "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: CUDA is not available on this machine")
    return str(parsed)


def _images_per_second(predictor, batch: np.ndarray) -> float:
    """Median rate over ~`PROBE_SECONDS` after a warm-up run; one timed run when a run takes longer."""
    predictor.infer(batch)  # warm-up: allocations, lazy initialisation
    times: list[float] = []
    deadline = time.perf_counter() + PROBE_SECONDS
    while not times or (time.perf_counter() < deadline and len(times) < 20) or (len(times) < 2 and times[0] < PROBE_SECONDS):
        start = time.perf_counter()
        predictor.infer(batch)
        times.append(time.perf_counter() - start)
    return len(batch) / statistics.median(times)


def decode_seconds(paths: Sequence[os.PathLike], size) -> float:
    """CPU seconds one thread spends decoding and resizing one of `paths` (median), 0 if none decode."""
    from facekd.io.decode import load_one

    times = []
    for path in paths:
        start = time.perf_counter()
        if not isinstance(load_one(path, size), str):
            times.append(time.perf_counter() - start)
    return statistics.median(times) if times else 0.0


def pipeline_rate(inference_rate: float, threads: int, decode_cost: float, cores: int) -> float:
    """Images/s of decoding overlapped with inference on `cores`: the model runs one batch at a
    time (≤ `inference_rate`), and decoding (`decode_cost` core-seconds an image) shares the
    cores with the inference threads (`threads / inference_rate` core-seconds an image)."""
    return min(inference_rate, cores / (decode_cost + threads / inference_rate))


def thread_counts(cores: int) -> list[int]:
    """Inference thread counts worth trying: powers of two below `cores`, and `cores`."""
    counts, n = [], 1
    while n < cores:
        counts.append(n)
        n *= 2
    return counts + [cores]


def open_model(model_path: str | os.PathLike, *, backend: str = "auto", device: str = "cpu",
               threads: int | None = None, batch_size: int = 64, decode_sample: Sequence[os.PathLike] = (),
               progress: Progress | None = None, convention=None):
    """`(predictor, BackendChoice)` for a model file (see the module doc).

    "auto" on the CPU picks the backend, the number of inference threads (unless `threads` is
    given) and the batch size (`batch_size` or a small one) that make the whole job fastest:
    it times each candidate on random images and,
    with `decode_sample` (a few of the job's images), weighs that against the time decoding
    needs on the same cores (`pipeline_rate`). A small model beside heavy JPEG decoding often
    does best with one thread; a big one takes every core. With PyTorch the thread count is
    `torch.set_num_threads`, a process-wide setting. ONNX Runtime threads sleep when idle, so
    decoding threads get the cores between batches. `convention`: the `InputConvention` of an
    `.onnx` recognizer from elsewhere (see `facekd.inference.predictors.load`)."""
    import torch

    from facekd.inference.predictors import available_threads, check_threads, load, load_onnx

    from facekd.io.decode import check_batch_size

    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    check_threads(threads)
    batch_size = check_batch_size(batch_size)
    progress = progress or Progress()
    path = Path(model_path)
    device = resolve_device(device)
    cores = available_threads()
    is_onnx = path.suffix.lower() == ".onnx"
    if is_onnx and backend == "torch":
        raise ConfigError(f"{path}: an .onnx file runs on ONNX Runtime; give the .safetensors file for torch")
    if device != "cpu" and (backend == "onnx" or is_onnx):
        raise ConfigError(f"{path}: ONNX Runtime runs on the CPU here; use --device cpu or the torch backend")

    onnx_file = path if is_onnx else None  # the export, made (or found in the cache) once

    def make(name: str, count: int):
        nonlocal onnx_file
        if name == "onnx":
            onnx_file = onnx_file or cached_onnx(path)
            return load_onnx(onnx_file, threads=count, batch_size=batch_size, spinning=False, convention=convention)
        torch.set_num_threads(count)
        return load(path, device=device, batch_size=batch_size, convention=convention)

    if backend == "torch" or (backend == "auto" and device != "cpu"):
        reason = "asked for" if backend == "torch" else f"{device} runs PyTorch"
        return make("torch", threads or cores), BackendChoice("torch", device, threads or cores, batch_size,
                                                              reason, {})
    if is_onnx or backend == "onnx":
        reason = "an .onnx model file" if is_onnx else "asked for"
        return make("onnx", threads or cores), BackendChoice("onnx", "cpu", threads or cores, batch_size,
                                                             reason, {})
    names = ["torch"]
    if importlib.util.find_spec("onnxruntime") is not None:
        try:
            onnx_file = cached_onnx(path)
            names.append("onnx")
        except FacekdError as error:
            progress.log(f"ONNX export failed, staying on PyTorch: {error}")
    first = make("torch", threads or cores)
    size = first.input_size
    decode_cost = decode_seconds(decode_sample, first.geometry)
    images = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    batches = sorted({min(SMALL_BATCH, batch_size), batch_size})
    progress.log(f"timing {' and '.join(names)} on {path.name} (batches of {' and '.join(map(str, batches))})")
    probe: dict[str, float] = {}
    best: tuple[float, str, int, int] | None = None
    for name in names:
        counts = [threads] if threads else sorted(thread_counts(cores), reverse=True)
        for count in counts:
            predictor = first if (name, count) == ("torch", threads or cores) else make(name, count)
            rates = {}
            for batch in batches:
                start = time.perf_counter()
                rates[batch] = rate = _images_per_second(predictor, images[:batch])
                probe[f"{name}/{count}/{batch}"] = rate
                expected = pipeline_rate(rate, count, decode_cost, cores)
                if best is None or expected > best[0] * 1.02:
                    best = (expected, name, count, batch)
                if time.perf_counter() - start > 2 * PROBE_SECONDS:
                    break  # a slow model: larger batches would take long to time and gain little
            rate = max(rates.values())
            if rate < cores / (decode_cost + count / rate):
                break  # inference-bound even with these threads: fewer would only be slower
    expected, name, count, chosen = best
    reason = (f"fastest here: ~{expected:,.0f} img/s expected with decoding at "
              f"{decode_cost * 1e3:.2f} ms an image" if decode_cost else f"fastest here ({expected:,.0f} img/s)")
    predictor = make(name, count)
    predictor.batch_size = chosen
    return predictor, BackendChoice(name, device, count, chosen, reason, probe)
