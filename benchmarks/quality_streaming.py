"""Streamed vs cached quality training data: peak memory against set size, and throughput.

    python benchmarks/quality_streaming.py --out benchmarks/results/quality_streaming.json

Files: `--unique` synthetic faces of `facekd.synth.generate_quality` (128 px PNG, as
`facekd synth quality` writes them), hard-linked up to `--large` distinct paths in a MOS CSV
(all in the page cache after the first read, as in a warm run). Every measurement is a fresh
process that builds the demo student (`--arch`, input `--size`) and a training
`QualityDataset` at its geometry, then trains it with the facekd `Trainer` (its DataLoader
path: `_EpochDataset`, the deterministic batch sampler, `--workers` worker processes):

(a) memory: `--rss-steps` optimizer steps on `--small` and on `--large` images, streamed
    (`cache=False`) and cached (`cache=True`); peak RSS (VmHWM) of the training process and
    the largest peak of its DataLoader workers (RUSAGE_CHILDREN). Target: streamed peak at
    `--large` ≤ 1.1× the peak at `--small`; cached for contrast (grows with N·S²·3 bytes).
(b) throughput: `--steps` steps at the demo's batch (32) on `--small` images, streamed and
    cached, with the demo's `num_workers` (0: decoding in the training process) and with
    `--workers`; a run's images/s is the median of the trainer's logged rates after the first
    window, a mode's the median of `--repeats` runs, interleaved with the other mode's.
    Target: streamed ≥ 0.9× cached. The load average before and after is recorded: the rates
    mean little on a machine that something else keeps busy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "quality" / "demo.yaml"


def _vm(key: str) -> float:
    """A /proc/self/status value (kB) in MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(spec: dict) -> dict:
    """One measurement (runs in a fresh process): build the set, train, report memory and rates."""
    import torch

    from facekd.engine import TrainConfig, Trainer
    from facekd.losses.quality import QualityLoss
    from facekd.models import build_model
    from facekd.quality.data import QualityDataset, from_csv
    from facekd.runtime import keep_freed_memory

    keep_freed_memory()  # as the facekd CLI does
    torch.manual_seed(0)
    model = build_model(spec["arch"], input_size=spec["size"])
    samples = from_csv(spec["csv"])
    started = time.perf_counter()
    dataset = QualityDataset(samples, model.geometry, model.normalization, train=True, cache=spec["cache"],
                             workers=spec["threads"])
    build_s = time.perf_counter() - started
    rss_built = _vm("VmRSS")
    config = TrainConfig(max_steps=spec["steps"], batch_size=spec["batch"], lr=1e-3, accelerator="cpu",
                         num_workers=spec["workers"], log_every_steps=spec["log_every"], clip_grad_norm=2.0)
    started = time.perf_counter()
    result = Trainer(config, spec["out"]).fit(model, QualityLoss(), dataset, resume=False)
    train_s = time.perf_counter() - started
    rates = [r["img/s"] for r in result.history if r["event"] == "train"]
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # kB -> MiB, largest worker
    return {"images": len(dataset), "cache": spec["cache"], "num_workers": spec["workers"],
            "steps": result.steps, "dataset_build_s": round(build_s, 2), "train_s": round(train_s, 2),
            "cache_mib": dataset.memory_bytes / 2**20, "rss_after_build_mib": rss_built,
            "peak_rss_mib": _vm("VmHWM"), "worker_peak_rss_mib": children if spec["workers"] else 0.0,
            "logged_img_per_s": rates,
            "img_per_s": statistics.median(rates[1:] if len(rates) > 1 else rates) if rates else None,
            "skipped": len(dataset.errors)}


