"""Teacher embedding cache: built once (torch, ONNX, sharded, resumed), read by distillation
instead of the live teacher with the same losses and gradients, refused for other data,
another teacher or an augmentation beyond a flip."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from facekd.cli import main
from facekd.engine.distributed import _EpochDataset
from facekd.errors import ConfigError, DataError
from facekd.inference import Shard
from facekd.io.images import resize_to
from facekd.losses.distill import build_distill_loss
from facekd.losses.margin import MarginSoftmax
from facekd.models import build_model
from facekd.models.artifact import save_model
from facekd.quality.config import ModelChoice
from facekd.recognition.config import RecognitionData
from facekd.recognition.data import IdentitySource, RecognitionDataset
from facekd.recognition.teacher_cache import TeacherCache, build_teacher_cache
from facekd.recognition.train import RecognitionLoss, train_recognition
from facekd.synth import generate_identities
from helpers import lively, tiny_recognition_config

SIZE, DIM = 32, 32
FP16_RTOL = 2 ** -10  # float16 has an 11-bit significand: relative rounding ≤ 2^-11, twice that for slack


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_faces")
    generate_identities(root / "train", identities=6, images_per_identity=6, size=SIZE, workers=0,
                        formats=("folder", "rec"))
    generate_identities(root / "test", identities=4, images_per_identity=4, size=SIZE, seed=1, workers=0,
                        formats=("folder",))
    return root


@pytest.fixture(scope="module")
def teacher(faces):
    """A MobileFaceNet with O(1), image-dependent outputs, saved as a facekd model file."""
    model = lively(build_model("mobilefacenet", input_size=SIZE, embedding_size=DIM), seed=3)
    path = faces / "teacher.safetensors"
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def cache(faces, teacher):
    out = faces / "cache"
    summary = build_teacher_cache(teacher, faces / "train", out, backend="torch", workers=0, part_images=10)
    assert summary.complete and summary.parts == summary.total_parts == 4 and summary.skipped == 0
    return out


def test_the_cache_holds_the_teachers_embeddings_of_each_image_and_its_mirror(faces, teacher, cache):
    import facekd

    model = facekd.load(teacher).model
    source = IdentitySource(faces / "train")
    stored = TeacherCache(cache)
    assert stored.directions.shape == (36, 2, DIM) and stored.directions.dtype == np.float16
    assert stored.norms.shape == (36, 2) and stored.norms.dtype == np.float32
    assert stored.index["data"]["digest"] == source.digest() and stored.arch == "mobilefacenet"
    images = np.stack([resize_to(source.read(i), (SIZE, SIZE)) for i in range(len(source))])
    from facekd.inference.predictors import mirror, torch_outputs

    for flip, batch in ((0, images), (1, mirror(images))):
        expected = torch_outputs(model, batch)
        found = stored.embeddings(flip)
        assert np.abs(found - expected).max() <= FP16_RTOL * np.abs(expected).max()
        assert np.abs(found - expected).max() > 0  # float16, not a copy of the float32 outputs
    # lookup: the rows asked for, mirrored where asked
    samples, flips = torch.tensor([5, 0, 5]), torch.tensor([False, True, True])
    rows = stored.lookup(samples, flips)
    assert rows.dtype == torch.float32
    assert torch.equal(rows[0], torch.from_numpy(stored.embeddings(0)[5]))
    assert torch.equal(rows[2], torch.from_numpy(stored.embeddings(1)[5]))


def _batch(faces, transform="flip"):
    """24 training items as the trainer reads them in epoch 1: some mirrored, some not."""
    dataset = RecognitionDataset(IdentitySource(faces / "train"), SIZE, {"mean": [127.5] * 3, "std": [127.5] * 3},
                                 workers=0, transform=transform)
    wrapped = _EpochDataset(dataset, 0, 1)
    batch = default_collate([wrapped[i] for i in range(0, 36, 3)] + [wrapped[i] for i in range(1, 36, 3)])
    assert 0 < int(batch["flip"].sum()) < len(batch["flip"])
    return batch


@pytest.mark.parametrize("method", ["feature", "rkd", "similarity", "ekd"])
def test_loss_and_gradients_from_the_cache_equal_the_live_teachers(faces, teacher, cache, method):
    import facekd

    batch = _batch(faces)
    student = lively(build_model("mobilefacenet", input_size=SIZE, embedding_size=DIM, width_mult=0.5), seed=4)
    head = MarginSoftmax(DIM, 6, "arcface", scale=16.0)
    options = {"top_k": 40} if method == "ekd" else {}
    results = []
    for target, weight in ((facekd.load(teacher).model, 1.0), (TeacherCache(cache), 1.0), (TeacherCache(cache), 0.0)):
        model = copy.deepcopy(student).train()
        loss_fn = RecognitionLoss(copy.deepcopy(head), target, build_distill_loss(method, **options), weight=weight)
        loss, metrics = loss_fn(model, batch)
        loss.backward()
        results.append((metrics["distill"], torch.cat([p.grad.flatten() for p in model.parameters()])))
    (live, live_grad), (cached, cached_grad), (_, margin_grad) = results
    assert live > 0
    assert cached == pytest.approx(float(live), rel=FP16_RTOL * (20 if method == "ekd" else 4))
    # the distillation term's gradient, from the cache, vs from the live teacher
    distill_grad = live_grad - margin_grad
    difference = float((cached_grad - live_grad).norm() / distill_grad.norm())
    assert difference <= (0.05 if method == "ekd" else 4 * FP16_RTOL)


def test_distill_cli_reads_the_cache_and_refuses_what_does_not_match(faces, teacher, cache, tmp_path):
    config = tmp_path / "config.json"
    raw = tiny_recognition_config(faces).model_dump(mode="json")
    raw["data"]["eval"] = [str(faces / "test")]
    config.write_text(json.dumps(raw))
    args = ["recognition", "distill", str(config), "--out", str(tmp_path / "cached"), "--teacher-cache", str(cache),
            "--set", "student_train.max_steps=3", "-q"]
    assert main(args) == 0
    report = json.loads((tmp_path / "cached" / "report.json").read_text())
    assert report["teacher"]["cache"] == str(cache) and report["teacher"]["arch"] == "mobilefacenet"
    assert report["teacher"]["digest"] == TeacherCache(cache).teacher_digest and report["steps"] == 3
    # the same run with the live teacher logs the same losses
    assert main(args[:4] + [str(tmp_path / "live"), "--teacher", str(teacher)] + args[7:]) == 0

    def losses(run):
        lines = (tmp_path / run / "train" / "metrics.jsonl").read_text().splitlines()
        return [(r["margin_loss"], r["distill"]) for r in map(json.loads, lines) if r["event"] == "train"]

    assert np.allclose(losses("cached"), losses("live"), rtol=2e-2)

    def refused(key, value):
        config = tiny_recognition_config(faces)
        setattr(config, key, value)
        with pytest.raises((DataError, ConfigError)) as error:
            train_recognition(config, tmp_path / "refused", role="student", teacher_cache=cache)
        return str(error.value)

    other_data = refused("data", RecognitionData(train=faces / "test"))
    assert "other training data" in other_data and str(cache) in other_data
    assert "beyond a flip" in refused("train_transform", "flip_shift")
    assert "48px" in refused("student", ModelChoice(arch="mobilefacenet", input_size=48,
                                                    options={"embedding_size": DIM}))
    other = tmp_path / "other.safetensors"
    save_model(lively(build_model("mobilefacenet", input_size=SIZE, embedding_size=DIM), seed=9), other)
    with pytest.raises(DataError, match="another teacher"):
        train_recognition(tiny_recognition_config(faces), tmp_path / "refused", role="student", teacher_path=other,
                          teacher_cache=cache)
    with pytest.raises(ConfigError, match="method is none"):
        train_recognition(tiny_recognition_config(faces, distill={"method": "none"}), tmp_path / "refused",
                          role="student", teacher_cache=cache)
    with pytest.raises(DataError, match="not a teacher cache"):
        train_recognition(tiny_recognition_config(faces), tmp_path / "refused", role="student",
                          teacher_cache=faces / "train")
    assert not (tmp_path / "refused" / "model.safetensors").exists()


def test_ekd_memory_queues_the_caches_teacher_embeddings(faces, cache, tmp_path):
    from facekd.engine import load_checkpoint

    config = tiny_recognition_config(faces, distill={"method": "ekd", "options": {"memory": 20, "top_k": 40}})
    config.student_train.max_steps, config.student_train.log_every_steps = 3, 1
    report = train_recognition(config, tmp_path / "run", role="student", teacher_cache=cache)
    assert report["steps"] == 3
    state = load_checkpoint(tmp_path / "run" / "train" / "checkpoints" / "last.ckpt")["loss"]
    queued, labels = state["distill.memory_teacher"], state["distill.memory_labels"]
    assert queued.shape == (20, DIM) and state["distill.memory_student"].shape == (20, DIM)
    # every queued teacher embedding is the cache's (unit) vector of one image or its mirror, of its identity
    stored = TeacherCache(cache)
    vectors = torch.nn.functional.normalize(torch.from_numpy(np.concatenate([stored.embeddings(0),
                                                                             stored.embeddings(1)])), dim=1)
    best = (queued @ vectors.t()).max(dim=1)
    assert (best.values > 1 - 1e-5).all()
    identity = IdentitySource(faces / "train").labels[best.indices.numpy() % len(stored.norms)]
    assert len(set(zip(labels.tolist(), identity.tolist()))) == len(set(labels.tolist()))
    history = [json.loads(line) for line in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["ekd_memory"] for r in history if r["event"] == "train"] == [0, 16, 20]  # batches of 16


def test_sharded_and_interrupted_builds_finish_to_the_same_cache(faces, teacher, cache, tmp_path, monkeypatch):
    full = TeacherCache(cache).embeddings(1)
    shared = tmp_path / "shared"
    first = build_teacher_cache(teacher, faces / "train", shared, backend="torch", workers=0, part_images=10,
                                shard=Shard(0, 2))
    assert (first.parts, first.total_parts, first.complete) == (2, 4, False)
    with pytest.raises(DataError, match="incomplete: 2 of 4 parts are missing"):
        TeacherCache(shared)
    second = build_teacher_cache(teacher, faces / "train", shared, backend="torch", workers=0, part_images=10,
                                 shard=Shard(1, 2))
    assert (second.parts, second.complete) == (2, True)
    assert np.array_equal(TeacherCache(shared).embeddings(1), full)

    # killed while embedding part 2: parts 0 and 1 are kept, the rerun computes parts 2 and 3 only
    killed = tmp_path / "killed"
    read = IdentitySource.read

    def dies_at_25(self, index):
        if index == 25:
            raise KeyboardInterrupt
        return read(self, index)

    monkeypatch.setattr(IdentitySource, "read", dies_at_25)
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(teacher, faces / "train", killed, backend="torch", workers=0, part_images=10)
    monkeypatch.setattr(IdentitySource, "read", read)
    again = build_teacher_cache(teacher, faces / "train", killed, backend="torch", workers=0, part_images=10)
    assert (again.resumed, again.parts, again.complete) == (2, 2, True)
    assert np.array_equal(TeacherCache(killed).embeddings(1), full)

    # another teacher's cache in the same folder: refused, or replaced with overwrite
    other = tmp_path / "other.safetensors"
    save_model(lively(build_model("mobilefacenet", input_size=SIZE, embedding_size=DIM), seed=9), other)
    with pytest.raises(DataError, match=r"another teacher or data \(teacher differ"):
        build_teacher_cache(other, faces / "train", killed, backend="torch", workers=0, part_images=10)
    replaced = build_teacher_cache(other, faces / "train", killed, backend="torch", workers=0, part_images=10,
                                   overwrite=True)
    assert replaced.resumed == 0 and not np.array_equal(TeacherCache(killed).embeddings(1), full)
    with pytest.raises(DataError, match="not a teacher cache"):
        build_teacher_cache(teacher, faces / "train", faces / "train", backend="torch", workers=0)


def test_onnx_teacher_recordio_data_and_unreadable_images(faces, teacher, cache, tmp_path):
    from facekd.export import export_onnx

    full = TeacherCache(cache).embeddings(0)
    onnx = tmp_path / "teacher.onnx"
    export_onnx(teacher, onnx)
    assert main(["recognition", "teacher-cache", str(onnx), "--data", str(faces / "train" / "train.rec"),
                 "--out", str(tmp_path / "onnx_rec"), "--workers", "2", "-q"]) == 0
    from_onnx = TeacherCache(tmp_path / "onnx_rec")
    assert from_onnx.index["data"]["kind"] == "recordio" and from_onnx.index["teacher"]["arch"] == "mobilefacenet"
    assert np.abs(from_onnx.embeddings(0) - full).max() <= 2 * FP16_RTOL * np.abs(full).max()
    with pytest.raises(DataError, match="other training data"):  # the .rec set is not the folder set
        from_onnx.check(IdentitySource(faces / "train"), SIZE)
    from_onnx.check(IdentitySource(faces / "train" / "train.rec"), SIZE)

    broken = tmp_path / "broken"
    shutil.copytree(faces / "train", broken, ignore=shutil.ignore_patterns("train.*"))
    bad = sorted((broken / "id_00002").iterdir())[1]
    bad.write_bytes(b"not an image")
    summary = build_teacher_cache(teacher, broken, tmp_path / "broken_cache", backend="torch", workers=0)
    assert summary.skipped == 1
    stored = TeacherCache(tmp_path / "broken_cache")
    assert [name for name, _ in stored.missing.values()] == [str(bad)]
    source = IdentitySource(broken)
    row = [source.name(i) for i in range(len(source))].index(str(bad))
    for array in (stored.directions, stored.norms):
        assert np.isnan(array[row]).all() and np.isfinite(np.delete(array, row, axis=0)).all()
    assert list(stored.missing) == [row]
    with pytest.raises(DataError, match=rf"{bad}: has no teacher embedding in .*broken_cache \(not a supported image"):
        stored.lookup(torch.tensor([0, row]), torch.tensor([False, False]))
    # training skips the unreadable image, as it does without a cache
    config = tiny_recognition_config(faces)
    config.data = RecognitionData(train=broken)
    report = train_recognition(config, tmp_path / "run", role="student", teacher_cache=tmp_path / "broken_cache")
    assert [e["path"] for e in report["skipped_images"]] == [str(bad)]


def test_data_digest_follows_the_images_not_where_they_lie(faces, tmp_path):
    digest = IdentitySource(faces / "train").digest()
    copy_ = tmp_path / "copy"
    shutil.copytree(faces / "train", copy_, ignore=shutil.ignore_patterns("train.*"))
    assert IdentitySource(copy_).digest() == digest
    first = sorted((copy_ / "id_00000").iterdir())[0]
    first.write_bytes(first.read_bytes() + b"\0")  # one byte more
    assert IdentitySource(copy_).digest() != digest
    first.write_bytes(first.read_bytes()[:-1])
    assert IdentitySource(copy_).digest() == digest
    first.unlink()  # one image fewer
    assert IdentitySource(copy_).digest() != digest


def test_train_transforms_none_flip_and_flip_shift(faces):
    norm = {"mean": [0.0] * 3, "std": [1.0] * 3}
    source = IdentitySource(faces / "train")
    items = {}
    for transform in ("none", "flip", "flip_shift"):
        dataset = _EpochDataset(RecognitionDataset(source, SIZE, norm, workers=0, transform=transform), 0, 1)
        items[transform] = [dataset[i] for i in range(len(source))]
    assert not any(bool(item["flip"]) for item in items["none"])
    assert [bool(i["flip"]) for i in items["flip"]] == [bool(i["flip"]) for i in items["flip_shift"]]
    shifts = set()
    for plain, flipped, shifted in zip(items["none"], items["flip"], items["flip_shift"]):
        base = plain["image"].flip(-1) if bool(flipped["flip"]) else plain["image"]
        assert torch.equal(flipped["image"], base)
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(shifted["image"], base[:, np.clip(np.arange(SIZE) - dy, 0, SIZE - 1)][
                     :, :, np.clip(np.arange(SIZE) - dx, 0, SIZE - 1)])]
        assert found, "flip_shift moved an image by more than 1/16 of its side"
        shifts.add(found[0])
    assert len(shifts) > 5  # the shifts vary from image to image
    with pytest.raises(ConfigError, match="train_transform: expected one of flip, none, flip_shift"):
        RecognitionDataset(source, SIZE, norm, workers=0, transform="crop")


def test_embeddings_beyond_float16s_range_and_non_finite_ones(faces, teacher, tmp_path, monkeypatch):
    from facekd.inference.predictors import BatchPredictor

    raw = BatchPredictor.raw

    def huge_or_inf(self, batch, flip=False):
        out = raw(self, batch, flip) * 1e6  # far beyond float16's 65504
        out[:1] = np.inf  # the first image of every batch
        return out

    monkeypatch.setattr(BatchPredictor, "raw", huge_or_inf)
    summary = build_teacher_cache(teacher, faces / "train", tmp_path / "huge", backend="torch", workers=0,
                                  batch_size=16)
    monkeypatch.setattr(BatchPredictor, "raw", raw)
    stored = TeacherCache(tmp_path / "huge")
    source = IdentitySource(faces / "train")
    assert summary.skipped == 3
    assert stored.missing == {i: (source.name(i), "the teacher returned a non-finite embedding") for i in (0, 16, 32)}
    good = np.isfinite(stored.norms).all(axis=1)
    assert np.flatnonzero(~good).tolist() == [0, 16, 32]
    reference = TeacherCache(build_teacher_cache(teacher, faces / "train", tmp_path / "plain", backend="torch",
                                                 workers=0).out)
    expected = 1e6 * reference.embeddings(0)[good]  # (another batch size: float32 noise, then float16 rounding)
    assert np.abs(stored.embeddings(0)[good] - expected).max() <= 2 * FP16_RTOL * np.abs(expected).max()
