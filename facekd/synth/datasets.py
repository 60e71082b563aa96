"""Write synthetic identity and quality datasets, deterministically and in parallel.

Every image has its own random generator, seeded by (seed, stream, ...indices), so the files
are byte-identical for the same arguments whatever the number of worker processes. Identities
are a function of (seed, identity index): a test set with other identities is the same call
with another seed. Outputs are built in a temporary sibling folder that replaces `out` only
when everything was written (`atomic_directory`): a failed or killed run leaves no half dataset.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from facekd.checks import real_number, whole_number
from facekd.errors import ConfigError
from facekd.io.atomic import atomic_directory
from facekd.progress import Progress
from facekd.synth.degrade import (DEGRADATIONS, Degradation, apply_degradations, mos_from_severities,
                                  pose_view, sample_severities)
from facekd.synth.faces import FaceRenderer, sample_identity, sample_view

__all__ = [
    "DEFAULT_DIFFICULTY",
    "DEFAULT_QUALITY_SIZE",
    "FORMATS",
    "difficulty_settings",
    "generate_identities",
    "generate_quality",
    "make_contact_sheet",
]

#: Default of `generate_identities(difficulty=...)`; see `difficulty_settings`.
DEFAULT_DIFFICULTY = 0.5
#: Default side of quality images. Quality depends on fine detail (noise grain, JPEG blocks,
#: blur), so it is larger than the 112 of recognition; 128 keeps the JPEG 8x8 grid aligned,
#: leaves a 21-pixel face at the strongest 6x down-scaling, and costs only ~1.3x the pixels.
DEFAULT_QUALITY_SIZE = 128
#: Output formats of `generate_identities`.
FORMATS = ("folder", "rec", "bin")
#: Most pairs written by default.
DEFAULT_MAX_PAIRS = 3000

# Random streams: the first entries of every per-item seed sequence.
_IDENTITY, _VIEW, _PAIRS, _DEGRADE = 1, 2, 3, 4
_Q_IDENTITY, _Q_VIEW, _Q_DEGRADE, _Q_LABEL = 11, 12, 13, 14
_QUALITY_SPLITS = ("labeled", "unlabeled", "test")
_QUALITY_CHUNK = 32


def difficulty_settings(difficulty: float) -> tuple[float, float]:
    """(identity_spread, nuisance) for a difficulty in [0, 1].

    identity_spread = 1 - 0.75 d   how far identities stray from the shared mean face
    nuisance        = 0.15 + 0.85 d pose / lighting / expression / occluder strength

    At the default d = 0.5 (spread 0.625, nuisance 0.575: yaw up to +-29 deg, roll +-13,
    +-10 % scale, strong side light, 17 % glasses, 17 % occluders) identities still differ in
    skin tone, hair and head shape, but many pairs of identities are close on those coarse
    cues, so telling them apart at a low false-positive rate needs the subtle geometry (eye,
    brow, nose, mouth placement) and the per-identity skin texture (mole and freckle layout,
    mottling) seen through pose and light. Fine, pose-dependent detail is what a large network
    resolves and a tiny one blurs; d = 0 is nearly trivial, d = 1 leaves mostly texture.
    """
    d = real_number(difficulty, "difficulty", 0.0, 1.0)
    return 1.0 - 0.75 * d, 0.15 + 0.85 * d


# ---------------------------------------------------------------------------------------------
# argument checks


def _workers(value: object) -> int:
    if value is None:
        return min(os.cpu_count() or 1, 8)
    return whole_number(value, "workers", 0)


# ---------------------------------------------------------------------------------------------
# parallel map (ordered, spawn-safe)


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)


# Worker processes are spawned, never forked: a child forked after OpenCV ran in the parent can
# deadlock on a lock held by one of OpenCV's threads (seen here). As with any spawn pool, a
# calling script needs the `if __name__ == "__main__":` guard (the CLI has it).
_START_METHOD = "spawn"


def _ordered_map(func: Callable, tasks: Sequence, workers: int, chunksize: int = 1) -> Iterator:
    """func over tasks, results in order; workers=0 runs in this process."""
    if workers == 0 or len(tasks) <= 1:
        yield from map(func, tasks)
        return
    context = multiprocessing.get_context(_START_METHOD)
    with context.Pool(min(workers, len(tasks)), initializer=_init_worker) as pool:
        yield from pool.imap(func, tasks, chunksize)


def _encode_png(image: np.ndarray) -> bytes:
    from facekd.io.images import encode_image

    return encode_image(image, ".png")


def _write_manifest(folder: Path, settings: dict) -> None:
    from facekd.version import __version__

    text = json.dumps({"generator": f"facekd {__version__}", **settings}, indent=2, sort_keys=True)
    (folder / "synth.json").write_text(text + "\n", encoding="utf-8")


def existing_dataset(folder: str | os.PathLike, **settings: object) -> bool:
    """Whether `folder` already holds a complete dataset generated with these settings (its
    `synth.json` records them), so a caller such as `facekd demo` can reuse it."""
    manifest = Path(folder) / "synth.json"
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(recorded.get(key) == value for key, value in settings.items())


# ---------------------------------------------------------------------------------------------
# identities


@dataclass(frozen=True)
class _IdentityJob:
    root: str | None  # where to write PNGs (None: no folder output)
    size: int
    seed: int
    spread: float
    nuisance: float
    degrade: float
    keep_bytes: bool
    id_width: int
    image_width: int
    images_per_identity: int

    def relpath(self, identity: int, index: int) -> str:
        return f"id_{identity:0{self.id_width}d}/{index:0{self.image_width}d}.png"


@dataclass(frozen=True)
class _IdentityItem:
    identity: int
    index: int
    landmarks: tuple
    png: bytes | None
    mos: float | None


def _identity_task(task: tuple[_IdentityJob, int]) -> list[_IdentityItem]:
    """Render, encode and (for the folder format) write every image of one identity."""
    job, identity = task
    renderer = FaceRenderer(sample_identity(np.random.default_rng([job.seed, _IDENTITY, identity]), job.spread),
                            job.size)
    folder = None
    if job.root is not None:
        folder = Path(job.root) / job.relpath(identity, 0).split("/")[0]
        folder.mkdir(parents=True, exist_ok=True)
    items = []
    for index in range(job.images_per_identity):
        rng = np.random.default_rng([job.seed, _VIEW, identity, index])
        view = sample_view(rng, job.nuisance)
        mos = None
        degradation = None
        if job.degrade > 0:
            drng = np.random.default_rng([job.seed, _DEGRADE, identity, index])
            degradation = sample_severities(drng) if drng.random() < job.degrade else Degradation()
            if degradation.severities["pose"] > 0:
                view = pose_view(view, degradation.severities["pose"], drng)
        image, landmarks = renderer.render(view, rng)
        if degradation is not None:
            image, landmarks = apply_degradations(image, landmarks, degradation, drng)
            mos = mos_from_severities(degradation.severities, degradation.region, drng)
        png = _encode_png(image)
        if folder is not None:
            (Path(job.root) / job.relpath(identity, index)).write_bytes(png)
        items.append(_IdentityItem(identity, index, tuple(round(float(v), 3) for v in landmarks.ravel()),
                                   png if job.keep_bytes else None, mos))
    return items


def _possible_pairs(identities: int, per_identity: int) -> tuple[int, int]:
    genuine = identities * per_identity * (per_identity - 1) // 2
    impostor = identities * (identities - 1) // 2 * per_identity * per_identity
    return genuine, impostor


_Member = tuple[int, int]  # (identity, image index)


def _sample_pairs(identities: int, per_identity: int, count: int, seed: int) -> list[tuple[_Member, _Member, bool]]:
    """`count` distinct pairs, half genuine and half impostor, alternating."""
    half = count // 2
    if half == 0:
        return []
    rng = np.random.default_rng([seed, _PAIRS])
    genuine_possible, impostor_possible = _possible_pairs(identities, per_identity)

    def draw(possible: int, enumerate_all: Callable[[], list], draw_one: Callable[[], tuple]) -> list:
        if half * 2 > possible:
            pool = enumerate_all()
            return [pool[i] for i in sorted(rng.choice(len(pool), size=half, replace=False))]
        seen: set = set()
        chosen = []
        while len(chosen) < half:
            pair = draw_one()
            if pair not in seen:
                seen.add(pair)
                chosen.append(pair)
        return chosen

    def genuine_all() -> list:
        return [((i, a), (i, b)) for i in range(identities) for a in range(per_identity)
                for b in range(a + 1, per_identity)]

    def genuine_one() -> tuple:
        i = int(rng.integers(identities))
        a, b = sorted(int(v) for v in rng.choice(per_identity, size=2, replace=False))
        return (i, a), (i, b)

    def impostor_all() -> list:
        return [((i, a), (j, b)) for i in range(identities) for j in range(i + 1, identities)
                for a in range(per_identity) for b in range(per_identity)]

    def impostor_one() -> tuple:
        i, j = sorted(int(v) for v in rng.choice(identities, size=2, replace=False))
        return (i, int(rng.integers(per_identity))), (j, int(rng.integers(per_identity)))

    genuine = draw(genuine_possible, genuine_all, genuine_one)
    impostor = draw(impostor_possible, impostor_all, impostor_one)
    pairs = []
    for g, n in zip(genuine, impostor):
        pairs.append((g[0], g[1], True))
        pairs.append((n[0], n[1], False))
    return pairs


def generate_identities(out: str | os.PathLike, identities: int = 100, images_per_identity: int = 20,
                        size: int = 112, seed: int = 0, difficulty: float = DEFAULT_DIFFICULTY,
                        identity_spread: float | None = None, nuisance: float | None = None,
                        formats: Iterable[str] = ("folder",), pairs: int | None = None, degrade: float = 0.0,
                        workers: int | None = None, progress: Progress | None = None,
                        overwrite: bool = False) -> dict:
    """Write a synthetic face-recognition dataset to `out`.

    folder: `out/id_00042/0003.png`, `out/landmarks.csv` (path,x1,y1,...,x5,y5: eye centres,
    nose tip, mouth corners in pixels), `out/pairs.txt` (path_a path_b same);
    rec: `out/train.rec`, `train.idx`, `property` (labels = identity index);
    bin: `out/pairs.bin` (the same pairs, insightface verification format).
    Always `out/synth.json` (the arguments). `pairs` defaults to min(3000, what is possible),
    half genuine and half impostor, alternating. `difficulty` sets `identity_spread` and
    `nuisance` (see `difficulty_settings`) unless they are given. `degrade` is the probability
    that an image also gets random quality degradations; the MOS of every image is then
    written to `out/quality.csv` (folder format). Returns a summary dict.
    """
    started = time.perf_counter()
    progress = progress or Progress()
    identities = whole_number(identities, "identities", 1)
    per_identity = whole_number(images_per_identity, "images_per_identity", 1)
    size = whole_number(size, "size", 32, 1024)
    seed = whole_number(seed, "seed", 0)
    default_spread, default_nuisance = difficulty_settings(difficulty)
    spread = default_spread if identity_spread is None else real_number(identity_spread, "identity_spread", 0.0, 1.0)
    if spread <= 0:
        raise ConfigError("identity_spread must be above 0 (at 0 every identity is the mean face)")
    nuisance = default_nuisance if nuisance is None else real_number(nuisance, "nuisance", 0.0, 1.0)
    degrade = real_number(degrade, "degrade", 0.0, 1.0)
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"formats must be some of {', '.join(FORMATS)}, got {list(formats)!r}")
    workers = _workers(workers)
    genuine_possible, impostor_possible = _possible_pairs(identities, per_identity)
    most = 2 * min(genuine_possible, impostor_possible)
    if pairs is None:
        pairs = min(DEFAULT_MAX_PAIRS, most)
    pairs = whole_number(pairs, "pairs", 0)
    if pairs > most:
        raise ConfigError(f"pairs={pairs} is more than the {most} balanced distinct pairs that "
                          f"{identities} identities x {per_identity} images allow")
    if "bin" in formats and pairs < 2:
        raise ConfigError("the bin format needs at least 2 pairs (2 identities with 2 images each)")
    pairs -= pairs % 2
    pair_list = _sample_pairs(identities, per_identity, pairs, seed)

    folder_format = "folder" in formats
    settings = {"kind": "identities", "identities": identities, "images_per_identity": per_identity,
                "size": size, "seed": seed, "difficulty": float(difficulty), "identity_spread": spread,
                "nuisance": nuisance, "degrade": degrade, "formats": list(formats), "pairs": len(pair_list)}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        job = _IdentityJob(root=str(tmp) if folder_format else None, size=size, seed=seed, spread=spread,
                           nuisance=nuisance, degrade=degrade, keep_bytes="rec" in formats or "bin" in formats,
                           id_width=max(5, len(str(identities - 1))), image_width=max(4, len(str(per_identity - 1))),
                           images_per_identity=per_identity)
        needed = {member for a, b, _ in pair_list for member in (a, b)} if "bin" in formats else set()
        kept: dict[tuple[int, int], bytes] = {}
        landmark_rows: list[list] = []
        mos_rows: list[tuple[str, float]] = []
        tasks = [(job, identity) for identity in range(identities)]
        chunksize = max(1, min(8, 64 // per_identity))

        def results() -> Iterator[tuple[int, bytes]]:
            with progress.task("rendering identities", identities * per_identity) as bar:
                for items in _ordered_map(_identity_task, tasks, workers, chunksize):
                    for item in items:
                        rel = job.relpath(item.identity, item.index)
                        landmark_rows.append([rel, *(f"{v:.3f}" for v in item.landmarks)])
                        if item.mos is not None:
                            mos_rows.append((rel, item.mos))
                        if (item.identity, item.index) in needed:
                            kept[(item.identity, item.index)] = item.png
                        if item.png is not None:
                            yield item.identity, item.png
                    bar.advance(len(items))

        if "rec" in formats:
            from facekd.io.recordio import write_insightface_dataset

            write_insightface_dataset(tmp / "train.rec", results(), image_size=(size, size))
        else:
            for _ in results():
                pass
        if folder_format:
            from facekd.io.formats import write_mos_csv, write_pairs

            with open(tmp / "landmarks.csv", "w", encoding="utf-8", newline="") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(["path"] + [f"{axis}{k}" for k in range(1, 6) for axis in "xy"])
                writer.writerows(landmark_rows)
            if pair_list:
                write_pairs(tmp / "pairs.txt", [(job.relpath(*a), job.relpath(*b), same) for a, b, same in pair_list],
                            relative_to=tmp)
            if degrade > 0:
                write_mos_csv(tmp / "quality.csv", mos_rows, relative_to=tmp)
        if "bin" in formats:
            from facekd.io.verification import write_verification_bin

            images = [kept[member] for a, b, _ in pair_list for member in (a, b)]
            write_verification_bin(tmp / "pairs.bin", images, [same for _, _, same in pair_list])
        _write_manifest(tmp, settings)
        files = sorted(p.name for p in tmp.iterdir())
    seconds = time.perf_counter() - started
    total = identities * per_identity
    return {**settings, "out": str(Path(out)), "images": total, "files": files, "workers": workers,
            "seconds": round(seconds, 3), "images_per_second": round(total / seconds, 1) if seconds > 0 else None}


# ---------------------------------------------------------------------------------------------
# quality


@dataclass(frozen=True)
class _QualityJob:
    root: str
    size: int
    seed: int
    nuisance: float


def _quality_relpath(split: str, index: int) -> str:
    return f"images/{split}/{index:06d}.png"


def _quality_task(task: tuple[_QualityJob, int, int, int]) -> list[tuple]:
    """Render, degrade and write images [start, stop) of one split; returns their labels."""
    job, split_id, start, stop = task
    split = _QUALITY_SPLITS[split_id]
    folder = Path(job.root) / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(start, stop):
        identity = sample_identity(np.random.default_rng([job.seed, _Q_IDENTITY, split_id, index]), 1.0)
        rng = np.random.default_rng([job.seed, _Q_VIEW, split_id, index])
        view = sample_view(rng, job.nuisance)
        # Near-frontal, unblurred, unoccluded base: pose, blur, noise and occlusion are degradations here.
        view = view.replace(yaw=0.3 * view.yaw, pitch=0.3 * view.pitch, roll=0.3 * view.roll, blur=0.0, noise=0.0,
                            occluder="", glasses=0 if view.glasses == 3 else view.glasses)
        drng = np.random.default_rng([job.seed, _Q_DEGRADE, split_id, index])
        degradation = sample_severities(drng)
        if degradation.severities["pose"] > 0:
            view = pose_view(view, degradation.severities["pose"], drng)
        image, landmarks = FaceRenderer(identity, job.size).render(view, rng)
        image, _ = apply_degradations(image, landmarks, degradation, drng)
        (Path(job.root) / _quality_relpath(split, index)).write_bytes(_encode_png(image))
        clean = mos_from_severities(degradation.severities, degradation.region)
        mos = mos_from_severities(degradation.severities, degradation.region,
                                  np.random.default_rng([job.seed, _Q_LABEL, split_id, index]))
        rows.append((split, index, dict(degradation.severities), degradation.region, clean, mos))
    return rows


def generate_quality(out: str | os.PathLike, labeled: int = 1000, unlabeled: int = 2000, test: int = 500,
                     size: int = DEFAULT_QUALITY_SIZE, seed: int = 0, nuisance: float = 0.2,
                     workers: int | None = None, progress: Progress | None = None, overwrite: bool = False) -> dict:
    """Write a synthetic face-quality dataset to `out`.

    `out/labeled.csv`, `out/test.csv` (path,mos), `out/unlabeled_1.txt`, `out/unlabeled_2.txt`
    (the unlabeled images split in two halves, one path a line), the images under
    `out/images/<split>/`, `out/severities.csv` (path, split, every severity, occlusion region,
    noiseless MOS, MOS; for analysis, the unlabeled images included) and `out/synth.json`.
    Each image is a new identity with mild nuisance (`nuisance`) and random degradations whose
    MOS follows `facekd.synth.degrade` (label noise included). Returns a summary dict.
    """
    started = time.perf_counter()
    progress = progress or Progress()
    counts = (whole_number(labeled, "labeled", 1), whole_number(unlabeled, "unlabeled", 0), whole_number(test, "test", 1))
    if counts[1] == 1:
        raise ConfigError("unlabeled must be 0 or at least 2 (it is split into two halves)")
    size = whole_number(size, "size", 32, 1024)
    seed = whole_number(seed, "seed", 0)
    nuisance = real_number(nuisance, "nuisance", 0.0, 1.0)
    workers = _workers(workers)
    settings = {"kind": "quality", "labeled": counts[0], "unlabeled": counts[1], "test": counts[2], "size": size,
                "seed": seed, "nuisance": nuisance}
    total = sum(counts)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        job = _QualityJob(root=str(tmp), size=size, seed=seed, nuisance=nuisance)
        tasks = [(job, split_id, start, min(start + _QUALITY_CHUNK, count))
                 for split_id, count in enumerate(counts) for start in range(0, count, _QUALITY_CHUNK)]
        rows: list[tuple] = []
        with progress.task("rendering quality images", total) as bar:
            for chunk in _ordered_map(_quality_task, tasks, workers):
                rows.extend(chunk)
                bar.advance(len(chunk))

        from facekd.io.formats import write_image_list, write_mos_csv

        by_split: dict[str, list[tuple]] = {split: [] for split in _QUALITY_SPLITS}
        for row in rows:
            by_split[row[0]].append(row)
        for split in ("labeled", "test"):
            write_mos_csv(tmp / f"{split}.csv", [(_quality_relpath(split, r[1]), r[5]) for r in by_split[split]],
                          relative_to=tmp)
        if counts[1]:
            paths = [_quality_relpath("unlabeled", r[1]) for r in by_split["unlabeled"]]
            half = (len(paths) + 1) // 2
            write_image_list(tmp / "unlabeled_1.txt", paths[:half], relative_to=tmp)
            write_image_list(tmp / "unlabeled_2.txt", paths[half:], relative_to=tmp)
        with open(tmp / "severities.csv", "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["path", "split", *DEGRADATIONS, "region", "mos_clean", "mos"])
            for split, index, severities, region, clean, mos in rows:
                values = [f"{severities[name]:.4f}" for name in DEGRADATIONS]
                writer.writerow([_quality_relpath(split, index), split, *values, region, f"{clean:.4f}", f"{mos:.4f}"])
        _write_manifest(tmp, settings)
        files = sorted(p.name for p in tmp.iterdir())
    seconds = time.perf_counter() - started
    mos = np.array([r[5] for r in rows])
    return {**settings, "out": str(Path(out)), "images": total, "files": files, "workers": workers,
            "mos_mean": round(float(mos.mean()), 3), "mos_std": round(float(mos.std()), 3),
            "seconds": round(seconds, 3), "images_per_second": round(total / seconds, 1) if seconds > 0 else None}


# ---------------------------------------------------------------------------------------------


def make_contact_sheet(images: Sequence[np.ndarray], cols: int = 8, pad: int = 2) -> np.ndarray:
    """Tile equally sized RGB images into one RGB image (for looking at a dataset)."""
    if not images:
        raise ConfigError("make_contact_sheet needs at least one image")
    cols = max(1, min(int(cols), len(images)))
    h, w = images[0].shape[:2]
    rows = math.ceil(len(images) / cols)
    sheet = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        sheet[y:y + h, x:x + w] = image
    return sheet
