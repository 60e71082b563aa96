"""Verification sets held in memory and a model's verification report on them.

A set is a `pairs.txt` (path_a path_b same), an insightface `.bin` (pairs 2i, 2i+1) or an
identity folder (every pair of its images, "1:1 all pairs": N images give N(N−1)/2 pairs,
which supports far lower FPR levels than a 6 000-pair list). Images are decoded once at the
model's input size; unreadable images are skipped with their pairs and listed in `.errors`.
Embeddings are flip-augmented as insightface reports: embedding(image) + embedding(flipped),
L2-normalised; a pair's score is the cosine of its two embeddings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facekd.errors import DataError, FacekdError
from facekd.progress import Progress

PathLike = str | os.PathLike
MAX_ALL_PAIRS = 200_000_000


@dataclass
class VerificationData:
    """Decoded images (N, S, S, 3) uint8 and either explicit pairs (`first`, `second`,
    `issame`) or identity `labels` (all pairs)."""

    name: str
    images: np.ndarray
    issame: np.ndarray | None = None
    first: np.ndarray | None = None
    second: np.ndarray | None = None
    labels: np.ndarray | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def pairs(self) -> int:
        if self.labels is not None:
            n = len(self.labels)
            return n * (n - 1) // 2
        return len(self.issame)


def load_verification_set(path: PathLike, input_size: int, progress: Progress | None = None,
                          workers: int | None = None) -> VerificationData:
    """Read a pairs file, a `.bin` or an identity folder (by what `path` is) at `input_size`."""
    from facekd.io.formats import read_identity_folder, read_pairs
    from facekd.io.decode import load_images

    path = Path(path)
    progress = progress or Progress()
    if path.is_dir():
        folder = read_identity_folder(path)
        images, kept, errors = load_images(folder.paths, input_size, progress, workers)
        labels = np.asarray(folder.labels)[kept]
        _require_images(path, images, errors)
        return VerificationData(path.name, images, labels=labels, errors=_named(errors))
    if path.suffix.lower() == ".bin":
        return _load_bin(path, input_size, progress)
    pairs = read_pairs(path, check_files=False)
    unique = sorted({p for pair in pairs for p in (pair.a, pair.b)}, key=str)
    images, kept, errors = load_images(unique, input_size, progress, workers)
    _require_images(path, images, errors)
    position = {unique[k]: i for i, k in enumerate(kept)}
    usable = [p for p in pairs if p.a in position and p.b in position]
    if not usable:
        raise DataError(path, "no pair has two readable images")
    return VerificationData(path.stem, images, issame=np.array([p.same for p in usable], dtype=bool),
                            first=np.array([position[p.a] for p in usable]),
                            second=np.array([position[p.b] for p in usable]), errors=_named(errors))


def _load_bin(path: Path, input_size: int, progress: Progress) -> VerificationData:
    from facekd.io.images import decode_image, resize_to
    from facekd.io.verification import read_verification_bin

    data = read_verification_bin(path)
    images = np.empty((len(data.images), input_size, input_size, 3), dtype=np.uint8)
    good = np.ones(len(data.images), dtype=bool)
    errors = []
    with progress.task(f"decoding {path.name}", len(data.images)) as bar:
        for i, encoded in enumerate(data.images):
            try:
                images[i] = resize_to(decode_image(encoded, source=f"{path}#{i}"), (input_size, input_size))
            except DataError as error:
                good[i] = False
                errors.append((error.path, error.reason))
            bar.advance()
    keep = good[0::2] & good[1::2]
    if not keep.any():
        raise DataError(path, "no pair has two readable images")
    index = np.flatnonzero(keep)
    return VerificationData(path.stem, images, issame=np.asarray(data.issame, dtype=bool)[index],
                            first=2 * index, second=2 * index + 1, errors=errors)


def _require_images(path: Path, images: np.ndarray, errors) -> None:
    if len(images) == 0:
        first = f" (first: {errors[0][0]}: {errors[0][1]})" if errors else ""
        raise DataError(path, f"no readable image{first}")


def _named(errors) -> list[tuple[str, str]]:
    return [(str(p), r) for p, r in errors]


def embed_images(model, images: np.ndarray, batch_size: int = 128, flip: bool = True,
                 with_norms: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """L2-normalised float32 embeddings of uint8 NHWC images (flip: + the mirrored image's);
    `with_norms` also returns the norms before normalisation (a quality cue of the recognizer)."""
    import contextlib

    from facekd.inference.predictors import BatchPredictor, FaceEmbedder, evaluating

    out, norms = [], []
    given = isinstance(model, BatchPredictor)  # a predictor (e.g. ONNX Runtime) rather than a FaceModel
    with contextlib.nullcontext() if given else evaluating(model):
        predictor = model if given else FaceEmbedder(model, device=None, batch_size=batch_size)
        for start in range(0, len(images), batch_size):
            raw = predictor.raw(images[start:start + batch_size], flip)
            norms.append(np.linalg.norm(raw, axis=1))
            out.append(predictor.finish(raw, len(raw)))
    embeddings = np.concatenate(out)
    return (embeddings, np.concatenate(norms)) if with_norms else embeddings


def pair_scores(data: VerificationData, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, issame) of every pair of the set."""
    from facekd.recognition.metrics import all_pairs_scores

    if data.labels is not None:
        return all_pairs_scores(embeddings, data.labels, max_pairs=MAX_ALL_PAIRS)
    scores = np.einsum("ij,ij->i", embeddings[data.first], embeddings[data.second])
    return scores.astype(np.float64), data.issame


def evaluate_embedder(model, data: VerificationData, batch_size: int = 128, flip: bool = True,
                      folds: int = 10) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """(verification report, (scores, issame)) of `model` on `data`."""
    from facekd.recognition.metrics import verification_report

    scores, issame = pair_scores(data, embed_images(model, data.images, batch_size, flip))
    report = verification_report(scores, issame, folds=folds)
    report["skipped_images"] = [{"path": p, "reason": r} for p, r in data.errors]
    return report, (scores, issame)


def summary_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Flat float metrics of a verification report, for training logs: acc, auc, tpr@<level>."""
    flat = {"auc": float(report["auc"])}
    if report.get("accuracy") is not None:
        flat["acc"] = float(report["accuracy"])
    for row in report["tpr_at_fpr"]:
        if row["supported"]:
            flat[f"tpr@{row['fpr_level']:.0e}"] = float(row["tpr"])
    return flat


def check_embedder(model, path: PathLike) -> None:
    if getattr(model, "task", None) != "recognition":
        raise FacekdError(f"{path}: a {getattr(model, 'task', 'unknown')} model, not a recognition model")


def evaluate_model(model_path: PathLike, sets: list[PathLike], out: PathLike | None = None, *,
                   batch_size: int = 128, flip: bool = True, convention=None,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Verification report of a model file (`.safetensors`, or `.onnx`: an export, or a
    recognizer from elsewhere with its `convention`) on each set (pairs.txt, .bin or identity
    folder); with `out`, writes out/report.json and out/roc.png (one curve per set)."""
    import json

    from facekd.inference.predictors import load
    from facekd.io.atomic import atomic_write_text
    from facekd.io.decode import check_batch_size
    from facekd.recognition.metrics import plot_roc, roc_curve

    if not sets:
        raise FacekdError("give a verification set: --pairs pairs.txt, --bin set.bin or --identities DIR")
    batch_size = check_batch_size(batch_size)
    model = load(model_path, batch_size=batch_size, convention=convention)
    check_embedder(model, model_path)
    progress = progress or Progress()
    reports, curves = {}, {}
    for path in sets:
        data = load_verification_set(path, model.input_size, progress)
        report, (scores, issame) = evaluate_embedder(model, data, batch_size, flip)
        reports[str(path)] = report
        curves[data.name] = roc_curve(scores, issame)[:2]
    result = {"pipeline": "verification", "model": str(model_path), "arch": model.info["arch"], "flip": flip,
              "sets": reports}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plot_roc(curves, out / "roc.png", title=f"{model.info['arch']} ({Path(model_path).name})")
        atomic_write_text(out / "report.json", json.dumps(result, indent=2) + "\n")
        result["roc"] = str(out / "roc.png")
    return result
