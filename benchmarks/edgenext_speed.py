"""timm's EdgeNeXt-XXS (facekd's `timm/edgenext_xx_small`) against the hand-written copy facekd
retired, on the CPU, in one run.

    python benchmarks/edgenext_speed.py --out benchmarks/results/edgenext_speed.json

The retired module is read from git history (`--retired-rev`, the last commit that had it), so
the comparison stays reproducible after its removal. Both trunks get the same quality head;
each model is timed with `facekd.models.measure_latency` (median of repeated passes, eval
mode, inference mode), alternating between the two models for `--rounds` rounds so that a
slow spell of the machine hits both. Ratio > 1: timm's is faster.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RETIRED_REV = "8408955"  # the last commit with facekd/models/students.py


def retired_students(rev: str):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:facekd/models/students.py"], check=True,
                            capture_output=True, text=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="facekd_retired_"))
    path = folder / "retired_students.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("retired_students", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[288, 352])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--retired-rev", default=RETIRED_REV)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/edgenext_speed.json")
    args = parser.parse_args()

    import torch

    from facekd.models import build_model, count_flops, count_params, measure_latency
    from facekd.models.heads import QualityHead
    from facekd.models.registry import FaceModel

    torch.manual_seed(0)
    old = retired_students(args.retired_rev)
    rows = []
    for size in args.sizes:
        timm_model = build_model("timm/edgenext_xx_small", size).eval()
        trunk = old.edgenext_xxs()
        hand = FaceModel("retired_edgenext_xxs", "quality", size, trunk, QualityHead(trunk.out_channels, (128,)),
                         {}, timm_model.normalization).eval()
        for batch in args.batches:
            times = {"timm": [], "hand_written": []}
            for _ in range(args.rounds):
                for name, model in (("timm", timm_model), ("hand_written", hand)):
                    result = measure_latency(model, size, batch=batch, warmup=2, min_time_s=1.0, max_time_s=4.0)
                    times[name].append(result["median_ms"])
            median = {name: statistics.median(values) for name, values in times.items()}
            rows.append({
                "input_size": size, "batch": batch,
                "timm_ms": median["timm"], "hand_written_ms": median["hand_written"],
                "timm_ms_rounds": times["timm"], "hand_written_ms_rounds": times["hand_written"],
                "speed_ratio_timm_over_hand_written": median["hand_written"] / median["timm"],
                "params": {"timm": count_params(timm_model), "hand_written": count_params(hand)},
                "gflops": {"timm": count_flops(timm_model, size) / 1e9, "hand_written": count_flops(hand, size) / 1e9},
            })
            print(f"{size}px b{batch}: timm {median['timm']:.1f} ms, hand-written {median['hand_written']:.1f} ms, "
                  f"ratio {rows[-1]['speed_ratio_timm_over_hand_written']:.2f}", file=sys.stderr)
    result = {
        "benchmark": "edgenext_speed", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "retired_rev": args.retired_rev, "rows": rows,
        "target_met": all(r["speed_ratio_timm_over_hand_written"] >= 1.0 for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"rows": [{k: r[k] for k in ("input_size", "batch", "speed_ratio_timm_over_hand_written")}
                               for r in rows], "target_met": result["target_met"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
