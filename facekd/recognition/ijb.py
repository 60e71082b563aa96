"""IJB-B / IJB-C 1:1 template verification, the protocol of insightface's `eval_ijbc.py`.

Each image is aligned with its 5 landmarks to the ArcFace template and embedded, with its
mirror, on the batch engine (`facekd.inference.embed_files`: threaded decoding, crash journal,
resume). The archive keeps both raw embeddings of each image, so every option below is
applied afterwards:

- `flip`: image + mirror embeddings added (else the image's alone);
- `norm_score`: the embedding keeps its norm (else it is L2-normalised first);
- `detector_score`: the embedding is multiplied by the face detector's score;

then a template is the sum over its media of the mean of that media's images, L2-normalised,
and a pair's score is the cosine of its two templates. Images that cannot be used are listed;
a template left without images is reported and its pairs are skipped (not scored)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from facekd.errors import ConfigError, DataError
from facekd.progress import Progress

__all__ = ["EMBEDDINGS_FILE", "SCORES_FILE", "Aligner", "ImageAndMirror", "IjbOptions", "evaluate_ijb",
           "image_features", "pair_scores", "template_features", "tpr_at_fpr_nearest"]

PathLike = str | os.PathLike
EMBEDDINGS_FILE = "embeddings.npz"
SCORES_FILE = "scores.npy"


class IjbOptions:
    """The three switches of eval_ijbc.py (`use_flip_test`, `use_norm_score`,
    `use_detector_score`); all on by default, as there."""

    __slots__ = ("flip", "norm_score", "detector_score")

    def __init__(self, flip: bool = True, norm_score: bool = True, detector_score: bool = True):
        for name, value in (("flip", flip), ("norm_score", norm_score), ("detector_score", detector_score)):
            if not isinstance(value, (bool, np.bool_)):
                raise ConfigError(f"{name} must be True or False, got {value!r}")
        self.flip, self.norm_score, self.detector_score = bool(flip), bool(norm_score), bool(detector_score)

    def to_dict(self) -> dict[str, bool]:
        return {"flip": self.flip, "norm_score": self.norm_score, "detector_score": self.detector_score}

    @property
    def mode(self) -> str:
        """insightface's name of the setting, e.g. "N1D1F2" (F2 = flip-add, F0 = no flip)."""
        return f"N{int(self.norm_score)}D{int(self.detector_score)}F{2 if self.flip else 0}"


# ----------------------------------------------------------------------------- aggregation


def image_features(raw: np.ndarray, detector_scores: np.ndarray, options: IjbOptions) -> np.ndarray:
    """Per-image features (N, D) float32 from raw embeddings (N, 2D): image | mirror side by side."""
    raw = np.asarray(raw, dtype=np.float32)
    if raw.ndim != 2 or raw.shape[1] % 2:
        raise DataError("<embeddings>", f"expected (N, 2D) image and mirror embeddings, got shape {raw.shape}")
    half = raw.shape[1] // 2
    features = raw[:, :half] + raw[:, half:] if options.flip else raw[:, :half].copy()
    if not options.norm_score:
        features /= np.sqrt(np.sum(features ** 2, axis=1, keepdims=True))
    if options.detector_score:
        features *= np.asarray(detector_scores, dtype=np.float32)[:, None]
    return features


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray, chunk: int = 1 << 16
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(template ids ascending, L2-normalised float64 features): per template the sum over its
    media of the mean feature of the media's images. A zero sum stays zero. Summed in float64
    over runs of whole templates of about `chunk` images, so memory stays near the input's."""
    templates, medias = np.asarray(templates), np.asarray(medias)
    _, group_of = np.unique(np.stack([templates, medias], axis=1), axis=0, return_inverse=True)
    group_of = group_of.reshape(-1)
    weights = 1.0 / np.bincount(group_of)[group_of]  # each image: 1 / (images of its media in its template)
    unique_templates, template_of = np.unique(templates, return_inverse=True)
    order = np.argsort(template_of.reshape(-1), kind="stable")
    bounds = np.searchsorted(template_of.reshape(-1)[order], np.arange(len(unique_templates) + 1))
    sums = np.empty((len(unique_templates), features.shape[1]))
    first = 0
    while first < len(unique_templates):
        fits = int(np.searchsorted(bounds, bounds[first] + chunk, side="right")) - 1
        last = min(max(first + 1, fits), len(unique_templates))
        rows = order[bounds[first]:bounds[last]]
        block = np.asarray(features[rows], dtype=np.float64) * weights[rows, None]
        sums[first:last] = np.add.reduceat(block, bounds[first:last] - bounds[first], axis=0)
        first = last
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return unique_templates, sums / np.where(norms > 0, norms, 1.0)


