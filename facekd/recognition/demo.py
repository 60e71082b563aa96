"""The recognition part of `facekd demo`: synthetic identities, a teacher, and the student
alone and distilled with EKD, all with configs/recognition/demo.yaml. Finished runs are reused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from facekd.progress import Progress

DEMO_TRAIN = dict(identities=150, images_per_identity=12, size=64, difficulty=0.3)
DEMO_TEST = dict(identities=60, images_per_identity=10, size=64, difficulty=0.3)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "recognition" / "demo.yaml"


def run_recognition_demo(out: str | Path, seed: int = 0, workers: int | None = None, overwrite: bool = False,
                         progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """Write out/fr_train, out/fr_test and out/recognition/{teacher,student,ekd}; returns the
    run reports by label (teacher, student alone, student + EKD)."""
    from facekd.config import load_config
    from facekd.recognition.config import RecognitionConfig
    from facekd.recognition.train import train_recognition
    from facekd.synth import generate_identities
    from facekd.synth.datasets import existing_dataset

    out = Path(out)
    progress = progress or Progress()
    data = {}
    for name, settings in (("fr_train", dict(DEMO_TRAIN, seed=seed)), ("fr_test", dict(DEMO_TEST, seed=seed + 1))):
        folder = out / name
        if overwrite or not existing_dataset(folder, kind="identities", **settings):
            generate_identities(folder, workers=workers, progress=progress, overwrite=True, **settings)
        data[name] = folder
    runs = out / "recognition"
    overrides = [f"data.train={data['fr_train']}", "data.eval=" + json.dumps([str(data["fr_test"])]),
                 f"teacher_train.seed={seed}", f"student_train.seed={seed}"]
    config = load_config(CONFIG, RecognitionConfig, overrides=overrides)
    reports = {}

    def finished(folder: Path, role: str, teacher: Path | None = None) -> dict[str, Any]:
        report_file = folder / "report.json"
        if report_file.is_file() and not overwrite:
            report = json.loads(report_file.read_text())
            if report.get("config") == json.loads(json.dumps(_as_dict(config), default=str)):
                progress.log(f"{folder.name}: up to date, skipped")
                return report
        progress.log(f"recognition {folder.name}: training")
        return train_recognition(config, folder, role=role, teacher_path=teacher, progress=progress)

    reports["teacher"] = finished(runs / "teacher", "teacher")
    teacher_model = runs / "teacher" / "model.safetensors"
    config.distill.method = "none"
    reports["student alone"] = finished(runs / "student", "student")
    config.distill.method = "ekd"
    reports["student + EKD"] = finished(runs / "ekd", "student", teacher_model)
    return reports


def _as_dict(config) -> dict:
    from facekd.config import config_to_dict

    return config_to_dict(config)
