"""Training throughput of the registered backbones: forward + backward images per second.

    python benchmarks/train_throughput.py --out train_throughput.json
    python benchmarks/train_throughput.py --archs mobilefacenet,iresnet50 --batch 64 --bf16 --channels-last

Per architecture: a few warm-up iterations, then timed iterations (median reported), bounded
by `--budget` seconds. bf16 autocast and channels_last apply on CUDA only (on CPU they are
reported as off). iresnet100 is skipped on CPU unless `--all`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable, Iterable

import torch
from torch import nn

ModelFactory = Callable[[], nn.Module]
CPU_SKIP = {"iresnet100"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, factory: ModelFactory, input_size: int, *, batch: int, device: torch.device,
            bf16: bool = False, channels_last: bool = False, warmup: int = 2, iters: int = 10,
            budget_s: float = 3.0) -> dict:
    """Median forward+backward time of one batch of random images for one model."""
    torch.manual_seed(0)
    model = factory().to(device).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    images = torch.randn(batch, 3, input_size, input_size, device=device).contiguous(memory_format=memory_format)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(images)
        out.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for _ in range(warmup):
        step()
        if time.perf_counter() - started > budget_s / 2:
            break
    _sync(device)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s / 2
    while len(times) < iters and (not times or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"name": name, "input_size": input_size, "batch": batch, "images_per_s": batch / median,
            "median_s": median, "timed_iters": len(times), "bf16": bf16, "channels_last": channels_last}


def run(entries: Iterable[tuple[str, ModelFactory, int]], *, batch: int, device: torch.device, bf16: bool,
        channels_last: bool, warmup: int, iters: int, budget_s: float) -> list[dict]:
    results = []
    for name, factory, input_size in entries:
        row = measure(name, factory, input_size, batch=batch, device=device, bf16=bf16,
                      channels_last=channels_last, warmup=warmup, iters=iters, budget_s=budget_s)
        print(f"{name:24s} {input_size:4d}px  batch {batch:4d}  {row['images_per_s']:10.1f} img/s", flush=True)
        results.append(row)
    return results


def main(argv: list[str] | None = None) -> int:
    from facekd.io.atomic import atomic_write_text
    from facekd.models import available_archs, build_model
    from facekd.runtime import keep_freed_memory

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", help="comma-separated names, timm/... and torchvision/... too (default: the "
                                        "named architectures and the featured backbones)")
    parser.add_argument("--all", action="store_true", help="include iresnet100 on CPU")
    parser.add_argument("--batch", type=int, help="images per batch (default: 64 on CUDA, 8 on CPU)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (CUDA only)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--budget", type=float, help="seconds per architecture (default: 3 on CPU, 20 on CUDA)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    allocator_tuned = keep_freed_memory()  # as the facekd CLI does

    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda: CUDA is not available")
    device = torch.device("cuda" if cuda else "cpu")
    batch = args.batch or (64 if cuda else 8)
    budget = args.budget or (20.0 if cuda else 3.0)

    from facekd.errors import ConfigError
    from facekd.models import get_arch
    from facekd.models.backbones import FEATURED_BACKBONES

    wanted = ([a.strip() for a in args.archs.split(",") if a.strip()] if args.archs
              else [s.name for s in available_archs()] + list(FEATURED_BACKBONES))
    try:
        specs = [get_arch(name) for name in wanted]
    except ConfigError as error:
        parser.error(str(error))
    skipped = [s.name for s in specs if not cuda and not args.all and s.name in CPU_SKIP]
    entries = [(s.name, (lambda name=s.name: build_model(name)), s.input_size) for s in specs
               if s.name not in skipped]

    results = run(entries, batch=batch, device=device, bf16=args.bf16 and cuda,
                  channels_last=args.channels_last and cuda, warmup=args.warmup, iters=args.iters, budget_s=budget)
    report = {
        "benchmark": "train_throughput", "measure": "forward+backward images/s (median over timed iterations)",
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": batch,
        "glibc_keeps_freed_memory": allocator_tuned, "results": results, "skipped": skipped,
    }
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
