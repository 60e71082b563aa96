from __future__ import annotations

import csv
import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import facekd
from facekd.errors import ConfigError, DataError
from facekd.io.formats import read_image_list, read_mos_csv
from facekd.io.images import Resize, read_image
from facekd.models import build_model
from facekd.models.artifact import save_model
from facekd.quality.data import QualityDataset, from_csv, from_list
from facekd.quality.pseudo import MIN_WEIGHT, flip_confidence, predict, pseudo_label, write_pseudo_labels
from facekd.inference import read_scores, score_files
from facekd.inference.predictors import preprocess
from facekd.inference.jobs import errors_path, journal_path, record_path
from facekd.synth import generate_quality

SIZE = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quality") / "data"
    generate_quality(root, labeled=24, unlabeled=16, test=8, size=SIZE, workers=0)
    return root


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, data) -> Path:
    """An untrained model whose scores differ visibly between images: batch-norm statistics
    taken from real images and a head with large weights (the default init scores ~0)."""
    torch.manual_seed(0)
    model = build_model("timm/mobilenetv3_small_100", input_size=SIZE)
    images = np.stack([read_image(row.path) for row in read_mos_csv(data / "labeled.csv")])
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = 1.0
        model.train()(preprocess(images, model.normalization))
        for module in model.head.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.5)
    return save_model(model.eval(), tmp_path_factory.mktemp("model") / "q.safetensors")


@pytest.fixture(scope="module")
def scorer(model_file):
    return facekd.load(model_file, batch_size=8)


@pytest.fixture
def net(model_file):
    from facekd.models.artifact import load_model

    return load_model(model_file)


class LinearMap:
    """Stands in for ScaleMap: a known monotone map, so the expected labels are computable."""

    def __init__(self, slope: float, intercept: float):
        self.slope, self.intercept = slope, intercept

    def apply(self, pred):
        return self.slope * np.asarray(pred, dtype=np.float64) + self.intercept


# ----------------------------------------------------------------------------- predict


def test_predict_matches_the_inference_api_and_restores_mode(data, net, scorer):
    dataset = QualityDataset(from_csv(data / "test.csv"), SIZE, net.normalization, workers=0)
    net.train()
    raw = predict(net, dataset, batch_size=3)
    assert net.training  # mode restored
    assert raw.shape == (8,) and raw.dtype == np.float32
    expected = scorer.score([read_image(p) for p in dataset.paths])
    np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-5)
    assert np.ptp(raw) > 1e-3
    both = predict(net, dataset.images, batch_size=5, flip=True)
    assert both.shape == (8, 2)
    np.testing.assert_allclose(both[:, 0], raw, rtol=1e-5, atol=1e-6)
    mirrored = predict(net, np.ascontiguousarray(dataset.images[:, :, ::-1]))
    np.testing.assert_allclose(both[:, 1], mirrored, rtol=1e-4, atol=1e-5)
    assert not np.allclose(both[:, 0], both[:, 1])