def pair_scores(unique_templates: np.ndarray, template_feats: np.ndarray, first: np.ndarray,
                second: np.ndarray, block: int = 1 << 14) -> np.ndarray:
    """Cosine score of each pair (float64); NaN where a template has no feature."""
    scores = np.full(len(first), np.nan)
    for start in range(0, len(first), block):
        a, b = first[start:start + block], second[start:start + block]
        ia = np.minimum(np.searchsorted(unique_templates, a), len(unique_templates) - 1)
        ib = np.minimum(np.searchsorted(unique_templates, b), len(unique_templates) - 1)
        known = (unique_templates[ia] == a) & (unique_templates[ib] == b)
        dots = np.einsum("ij,ij->i", template_feats[ia[known]], template_feats[ib[known]])
        scores[start:start + block][known] = dots
    return scores


# ----------------------------------------------------------------------------- embedding


class ImageAndMirror:
    """A recognizer as the batch engine sees it for IJB: one vector per image, its raw
    embedding and its mirror's side by side (2D values; the options are applied later)."""

    task = "recognition"

    def __init__(self, predictor):
        self.predictor = predictor
        self.geometry = predictor.geometry
        self.input_size = predictor.input_size
        self.embedding_size = 2 * int(predictor.embedding_size)

    def infer(self, batch: np.ndarray, flip: bool = False) -> np.ndarray:
        from facekd.inference.predictors import mirror

        both = self.predictor.raw(np.concatenate([batch, mirror(batch)]))
        return np.concatenate([both[:len(batch)], both[len(batch):]], axis=1)


class Aligner:
    """`prepare` step of the decoding threads: each file warped by its own 5 landmarks onto the
    ArcFace template at the model's input size."""

    def __init__(self, paths: list[Path], landmarks: np.ndarray, size: int):
        self.landmarks = {str(path): points for path, points in zip(paths, landmarks)}
        self.size = size

    def __call__(self, path: Path, image: np.ndarray) -> np.ndarray:
        from facekd.io.align import align_face

        return align_face(image, self.landmarks[str(path)], self.size)


def _fingerprint(model_digest: str | None, landmark_file: Path, size: int) -> str:
    """What makes the archive's vectors: the model, the landmarks and the crop size."""
    from facekd.io.formats import file_digest

    return f"{model_digest}+ijb-align{size}:{file_digest(landmark_file)}"


def _load_embeddings(path: Path, protocol) -> tuple[np.ndarray, np.ndarray]:
    """(raw (K, 2D) float32, index in the protocol of each row (K,)) of the archive."""
    with np.load(path, allow_pickle=False) as archive:
        names, raw = archive["paths"], archive["embeddings"]
    position = {str(p): i for i, p in enumerate(protocol.paths)}
    index = np.fromiter((position[str(Path(name))] for name in names.tolist()), dtype=np.int64, count=len(names))
    return raw, index


# ----------------------------------------------------------------------------- metrics


def tpr_at_fpr_nearest(scores: np.ndarray, issame: np.ndarray, levels) -> list[dict[str, float]]:
    """The TPR table of eval_ijbc.py: at each level, the point of scikit-learn's ROC (with its
    default `drop_intermediate`) whose FPR is nearest the level (ties: the higher FPR, then
    the higher TPR). Papers' IJB figures use this rule; `tpr_at_fpr` is facekd's stricter one.
    `threshold` is None at the curve's start (nothing accepted)."""
    from sklearn.metrics import roc_curve

    return _nearest_rows(*roc_curve(issame, scores), levels)


def _nearest_rows(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray, levels) -> list[dict[str, float]]:
    fpr, tpr, thresholds = fpr[::-1], tpr[::-1], thresholds[::-1]
    rows = []
    for level in levels:
        nearest = int(np.argmin(np.abs(fpr - level)))
        threshold = float(thresholds[nearest])
        rows.append({"fpr_level": float(level), "tpr": float(tpr[nearest]), "fpr": float(fpr[nearest]),
                     "threshold": threshold if np.isfinite(threshold) else None})
    return rows


def _verification(scores: np.ndarray, issame: np.ndarray) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """(figures, ROC to plot): facekd's verification report without k-fold accuracy, plus the
    eval_ijbc.py table; the ROC is scikit-learn's default one (collinear points dropped)."""
    from sklearn.metrics import roc_curve

    from facekd.recognition.metrics import FPR_LEVELS, verification_report

    levels = sorted(FPR_LEVELS)
    report = verification_report(scores, issame, levels=levels, folds=None)
    fpr, tpr, thresholds = roc_curve(issame, scores)
    report["tpr_at_fpr_nearest"] = _nearest_rows(fpr, tpr, thresholds, levels)
    return report, (fpr, tpr)


