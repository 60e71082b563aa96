"""`facekd evaluate edc`: quality models judged by what they save a face recognizer.

The comparisons come from a pairs file (path_a path_b same) or an identity folder (every pair
of its images). The recognizer embeds every image (flip-augmented, as in verification) and a
comparison's score is the cosine of its two embeddings; each quality model scores every image
and a comparison's quality is the lower of its two images' scores. Two baselines join them:
a random order, and the recognizer's own embedding norm (the norm before L2 normalisation,
which margin-softmax training ties to image quality). Images that cannot be read are skipped
with their comparisons and listed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facekd.errors import ConfigError, DataError, FacekdError
from facekd.progress import Progress
from facekd.results import EdcReport, ResultFiles, write_result

PathLike = str | os.PathLike
EMBEDDING_NORM = "embedding norm"
PLOT_FILE = "edc.png"
MAX_COMPARISONS = 50_000_000


def comparisons(pairs: PathLike | None = None, identities: PathLike | None = None
                ) -> tuple[list[Path], np.ndarray, np.ndarray, np.ndarray]:
    """(image paths, first index, second index, same identity) of a pairs file or of every
    pair of an identity folder."""
    from facekd.io.formats import read_identity_folder, read_pairs

    if (pairs is None) == (identities is None):
        raise ConfigError("give exactly one of --pairs FILE or --identities FOLDER")
    if identities is not None:
        folder = read_identity_folder(identities)
        n = len(folder.paths)
        if n * (n - 1) // 2 > MAX_COMPARISONS:
            raise FacekdError(f"{identities}: {n} images make {n * (n - 1) // 2} comparisons, more than "
                              f"{MAX_COMPARISONS}; use a pairs file")
        first, second = np.triu_indices(n, 1)
        labels = np.asarray(folder.labels)
        return list(folder.paths), first, second, labels[first] == labels[second]
    listed = read_pairs(pairs, check_files=False)
    paths = sorted({p for pair in listed for p in (pair.a, pair.b)}, key=str)
    index = {p: i for i, p in enumerate(paths)}
    return (paths, np.array([index[p.a] for p in listed]), np.array([index[p.b] for p in listed]),
            np.array([p.same for p in listed], dtype=bool))


def _decode(paths: list[Path], geometry, cache: dict, progress: Progress):
    """Images at a model's `geometry` (decoded once per geometry) and a mask of the readable ones."""
    from facekd.io.decode import load_images

    if geometry not in cache:
        size = geometry.size
        images, kept, errors = load_images(paths, geometry, progress)
        readable = np.zeros(len(paths), dtype=bool)
        readable[kept] = True
        full = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
        full[kept] = images
        cache[geometry] = (full, readable, errors)
    return cache[geometry]


def evaluate_edc(recognizer: PathLike, qualities: Sequence[PathLike], *, pairs: PathLike | None = None,
                 identities: PathLike | None = None, out: PathLike | None = None, fmr: float = 1e-3,
                 start_fnmr: float | None = None, limits: Sequence[float] = (0.2, 0.3), batch_size: int = 64,
                 names: Sequence[str] | None = None, convention=None, progress: Progress | None = None) -> dict[str, Any]:
    """EDC report of each quality model (with the random and embedding-norm baselines); with
    `out`, writes out/report.json and out/edc.png. The recognizer may be an `.onnx` file (a
    recognizer from elsewhere with its `convention`, see `facekd.inference.predictors.load`)."""
    from facekd.evaluation.edc import edc_report, pair_quality, plot_edc
    from facekd.inference.predictors import load
    from facekd.models.artifact import load_model
    from facekd.io.decode import check_batch_size
    from facekd.quality.pseudo import predict
    from facekd.recognition.evaluation import check_embedder, embed_images

    progress = progress or Progress()
    batch_size = check_batch_size(batch_size)
    if not qualities:
        raise ConfigError("give at least one --quality model")
    names = list(names) if names else [Path(q).parent.name if Path(q).stem == "model" else Path(q).stem
                                       for q in qualities]
    if len(names) != len(qualities) or len(set(names)) != len(names):
        raise ConfigError(f"quality names must be unique, one per model: {names}")
    paths, first, second, issame = comparisons(pairs, identities)
    cache: dict = {}
    fr_model = load(recognizer, batch_size=batch_size, convention=convention)  # .safetensors or .onnx
    check_embedder(fr_model, recognizer)
    images, readable, errors = _decode(paths, fr_model.geometry, cache, progress)
    progress.log(f"embedding {len(paths)} images with {fr_model.info['arch']}")
    embeddings, norms = embed_images(fr_model, images, batch_size, flip=True, with_norms=True)
    image_quality = {EMBEDDING_NORM: norms}
    for name, path in zip(names, qualities):
        model = load_model(path)
        if model.task != "quality":
            raise FacekdError(f"{path}: a {model.task} model, not a quality model")
        q_images, _, _ = _decode(paths, model.geometry, cache, progress)
        image_quality[name] = predict(model, q_images, batch_size=batch_size, progress=progress)
    usable = readable[first] & readable[second]
    if not usable.any():
        raise DataError(pairs or identities, "no comparison has two readable images")
    first, second, issame = first[usable], second[usable], issame[usable]
    scores = np.einsum("ij,ij->i", embeddings[first], embeddings[second]).astype(np.float64)
    quality_by_name = {name: pair_quality(q[first], q[second]) for name, q in image_quality.items()
                       if name != EMBEDDING_NORM}
    quality_by_name[EMBEDDING_NORM] = pair_quality(norms[first], norms[second])
    result = EdcReport(**edc_report(scores, issame, quality_by_name, fmr=fmr, start_fnmr=start_fnmr, limits=limits),
                       recognizer=str(recognizer), quality_models=dict(zip(names, map(str, qualities))),
                       comparisons_source=str(pairs or identities),
                       skipped_images=[{"path": str(p), "reason": r} for p, r in errors],
                       skipped_comparisons=int((~usable).sum()))
    if out is None:
        return result.to_dict()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result.files = ResultFiles(plot=PLOT_FILE)
    plot_edc(result.to_dict(), out / PLOT_FILE, title=f"EDC — recognizer {fr_model.info['arch']}, threshold at "
             + (f"FMR {fmr:g}" if start_fnmr is None else f"FNMR {start_fnmr:g}"))
    return {**write_result(result, out), "plot": str(out / PLOT_FILE)}


def format_edc_table(report: dict[str, Any]):
    """A rich table per curve and limit: pAUC, pAUC ÷ the no-discard area (1: no gain) and
    normalised by the theoretical best ((pAUC − best) / (no-discard − best): 0 best, 1 no gain)."""
    from rich.table import Table

    limits = report["limits"]
    table = Table(title=f"EDC — {report['genuine']} genuine / {report['impostor']} impostor comparisons, "
                        f"threshold {report['threshold']:.4f} (start FNMR {report['start_fnmr']:.4f})")
    table.add_column("Quality", no_wrap=True)
    for limit in limits:
        for what in ("pAUC", "÷ no discard", "normalised"):
            table.add_column(f"{what} @{limit:g}", justify="right", no_wrap=True)
    rows = {**report["qualities"], "random": report["random"], "theoretical best": report["theoretical_best"]}
    for name, entry in rows.items():
        cells = []
        for limit in limits:
            summary = entry["pauc"][str(limit)]
            cells += [f"{summary['pauc']:.4f}"] + ["n/a" if summary[key] is None else f"{summary[key]:.3f}"
                                                   for key in ("relative_to_start", "normalized")]
        table.add_row(name, *cells)
    return table
