"""The FIQA demo benchmark over several seeds: T0, T1, the distilled student S and the control
student, each seed with its own synthetic data and training randomness.

    python benchmarks/fiqa_pipeline.py --seeds 0 1 2 --out benchmarks/results/fiqa_pipeline.json

Writes per-seed metrics and mean ± std, and checks the issue's targets on the means:
S within the challenge limit, S's (SRCC+PLCC)/2 ≥ 0.97 × T1's, S − control larger than the
seed-to-seed spread (the larger std of the two), T1 ≥ T0."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

MODELS = ("T0", "T1", "S", "control")
METRICS = ("srcc", "plcc", "plcc_logistic", "krcc", "rmse", "score")


def run_seed(seed: int, work: Path, config: Path, sizes: dict, progress) -> dict:
    from facekd.config import load_config
    from facekd.quality.config import QualityRunConfig, data_overrides
    from facekd.quality.pipeline import QualityPipeline
    from facekd.synth import generate_quality
    from facekd.synth.datasets import existing_dataset

    data = work / f"data_seed{seed}"
    if not existing_dataset(data, kind="quality", seed=seed, **sizes):
        generate_quality(data, seed=seed, overwrite=True, progress=progress, **sizes)
    cfg = load_config(config, QualityRunConfig, overrides=data_overrides(data) + [
        f"teacher_train.seed={seed}", f"student_train.seed={seed}"])
    started = time.perf_counter()
    report = QualityPipeline(cfg, work / f"run_seed{seed}", progress=progress).run()
    return {"seed": seed, "seconds": round(time.perf_counter() - started, 1), "models": report["models"],
            "challenge_limit": report["challenge_limit"]}


def summarise(runs: list[dict]) -> dict:
    summary = {}
    for model in MODELS:
        rows = [run["models"][model] for run in runs if model in run["models"]]
        summary[model] = {m: {"mean": statistics.fmean(r[m] for r in rows),
                              "std": statistics.stdev(r[m] for r in rows) if len(rows) > 1 else 0.0}
                          for m in METRICS}
        summary[model].update(params=rows[0]["params"], gflops=rows[0]["gflops"], arch=rows[0]["arch"],
                              input_size=rows[0]["input_size"])
    score = {m: summary[m]["score"] for m in MODELS}
    spread = max(score["S"]["std"], score["control"]["std"])
    limit = runs[0]["challenge_limit"]
    summary["targets"] = {
        "student_within_limit": bool(limit and limit["within"]),
        "student_over_t1": score["S"]["mean"] / score["T1"]["mean"],
        "student_at_least_97pct_of_t1": score["S"]["mean"] >= 0.97 * score["T1"]["mean"],
        "student_minus_control": score["S"]["mean"] - score["control"]["mean"],
        "seed_spread": spread,
        "student_beats_control_beyond_spread": score["S"]["mean"] - score["control"]["mean"] > spread,
        "t1_minus_t0": score["T1"]["mean"] - score["T0"]["mean"],
        "t1_at_least_t0": score["T1"]["mean"] >= score["T0"]["mean"],
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    from facekd.io.atomic import atomic_write_text
    from facekd.progress import RichProgress
    from facekd.runtime import keep_freed_memory

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/quality/demo.yaml"))
    parser.add_argument("--work", default="runs/fiqa_benchmark", help="data and run folders (reused on rerun)")
    parser.add_argument("--labeled", type=int, default=800)
    parser.add_argument("--unlabeled", type=int, default=1600)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--out", default="benchmarks/results/fiqa_pipeline.json")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    keep_freed_memory()
    progress = RichProgress(disable=args.quiet)
    sizes = {"labeled": args.labeled, "unlabeled": args.unlabeled, "test": args.test}
    runs = [run_seed(seed, Path(args.work), Path(args.config), sizes, progress) for seed in args.seeds]
    result = {"benchmark": "fiqa_pipeline", "config": args.config, "data": sizes, "seeds": args.seeds,
              "runs": runs, "summary": summarise(runs)}
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    for model in MODELS:
        row = result["summary"][model]
        print(f"{model:8s} " + "  ".join(f"{m}={row[m]['mean']:.4f}±{row[m]['std']:.4f}" for m in ("srcc", "plcc", "score")))
    print(json.dumps(result["summary"]["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
