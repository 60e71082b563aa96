"""Model cost: parameters, GFLOPs and CPU latency/throughput.

FLOPs are multiply-adds (one MAC = one FLOP), counted as fvcore's `FlopCountAnalysis` counts
them by default, the convention of papers and challenge limits (the VQualA FIQA challenge's
0.3313 G for EdgeNeXt-XXS at 288×288): convolutions and matrix products (from
`torch.utils.flop_counter.FlopCounterMode`, which counts 2 per MAC, halved), plus fvcore's
rules for batch norm in eval (1 per element, 2 with an affine), layer/group norm (4 per
element, 5 with an affine), adaptive average pooling (1 per input element; a global one runs
as a mean and is not counted, a few thousand MACs) and bilinear (4 per output element) /
nearest (1) upsampling. Activations, softmax and other element-wise work are
not counted, as in fvcore.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from facekd.errors import ConfigError
from facekd.progress import Progress

GFLOPS_NOTE = "GFLOPs = multiply-adds (1 MAC = 1 FLOP)"


def _size_hw(input_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    h, w = input_size
    return int(h), int(w)


def model_device(model: nn.Module) -> torch.device:
    """The device of a module's first parameter (the CPU for a module without any)."""
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all of them, or only those with `requires_grad`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def _norm_rule(per_element: int, affine_arg: int):
    """fvcore's norm rule as a FlopCounterMode formula (in its 2-per-MAC units)."""
    def flops(x_shape, *args, out_shape=None, **kwargs) -> int:
        affine = len(args) >= affine_arg and args[affine_arg - 1] is not None
        return 2 * _numel(x_shape) * (per_element + (1 if affine else 0))
    return flops


def _input_rule(scale: int):
    def flops(x_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * scale * _numel(x_shape)
    return flops


def _output_rule(scale: int):
    def flops(*args, out_shape=None, **kwargs) -> int:
        return 2 * scale * _numel(out_shape)
    return flops


def _fvcore_extra_rules() -> dict:
    aten = torch.ops.aten
    rules = {
        aten.native_layer_norm: _norm_rule(4, 2),  # (input, normalized_shape, weight, bias, eps)
        aten.native_group_norm: _norm_rule(4, 1),  # (input, weight, bias, N, C, HxW, group, eps)
        aten.native_batch_norm: _norm_rule(1, 1),  # eval-mode count: (input, weight, ...)
        aten._native_batch_norm_legit_no_training: _norm_rule(1, 1),
        aten._adaptive_avg_pool2d: _input_rule(1),
        aten.upsample_bilinear2d: _output_rule(4),
        aten.upsample_nearest2d: _output_rule(1),
    }
    return rules


def count_flops(model: nn.Module, input_size: int | tuple[int, int]) -> int:
    """Multiply-adds of one forward pass on a single (3, H, W) image, in eval mode.

    Works on the meta device too (no computation), which makes big nets free to count."""
    h, w = _size_hw(input_size)
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, 3, h, w, device=model_device(model))
        with FlopCounterMode(display=False, custom_mapping=_fvcore_extra_rules()) as counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _enough(iters: int, elapsed: float, min_time_s: float, max_time_s: float, min_iters: int,
            max_iters: int) -> bool:
    return iters >= max_iters or elapsed >= max_time_s or (elapsed >= min_time_s and iters >= min_iters)


