"""Recognition: margin heads, the P×K sampler, identity data (folder and RecordIO), training and
distillation on the engine, eval and embed commands."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from facekd.cli import main
from facekd.errors import ConfigError, DataError
from facekd.losses.margin import MarginSoftmax
from facekd.recognition.data import IdentityBatchSampler, IdentitySource, RecognitionDataset
from facekd.recognition.train import train_recognition
from facekd.synth import generate_identities
from helpers import lively, tiny_recognition_config as tiny_config

@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    generate_identities(root / "train", identities=6, images_per_identity=6, size=32, workers=0,
                        formats=("folder", "rec"))
    generate_identities(root / "test", identities=4, images_per_identity=4, size=32, seed=1, workers=0,
                        formats=("folder", "bin"), pairs=20)
    return root


# ----------------------------------------------------------------------------- margin heads

def test_arcface_and_cosface_logits_match_their_formulas():
    head = MarginSoftmax(4, 3, "arcface", scale=10.0, margin=0.3)
    cosines = torch.tensor([[0.6, 0.1, -0.2], [0.0, -0.99, 0.5]])
    labels = torch.tensor([0, 1])
    logits = head.logits(cosines, labels)
    theta = math.acos(0.6)
    assert logits[0, 0].item() == pytest.approx(10 * math.cos(theta + 0.3), abs=1e-5)
    assert logits[0, 1].item() == pytest.approx(1.0, abs=1e-6)  # non-target: s·cos
    # θ + m past π (cos = −0.99 < cos(π − 0.3)): the linear fallback cos − m·sin m
    assert logits[1, 1].item() == pytest.approx(10 * (-0.99 - 0.3 * math.sin(0.3)), abs=1e-5)
    cos_head = MarginSoftmax(4, 3, "cosface", scale=10.0, margin=0.35)
    assert cos_head.logits(cosines, labels)[0, 0].item() == pytest.approx(10 * (0.6 - 0.35), abs=1e-5)
    assert MarginSoftmax(4, 3, "cosface").margin == 0.35 and MarginSoftmax(4, 3).scale == 64.0


def test_margin_softmax_trains_its_centres_and_refuses_bad_settings():
    torch.manual_seed(0)
    head = MarginSoftmax(8, 4, scale=16.0, margin=0.2)
    embeddings = torch.randn(16, 8)
    labels = torch.arange(16) % 4
    optimizer = torch.optim.SGD(head.trainable_parameters(), lr=1.0)
    first = head(embeddings, labels)[0].item()
    for _ in range(30):
        optimizer.zero_grad()
        head(embeddings, labels)[0].backward()
        optimizer.step()
    loss, metrics = head(embeddings, labels)
    assert loss.item() < first and 0 <= metrics["accuracy"] <= 1
    with pytest.raises(ConfigError, match="head.kind"):
        MarginSoftmax(8, 4, "sphereface")
    with pytest.raises(ConfigError, match="head.margin"):
        MarginSoftmax(8, 4, "arcface", margin=2.0)
    with pytest.raises(ConfigError, match="at least 2 identities"):
        MarginSoftmax(8, 1)


# ----------------------------------------------------------------------------- sampler

def test_pk_sampler_builds_balanced_batches_dealt_over_ranks():
    labels = np.repeat(np.arange(20), 5)  # 20 identities × 5 images
    one = IdentityBatchSampler(labels, 16, 4, random_fraction=0.25, seed=3)
    assert len(one) == 100 // 16
    one.set_epoch(1)
    batches = list(one)
    for batch in batches:
        assert len(batch) == 16
        counts = Counter(labels[batch[:12]])  # the P×K part: 3 identities × 4
        assert sorted(counts.values()) == [4, 4, 4]
    one.set_epoch(2)
    assert list(one) != batches  # a new epoch, a new draw
    one.set_epoch(1)
    assert list(one) == batches  # a pure function of (seed, epoch)
    ranks = [IdentityBatchSampler(labels, 8, 4, random_fraction=0.25, seed=3, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(1)
    for k, (a, b) in enumerate(zip(*ranks)):
        assert sorted(a + b) == sorted(batches[k])


def test_pk_sampler_skips_singletons_and_checks_settings():
    labels = np.array([0, 1, 1, 2, 2, 2, 3])
    sampler = IdentityBatchSampler(labels, 4, 2)
    drawn = {int(labels[i]) for batch in sampler for i in batch}
    assert drawn <= {1, 2}
    with pytest.raises(DataError, match="no identity has 2"):
        IdentityBatchSampler(np.arange(5), 4, 2)
    with pytest.raises(ConfigError, match="images_per_identity"):
        IdentityBatchSampler(labels, 4, 1)
    with pytest.raises(ConfigError, match="random_fraction"):
        IdentityBatchSampler(labels, 4, 2, random_fraction=1.0)


# ----------------------------------------------------------------------------- data

def test_folder_and_recordio_give_the_same_dataset(faces):
    folder = IdentitySource(faces / "train")
    rec = IdentitySource(faces / "train" / "train.rec")
    assert folder.kind == "folder" and rec.kind == "recordio"
    assert folder.num_classes == rec.num_classes == 6
    assert np.array_equal(np.sort(folder.labels), np.sort(rec.labels))
    norm = {"mean": [127.5] * 3, "std": [127.5] * 3}
    a = RecognitionDataset(folder, 32, norm, train=False, workers=0)
    b = RecognitionDataset(rec, 32, norm, train=False, cache=False)
    assert not b.cached and a.cached
    order_a = np.argsort(folder.labels, kind="stable")
    order_b = np.argsort(rec.labels, kind="stable")
    # PNG in the folder, PNG bytes in the record: the same pixels
    assert torch.equal(a[int(order_a[0])]["image"], b[int(order_b[0])]["image"])


def test_unreadable_training_images_are_skipped_and_listed(faces, tmp_path):
    import shutil

    root = tmp_path / "ids"
    shutil.copytree(faces / "train", root, ignore=shutil.ignore_patterns("*.rec", "*.idx", "property"))
    bad = next((root / "id_00000").glob("*.png"))
    bad.write_bytes(b"not an image")
    dataset = RecognitionDataset(IdentitySource(root), 32, {"mean": [0] * 3, "std": [1] * 3}, workers=0)
    assert len(dataset) == 35 and dataset.errors[0][0] == str(bad)
    streaming = RecognitionDataset(IdentitySource(root), 32, {"mean": [0] * 3, "std": [1] * 3}, train=False,
                                   cache=False)
    position = [str(p) for p in streaming.source._paths].index(str(bad))
    with pytest.raises(DataError, match="not an image|unknown|format"):
        streaming[position]
    with pytest.raises(DataError, match="not found"):
        IdentitySource(tmp_path / "missing")


# ----------------------------------------------------------------------------- training

def test_teacher_then_ekd_student_train_evaluate_and_resume(faces, tmp_path):
    teacher = train_recognition(tiny_config(faces), tmp_path / "teacher", role="teacher")
    assert teacher["method"] == "none" and teacher["identities"] == 6
    sets = teacher["eval"]
    assert set(sets) == {"test", "pairs"}
    every_pair = sets["test"]
    assert every_pair["pairs"] == 16 * 15 // 2 and every_pair["positives"] == 4 * 6
    assert sets["pairs"]["pairs"] == 20
    assert (tmp_path / "teacher" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    teacher_model = tmp_path / "teacher" / "model.safetensors"

    config = tiny_config(faces)
    config.distill.teacher = teacher_model
    student = train_recognition(config, tmp_path / "student", role="student")
    assert student["method"] == "ekd" and student["teacher"]["arch"] == "mobilefacenet"
    history = [json.loads(line) for line in (tmp_path / "student" / "train" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in history if r["event"] == "train"]
    assert logged and all("ekd_pos" in r and "distill" in r and "margin_loss" in r for r in logged)
    # the EKD thresholds live in the checkpoint (loss buffers)
    from facekd.engine import load_checkpoint
    state = load_checkpoint(tmp_path / "student" / "train" / "checkpoints" / "last.ckpt")
    thresholds = [key for key in state["loss"] if key.endswith("teacher_thresholds")]
    assert thresholds and torch.isfinite(state["loss"][thresholds[0]]).all()
    # a second start finds the finished checkpoint: no step is trained again
    again = train_recognition(config, tmp_path / "student", role="student")
    assert again["steps"] == student["steps"] and again["resumed_from_step"] == student["steps"]


def test_distillation_refuses_a_missing_or_mismatched_teacher(faces, tmp_path):
    with pytest.raises(ConfigError, match="needs a teacher"):
        train_recognition(tiny_config(faces), tmp_path / "s", role="student")
    from facekd.models import build_model
    from facekd.models.artifact import save_model
    other = tmp_path / "big.safetensors"
    save_model(build_model("mobilefacenet", input_size=48, embedding_size=32), other)
    config = tiny_config(faces)
    config.distill.teacher = other
    with pytest.raises(ConfigError, match="48px"):
        train_recognition(config, tmp_path / "s", role="student")
    with pytest.raises(ConfigError, match="quality model"):
        train_recognition(tiny_config(faces, teacher={"arch": "timm/mobilenetv3_small_100", "input_size": 32}),
                          tmp_path / "t", role="teacher")


# ----------------------------------------------------------------------------- CLI

def test_cli_train_distill_eval_embed(faces, tmp_path, capsys):
    config = tmp_path / "fr.yaml"
    raw = tiny_config(faces)
    from facekd.config import dump_config
    dump_config(raw, config)
    assert main(["recognition", "train", str(config), "--out", str(tmp_path / "t"), "-q",
                 "--set", "teacher_train.max_steps=2"]) == 0
    teacher = tmp_path / "t" / "model.safetensors"
    assert main(["recognition", "distill", str(config), "--out", str(tmp_path / "s"), "--teacher", str(teacher),
                 "--method", "rkd", "-q", "--set", "student_train.max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "rkd" in out and "TPR@1e-03" in out

    assert main(["recognition", "eval", str(teacher), "--bin", str(faces / "test" / "pairs.bin"),
                 "--identities", str(faces / "test"), "--out", str(tmp_path / "eval"), "-q"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    bin_report = report["sets"][str(faces / "test" / "pairs.bin")]
    assert bin_report["pairs"] == 20 and bin_report["accuracy"] is not None
    levels = {r["fpr_level"]: r["supported"] for r in bin_report["tpr_at_fpr"]}
    assert levels[1e-1] and not levels[1e-3]  # 10 negative pairs cannot support FPR 1e-3
    assert (tmp_path / "eval" / "roc.png").is_file()

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    npz = tmp_path / "emb.npz"
    assert main(["recognition", "embed", str(teacher), str(faces / "test" / "id_00000"), str(bad),
                 "--out", str(npz), "--backend", "torch", "-q"]) == 0
    saved = np.load(npz)
    assert saved["embeddings"].shape == (4, 32) and len(saved["paths"]) == 4
    assert np.allclose(np.linalg.norm(saved["embeddings"], axis=1), 1.0, atol=1e-5)
    assert "bad.png," in (tmp_path / "emb.errors.csv").read_text()
    # the same image embedded by the library API gives the same vector
    import facekd
    first = facekd.load(teacher).embed([saved["paths"][0]])
    assert np.allclose(first[0], saved["embeddings"][0], atol=1e-5)

    assert main(["recognition", "eval", str(teacher), "-q"]) == 2
    assert "give a verification set" in capsys.readouterr().err


def test_ekd_distillation_on_two_processes_live_and_from_a_teacher_cache(faces, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from facekd.models import build_model
    from facekd.models.artifact import save_model
    from facekd.recognition.teacher_cache import build_teacher_cache

    teacher = tmp_path / "teacher.safetensors"
    save_model(lively(build_model("mobilefacenet", input_size=32, embedding_size=32)), teacher)
    cache = tmp_path / "cache"
    build_teacher_cache(teacher, faces / "train", cache, backend="torch", workers=0)
    job = Path(__file__).parent / "jobs" / "recognition_ddp.py"
    done = subprocess.run([sys.executable, str(job), str(faces / "train"), str(teacher), str(tmp_path / "run"),
                           str(cache)], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] == {"steps": 3, "method": "ekd"}

    def train_records(run):
        lines = (run / "train" / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["event"] == "train"]

    history = train_records(tmp_path / "run")
    assert [r["step"] for r in history] == [1, 2, 3]
    assert all(r["ekd_thr_student"] == r["ekd_thr_student"] for r in history)  # not NaN
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "report.json").is_file()
    # every rank reads its own images' teacher embeddings from the cache: the same losses as the live teacher
    cached = [json.loads((tmp_path / "run" / "cached" / f"rank{r}.json").read_text()) for r in range(2)]
    assert cached[0] == cached[1] == {"steps": 3, "cache": str(cache)}
    for live, from_cache in zip(history, train_records(tmp_path / "run" / "cached")):
        assert from_cache["distill"] == pytest.approx(live["distill"], rel=2e-2)
        assert from_cache["ekd_thr_teacher"] == pytest.approx(live["ekd_thr_teacher"], abs=2e-3)


def test_tface_sampler_epoch_and_random_part_last_on_every_rank():
    labels = np.repeat(np.arange(20), 5)
    assert len(IdentityBatchSampler(labels, 16, 4, random_fraction=0.5, epoch="random_images")) == 100 // 8
    with pytest.raises(ConfigError, match="random_images with random_fraction > 0"):
        IdentityBatchSampler(labels, 16, 4, epoch="random_images")
    one = IdentityBatchSampler(labels, 16, 4, random_fraction=0.5, seed=3)
    ranks = [IdentityBatchSampler(labels, 8, 4, random_fraction=0.5, seed=3, rank=r, world_size=2) for r in range(2)]
    for whole, *parts in zip(one, *ranks):
        assert sorted(sum(parts, [])) == sorted(whole)
        assert sorted(parts[0][4:] + parts[1][4:]) == sorted(whole[8:])  # each rank's last 4: the random part
        assert sorted(Counter(labels[parts[0][:4] + parts[1][:4]]).values()) == [4, 4]


def test_margin_softmax_on_the_random_part_only(faces):
    from facekd.losses.margin import MarginSoftmax
    from facekd.recognition.train import RecognitionLoss, _margin_rows

    torch.manual_seed(0)
    head = MarginSoftmax(8, 5, "arcface", 16.0, 0.5)
    model = torch.nn.Linear(3, 8)
    batch = {"image": torch.randn(6, 3), "label": torch.tensor([0, 1, 2, 3, 4, 0])}
    loss, metrics = RecognitionLoss(head, margin_rows=2)(model, batch)
    expected, _ = head(model(batch["image"][-2:]), batch["label"][-2:])
    assert torch.allclose(loss, expected) and not torch.allclose(loss, head(model(batch["image"]), batch["label"])[0])
    config = tiny_config(faces, head={"images": "random", "scale": 16.0})
    assert _margin_rows(config, config.student_train) == 4  # random_fraction 0.25 × batch 16
    config.sampler.random_fraction = 0.3
    with pytest.raises(ConfigError, match=r"head\.images: random needs .* = 4\.8"):
        _margin_rows(config, config.student_train)


def test_demo_gap_closed_is_the_share_of_the_teacher_student_tpr_gap():
    from facekd.demo import gap_closed

    def report(tpr_1e3: float) -> dict:
        return {"eval": {"test": {"tpr_at_fpr": [{"fpr_level": 1e-2, "tpr": 0.9}, {"fpr_level": 1e-3, "tpr": tpr_1e3}]}}}

    reports = {"teacher": report(0.5), "student alone": report(0.1), "student + EKD": report(0.3),
               "student + RKD": report(0.05)}
    assert gap_closed(reports) == pytest.approx({"student + EKD": 0.5, "student + RKD": -0.125})
    assert gap_closed({**reports, "teacher": report(0.1)}) == {}
