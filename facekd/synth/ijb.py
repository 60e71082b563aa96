"""A small synthetic IJB-B/C-style set (`facekd synth ijb`), in the exact insightface layout
(`facekd.io.ijb`): identities → templates → media → images.

Each image is a synthetic face (`FaceRenderer`) warped into a larger "loose crop" by a random
similarity (scale, rotation, shift), so the face is not where the ArcFace template expects it;
its 5 landmarks are moved by the same warp and written with a detector score. The images of
one media are frames of one shot (one base view, small jitter); the media of a template and
the templates of an identity differ in view. Pairs: every genuine template pair, and impostor
template pairs drawn at random. Deterministic by seed, whatever the number of workers."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facekd.checks import real_number, whole_number
from facekd.errors import ConfigError
from facekd.io.atomic import atomic_directory
from facekd.progress import Progress
from facekd.synth.datasets import _ordered_map, _workers, _write_manifest
from facekd.synth.faces import FaceRenderer, sample_identity, sample_view

__all__ = ["generate_ijb"]

_IJB_IDENTITY, _IJB_MEDIA, _IJB_FRAME, _IJB_PAIRS = 21, 22, 23, 24
FACE_SIZE = 112


@dataclass(frozen=True)
class _IjbJob:
    root: str
    seed: int
    templates: int
    media: int
    frames: int
    crop: int
    nuisance: float
    spread: float

    def images_per_identity(self) -> int:
        return self.templates * self.media * self.frames


def _loose_crop(face: np.ndarray, landmarks: np.ndarray, crop: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """`face` warped into a crop×crop image by a random similarity; the landmarks moved with it."""
    import cv2

    scale = float(rng.uniform(0.75, 1.25)) * crop / (1.4 * FACE_SIZE)
    angle = float(rng.uniform(-20.0, 20.0))
    centre = FACE_SIZE / 2.0
    target = crop / 2.0 + rng.uniform(-0.12, 0.12, size=2) * crop
    matrix = cv2.getRotationMatrix2D((centre, centre), angle, scale)
    matrix[:, 2] += target - centre
    image = cv2.warpAffine(face, matrix, (crop, crop), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    moved = np.asarray(landmarks, dtype=np.float64) @ matrix[:, :2].T + matrix[:, 2]
    return image, moved


def _ijb_task(task: tuple[_IjbJob, int]) -> list[tuple[int, int, int, int, np.ndarray, float]]:
    """Render and write every image of one identity: rows (identity, template, media, frame,
    landmarks in the crop, detector score) in file order."""
    from facekd.io.images import encode_image

    job, identity = task
    renderer = FaceRenderer(sample_identity(np.random.default_rng([job.seed, _IJB_IDENTITY, identity]), job.spread),
                            FACE_SIZE)
    rows = []
    for template in range(job.templates):
        for media in range(job.media):
            base = sample_view(np.random.default_rng([job.seed, _IJB_MEDIA, identity, template, media]), job.nuisance)
            for frame in range(job.frames):
                rng = np.random.default_rng([job.seed, _IJB_FRAME, identity, template, media, frame])
                view = base.replace(yaw=base.yaw + float(rng.normal(0, 3)), roll=base.roll + float(rng.normal(0, 2)),
                                    smile=base.smile + float(rng.normal(0, 0.01)))
                face, landmarks = renderer.render(view, rng)
                image, points = _loose_crop(face, landmarks, job.crop, rng)
                score = float(rng.uniform(0.55, 1.0))
                name = _image_name(job, identity, template, media, frame)
                (Path(job.root) / "loose_crop" / name).write_bytes(encode_image(image, ".jpg", quality=95))
                rows.append((identity, template, media, frame, points, score))
    return rows


def _image_name(job: _IjbJob, identity: int, template: int, media: int, frame: int) -> str:
    number = ((identity * job.templates + template) * job.media + media) * job.frames + frame
    return f"{number + 1}.jpg"


def _template_pairs(identities: int, templates: int, impostors: int, seed: int) -> list[tuple[int, int, int]]:
    """Every genuine template pair and `impostors` distinct random impostor pairs (template ids
    start at 1; identity i owns ids i*templates+1 …)."""
    ids = lambda i, t: i * templates + t + 1  # noqa: E731
    genuine = [(ids(i, a), ids(i, b), 1) for i in range(identities) for a in range(templates)
               for b in range(a + 1, templates)]
    total = identities * templates
    possible = total * (total - 1) // 2 - len(genuine)
    if impostors > possible:
        raise ConfigError(f"impostors={impostors} is more than the {possible} impostor template pairs possible")
    rng = np.random.default_rng([seed, _IJB_PAIRS])
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < impostors:
        a, b = sorted(int(v) for v in rng.choice(total, size=2, replace=False))
        if a // templates != b // templates:
            chosen.add((a + 1, b + 1))
    impostor = [(a, b, 0) for a, b in sorted(chosen)]
    return genuine + impostor


def generate_ijb(out: str | os.PathLike, identities: int = 20, templates_per_identity: int = 2,
                 media_per_template: int = 2, images_per_media: int = 2, crop: int = 160, target: str = "IJBC",
                 impostors: int | None = None, nuisance: float = 0.4, identity_spread: float = 0.8,
                 seed: int = 0, workers: int | None = None, progress: Progress | None = None,
                 overwrite: bool = False) -> dict:
    """Write a synthetic IJB set to `out` (`meta/<t>_*.txt`, `loose_crop/<n>.jpg`, `synth.json`).

    `impostors`: impostor template pairs (default: 5 per genuine pair, at most what is
    possible). Template and media ids start at 1 and are unique across the set. Returns a
    summary dict."""
    from facekd.io.ijb import IJB_TARGETS, write_ijb_meta

    started = time.perf_counter()
    progress = progress or Progress()
    identities = whole_number(identities, "identities", 2)
    templates = whole_number(templates_per_identity, "templates_per_identity", 2)
    media = whole_number(media_per_template, "media_per_template")
    frames = whole_number(images_per_media, "images_per_media")
    crop = whole_number(crop, "crop", 112, 1024)
    seed = whole_number(seed, "seed", 0)
    if target not in IJB_TARGETS:
        raise ConfigError(f"target must be one of {', '.join(IJB_TARGETS)}, got {target!r}")
    nuisance = real_number(nuisance, "nuisance", 0.0, 1.0)
    spread = real_number(identity_spread, "identity_spread", 0.0, 1.0)
    if spread <= 0:
        raise ConfigError("identity_spread must be above 0 (at 0 every identity is the mean face)")
    genuine = identities * templates * (templates - 1) // 2
    total = identities * templates
    possible = total * (total - 1) // 2 - genuine
    impostors = min(5 * genuine, possible) if impostors is None else whole_number(impostors, "impostors", 1)
    workers = _workers(workers)
    pairs = _template_pairs(identities, templates, impostors, seed)
    settings = {"kind": "ijb", "target": target, "identities": identities, "templates_per_identity": templates,
                "media_per_template": media, "images_per_media": frames, "crop": crop, "impostors": impostors,
                "nuisance": nuisance, "identity_spread": spread, "seed": seed}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "loose_crop").mkdir()
        job = _IjbJob(root=str(tmp), seed=seed, templates=templates, media=media, frames=frames, crop=crop,
                      nuisance=nuisance, spread=spread)
        rows = []
        with progress.task("rendering IJB images", identities * job.images_per_identity()) as bar:
            for items in _ordered_map(_ijb_task, [(job, i) for i in range(identities)], workers):
                for identity, template, medium, frame, points, score in items:
                    template_id = identity * templates + template + 1
                    media_id = template_id * media - media + medium + 1
                    rows.append((_image_name(job, identity, template, medium, frame), template_id, media_id,
                                 points, score))
                bar.advance(len(items))
        write_ijb_meta(tmp, target, rows, pairs)
        _write_manifest(tmp, settings)
    seconds = time.perf_counter() - started
    return {**settings, "out": str(Path(out)), "images": len(rows), "templates": total, "genuine_pairs": genuine,
            "impostor_pairs": impostors, "workers": workers, "seconds": round(seconds, 3)}
