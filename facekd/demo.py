"""`facekd demo`: the main jobs end to end on built-in synthetic data, sized for 2 CPU cores.

1. FIQA: synthetic MOS-labelled faces → T0 → pseudo-labels → T1 → pseudo-labels → student
   (configs/quality/demo.yaml), into OUT/quality.
2. Recognition: synthetic 48×48 identities → MobileFaceNet teacher → MobileFaceNet ×0.25
   student alone, distilled with EKD (bias-corrected thresholds, momentum 0.05, weight 10;
   configs/recognition/demo.yaml) and with RKD (weight 100), the method benchmarks/fr_distill.py
   found best, into OUT/recognition.
3. EDC: the quality models T0, T1 and S judged by the distilled recognizer on unseen identities
   whose images carry quality degradations at random severities, into OUT/edc.
Everything already done with the same settings is reused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facekd.progress import Progress

CONFIGS = Path(__file__).resolve().parent / "configs"
DEMO_QUALITY = {"labeled": 800, "unlabeled": 1600, "test": 500}
DEMO_FR_TRAIN = dict(identities=150, images_per_identity=12, size=48, difficulty=0.3)
DEMO_FR_TEST = dict(identities=60, images_per_identity=10, size=48, difficulty=0.3)
# EDC comparisons: unseen, well-separated identities at the quality models' resolution, half the
# images degraded, so that recognition errors come mostly from quality. The demo recognizer is
# tiny: at FMR 1e-3 it misses most genuine pairs of degraded images (start FNMR ≈ 0.89), so the
# demo fixes the threshold at a starting FNMR of 0.1 instead (`facekd evaluate edc --start-fnmr`).
DEMO_EDC_FACES = dict(identities=60, images_per_identity=10, size=128, difficulty=0.0, degrade=0.5)
DEMO_EDC_START_FNMR = 0.1
# the best method of benchmarks/fr_distill.py (results/fr_distill.json) and its chosen weight
DEMO_BEST_DISTILL = {"method": "rkd", "weight": 100.0, "options": {}}


@dataclass
class DemoResult:
    quality: dict[str, Any]
    recognition: dict[str, dict[str, Any]]
    edc: dict[str, Any]


def _identities(folder: Path, settings: dict, workers, overwrite: bool, progress: Progress) -> Path:
    from facekd.synth import generate_identities
    from facekd.synth.datasets import existing_dataset

    if overwrite or not existing_dataset(folder, kind="identities", **settings):
        generate_identities(folder, workers=workers, progress=progress, overwrite=True, **settings)
    return folder


def run_quality_demo(out: Path, seed: int, workers, overwrite: bool, progress: Progress) -> dict[str, Any]:
    from facekd.config import load_config
    from facekd.quality.config import QualityRunConfig, data_overrides
    from facekd.quality.pipeline import QualityPipeline
    from facekd.synth import generate_quality
    from facekd.synth.datasets import existing_dataset

    data = out / "quality_data"
    settings = dict(seed=seed, **DEMO_QUALITY)
    if overwrite or not existing_dataset(data, kind="quality", **settings):
        generate_quality(data, workers=workers, progress=progress, overwrite=True, **settings)
    config = load_config(CONFIGS / "quality" / "demo.yaml", QualityRunConfig,
                         overrides=data_overrides(data) + [f"teacher_train.seed={seed}", f"student_train.seed={seed}"])
    return QualityPipeline(config, out / "quality", progress=progress).run(force=("t0",) if overwrite else ())


def run_recognition_demo(out: Path, seed: int, workers, overwrite: bool, progress: Progress) -> dict[str, dict]:
    """OUT/recognition/{teacher,student,ekd,rkd}; returns their reports by label."""
    from facekd.config import config_to_dict, load_config
    from facekd.recognition.config import RecognitionConfig
    from facekd.recognition.train import train_recognition

    train = _identities(out / "fr_train", dict(DEMO_FR_TRAIN, seed=seed), workers, overwrite, progress)
    test = _identities(out / "fr_test", dict(DEMO_FR_TEST, seed=seed + 1), workers, overwrite, progress)
    config = load_config(CONFIGS / "recognition" / "demo.yaml", RecognitionConfig, overrides=[
        f"data.train={train}", "data.eval=" + json.dumps([str(test)]), f"teacher_train.seed={seed}",
        f"student_train.seed={seed}"])
    runs = out / "recognition"

    def trained(folder: Path, role: str, method: str, teacher: Path | None = None, **distill) -> dict[str, Any]:
        run_config = config.model_copy(deep=True)
        run_config.distill.method = method
        for key, value in distill.items():
            setattr(run_config.distill, key, value)
        settings = json.loads(json.dumps(config_to_dict(run_config), default=str))
        report_file = folder / "report.json"
        if report_file.is_file() and not overwrite:
            report = json.loads(report_file.read_text())
            if report.get("config") == settings and (teacher is None or report["teacher"]["digest"] == _digest(teacher)):
                progress.log(f"recognition {folder.name}: up to date, skipped")
                return report
        progress.log(f"recognition {folder.name}: training")
        return train_recognition(run_config, folder, role=role, teacher_path=teacher, progress=progress)

    teacher = trained(runs / "teacher", "teacher", "none")
    teacher_model = runs / "teacher" / "model.safetensors"
    best = DEMO_BEST_DISTILL["method"]
    return {"teacher": teacher, "student alone": trained(runs / "student", "student", "none"),
            "student + EKD": trained(runs / "ekd", "student", "ekd", teacher_model),
            f"student + {best.upper()} (fr_distill's best)": trained(runs / best, "student", teacher=teacher_model,
                                                                     **DEMO_BEST_DISTILL)}


def gap_closed(reports: dict[str, dict[str, Any]], level: float = 1e-3) -> dict[str, float]:
    """Share of the teacher − student-alone TPR gap at FPR `level` each distilled student closes
    (on the first evaluation set); empty when the teacher does not beat the student alone."""
    def tpr(report: dict[str, Any]) -> float:
        rows = next(iter(report["eval"].values()))["tpr_at_fpr"]
        return next(r["tpr"] for r in rows if math.isclose(r["fpr_level"], level))

    teacher, alone = tpr(reports["teacher"]), tpr(reports["student alone"])
    if teacher <= alone:
        return {}
    return {label: (tpr(report) - alone) / (teacher - alone) for label, report in reports.items()
            if label not in ("teacher", "student alone")}


def _digest(path: Path) -> str:
    from facekd.io.formats import file_digest

    return file_digest(path)


def run_edc_demo(out: Path, seed: int, workers, overwrite: bool, progress: Progress) -> dict[str, Any]:
    from facekd.evaluation.quality_edc import evaluate_edc

    faces = _identities(out / "edc_faces", dict(DEMO_EDC_FACES, seed=seed + 2), workers, overwrite, progress)
    quality = out / "quality"
    models = {label: quality / stage / "model.safetensors" for label, stage in (("T0", "t0"), ("T1", "t1"),
                                                                                 ("S", "student"))}
    return evaluate_edc(out / "recognition" / "ekd" / "model.safetensors", list(models.values()),
                        names=list(models), identities=faces, out=out / "edc", start_fnmr=DEMO_EDC_START_FNMR,
                        progress=progress)


def run_demo(out: str | Path = "demo_run", seed: int = 0, workers: int | None = None, overwrite: bool = False,
             progress: Progress | None = None) -> DemoResult:
    """All three parts (see the module docstring)."""
    out = Path(out)
    progress = progress or Progress()
    quality = run_quality_demo(out, seed, workers, overwrite, progress)
    recognition = run_recognition_demo(out, seed, workers, overwrite, progress)
    edc = run_edc_demo(out, seed, workers, overwrite, progress)
    return DemoResult(quality, recognition, edc)
