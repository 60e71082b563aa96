"""Distillation throughput with a teacher embedding cache vs the live teacher, and the cache's cost.

    python benchmarks/distill_cache.py --out benchmarks/results/distill_cache.json
    python benchmarks/distill_cache.py --teachers iresnet50 --device cuda --precision bf16-mixed --batch 128

For each teacher (IResNet-50 and -100 by default, random weights: speed does not depend on
them) and the student (MobileFaceNet) at 112 px, on synthetic identities: the cache build
(`facekd recognition teacher-cache`: seconds, images per second, each image and its mirror),
then the same distillation (same method, batch, data, schedule) twice through
`facekd.recognition.train.train_recognition`, once with the live teacher and once from the
cache, and the student alone (method none: the bound for distillation from a cache). The
speed of each is the median of the trainer's own per-step img/s (logged every
step, data loading included) after `--warmup` steps; the ratio is taken within this one run.
Everything runs on torch's thread count (OMP_NUM_THREADS), the build included. Parity: per
method, the loss and the student's gradient on one batch with the live teacher and from the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _step_rates(run: Path) -> list[float]:
    lines = (run / "train" / "metrics.jsonl").read_text().splitlines()
    return [r["img/s"] for r in map(json.loads, lines) if r["event"] == "train"]


def _config(student: str, teacher: str, size: int, batch: int, steps: int, method: str, device: str,
            precision: str, data: Path):
    from facekd.config import config_from_dict
    from facekd.recognition.config import RecognitionConfig

    schedule = {"max_steps": steps, "batch_size": batch, "optimizer": "sgd", "lr": 0.01, "accelerator": device,
                "precision": precision, "eval_every_epochs": 0, "log_every_steps": 1, "checkpoint_every_steps": 0}
    return config_from_dict({
        "teacher": {"arch": teacher, "input_size": size, "options": {"embedding_size": 512}},
        "student": {"arch": student, "input_size": size, "options": {"embedding_size": 512}},
        "student_train": schedule, "sampler": {"images_per_identity": 4}, "distill": {"method": method},
        "data": {"train": str(data)}}, RecognitionConfig)


def parity(teacher: Path, cache: Path, data: Path, student_arch: str, size: int, batch: int) -> dict:
    """Per method, on one training batch (some images mirrored): the distillation loss with the
    live teacher and from the cache, and the relative difference of the gradient they give the
    student (‖g_cache − g_live‖ / ‖g_live − g_margin‖, the distillation term's own gradient)."""
    import copy

    import torch
    from torch.utils.data import default_collate

    import facekd
    from facekd.engine.distributed import _EpochDataset
    from facekd.losses.distill import build_distill_loss
    from facekd.losses.margin import MarginSoftmax
    from facekd.models import build_model
    from facekd.recognition.data import IdentitySource, RecognitionDataset
    from facekd.recognition.teacher_cache import TeacherCache
    from facekd.recognition.train import RecognitionLoss

    live_teacher = facekd.load(teacher).model
    source = IdentitySource(data)
    items = _EpochDataset(RecognitionDataset(source, size, live_teacher.normalization, workers=0), 0, 1)
    images = default_collate([items[i] for i in range(0, len(source), max(1, len(source) // batch))][:batch])
    torch.manual_seed(0)
    student = build_model(student_arch, input_size=size, embedding_size=512)
    head = MarginSoftmax(512, source.num_classes, "arcface")
    rows = {}
    for method in ("feature", "rkd", "similarity", "ekd"):
        results = []
        for target, weight in ((live_teacher, 1.0), (TeacherCache(cache), 1.0), (TeacherCache(cache), 0.0)):
            model = copy.deepcopy(student).train()
            loss_fn = RecognitionLoss(copy.deepcopy(head), target, build_distill_loss(method), weight=weight)
            loss, metrics = loss_fn(model, images)
            loss.backward()
            results.append((float(metrics["distill"]), torch.cat([p.grad.flatten() for p in model.parameters()])))
        (live, live_grad), (cached, cached_grad), (_, margin_grad) = results
        rows[method] = {"loss_live": live, "loss_cache": cached, "loss_rel_diff": abs(cached - live) / abs(live),
                        "grad_rel_diff": float((cached_grad - live_grad).norm() / (live_grad - margin_grad).norm())}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", default="iresnet50,iresnet100")
    parser.add_argument("--student", default="mobilefacenet")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--method", default="ekd", choices=("feature", "rkd", "similarity", "ekd"))
    parser.add_argument("--steps", type=int, default=8, help="training steps of each run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--identities", type=int, default=64)
    parser.add_argument("--images-per-identity", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the trainer's accelerator)")
    parser.add_argument("--precision", default="32", help="trainer precision, e.g. bf16-mixed on CUDA")
    parser.add_argument("--out", help="JSON file to write (printed otherwise)")
    args = parser.parse_args(argv)

    import torch

    from facekd.io.atomic import atomic_write_text
    from facekd.models import build_model
    from facekd.models.artifact import save_model
    from facekd.progress import Progress
    from facekd.recognition.teacher_cache import build_teacher_cache
    from facekd.recognition.train import train_recognition
    from facekd.synth import generate_identities

    quiet = Progress()  # silent
    rows = []
    with tempfile.TemporaryDirectory(prefix="facekd-distill-cache-") as tmp:
        root = Path(tmp)
        data = root / "train"
        generate_identities(data, identities=args.identities, images_per_identity=args.images_per_identity,
                            size=args.size, workers=0)
        images = args.identities * args.images_per_identity
        alone = root / "student-alone"  # the bound for distillation from a cache: the student's own cost
        config = _config(args.student, args.student, args.size, args.batch, args.steps, "none", args.device,
                         args.precision, data)
        train_recognition(config, alone, role="student", progress=quiet)
        alone_rate = statistics.median(_step_rates(alone)[args.warmup:])
        print(f"{args.student} alone: {alone_rate:7.1f} img/s", flush=True)
        for teacher_arch in args.teachers.split(","):
            config = _config(args.student, teacher_arch, args.size, args.batch, args.steps, args.method,
                             args.device, args.precision, data)
            teacher = root / f"{teacher_arch}.safetensors"
            save_model(build_model(teacher_arch, input_size=args.size, embedding_size=512), teacher)
            started = time.perf_counter()
            summary = build_teacher_cache(teacher, data, root / f"{teacher_arch}.cache", backend="torch",
                                          device=args.device, threads=torch.get_num_threads(),
                                          batch_size=args.batch, progress=quiet)
            build_seconds = time.perf_counter() - started
            rates = {}
            for mode in ("live", "cache"):
                run = root / f"{teacher_arch}-{mode}"
                extra = {"teacher_cache": root / f"{teacher_arch}.cache"} if mode == "cache" else {"teacher_path": teacher}
                train_recognition(config, run, role="student", progress=quiet, **extra)
                rates[mode] = statistics.median(_step_rates(run)[args.warmup:])
            row = {"teacher": teacher_arch, "student": args.student, "method": args.method, "batch": args.batch,
                   "input_size": args.size, "device": args.device, "precision": args.precision,
                   "live_images_per_s": rates["live"], "cache_images_per_s": rates["cache"],
                   "speedup": rates["cache"] / rates["live"], "student_alone_images_per_s": alone_rate,
                   "cache_vs_student_alone": rates["cache"] / alone_rate,
                   "cache_build": {"images": images, "seconds": build_seconds,
                                   "images_per_s": images / build_seconds, "embedding_s": summary.seconds,
                                   "bytes": sum(f.stat().st_size for f in (root / f"{teacher_arch}.cache").iterdir()
                                                if f.is_file())},
                   "cache_build_in_live_steps": build_seconds * rates["live"] / args.batch}
            row["parity"] = parity(teacher, root / f"{teacher_arch}.cache", data, args.student, args.size, args.batch)
            print(f"{teacher_arch:>11s} → {args.student}: live {rates['live']:7.1f} img/s, cache "
                  f"{rates['cache']:7.1f} img/s ({row['speedup']:.2f}×); cache build {build_seconds:.1f} s "
                  f"({images / build_seconds:.1f} img/s)", flush=True)
            rows.append(row)
    result = {"benchmark": "distill_cache", "python": sys.version.split()[0], "torch": torch.__version__,
              "machine": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
              "load_average": os.getloadavg(), "steps": args.steps, "warmup": args.warmup, "rows": rows}
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        atomic_write_text(args.out, text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