def run_child(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise SystemExit(f"measurement failed ({spec}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_files(work: Path, unique: int, counts: list[int], seed: int) -> dict[int, Path]:
    """`unique` synthetic renders, linked up to max(counts) paths; a MOS CSV per count."""
    from facekd.io.formats import read_mos_csv, write_mos_csv
    from facekd.synth import generate_quality

    source = work / "synth"
    if not (source / "labeled.csv").is_file():
        generate_quality(source, labeled=unique, unlabeled=0, test=1, seed=seed, workers=os.cpu_count() or 1,
                         overwrite=True)
    rows = read_mos_csv(source / "labeled.csv")
    links = work / "links"
    links.mkdir(exist_ok=True)
    paths = []
    for index in range(max(counts)):
        row = rows[index % len(rows)]
        path = links / f"{index:06d}.png"
        if not path.exists():
            os.link(row.path, path)
        paths.append((path, row.mos))
    csvs = {}
    for count in counts:
        csvs[count] = work / f"set_{count}.csv"
        write_mos_csv(csvs[count], paths[:count])
    return csvs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality_streaming.json")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "facekd-quality-streaming")
    parser.add_argument("--arch", help="quality architecture (default: the demo config's student)")
    parser.add_argument("--size", type=int, help="input size (default: the demo config's student)")
    parser.add_argument("--batch", type=int, help="batch size (default: the demo config's student_train)")
    parser.add_argument("--unique", type=int, default=500, help="distinct renders behind the hard links")
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--rss-steps", type=int, default=6, help="optimizer steps per memory measurement")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per throughput measurement")
    parser.add_argument("--log-every", type=int, default=6, help="steps per logged rate")
    parser.add_argument("--repeats", type=int, default=5, help="throughput runs per mode (median)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads of the dataset's construction pass (header check or decoding)")
    parser.add_argument("--keep", action="store_true", help="keep --work (else removed at the end)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    sys.path.insert(0, str(ROOT))
    from facekd.config import load_config
    from facekd.io.atomic import atomic_write_text
    from facekd.quality.config import QualityRunConfig

    demo = load_config(DEMO, QualityRunConfig)
    arch = args.arch or demo.student.arch
    size = args.size or demo.student.input_size
    batch = args.batch or demo.student_train.batch_size
    started = time.perf_counter()
    load_before = os.getloadavg()
    args.work.mkdir(parents=True, exist_ok=True)
    csvs = make_files(args.work, args.unique, [args.small, args.large], seed=0)
    setup_s = time.perf_counter() - started

    def measure(count: int, cache: bool, workers: int, steps: int) -> dict:
        spec = {"csv": str(csvs[count]), "arch": arch, "size": size, "batch": batch, "cache": cache,
                "workers": workers, "steps": steps, "log_every": args.log_every, "threads": args.threads,
                "out": str(args.work / "run")}
        row = run_child(spec)
        print(f"{count:6d} images  {'cached ' if cache else 'streamed'}  workers {workers}  "
              f"peak {row['peak_rss_mib']:8.1f} MiB (workers {row['worker_peak_rss_mib']:7.1f})  "
              f"{row['img_per_s'] or 0:7.1f} img/s", flush=True)
        return row

    memory = {}
    for cache in (False, True):
        mode = "cached" if cache else "streamed"
        rows = {n: measure(n, cache, args.workers, args.rss_steps) for n in (args.small, args.large)}
        small, large = rows[args.small], rows[args.large]
        memory[mode] = {
            "small": small, "large": large,
            "peak_ratio": large["peak_rss_mib"] / small["peak_rss_mib"],
            "worker_peak_ratio": (large["worker_peak_rss_mib"] / small["worker_peak_rss_mib"]
                                  if small["worker_peak_rss_mib"] else None),
        }
    throughput = {}
    for workers in sorted({demo.student_train.num_workers, args.workers}):
        runs: dict[str, list[dict]] = {"streamed": [], "cached": []}
        for repeat in range(args.repeats):  # interleaved, so a load change hits both modes alike
            for cache in ((False, True) if repeat % 2 == 0 else (True, False)):
                runs["cached" if cache else "streamed"].append(measure(args.small, cache, workers, args.steps))
        rates = {mode: statistics.median(r["img_per_s"] for r in rows) for mode, rows in runs.items()}
        throughput[f"num_workers={workers}"] = {
            "streamed_img_per_s": rates["streamed"], "cached_img_per_s": rates["cached"],
            "ratio": rates["streamed"] / rates["cached"],
            "runs": {mode: [r["img_per_s"] for r in rows] for mode, rows in runs.items()}}
    stream_mem = memory["streamed"]["peak_ratio"]
    demo_ratio = throughput[f"num_workers={demo.student_train.num_workers}"]["ratio"]
    report = {
        "benchmark": "quality_streaming",
        "setup": {"arch": arch, "input_size": size, "batch": batch, "unique_renders": args.unique,
                  "small": args.small, "large": args.large, "rss_steps": args.rss_steps, "steps": args.steps,
                  "num_workers_memory": args.workers, "demo_num_workers": demo.student_train.num_workers,
                  "construction_threads": args.threads, "files_s": round(setup_s, 1)},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "memory": memory,
        "throughput": throughput,
        "targets": {"streamed_peak_ratio_max": 1.1, "streamed_peak_ratio": stream_mem,
                    "memory_met": stream_mem <= 1.1,
                    "throughput_ratio_min": 0.9, "throughput_ratio_demo_workers": demo_ratio,
                    "throughput_met": demo_ratio >= 0.9},
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"streamed peak {args.large}/{args.small}: {stream_mem:.3f}x (target <= 1.1); cached: "
          f"{memory['cached']['peak_ratio']:.3f}x; streamed/cached img/s: "
          + ", ".join(f"{k}: {v['ratio']:.3f}" for k, v in throughput.items()) + " (target >= 0.9)")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