# ----------------------------------------------------------------------------- the evaluation


def evaluate_ijb(model, root: PathLike, out: PathLike, *, target: str = "IJBC", options: IjbOptions | None = None,
                 batch_size: int = 128, workers: int | None = None, resume: bool = False, overwrite: bool = False,
                 model_file: PathLike | None = None, backend: dict | None = None,
                 progress: Progress | None = None) -> dict[str, Any]:
    """IJB-B/C 1:1 verification of `model` (a model file, or a recognition predictor from
    `facekd.load` / `facekd.inference.open_model` with `model_file` the file it was opened from:
    its hash guards `resume` against mixing models).

    Writes into `out`: `embeddings.npz` (raw image | mirror embeddings; with its errors CSV and
    run record), `scores.npy` (one score per line of the pair list, NaN for skipped pairs),
    `roc.png` and `report.json`, which is also returned. `resume` completes an interrupted
    embedding (or reuses a finished one, e.g. to try other `options`)."""
    from facekd.inference import embed_files
    from facekd.inference.jobs import read_errors
    from facekd.io.atomic import atomic_write
    from facekd.io.formats import absolute, file_digest
    from facekd.io.ijb import ijb_files, read_ijb
    from facekd.recognition.metrics import plot_roc
    from facekd.results import IjbReport, ResultFiles, write_result

    options = options or IjbOptions()
    progress = progress or Progress()
    protocol = read_ijb(root, target)
    if isinstance(model, (str, os.PathLike)):
        from facekd.inference.predictors import load

        model_file = model
        model = load(model, batch_size=batch_size)
    fingerprint = None if model_file is None else file_digest(model_file)
    convention = getattr(model, "info", {}).get("input_convention")  # an .onnx recognizer from elsewhere
    if fingerprint is not None and convention:
        fingerprint += json.dumps(convention, sort_keys=True)
    if getattr(model, "task", None) != "recognition":
        raise ConfigError(f"IJB evaluation needs a recognition model, got a {getattr(model, 'task', '?')} model")
    out = absolute(out)
    out.mkdir(parents=True, exist_ok=True)
    size = int(model.input_size)
    landmark_file = ijb_files(root, target)["name_5pts_score"]
    progress.log(f"{target}: {len(protocol)} images, {len(np.unique(protocol.templates))} templates, "
                 f"{len(protocol.labels)} pairs")
    job = embed_files(ImageAndMirror(model), [], out / EMBEDDINGS_FILE, batch_size=batch_size, resume=resume,
                      overwrite=overwrite, workers=workers, fingerprint=_fingerprint(fingerprint, landmark_file, size),
                      backend=backend, progress=progress, files=protocol.paths,
                      prepare=Aligner(protocol.paths, protocol.landmarks, size))
    raw, kept = _load_embeddings(out / EMBEDDINGS_FILE, protocol)
    features = image_features(raw, protocol.detector_scores[kept], options)
    del raw
    templates, feats = template_features(features, protocol.templates[kept], protocol.medias[kept])
    scores = pair_scores(templates, feats, protocol.first, protocol.second)
    scored = np.isin(protocol.first, templates) & np.isin(protocol.second, templates)
    lost = np.setdiff1d(np.unique(protocol.templates), templates)
    with atomic_write(out / SCORES_FILE, "wb") as handle:
        np.save(handle, scores)
    report, curve = _verification(scores[scored], protocol.labels[scored])
    plot_roc({f"{target} {options.mode}": curve}, out / "roc.png", title=f"{target} 1:1 verification")
    reasons = {str(path): reason for path, reason in read_errors(out / EMBEDDINGS_FILE)}
    missing = np.setdiff1d(np.arange(len(protocol)), kept)
    skipped = [{"path": str(protocol.paths[i]), "reason": reasons.get(str(protocol.paths[i]), "not embedded")}
               for i in missing]
    result = IjbReport(
        target=target, root=str(protocol.root), model=None if model_file is None else str(model_file),
        mode=options.mode, options=options.to_dict(), images=len(protocol),
        templates=int(len(np.unique(protocol.templates))), pairs=int(len(scores)), scored_pairs=int(scored.sum()),
        skipped_pairs=int((~scored).sum()), templates_without_images=[int(t) for t in lost], skipped_images=skipped,
        positives=report["positives"], negatives=report["negatives"], auc=report["auc"], eer=report["eer"],
        tpr_at_fpr=report["tpr_at_fpr"], tpr_at_fpr_nearest=report["tpr_at_fpr_nearest"], embedding=job.to_dict(),
        files=ResultFiles(plot="roc.png", embeddings=EMBEDDINGS_FILE, scores=SCORES_FILE,
                          errors=None if job.errors_csv is None else job.errors_csv.name))
    return write_result(result, out)