def test_predict_refuses_wrong_images(net):
    with pytest.raises(ConfigError, match="model takes 64x64"):
        predict(net, np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ConfigError, match="uint8 RGB"):
        predict(net, np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(ConfigError, match="batch_size"):
        predict(net, np.zeros((2, 64, 64, 3), np.uint8), batch_size=0)


# ----------------------------------------------------------------------------- pseudo-labels


def test_flip_confidence_weights():
    pred = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    flipped = pred + np.array([0.0, 0.1, 0.2, 0.4, 100.0])
    weights = flip_confidence(pred, flipped)
    assert weights[0] == 1.0 and weights[2] == pytest.approx(math.exp(-1.0))  # median gap -> e^-1
    assert np.all(np.diff(weights) < 0) and np.all(weights > 0) and np.all(weights <= 1)
    assert flip_confidence(pred, pred).tolist() == [1.0] * 5
    # median gap 0 -> the mean gap sets the scale
    sparse = flip_confidence(np.zeros(3), np.array([0.0, 0.0, 3.0]))
    assert sparse.tolist() == pytest.approx([1.0, 1.0, math.exp(-3.0)])


def test_pseudo_labels_on_the_mos_scale_with_confidence_and_skipped_files(data, net, tmp_path):
    unlabeled = read_image_list(data / "unlabeled_1.txt")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(unlabeled[0].read_bytes()[:150])
    listing = tmp_path / "u.txt"
    listing.write_text("\n".join([str(unlabeled[0]), str(corrupt), *map(str, unlabeled[1:]),
                                  str(tmp_path / "gone.png")]) + "\n")
    raw = predict(net, QualityDataset(from_list(data / "unlabeled_1.txt"), SIZE, net.normalization, workers=0),
                  flip=True)
    scale = LinearMap(10.0, 3.0)
    plain, errors = pseudo_label(net, [listing], scale, batch_size=4, workers=0)
    assert [s.path for s in plain] == unlabeled
    np.testing.assert_allclose([s.mos for s in plain], 10.0 * raw[:, 0] + 3.0, rtol=1e-5)
    assert all(s.weight == 1.0 for s in plain)
    assert [(p, "truncated" in r or "not found" in r) for p, r in errors] == [(corrupt, True),
                                                                             (tmp_path / "gone.png", True)]
    weighted, _ = pseudo_label(net, [listing], scale, confidence="flip", workers=2)
    assert [s.mos for s in weighted] == pytest.approx([s.mos for s in plain], rel=1e-5)
    weights = np.array([s.weight for s in weighted])
    assert np.all(weights > 0) and np.all(weights <= 1) and np.ptp(weights) > 0
    gap = 10.0 * np.abs(raw[:, 0].astype(np.float64) - raw[:, 1])
    np.testing.assert_allclose(weights, np.maximum(np.exp(-gap / np.median(gap)), MIN_WEIGHT), rtol=1e-3)
    # clipped to the labeled range
    low, high = np.quantile([s.mos for s in plain], [0.25, 0.75])
    clipped, _ = pseudo_label(net, [listing], scale, mos_range=(low, high), workers=0)
    values = np.array([s.mos for s in clipped])
    assert values.min() == pytest.approx(low) and values.max() == pytest.approx(high)
    np.testing.assert_allclose(values, np.clip([s.mos for s in plain], low, high))


def test_pseudo_labels_with_a_fitted_scale_map_land_in_the_labeled_range(data, net):
    from facekd.quality.metrics import ScaleMap

    labeled = QualityDataset(from_csv(data / "labeled.csv"), SIZE, net.normalization, workers=0)
    scale = ScaleMap.fit(predict(net, labeled), labeled.mos)
    mos_range = (labeled.mos.min(), labeled.mos.max())
    samples, errors = pseudo_label(net, [data / "unlabeled_2.txt"], scale, mos_range=mos_range, workers=0)
    assert errors == [] and len(samples) == 8
    values = np.array([s.mos for s in samples])
    assert np.all(values >= mos_range[0]) and np.all(values <= mos_range[1])


def test_pseudo_label_refusals(data, net, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("text")
    with pytest.raises(DataError, match="none of the 1 images could be read"):
        pseudo_label(net, [bad], LinearMap(1, 0))
    with pytest.raises(ConfigError, match="confidence"):
        pseudo_label(net, [data / "unlabeled_1.txt"], LinearMap(1, 0), confidence="dropout")
    with pytest.raises(ConfigError, match="mos_range"):
        pseudo_label(net, [data / "unlabeled_1.txt"], LinearMap(1, 0), mos_range=(5, 1))


def test_write_pseudo_labels_round_trip(data, net, tmp_path):
    samples, _ = pseudo_label(net, [data / "unlabeled_1.txt"], LinearMap(2.0, 1.0), confidence="flip", workers=0)
    out = data / "pseudo_t0.csv"
    write_pseudo_labels(out, samples)
    lines = out.read_text().splitlines()
    assert lines[0] == "path,mos,weight"
    assert lines[1].startswith("images/unlabeled/")  # relative to the CSV's folder
    assert read_mos_csv(out) == samples  # exact values, weights included
    out.unlink()


# ----------------------------------------------------------------------------- scoring


def score_inputs(data: Path, tmp_path: Path) -> tuple[list, dict[str, Path]]:
    """Inputs mixing a folder, a list with a missing entry and a non-image, and bad files."""
    test_images = [row.path for row in read_mos_csv(data / "test.csv")]
    extra = tmp_path / "extra"
    extra.mkdir()
    corrupt = extra / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    fake = extra / "fake.png"
    fake.write_text("hello")
    readme = tmp_path / "readme.md"
    readme.write_text("# not an image")
    listing = tmp_path / "more.txt"
    listing.write_text(f"{test_images[0]}\n{readme}\nmissing.png\n")
    bad = {"corrupt": corrupt, "fake": fake, "readme": readme, "missing": tmp_path / "missing.png"}
    return [data / "images" / "test", extra, listing], bad


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_score_files_lists_bad_images_and_keeps_input_order(data, scorer, tmp_path):
    inputs, bad = score_inputs(data, tmp_path)
    out = tmp_path / "scores.csv"
    summary = score_files(scorer, inputs, out, batch_size=3, workers=2)
    good = sorted((data / "images" / "test").iterdir())
    assert (summary.kind, summary.total, summary.done, summary.resumed, summary.skipped) == ("scores", 12, 8, 0, 4)
    assert summary.out == out and summary.errors_csv == errors_path(out) == tmp_path / "scores.errors.csv"
    assert summary.shard is None and summary.images_per_second > 0
    rows = read_rows(out)
    assert rows[0] == ["path", "score"]
    assert [Path(r[0]) for r in rows[1:]] == good  # outside the CSV's folder: absolute
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]], scorer.score(good), rtol=1e-5, atol=1e-6)
    errors = read_rows(summary.errors_csv)
    assert errors[0] == ["path", "reason"]
    reasons = {r[0]: r[1] for r in errors[1:]}
    assert list(reasons) == ["extra/corrupt.jpg", "extra/fake.png", "readme.md", "missing.png"]  # relative
    assert "JPEG" in reasons["extra/corrupt.jpg"]
    assert "not a supported image" in reasons["extra/fake.png"] and "not a supported image" in reasons["readme.md"]
    assert "not found" in reasons["missing.png"]
    assert not journal_path(out).exists()
    assert read_scores(out) == {p: pytest.approx(v, rel=1e-5) for p, v in zip(good, scorer.score(good))}
    record = json.loads(record_path(out).read_text())
    assert record_path(out).name == "scores.run.json"
    assert [record[k] for k in ("kind", "total", "done", "skipped", "dim")] == ["scores", 12, 8, 4, 1]


