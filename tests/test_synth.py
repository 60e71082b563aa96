"""facekd.synth: deterministic synthetic faces, degradations and the MOS formula."""

from __future__ import annotations

import csv
import hashlib
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from facekd.errors import ConfigError, DataError
from facekd.io.formats import read_image_list, read_mos_csv, read_pairs
from facekd.io.images import decode_image, read_image
from facekd.synth import datasets as synth_datasets
from facekd.synth import (DEGRADATIONS, Degradation, FaceRenderer, View, apply_degradations,
                          difficulty_settings, generate_identities, generate_quality, mos_from_severities,
                          sample_identity, sample_severities, sample_view)
from facekd.synth import degrade as dg
from facekd.synth.faces import ARCFACE_TEMPLATE_112


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _face(seed: int = 0, size: int = 112, view: View | None = None) -> tuple[np.ndarray, np.ndarray]:
    renderer = FaceRenderer(sample_identity(np.random.default_rng(seed), 1.0), size)
    return renderer.render(view or View(), np.random.default_rng(seed))


def _laplacian_var(image: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def _high_freq(image: np.ndarray) -> float:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float64)
    return float(np.mean((gray - cv2.GaussianBlur(gray, (0, 0), 1.5)) ** 2))


# --------------------------------------------------------------------------- determinism


def test_identities_byte_identical_across_worker_counts(tmp_path):
    kwargs = dict(identities=5, images_per_identity=3, seed=3, formats=("folder", "rec", "bin"), degrade=0.5)
    generate_identities(tmp_path / "a", workers=0, **kwargs)
    generate_identities(tmp_path / "b", workers=2, **kwargs)
    a, b = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert a == b
    assert {"train.rec", "train.idx", "property", "pairs.bin", "pairs.txt", "landmarks.csv", "quality.csv",
            "id_00004/0002.png"} <= set(a)


def test_quality_byte_identical_across_worker_counts(tmp_path):
    kwargs = dict(labeled=5, unlabeled=4, test=3, size=96, seed=1)
    generate_quality(tmp_path / "a", workers=0, **kwargs)
    generate_quality(tmp_path / "b", workers=2, **kwargs)
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")


def test_different_seeds_give_different_images(tmp_path):
    generate_identities(tmp_path / "a", identities=2, images_per_identity=2, seed=0, workers=0)
    generate_identities(tmp_path / "b", identities=2, images_per_identity=2, seed=1, workers=0)
    a, b = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    pngs = [k for k in a if k.endswith(".png")]
    assert pngs and all(a[k] != b[k] for k in pngs)


# --------------------------------------------------------------------------- faces


