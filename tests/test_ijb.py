"""IJB-B / IJB-C 1:1 verification (`facekd.io.ijb`, `facekd.recognition.ijb`, `facekd synth ijb`):
layout and its errors, alignment, parity with eval_ijbc.py's aggregation, bad images, resume, CLI."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import lively
from facekd.cli import main
from facekd.errors import ConfigError, DataError
from facekd.io.align import align_face
from facekd.io.ijb import ijb_files, read_ijb
from facekd.io.images import read_image
from facekd.models import build_model
from facekd.models.artifact import save_model
from facekd.progress import Progress, ProgressTask
from facekd.recognition.ijb import (IjbOptions, evaluate_ijb, image_features, pair_scores, template_features,
                                    tpr_at_fpr_nearest)
from facekd.synth import generate_ijb

pytestmark = pytest.mark.usefixtures("keep_torch_threads")  # conftest.py

LEVELS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
ALL_OPTIONS = [IjbOptions(*flags) for flags in itertools.product((True, False), repeat=3)]
SHAPE = dict(identities=6, templates_per_identity=2, media_per_template=2, images_per_media=2)
IMAGES = 6 * 2 * 2 * 2
TEMPLATES = 6 * 2
GENUINE = 6  # one pair of templates per identity
IMPOSTORS = 5 * GENUINE  # generate_ijb's default


# ----------------------------------------------------------------------------- reference (test only)
# A small numpy re-statement of insightface recognition/arcface_torch/eval_ijbc.py: its option
# block (use_flip_test, use_norm_score, use_detector_score), image2template_feature,
# verification and the TPR@FPR table, loop for loop.


def reference_inputs(img_feats: np.ndarray, faceness_scores: np.ndarray, options: IjbOptions) -> np.ndarray:
    half = img_feats.shape[1] // 2
    feats = img_feats[:, :half] + img_feats[:, half:] if options.flip else img_feats[:, :half]
    if not options.norm_score:
        feats = feats / np.sqrt(np.sum(feats ** 2, -1, keepdims=True))
    if options.detector_score:
        feats = feats * faceness_scores[:, np.newaxis]
    return feats


def reference_template_features(img_feats, templates, medias):
    from sklearn.preprocessing import normalize

    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_feats.shape[1]))
    for row, template in enumerate(unique_templates):
        (in_template,) = np.where(templates == template)
        feats, its_medias = img_feats[in_template], medias[in_template]
        media_feats = []
        for media, count in zip(*np.unique(its_medias, return_counts=True)):
            (in_media,) = np.where(its_medias == media)
            media_feats.append(feats[in_media] if count == 1 else np.mean(feats[in_media], axis=0, keepdims=True))
        template_feats[row] = np.sum(np.array(media_feats), axis=0)
    return normalize(template_feats), unique_templates


def reference_verification(template_norm_feats, unique_templates, p1, p2):
    template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for row, template in enumerate(unique_templates):
        template2id[template] = row
    feat1, feat2 = template_norm_feats[template2id[p1]], template_norm_feats[template2id[p2]]
    return np.sum(feat1 * feat2, -1).flatten()


def reference_tprs(label, score):
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(label, score)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return [tpr[min(zip(abs(fpr - level), range(len(fpr))))[1]] for level in LEVELS]


def reference_scores(raw, scores, templates, medias, p1, p2, options):
    feats, unique = reference_template_features(reference_inputs(raw, scores, options), templates, medias)
    return reference_verification(feats, unique, p1, p2)


def ours(raw, scores, templates, medias, p1, p2, options):
    unique, feats = template_features(image_features(raw, scores, options), templates, medias)
    return pair_scores(unique, feats, p1, p2)


# ----------------------------------------------------------------------------- fixtures


class Stop(Exception):
    pass


class StopAfterFirstBatch(Progress):
    """Interrupts a job once its first batch is journaled (as a kill would)."""

    def task(self, description, total=None, unit=""):
        class Task(ProgressTask):
            def advance(self, n=1, **info):
                raise Stop

        return Task()


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ijb") / "set"
    generate_ijb(root, workers=0, seed=3, **SHAPE)
    return root


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = lively(build_model("mobilefacenet", embedding_size=64, width_mult=0.25), seed=0)
    return save_model(model, tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, ijb_root, model_file) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval") / "run"
    return out, evaluate_ijb(model_file, ijb_root, out, batch_size=16, workers=1)


def copy_set(root: Path, to: Path) -> Path:
    shutil.copytree(root, to)
    return to


def edit_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def archive(out: Path) -> tuple[list[str], np.ndarray]:
    with np.load(out / "embeddings.npz") as data:
        return [Path(p).name for p in data["paths"].tolist()], data["embeddings"]


# ----------------------------------------------------------------------------- layout


def test_synthetic_set_has_the_layout_and_landmarks_that_find_the_face(ijb_root):
    protocol = read_ijb(ijb_root, "IJBC")
    assert len(protocol) == IMAGES and all(p.is_file() for p in protocol.paths)
    assert len(np.unique(protocol.templates)) == TEMPLATES
    per_template = {t: set(protocol.medias[protocol.templates == t]) for t in np.unique(protocol.templates)}
    assert all(len(m) == 2 for m in per_template.values())
    assert len(set().union(*per_template.values())) == 2 * TEMPLATES  # media ids are unique across templates
    assert protocol.labels.sum() == GENUINE and (~protocol.labels).sum() == IMPOSTORS
    assert ((protocol.detector_scores > 0) & (protocol.detector_scores <= 1)).all()
    # two frames of one media, each aligned with its own landmarks: nearly the same face (eyes to
    # mouth); with the other frame's landmarks the faces fall apart
    first, second = read_image(protocol.paths[0]), read_image(protocol.paths[1])
    assert protocol.medias[0] == protocol.medias[1]

    def face(image, points):
        return align_face(image, points)[40:100, 30:82].astype(float)

    own = np.abs(face(first, protocol.landmarks[0]) - face(second, protocol.landmarks[1])).mean()
    swapped = np.abs(face(first, protocol.landmarks[0]) - face(second, protocol.landmarks[0])).mean()
    assert own < 0.5 * swapped
    # the face is not already at the template position in the loose crop
    assert np.abs(protocol.landmarks[:, 0] - np.array([38.29, 51.70])).max() > 5


def test_synthetic_set_is_deterministic_and_ijbb_names(tmp_path):
    def digest(root: Path) -> str:
        hasher = hashlib.sha256()
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "synth.json"):
            hasher.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
        return hasher.hexdigest()

    small = dict(identities=2, templates_per_identity=2, media_per_template=1, images_per_media=2)
    generate_ijb(tmp_path / "a", seed=5, workers=0, target="IJBB", **small)
    generate_ijb(tmp_path / "b", seed=5, workers=2, target="IJBB", **small)
    generate_ijb(tmp_path / "c", seed=6, workers=0, target="IJBB", **small)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "a" / "meta").iterdir()) == [
        "ijbb_face_tid_mid.txt", "ijbb_name_5pts_score.txt", "ijbb_template_pair_label.txt"]
    assert len(read_ijb(tmp_path / "a", "IJBB")) == 2 * 2 * 1 * 2
    with pytest.raises(DataError, match="ijbc_face_tid_mid.txt.*not found"):
        read_ijb(tmp_path / "a", "IJBC")


@pytest.mark.parametrize("meta, line, text, message", [
    ("face_tid_mid", 2, "2.jpg 1", r"line 2: expected 3 fields"),
    ("face_tid_mid", 3, "3.jpg one 2", r"line 3: template_id 'one' is not an integer"),
    ("face_tid_mid", 4, "4.jpg 1 2.5", r"line 4: media_id '2.5' is not an integer"),
    ("name_5pts_score", 2, "2.jpg 1 2 3 4 5 6 7 8 9 10", r"line 2: expected 12 fields"),
    ("name_5pts_score", 5, "5.jpg 1 2 3 x 5 6 7 8 9 10 0.9", r"line 5: y2 'x' is not a number"),
    ("name_5pts_score", 6, "6.jpg 1 2 3 4 5 6 7 8 9 10 nan", r"line 6: detector_score 'nan' is not a finite"),
    ("name_5pts_score", 7, "99.jpg 1 2 3 4 5 6 7 8 9 10 0.9", r"line 7: image '99.jpg' but line 7 of"),
    ("template_pair_label", 3, "1 2", r"line 3: expected 3 fields"),
    ("template_pair_label", 4, "1 b 0", r"line 4: template_id_2 'b' is not an integer"),
    ("template_pair_label", 5, "1 2 2", r"line 5: label '2' must be 1"),
    ("template_pair_label", 6, "1 777 0", r"line 6: template 777 is not in ijbc_face_tid_mid.txt"),
])
def test_malformed_meta_files_name_the_file_and_line(ijb_root, tmp_path, meta, line, text, message):
    root = tmp_path / "set"
    shutil.copytree(ijb_root / "meta", root / "meta")
    path = ijb_files(root, "IJBC")[meta]
    edit_line(path, line, text)
    with pytest.raises(DataError, match=message) as error:
        read_ijb(root, "IJBC")
    assert error.value.path == str(path)


def test_missing_files_duplicate_image_and_unknown_target(ijb_root, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(ijb_root / "meta", root / "meta")
    files = ijb_files(root, "IJBC")
    with pytest.raises(ConfigError, match="IJBC, IJBB.*'IJBA'"):
        read_ijb(root, "IJBA")
    with pytest.raises(DataError, match="loose_crop: image folder not found"):
        read_ijb(root, "IJBC")  # only meta/ was copied
    (root / "loose_crop").mkdir()
    pairs = files["template_pair_label"].read_text()
    files["template_pair_label"].write_text("\n  \n")
    with pytest.raises(DataError, match="ijbc_template_pair_label.txt: no pairs listed"):
        read_ijb(root, "IJBC")
    files["template_pair_label"].write_text(pairs)
    assert len(read_ijb(root, "IJBC").labels) == GENUINE + IMPOSTORS
    for key in ("face_tid_mid", "name_5pts_score"):
        edit_line(files[key], 3, files[key].read_text().splitlines()[1])
    with pytest.raises(DataError, match=r"line 3: image '2.jpg' again \(first on line 2\)"):
        read_ijb(root, "IJBC")
    files["template_pair_label"].unlink()
    with pytest.raises(DataError, match="ijbc_template_pair_label.txt: IJB meta file .* not found"):
        read_ijb(root, "IJBC")


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("options", ALL_OPTIONS, ids=lambda o: o.mode)
def test_scores_and_tprs_equal_eval_ijbc_on_the_same_embeddings(evaluated, ijb_root, options):
    out, _ = evaluated
    protocol = read_ijb(ijb_root, "IJBC")
    names, raw = archive(out)
    assert names == [p.name for p in protocol.paths]
    rng = np.random.default_rng(7)
    # the set's embeddings, and a random set with 1..4 media per template and 1..3 images per media
    count = 400
    templates = rng.integers(1, 60, count)
    medias = templates * 10 + rng.integers(0, 4, count)
    random_set = (rng.normal(0, 3, (count, 32)).astype(np.float32), rng.uniform(0.3, 1, count).astype(np.float32),
                  templates, medias)
    # distinct pairs of two different templates: a tie (a pair twice, a template with itself) would
    # leave the ROC order to rounding, where float32 (eval_ijbc.py) and float64 (ours) differ
    every_pair = np.array(list(itertools.combinations(np.unique(templates), 2)))
    random_pairs = every_pair[rng.choice(len(every_pair), 800, replace=False)]
    cases = [((raw, protocol.detector_scores, protocol.templates, protocol.medias), protocol.first, protocol.second,
              protocol.labels),
             (random_set, random_pairs[:, 0], random_pairs[:, 1], rng.random(800) < 0.1)]
    for inputs, p1, p2, labels in cases:
        expected = reference_scores(*inputs, p1, p2, options)
        got = ours(*inputs, p1, p2, options)
        assert np.abs(got - expected).max() < 1e-6
        features = image_features(inputs[0], inputs[1], options)
        by_chunks = template_features(features, inputs[2], inputs[3], chunk=5)  # summed a few templates at a time
        np.testing.assert_allclose(by_chunks[1], template_features(features, inputs[2], inputs[3])[1], atol=1e-12)
        table = tpr_at_fpr_nearest(got, labels, LEVELS)
        assert all(row["threshold"] is None or np.isfinite(row["threshold"]) for row in table)
        tprs = [row["tpr"] for row in table]
        np.testing.assert_allclose(tprs, reference_tprs(labels, expected), atol=1e-6)
    # and the options matter: the report's scores are those of its own setting only
    if options.mode != "N1D1F2":
        default = ours(*cases[1][0], *cases[1][1:3], IjbOptions())
        assert np.abs(ours(*cases[1][0], *cases[1][1:3], options) - default).max() > 1e-3


def test_nearest_rule_where_an_impostor_scores_highest():
    scores, labels = np.array([0.9, 0.7, 0.5, 0.3, 0.1]), np.array([False, True, True, False, False])
    table = tpr_at_fpr_nearest(scores, labels, LEVELS)
    assert [row["tpr"] for row in table] == pytest.approx(reference_tprs(labels, scores))
    assert table[0]["tpr"] == 0 and table[0]["threshold"] is None  # nothing accepted: no finite threshold
    json.dumps(table, allow_nan=False)


def test_report_figures_come_from_the_reference_aggregation(evaluated, ijb_root):
    out, report = evaluated
    protocol = read_ijb(ijb_root, "IJBC")
    _, raw = archive(out)
    expected = reference_scores(raw, protocol.detector_scores, protocol.templates, protocol.medias,
                                protocol.first, protocol.second, IjbOptions())
    saved = np.load(out / "scores.npy")
    assert np.abs(saved - expected).max() < 1e-6
    assert [r["tpr"] for r in report["tpr_at_fpr_nearest"]] == pytest.approx(
        reference_tprs(protocol.labels, expected), abs=1e-6)
    assert report["mode"] == "N1D1F2" and report["scored_pairs"] == report["pairs"] == GENUINE + IMPOSTORS
    assert report["skipped_images"] == [] and report["templates_without_images"] == []
    assert json.loads((out / "report.json").read_text())["auc"] == report["auc"]
    assert (out / "roc.png").stat().st_size > 0


def test_facekd_report_renders_an_ijb_run(evaluated):
    from facekd.evaluation.report import render_report
    from facekd.results import IjbReport, read_report_json, result_from_dict

    out, report = evaluated
    record = result_from_dict(read_report_json(out / "report.json"), out / "report.json")
    assert isinstance(record, IjbReport) and record.files.locate("scores", out / "report.json").is_file()
    assert record.to_dict() == report
    page = render_report(out)
    assert "IJB verification" in page and "Unknown report" not in page and "N1D1F2" in page
    first = report["tpr_at_fpr_nearest"][-1]
    assert f"{first['tpr']:.4f}" in page and 'alt="ROC curve"' in page


# ----------------------------------------------------------------------------- alignment


def test_embeddings_are_of_the_aligned_image_and_its_mirror(evaluated, ijb_root, model_file):
    import facekd

    out, _ = evaluated
    protocol = read_ijb(ijb_root, "IJBC")
    _, raw = archive(out)
    embedder = facekd.load(model_file)
    for i in (0, 13):
        aligned = align_face(read_image(protocol.paths[i]), protocol.landmarks[i])[None]
        expected = np.concatenate([embedder.raw(aligned), embedder.raw(aligned[:, :, ::-1])], axis=1)[0]
        np.testing.assert_allclose(raw[i], expected, rtol=1e-4, atol=1e-4)
        unaligned = embedder.raw(np.stack([embedder.geometry(read_image(protocol.paths[i]))]))[0]
        assert np.abs(raw[i, :64] - unaligned).max() > 1e-2


def test_wrong_landmarks_change_that_image_only(evaluated, ijb_root, model_file, tmp_path):
    out, report = evaluated
    root = copy_set(ijb_root, tmp_path / "set")
    landmark_file = ijb_files(root, "IJBC")["name_5pts_score"]
    fields = landmark_file.read_text().splitlines()[4].split()
    shifted = [f"{float(v) + 30:.3f}" for v in fields[1:11]]
    edit_line(landmark_file, 5, " ".join([fields[0], *shifted, fields[11]]))
    moved = evaluate_ijb(model_file, root, tmp_path / "run", batch_size=16, workers=1)
    _, before = archive(out)
    _, after = archive(tmp_path / "run")
    changed = np.abs(after - before).max(axis=1)
    assert changed[4] > 1e-2 and np.delete(changed, 4).max() < 1e-5
    protocol = read_ijb(root, "IJBC")
    template = protocol.templates[4]
    involved = (protocol.first == template) | (protocol.second == template)
    gap = np.abs(np.load(tmp_path / "run" / "scores.npy") - np.load(out / "scores.npy"))
    assert gap[involved].min() > 1e-4 and gap[~involved].max() < 1e-5
    assert moved["skipped_images"] == []


# ----------------------------------------------------------------------------- bad images, resume


def test_bad_and_missing_images_are_listed_and_lost_templates_reported(ijb_root, model_file, tmp_path):
    root = copy_set(ijb_root, tmp_path / "set")
    protocol = read_ijb(root, "IJBC")
    lost = int(protocol.templates[-1])
    for path in np.asarray(protocol.paths)[protocol.templates == lost]:
        path.unlink()
    protocol.paths[0].write_bytes(b"not an image")
    landmark_file = ijb_files(root, "IJBC")["name_5pts_score"]
    fields = landmark_file.read_text().splitlines()[2].split()
    edit_line(landmark_file, 3, " ".join([fields[0], *["50"] * 10, fields[11]]))  # 5 points in one place
    report = evaluate_ijb(model_file, root, tmp_path / "run", batch_size=16, workers=1)
    skipped = {Path(row["path"]).name: row["reason"] for row in report["skipped_images"]}
    assert set(skipped) == {protocol.paths[0].name, protocol.paths[2].name} | {
        p.name for p, t in zip(protocol.paths, protocol.templates) if t == lost}
    assert all(reason for reason in skipped.values()) and "degenerate" in skipped[protocol.paths[2].name]
    assert report["templates_without_images"] == [lost]
    involved = (protocol.first == lost) | (protocol.second == lost)
    assert report["skipped_pairs"] == involved.sum() > 0 and report["scored_pairs"] == (~involved).sum()
    scores = np.load(tmp_path / "run" / "scores.npy")
    assert np.isnan(scores[involved]).all() and np.isfinite(scores[~involved]).all()
    assert (tmp_path / "run" / report["files"]["errors"]).is_file()


def test_an_interrupted_run_resumes_from_its_journal(evaluated, ijb_root, model_file, tmp_path):
    out, report = evaluated
    run = tmp_path / "run"
    with pytest.raises(Stop):
        evaluate_ijb(model_file, ijb_root, run, batch_size=8, workers=1, progress=StopAfterFirstBatch())
    assert not (run / "embeddings.npz").exists() and (run / ".embeddings.npz.partial").is_file()
    resumed = evaluate_ijb(model_file, ijb_root, run, batch_size=8, workers=1, resume=True)
    assert resumed["embedding"]["resumed"] == 8 and resumed["embedding"]["done"] == IMAGES - 8  # batches of 8
    np.testing.assert_allclose(np.load(run / "scores.npy"), np.load(out / "scores.npy"), atol=1e-6)
    # a finished run is reused whole to try another setting
    other = evaluate_ijb(model_file, ijb_root, run, batch_size=8, workers=1, resume=True,
                         options=IjbOptions(flip=False))
    assert other["embedding"]["resumed"] == IMAGES and other["embedding"]["done"] == 0 and other["mode"] == "N1D1F0"
    with pytest.raises(DataError, match="already exists"):
        evaluate_ijb(model_file, ijb_root, run, batch_size=8, workers=1)


# ----------------------------------------------------------------------------- CLI


def test_cli_synth_and_eval_end_to_end(tmp_path, model_file, capsys):
    root, out = tmp_path / "ijbb", tmp_path / "run"
    assert main(["synth", "ijb", str(root), "--target", "IJBB", "--identities", "4", "--templates-per-identity", "2",
                 "--media-per-template", "2", "--images-per-media", "2", "--workers", "0", "-q"]) == 0
    capsys.readouterr()
    command = ["recognition", "eval", str(model_file), "--ijb", str(root), "--target", "IJBB", "--out", str(out),
               "--backend", "torch", "--threads", "1", "--workers", "1", "--batch-size", "16", "-q"]
    assert main(command + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "IJBB" and result["images"] == 4 * 2 * 2 * 2 and result["pairs"] == 4 + 5 * 4
    assert [row["fpr_level"] for row in result["tpr_at_fpr_nearest"]] == LEVELS
    protocol = read_ijb(root, "IJBB")
    _, raw = archive(out)
    options = IjbOptions(norm_score=False, detector_score=False)
    assert main(command + ["--resume", "--no-norm-score", "--no-detector-score"]) == 0
    table = capsys.readouterr().out
    assert "N0D0F2" in table and "eval_ijbc.py" in table
    expected = reference_scores(raw, protocol.detector_scores, protocol.templates, protocol.medias, protocol.first,
                                protocol.second, options)
    saved = json.loads((out / "report.json").read_text())
    assert saved["options"] == options.to_dict()
    assert [r["tpr"] for r in saved["tpr_at_fpr_nearest"]] == pytest.approx(
        reference_tprs(protocol.labels, expected), abs=1e-6)
    # user errors: one line, exit 2
    assert main(command[:6] + ["IJBA"] + command[7:]) == 2
    assert "IJBC, IJBB" in capsys.readouterr().err
    assert main(command[:6] + ["IJBC"] + command[7:]) == 2
    err = capsys.readouterr().err.strip()
    assert "ijbc_face_tid_mid.txt" in err and "not found" in err and "\n" not in err


def test_a_zoo_onnx_recognizer_gives_the_model_files_scores(tmp_path, ijb_root, model_file, evaluated):
    """The same network as an insightface-zoo-style graph (float32 NCHW input, no metadata) with
    `--preset insightface`: the scores of the facekd model file, within ONNX Runtime's rounding."""
    from facekd.models.artifact import load_model
    from test_onnx_recognizers import export_foreign

    graph = export_foreign(load_model(model_file), tmp_path / "zoo.onnx", size=112)
    out = tmp_path / "run"
    assert main(["recognition", "eval", str(graph), "--preset", "insightface", "--ijb", str(ijb_root),
                 "--out", str(out), "--backend", "onnx", "--workers", "1", "--batch-size", "16", "-q"]) == 0
    zoo, own = np.load(out / "scores.npy"), np.load(evaluated[0] / "scores.npy")
    assert zoo.shape == own.shape and np.nanmax(np.abs(zoo - own)) <= 1e-4
