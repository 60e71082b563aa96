"""Single-step quality commands: evaluate a model file on a MOS CSV, pseudo-label a set of images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facekd.errors import DataError
from facekd.io.atomic import atomic_write_text
from facekd.progress import Progress


def evaluate_model(model_path: str | Path, test_csv: str | Path, *, out: str | Path | None = None,
                   batch_size: int = 64, progress: Progress | None = None) -> dict[str, Any]:
    """SRCC, PLCC (raw and logistic-fitted), KRCC, RMSE and (SRCC+PLCC)/2 of a model on a MOS CSV.

    Unreadable images are skipped and listed under `skipped`; `out` also gets the report as JSON."""
    from facekd.inference.predictors import load
    from facekd.io.formats import read_mos_csv
    from facekd.io.decode import load_images
    from facekd.quality.metrics import quality_metrics

    model = load(model_path, batch_size=batch_size)
    rows = read_mos_csv(test_csv)
    images, kept, errors = load_images([row.path for row in rows], model.geometry, progress=progress)
    if len(kept) < 3:
        raise DataError(test_csv, f"only {len(kept)} readable images; need at least 3 to correlate")
    scores = model.score(images)
    mos = np.array([rows[i].mos for i in kept], dtype=np.float64)
    report = {"model": str(model_path), "test": str(test_csv), "metrics": quality_metrics(scores, mos),
              "skipped": [{"path": str(path), "reason": reason} for path, reason in errors]}
    if out is not None:
        atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    return report


def pseudo_label_files(model_path: str | Path, images: Sequence[str | Path], out_csv: str | Path, *,
                       labeled: str | Path | None = None, confidence: str = "none", batch_size: int = 64,
                       progress: Progress | None = None) -> dict[str, Any]:
    """Label images with a model's predictions, mapped to the MOS scale by a 4-parameter logistic
    fitted on `labeled` (a MOS CSV) when given, else left raw. Writes path,mos,weight."""
    from facekd.models.artifact import load_model
    from facekd.quality.data import QualityDataset, from_csv
    from facekd.quality.metrics import ScaleMap
    from facekd.quality.pseudo import predict, pseudo_label, write_pseudo_labels

    model = load_model(model_path)
    scale, mos_range = ScaleMap("linear", (1.0, 0.0)), None  # raw scores unless a labeled set is given
    if labeled is not None:
        dataset = QualityDataset(from_csv(labeled), model.geometry, model.normalization, train=False,
                                 progress=progress)
        mos = np.asarray(dataset.mos, dtype=np.float64)
        scale = ScaleMap.fit(predict(model, dataset, batch_size=batch_size), mos)
        mos_range = (float(mos.min()), float(mos.max()))
    samples, errors = pseudo_label(model, list(images), scale, batch_size=batch_size, confidence=confidence,
                                   mos_range=mos_range, progress=progress)
    write_pseudo_labels(out_csv, samples)
    values = np.array([s.mos for s in samples])
    return {"images": len(samples), "skipped": len(errors), "mapped_to_mos": labeled is not None,
            "mean": round(float(values.mean()), 4), "std": round(float(values.std()), 4), "out": str(out_csv)}