def test_same_identity_images_are_more_alike_than_other_identities():
    spread, nuisance = difficulty_settings(synth_datasets.DEFAULT_DIFFICULTY)
    features, labels = [], []
    for identity in range(8):
        renderer = FaceRenderer(sample_identity(np.random.default_rng([5, identity]), spread), 112)
        for index in range(4):
            rng = np.random.default_rng([6, identity, index])
            image, _ = renderer.render(sample_view(rng, nuisance), rng)
            gray = cv2.cvtColor(image[20:104, 20:92], cv2.COLOR_RGB2GRAY)
            small = cv2.resize(gray, (18, 21), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
            small = (small - small.mean()) / (small.std() + 1e-9)
            features.append(small / np.linalg.norm(small))
            labels.append(identity)
    features, labels = np.array(features), np.array(labels)
    sim = features @ features.T
    upper = np.triu(np.ones_like(sim, bool), 1)
    same = (labels[:, None] == labels[None, :]) & upper
    other = (labels[:, None] != labels[None, :]) & upper
    assert sim[same].mean() > sim[other].mean() + 0.05


def test_landmarks_of_mean_face_follow_template_and_sit_on_the_pupils():
    renderer = FaceRenderer(sample_identity(np.random.default_rng(0), 1e-6), 112)
    image, landmarks = renderer.render(View(), np.random.default_rng(0))
    assert image.shape == (112, 112, 3) and image.dtype == np.uint8
    assert np.abs(landmarks - ARCFACE_TEMPLATE_112).max() < 3.0
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(float)
    for x, y in landmarks[:2]:
        assert gray[int(round(y)), int(round(x))] < gray[40:100, 30:82].mean() - 40


def test_landmarks_follow_roll_and_shift():
    identity = sample_identity(np.random.default_rng(1), 0.5)
    renderer = FaceRenderer(identity, 112)
    base = renderer.landmarks(View())
    shifted = renderer.landmarks(View(shift_x=0.1))
    assert np.allclose(shifted - base, [11.2, 0.0], atol=1e-3)
    rolled = renderer.landmarks(View(roll=20))
    eyes = rolled[1] - rolled[0]
    assert math.degrees(math.atan2(eyes[1], eyes[0])) == pytest.approx(20, abs=1.5)
    yawed = renderer.landmarks(View(yaw=30))
    assert yawed[2, 0] - base[2, 0] > 10  # the nose tip swings with the head


def test_identity_spread_controls_how_far_identities_stray():
    def distance(spread: float) -> float:
        a = sample_identity(np.random.default_rng(1), spread).values
        b = sample_identity(np.random.default_rng(2), spread).values
        return sum(abs(a[k] - b[k]) for k in a)

    assert distance(0.2) < 0.5 * distance(1.0)
    assert difficulty_settings(0.0)[0] > difficulty_settings(1.0)[0]
    assert difficulty_settings(0.0)[1] < difficulty_settings(1.0)[1]


# --------------------------------------------------------------------------- MOS


def test_mos_is_monotonic_in_each_severity_alone():
    for name in DEGRADATIONS:
        values = [mos_from_severities({name: s}) for s in np.linspace(0, 1, 11)]
        assert all(b < a for a, b in zip(values, values[1:])), name
        assert 1.0 <= values[-1] < values[0] <= 5.0


def test_occluding_the_eyes_costs_more_than_the_forehead():
    assert mos_from_severities({"occlusion": 0.6}, "eyes") < mos_from_severities({"occlusion": 0.6}, "forehead") - 0.3


def test_mos_is_not_additive():
    clean = mos_from_severities({})

    def drop(**severities) -> float:
        return clean - mos_from_severities(severities)

    # Blur and down-scaling saturate each other.
    assert drop(blur=0.5, downscale=0.5) < drop(blur=0.5) + drop(downscale=0.5) - 0.3
    # Noise is masked by the blur applied after it.
    assert drop(blur=0.6, noise=0.6) - drop(blur=0.6) < 0.6 * drop(noise=0.6)


def test_label_noise_is_moderate_and_clipped():
    rng = np.random.default_rng(0)
    clean = mos_from_severities({"jpeg": 0.5})
    noisy = np.array([mos_from_severities({"jpeg": 0.5}, rng=rng) for _ in range(400)])
    assert 0.08 < noisy.std() < 0.2
    assert abs(noisy.mean() - clean) < 0.03
    assert all(1.0 <= mos_from_severities({}, rng=rng) <= 5.0 for _ in range(50))


def test_sampled_severities_cover_the_mos_range():
    rng = np.random.default_rng(0)
    draws = [sample_severities(rng) for _ in range(600)]
    mos = np.array([mos_from_severities(d.severities, d.region) for d in draws])
    counts = np.histogram(mos, bins=[1, 2, 3, 4, 5])[0] / len(mos)
    assert counts.min() > 0.15
    active = np.array([len(d.active()) for d in draws])
    assert (active >= 2).mean() > 0.3 and (active == 0).mean() > 0.01


# --------------------------------------------------------------------------- degradations


def test_degradations_change_images_as_expected():
    image, landmarks = _face(2, 128)
    rng = np.random.default_rng(0)
    assert _laplacian_var(dg.blur(image, 0.6)) < 0.5 * _laplacian_var(image)
    assert _laplacian_var(dg.downscale(image, 0.6)) < 0.5 * _laplacian_var(image)
    assert _high_freq(dg.noise(image, 0.5, rng)) > 2 * _high_freq(image)
    assert not np.array_equal(dg.jpeg(image, 0.9), image)
    error = lambda im: np.abs(im.astype(int) - image).mean()  # noqa: E731
    assert error(dg.jpeg(image, 0.9)) > error(dg.jpeg(image, 0.1))
    assert dg.exposure(image, 0.7, over=False).mean() < image.mean() - 30
    assert dg.exposure(image, 0.7, over=True).mean() > image.mean() + 30
    gray = lambda im: cv2.cvtColor(im, cv2.COLOR_RGB2GRAY).astype(float)  # noqa: E731
    moved = gray(dg.motion_blur(image, 0.8, angle=0.0))  # horizontal streaks
    dx = lambda im: np.abs(np.diff(im, axis=1)).mean()  # noqa: E731
    dy = lambda im: np.abs(np.diff(im, axis=0)).mean()  # noqa: E731
    assert dx(moved) / dx(gray(image)) < dy(moved) / dy(gray(image))
    cropped = dg.crop_shift(image, 0.8, angle=0.0, black=True)
    assert cropped[:, :20].max() == 0 and cropped[:, 60:].any()


def test_occlusion_covers_the_chosen_region():
    image, landmarks = _face(3, 112)
    eyes = dg.occlude(image, landmarks, 1.0, np.random.default_rng(0), region="eyes", style="bar")
    changed = np.abs(eyes.astype(int) - image).sum(axis=2) > 0
    x, y = landmarks[0].round().astype(int)
    mx, my = landmarks[3].round().astype(int)
    assert changed[y, x] and not changed[my + 4, mx]
    mouth = dg.occlude(image, landmarks, 1.0, np.random.default_rng(0), region="mouth", style="bar")
    changed = np.abs(mouth.astype(int) - image).sum(axis=2) > 0
    assert changed[my, mx + 2] and not changed[y - 2, x]


def test_apply_degradations_keeps_a_clean_image_and_moves_landmarks_with_a_crop():
    image, landmarks = _face(4, 112)
    same, moved = apply_degradations(image, landmarks, Degradation(), np.random.default_rng(0))
    assert np.array_equal(same, image) and np.allclose(moved, landmarks)
    deg = Degradation()
    deg.severities["crop"] = 0.5
    _, shifted = apply_degradations(image, landmarks, deg, np.random.default_rng(0))
    assert np.linalg.norm(shifted[0] - landmarks[0]) == pytest.approx(0.45 * 0.5 * 112, abs=0.01)


# --------------------------------------------------------------------------- datasets


def test_identity_folder_pairs_and_landmarks(tmp_path):
    out = tmp_path / "ids"
    summary = generate_identities(out, identities=6, images_per_identity=4, seed=2, workers=0)
    assert summary["images"] == 24 and summary["pairs"] == 2 * min(6 * 6, 15 * 16)
    pairs = read_pairs(out / "pairs.txt")  # checks that every file exists
    assert len(pairs) == summary["pairs"]
    assert sum(p.same for p in pairs) == len(pairs) // 2
    keys = {tuple(sorted((p.a.as_posix(), p.b.as_posix()))) for p in pairs}
    assert len(keys) == len(pairs)
    for p in pairs:
        assert p.a != p.b
        assert (p.a.parent == p.b.parent) == p.same
    with open(out / "landmarks.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 24 and rows[0]["path"] == "id_00000/0000.png"
    image = read_image(out / rows[5]["path"])
    assert image.shape == (112, 112, 3)
    coords = np.array([[float(r[f"{a}{k}"]) for k in range(1, 6) for a in "xy"] for r in rows]).reshape(-1, 5, 2)
    assert (coords[:, 0, 0] < coords[:, 1, 0]).all()  # left eye left of right eye
    assert ((coords > 0) & (coords < 112)).mean() > 0.95


def test_identity_rec_and_bin_formats_hold_the_same_images(tmp_path):
    from facekd.io.recordio import read_insightface_dataset
    from facekd.io.verification import read_verification_bin

    out = tmp_path / "ids"
    generate_identities(out, identities=3, images_per_identity=3, seed=4, formats=("folder", "rec", "bin"),
                        pairs=6, workers=0)
    rec = read_insightface_dataset(out / "train.rec")
    assert len(rec) == 9 and rec.num_classes == 3
    assert list(rec.labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert rec.image_bytes(4) == (out / "id_00001" / "0001.png").read_bytes()
    assert (out / "property").read_text().strip() == "3,112,112"
    verification = read_verification_bin(out / "pairs.bin")
    pairs = read_pairs(out / "pairs.txt")
    assert len(verification) == len(pairs) == 6
    for k, pair in enumerate(pairs):
        a, b, same = verification.pair(k)
        assert same == pair.same and a == pair.a.read_bytes() and b == pair.b.read_bytes()


def test_rec_only_writes_no_image_tree(tmp_path):
    out = tmp_path / "rec"
    generate_identities(out, identities=2, images_per_identity=2, formats=("rec",), workers=0)
    assert sorted(p.name for p in out.iterdir()) == ["property", "synth.json", "train.idx", "train.rec"]


def test_identities_with_degradations_record_mos(tmp_path):
    out = tmp_path / "ids"
    generate_identities(out, identities=2, images_per_identity=4, degrade=1.0, workers=0)
    rows = read_mos_csv(out / "quality.csv")
    assert len(rows) == 8 and all(1.0 <= r.mos <= 5.0 for r in rows)
    assert len({round(r.mos, 3) for r in rows}) > 4


def test_quality_dataset_files(tmp_path):
    out = tmp_path / "q"
    summary = generate_quality(out, labeled=6, unlabeled=5, test=4, size=96, workers=0)
    assert summary["images"] == 15
    labeled, test = read_mos_csv(out / "labeled.csv"), read_mos_csv(out / "test.csv")
    assert len(labeled) == 6 and len(test) == 4
    assert all(1.0 <= r.mos <= 5.0 for r in labeled + test)
    first, second = read_image_list(out / "unlabeled_1.txt"), read_image_list(out / "unlabeled_2.txt")
    assert len(first) == 3 and len(second) == 2 and not set(first) & set(second)
    assert decode_image((out / "images" / "test" / "000003.png").read_bytes()).shape == (96, 96, 3)
    with open(out / "severities.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 15 and set(DEGRADATIONS) <= set(rows[0])
    by_path = {r["path"]: r for r in rows}
    for item in labeled:
        row = by_path[item.path.relative_to(out).as_posix()]
        severities = {name: float(row[name]) for name in DEGRADATIONS}
        assert float(row["mos_clean"]) == pytest.approx(mos_from_severities(severities, row["region"]), abs=1e-3)
        assert float(row["mos"]) == pytest.approx(item.mos, abs=1e-3)


# --------------------------------------------------------------------------- failures


def test_failed_generation_leaves_no_output(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synth_datasets._encode_png

    def failing(image):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("disk on fire")
        return real(image)

    monkeypatch.setattr(synth_datasets, "_encode_png", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        generate_identities(tmp_path / "ids", identities=3, images_per_identity=2, workers=0)
    assert list(tmp_path.iterdir()) == []
    # An existing dataset survives a failed overwrite.
    monkeypatch.setattr(synth_datasets, "_encode_png", real)
    generate_quality(tmp_path / "q", labeled=2, unlabeled=0, test=2, size=64, workers=0)
    before = _hashes(tmp_path / "q")
    calls["n"] = 0
    monkeypatch.setattr(synth_datasets, "_encode_png", failing)
    with pytest.raises(RuntimeError):
        generate_quality(tmp_path / "q", labeled=4, unlabeled=0, test=2, size=64, workers=0, overwrite=True)
    assert _hashes(tmp_path / "q") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "ids"
    generate_identities(out, identities=2, images_per_identity=2, workers=0)
    with pytest.raises(DataError, match="not empty"):
        generate_identities(out, identities=2, images_per_identity=2, workers=0)
    generate_identities(out, identities=3, images_per_identity=2, workers=0, overwrite=True)
    assert (out / "id_00002").is_dir()


@pytest.mark.parametrize("kwargs, message", [
    (dict(difficulty=1.5), "difficulty"),
    (dict(formats=("folder", "zip")), "formats"),
    (dict(pairs=1000), "pairs"),
    (dict(identities=0), "identities"),
    (dict(size=8), "size"),
    (dict(seed=-1), "seed"),
    (dict(workers=-2), "workers"),
    (dict(identity_spread=0.0), "identity_spread"),
])
def test_bad_identity_arguments(tmp_path, kwargs, message):
    args = dict(identities=3, images_per_identity=2, workers=0) | kwargs
    with pytest.raises(ConfigError, match=message):
        generate_identities(tmp_path / "ids", **args)
    assert not (tmp_path / "ids").exists()


def test_bad_quality_arguments(tmp_path):
    with pytest.raises(ConfigError, match="unlabeled"):
        generate_quality(tmp_path / "q", labeled=2, unlabeled=1, test=2, workers=0)
    with pytest.raises(ConfigError, match="labeled"):
        generate_quality(tmp_path / "q", labeled=0, unlabeled=0, test=2, workers=0)