def test_strict_scoring_raises_and_writes_nothing(data, scorer, tmp_path):
    inputs, bad = score_inputs(data, tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(DataError) as info:
        score_files(scorer, inputs, tmp_path / "scores.csv", batch_size=3, strict=True, workers=0)
    assert info.value.path == str(bad["corrupt"])
    assert sorted(os.listdir(tmp_path)) == before


class Interrupted(Exception):
    """The simulated crash of a scoring run."""


class FlakyScorer:
    """Delegates `infer` to a real scorer, counts the images it scores, and raises `Interrupted`
    on call number `fail_on` (a crash after `fail_on - 1` batches)."""

    task = "quality"

    def __init__(self, scorer, fail_on: int | None = None):
        self.scorer, self.fail_on = scorer, fail_on
        self.input_size, self.geometry = scorer.input_size, scorer.geometry
        self.calls, self.images = 0, 0

    def infer(self, batch, flip=False):
        self.calls += 1
        if self.calls == self.fail_on:
            raise Interrupted("simulated crash")
        self.images += len(batch)
        return self.scorer.infer(batch, flip=flip)


def record_bytes(paths) -> int:
    """Size of the journal records of `paths` (score jobs: one float32 each)."""
    return sum(8 + len(str(p).encode()) + 4 for p in paths)


def test_resume_after_a_crash_scores_only_the_rest_and_matches_an_uninterrupted_run(data, scorer, tmp_path):
    inputs = [data / "images" / "labeled", data / "unlabeled_1.txt"]
    files = sorted((data / "images" / "labeled").iterdir()) + read_image_list(data / "unlabeled_1.txt")
    reference = tmp_path / "reference" / "scores.csv"
    score_files(scorer, inputs, reference, batch_size=8, workers=0)

    out = tmp_path / "scores.csv"
    crashing = FlakyScorer(scorer, fail_on=3)  # two batches done, then a crash
    with pytest.raises(Interrupted):
        score_files(crashing, inputs, out, batch_size=8, workers=2)
    assert crashing.images == 16 and not out.exists()  # atomic: no half-written output
    journal = journal_path(out)
    assert journal.name == ".scores.csv.partial" and journal.is_file()
    size = journal.stat().st_size
    with open(journal, "ab") as handle:
        handle.write(struct.pack("<II", 40, 12345) + b"/torn/pa")  # a crash in the middle of a write

    with pytest.raises(DataError, match=r"different job \(its model differ"):
        score_files(scorer, inputs, out, batch_size=8, resume=True, fingerprint="other")
    assert journal.stat().st_size == size + 16  # a refused resume leaves the journal alone
    second = FlakyScorer(scorer, fail_on=2)  # crashes again after one more batch
    with pytest.raises(Interrupted):
        score_files(second, inputs, out, batch_size=8, resume=True, workers=0)
    assert second.images == 8 and not out.exists()
    assert journal.stat().st_size == size + record_bytes(files[16:24])  # torn record cut off

    resumed_model = FlakyScorer(scorer)
    summary = score_files(resumed_model, inputs, out, batch_size=8, resume=True, workers=0)
    assert (summary.total, summary.resumed, summary.done, summary.skipped) == (32, 24, 8, 0)
    assert resumed_model.images == 8  # only what the journal lacked
    assert out.read_bytes() == reference.read_bytes()
    assert not journal.exists() and summary.errors_csv is None

    # an existing output is refused without resume/overwrite; resume on a finished CSV scores nothing
    with pytest.raises(DataError, match="already exists"):
        score_files(scorer, inputs, out)
    idle = FlakyScorer(scorer)
    again = score_files(idle, inputs, out, resume=True)
    assert (again.resumed, again.done, idle.calls) == (32, 0, 0)
    assert out.read_bytes() == reference.read_bytes()
    assert not journal.exists()


def test_without_resume_an_old_journal_is_discarded_and_overwrite_replaces(data, scorer, tmp_path):
    image = sorted((data / "images" / "test").iterdir())[0]
    out = tmp_path / "scores.csv"
    first = FlakyScorer(scorer, fail_on=1)
    with pytest.raises(Interrupted):
        score_files(first, [image], out, workers=0)
    journal = journal_path(out)
    body = str(image).encode() + struct.pack("<f", 123.0)  # a whole record: resume would take it
    journal.write_bytes(journal.read_bytes() + struct.pack("<II", len(str(image).encode()), zlib.crc32(body)) + body)
    counting = FlakyScorer(scorer)
    summary = score_files(counting, [image], out, workers=0)
    (value,) = read_scores(out).values()
    assert value == pytest.approx(float(scorer.score([image])[0]), rel=1e-5) and value != 123.0
    assert (summary.done, summary.resumed, counting.images) == (1, 0, 1) and not journal.exists()
    # overwrite, with a stale errors CSV removed when the new run has no errors
    errors_path(out).write_text("path,reason\nold.png,old\n")
    summary = score_files(scorer, [image], out, overwrite=True, workers=0)
    assert summary.errors_csv is None and not errors_path(out).exists()


def test_all_images_bad_gives_an_error_and_no_scores(tmp_path, scorer):
    fake = tmp_path / "a.png"
    fake.write_text("x")
    out = tmp_path / "scores.csv"
    with pytest.raises(DataError, match="none of the 1 images could be used"):
        score_files(scorer, [fake], out, workers=0)
    assert not out.exists() and not journal_path(out).exists() and not record_path(out).exists()
    assert read_rows(errors_path(out))[1][0] == "a.png"


def test_score_files_refusals(data, scorer, tmp_path):
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    with pytest.raises(DataError, match="is a folder"):
        score_files(scorer, [data / "images" / "test"], folder)
    with pytest.raises(DataError, match=r"written to a \.csv file"):
        score_files(scorer, [data / "images" / "test"], tmp_path / "s.npz")
    with pytest.raises(ConfigError, match="batch_size"):
        score_files(scorer, [data / "images" / "test"], tmp_path / "s.csv", batch_size=0)
    with pytest.raises(ConfigError, match="workers"):
        score_files(scorer, [data / "images" / "test"], tmp_path / "s.csv", workers=-1)
    with pytest.raises(DataError, match="not found"):
        score_files(scorer, [tmp_path / "nowhere"], tmp_path / "s.csv")
    embedder = type("Embedder", (), {"task": "recognition", "input_size": SIZE})()
    with pytest.raises(ConfigError, match="quality model"):
        score_files(embedder, [data / "images" / "test"], tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists() and not journal_path(tmp_path / "s.csv").exists()


class NanForBrightImages:
    """A scorer that returns NaN for images brighter than a threshold (a broken model)."""

    input_size = SIZE
    geometry = Resize(SIZE)
    task = "quality"

    def __init__(self, threshold: float):
        self.threshold = threshold

    def infer(self, batch, flip=False):
        assert batch.shape[1:] == (SIZE, SIZE, 3) and batch.dtype == np.uint8 and not flip
        return np.array([math.nan if image.mean() > self.threshold else image.mean() for image in batch])


def test_non_finite_scores_are_listed_as_errors_or_raised_in_strict_mode(data, tmp_path):
    images = sorted((data / "images" / "test").iterdir())
    means = [read_image(p).mean() for p in images]
    threshold = float(np.median(means))
    out = tmp_path / "scores.csv"
    summary = score_files(NanForBrightImages(threshold), images, out, batch_size=3, workers=0)
    bright = [p for p, m in zip(images, means) if m > threshold]
    assert summary.skipped == len(bright) > 0 and summary.done == len(images) - len(bright)
    errors = read_rows(errors_path(out))[1:]
    assert [Path(r[0]) for r in errors] == bright
    assert all(r[1] == "the model returned a non-finite score (nan)" for r in errors)
    assert list(read_scores(out)) == [p for p in images if p not in bright]
    with pytest.raises(DataError, match=r"non-finite score \(nan\)"):
        score_files(NanForBrightImages(threshold), images, tmp_path / "strict.csv", strict=True, workers=0)
    assert not (tmp_path / "strict.csv").exists() and not journal_path(tmp_path / "strict.csv").exists()