def measure_latency(model: nn.Module, input_size: int | tuple[int, int], batch: int = 1, warmup: int = 2,
                    min_time_s: float = 0.5, max_time_s: float = 3.0, min_iters: int = 3,
                    max_iters: int = 50) -> dict[str, Any]:
    """Time forward passes on random input under `torch.inference_mode()` in eval mode.

    Runs `warmup` untimed passes on a small slice of the batch (so a huge net costs seconds,
    not minutes, yet its first-call overhead is not timed), then timed full-batch passes until
    `max_iters`, or `max_time_s` of timed work, or both `min_time_s` and `min_iters` are
    reached — at least one. Returns median/mean/min ms per batch, images per second (from the
    median), and the passes used."""
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    device = model_device(model)
    if device.type == "meta":
        raise ValueError("cannot time a model on the meta device")
    h, w = _size_hw(input_size)
    was_training = model.training
    model.eval()
    times: list[float] = []
    warmed = max(0, warmup)
    try:
        with torch.inference_mode():
            x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
            for _ in range(warmed):
                model(x[: min(batch, 4)])
                _sync(device)
            began = time.perf_counter()
            while True:
                start = time.perf_counter()
                model(x)
                _sync(device)
                times.append(time.perf_counter() - start)
                if _enough(len(times), time.perf_counter() - began, min_time_s, max_time_s, min_iters,
                           max_iters):
                    break
    finally:
        model.train(was_training)
    median = statistics.median(times)
    return {
        "batch": batch,
        "input_size": [h, w],
        "median_ms": median * 1e3,
        "mean_ms": statistics.fmean(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "images_per_s": batch / median if median > 0 else float("inf"),
        "iterations": len(times),
        "warmup": warmed,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


def cost_report(archs: Iterable[str] | None = None, input_size: int | None = None, batch_latency: int | None = 1,
                batch_throughput: int | None = 64, measure: bool = True,
                progress: Progress | None = None) -> list[dict[str, Any]]:
    """One row per architecture: arch, task, input_size, params, gflops, latency_ms_b1 (median
    ms for one batch of `batch_latency`), throughput_b64 (images/s at `batch_throughput`).

    The two key names keep their default-batch spelling; `latency_batch` and
    `throughput_batch` give the batch sizes actually used. `measure=False` (or a batch of
    None) builds on the meta device and skips timing (those fields are None): instant.
    `input_size` None uses each architecture's own default; `archs` None: the named ones and
    the featured timm/torchvision backbones."""
    from facekd.models.registry import available_archs, build_model, get_arch

    progress = progress or Progress()
    if isinstance(archs, str):
        archs = [archs]
    if archs is None:
        from facekd.models.backbones import FEATURED_BACKBONES

        archs = [spec.name for spec in available_archs()] + list(FEATURED_BACKBONES)
    names = list(archs)
    specs = [get_arch(name) for name in names]  # fail before any work on a bad name
    for spec in specs:
        if input_size is not None:
            spec.check_input_size(input_size)
    rows: list[dict[str, Any]] = []
    for spec in progress.track(specs, "cost report"):
        size = spec.input_size if input_size is None else int(input_size)
        timed = measure and (batch_latency or batch_throughput)
        if timed:
            model = build_model(spec.name, size)
        else:
            with torch.device("meta"):
                model = build_model(spec.name, size)
        row: dict[str, Any] = {
            "arch": spec.name,
            "task": spec.task,
            "description": spec.description,
            "input_size": size,
            "params": count_params(model),
            "gflops": count_flops(model, size) / 1e9,
            "latency_ms_b1": None,
            "throughput_b64": None,
            "latency_batch": batch_latency if timed else None,
            "throughput_batch": batch_throughput if timed else None,
            "latency_iters": None,
            "throughput_iters": None,
            "threads": torch.get_num_threads() if timed else None,
        }
        if timed and batch_latency:
            result = measure_latency(model, size, batch=batch_latency)
            row["latency_ms_b1"] = result["median_ms"]
            row["latency_iters"] = result["iterations"]
        if timed and batch_throughput:
            result = measure_latency(model, size, batch=batch_throughput, warmup=1)
            row["throughput_b64"] = result["images_per_s"]
            row["throughput_iters"] = result["iterations"]
        rows.append(row)
        del model
    return rows


def format_cost_table(rows: list[dict[str, Any]]):
    """A rich Table of `cost_report` rows; its title states the GFLOPs convention."""
    from rich.table import Table

    lat_batch = next((r["latency_batch"] for r in rows if r.get("latency_batch")), 1)
    thr_batch = next((r["throughput_batch"] for r in rows if r.get("throughput_batch")), 64)
    table = Table(title=f"Model cost — {GFLOPS_NOTE}; CPU timings on this machine")
    table.add_column("Arch", no_wrap=True)
    table.add_column("Task", no_wrap=True)
    table.add_column("Input", justify="right")
    table.add_column("Params M", justify="right")
    table.add_column("GFLOPs", justify="right")
    table.add_column(f"ms b{lat_batch}", justify="right")
    table.add_column(f"img/s b{thr_batch}", justify="right")
    table.add_column("Description")

    def fmt(value: Any, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    for row in rows:
        table.add_row(
            str(row["arch"]), str(row["task"]), f"{row['input_size']}",
            fmt(row["params"] / 1e6 if row.get("params") is not None else None, ".3f"),
            fmt(row.get("gflops"), ".4f"),
            fmt(row.get("latency_ms_b1"), ".2f"),
            fmt(row.get("throughput_b64"), ".1f"),
            str(row.get("description", "")),
        )
    return table
