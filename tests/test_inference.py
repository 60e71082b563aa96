"""Batch inference (`facekd.inference`, `facekd.io.decode`): decoding, journal, shards, jobs, merge, backends, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import facekd
from helpers import lively
from facekd.cli import main
from facekd.errors import ConfigError, DataError
from facekd.inference.predictors import OnnxQualityModel
from facekd.inference import BackendChoice, Shard, embed_files, merge_outputs, open_model, parse_shard, read_scores, \
    score_files
from facekd.inference.backend import pipeline_rate, thread_counts
from facekd.inference.jobs import errors_path, journal_path, record_path
from facekd.inference.journal import Journal
from facekd.inference.shards import select_shard, shard_of, shard_output
from facekd.io import decode
from facekd.io.decode import decode_batches, load_images
from facekd.io.formats import file_digest
from facekd.models import build_model
from facekd.models.artifact import save_model
from facekd.inference.predictors import FaceEmbedder, QualityModel, preprocess

pytestmark = pytest.mark.usefixtures("keep_torch_threads")  # conftest.py

SIZE = 32


def lively_model(arch: str, images: np.ndarray, seed: int, **options):
    """`arch` at SIZE px with O(1) outputs that differ between `images`."""
    torch.manual_seed(seed)
    return lively(build_model(arch, input_size=SIZE, **options), seed, images)


def image_files(faces: Path) -> list[Path]:
    return sorted(p for p in faces.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """30 small images of several sizes (in a subfolder too) and one corrupt file."""
    root = tmp_path_factory.mktemp("faces") / "faces"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(30):
        side = 24 + 4 * (i % 5)
        ramp = np.linspace(0, 255, side, dtype=np.float32)[None, :, None]
        image = np.clip(rng.normal(i * 8, 40, (side, side, 3)) + ramp * (i % 3), 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / ("sub" if i % 4 == 0 else "") / f"{i:02d}.{'jpg' if i % 2 else 'png'}"), image)
    (root / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    return root


@pytest.fixture(scope="module")
def quality_file(tmp_path_factory, faces) -> Path:
    images = load_images(image_files(faces)[:-1], SIZE)[0]
    model = lively_model("timm/mobilenetv3_small_100", images, seed=1)
    return save_model(model, tmp_path_factory.mktemp("q") / "q.safetensors")


@pytest.fixture(scope="module")
def recognition_file(tmp_path_factory, faces) -> Path:
    images = load_images(image_files(faces)[:-1], SIZE)[0]
    model = lively_model("mobilefacenet", images, seed=2, embedding_size=16, width_mult=0.5, blocks=[1, 1, 1, 1])
    return save_model(model, tmp_path_factory.mktemp("r") / "r.safetensors")


@pytest.fixture(scope="module")
def scorer(quality_file):
    return facekd.load(quality_file, batch_size=4)


@pytest.fixture(scope="module")
def embedder(recognition_file):
    return facekd.load(recognition_file, batch_size=4)


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("workers", [0, 2])
def test_decode_batches_matches_load_images(faces, tmp_path, workers):
    paths = image_files(faces)[:9] + [tmp_path / "missing.png"] + image_files(faces)[9:]
    images, kept, errors = load_images(paths, SIZE, workers=workers)
    batches = list(decode_batches(paths, SIZE, 5, workers=workers))
    assert [b.size for b in batches] == [5] * 6 + [2]  # 32 paths: 30 images, one missing, one corrupt
    assert [p for b in batches for p in b.paths] == [paths[i] for i in kept]
    np.testing.assert_array_equal(np.concatenate([b.images for b in batches]), images)
    assert all(b.images.shape == (len(b.paths), SIZE, SIZE, 3) and b.images.dtype == np.uint8 for b in batches)
    bad = {i: b.errors for i, b in enumerate(batches) if b.errors}
    assert list(bad) == [1, 6]  # the missing file is path 9, the corrupt one the last
    assert bad[1][0][0] == tmp_path / "missing.png" and "not found" in bad[1][0][1]
    assert [p for p, _ in bad[6]] == [faces / "zz_corrupt.png"] and len(kept) == 30
    assert [e for b in batches for e in b.errors] == errors


@pytest.mark.parametrize("workers,ahead", [(0, 2), (2, 1), (2, 3)])
def test_decode_batches_decodes_a_bounded_number_ahead(monkeypatch, workers, ahead):
    decoded, lock = [], threading.Lock()

    def counting_load(path, geometry):
        with lock:
            decoded.append(path)
        return np.zeros((geometry.size, geometry.size, 3), np.uint8)

    monkeypatch.setattr(decode, "load_one", counting_load)
    paths = [Path(f"/nowhere/{i}.png") for i in range(60)]
    batches = decode_batches(paths, 8, batch_size=5, workers=workers, ahead=ahead)
    first = next(batches)
    time.sleep(0.2)  # give the decoding threads time to run ahead as far as they may
    limit = 5 if workers == 0 else (ahead + 1) * 5
    assert first.paths == paths[:5] and len(decoded) <= limit
    rest = list(batches)
    assert len(decoded) == 60 and [p for b in rest for p in b.paths] == paths[5:]


def test_decode_batches_refuses_bad_arguments():
    with pytest.raises(ConfigError, match="batch_size"):
        list(decode_batches([], SIZE, 0))
    with pytest.raises(ConfigError, match="workers"):
        list(decode_batches([], SIZE, 4, workers=-1))
    with pytest.raises(ConfigError, match="image size"):
        list(decode_batches([], 0, 4))


# ----------------------------------------------------------------------------- journal

IDENTITY = {"kind": "embeddings", "model": "abc", "input_size": SIZE, "dim": 3, "flip": False, "shard": None}


def rows(start: int, count: int) -> list[tuple[str, np.ndarray]]:
    return [(f"/data/é{i}.png", np.array([i, -i / 3, 1e-3 * i], np.float32)) for i in range(start, start + count)]


def reopened(path: Path, identity: dict, resume: bool = True) -> dict[str, int]:
    """The index of a journal opened (then closed) as a job would."""
    journal = Journal(path, identity, resume=resume)
    journal.close()
    return journal.index


def test_journal_round_trip_and_resume(tmp_path):
    path = tmp_path / ".out.npz.partial"
    journal = Journal(path, IDENTITY, resume=False)
    journal.append(rows(0, 3))
    journal.append(rows(3, 2))
    for name, values in rows(0, 5):
        np.testing.assert_array_equal(journal.values(name), values)
    journal.close()
    again = Journal(path, IDENTITY, resume=True)
    assert list(again.index) == [name for name, _ in rows(0, 5)]
    again.append(rows(5, 1))
    for name, values in rows(0, 6):
        np.testing.assert_array_equal(again.values(name), values)
    again.remove()
    assert not path.exists()
    assert reopened(path, IDENTITY) == {}  # no journal: start anew


def test_journal_cuts_a_torn_tail_and_a_corrupt_record(tmp_path):
    path = tmp_path / "journal"
    journal = Journal(path, IDENTITY, resume=False)
    sizes = [path.stat().st_size]  # the header, then after each record
    for row in rows(0, 3):
        journal.append([row])
        sizes.append(path.stat().st_size)
    journal.close()
    assert np.diff(sizes).tolist() == [8 + len(name.encode()) + 12 for name, _ in rows(0, 3)]
    with open(path, "ab") as handle:
        handle.write(struct.pack("<II", 20, 7) + b"/data/to")  # a record torn mid-write
    assert len(reopened(path, IDENTITY)) == 3
    assert path.stat().st_size == sizes[3]  # the torn bytes are cut off
    data = bytearray(path.read_bytes())
    data[sizes[2] - 1] ^= 0xFF  # last value byte of the second record: its CRC fails
    path.write_bytes(bytes(data))
    damaged = Journal(path, IDENTITY, resume=True)
    first, values = rows(0, 1)[0]
    assert list(damaged.index) == [first]  # the bad record and all after it are dropped
    np.testing.assert_array_equal(damaged.values(first), values)
    damaged.close()
    assert path.stat().st_size == sizes[1]


def test_journal_of_another_job_is_refused_naming_the_differences(tmp_path):
    path = tmp_path / "journal"
    Journal(path, IDENTITY, resume=False).close()
    other = {**IDENTITY, "model": "def", "flip": True}
    with pytest.raises(DataError, match=r"different job \(its flip, model differ\)"):
        Journal(path, other, resume=True)
    assert reopened(path, other, resume=False) == {}  # without resume it starts over
    path.write_text("path,score\n/old/text/journal.png,1.0\n")  # not a v2 journal: ignored
    assert reopened(path, IDENTITY) == {}


# ----------------------------------------------------------------------------- shards


def test_parse_shard():
    assert parse_shard("0/4") == Shard(0, 4) and parse_shard(" 3 / 4 ") == Shard(3, 4)
    assert parse_shard(None) is None
    assert str(Shard(3, 8)) == "3/8" and Shard(3, 8).tag == "00003-of-00008"
    assert parse_shard("auto", {"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2)
    assert parse_shard("auto", {"SLURM_PROCID": "5", "SLURM_NTASKS": "6"}) == Shard(5, 6)
    assert parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3"}) == Shard(0, 3)
    assert parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3",
                                "SLURM_ARRAY_TASK_MIN": "4"}) == Shard(1, 3)  # --array=4-6
    assert parse_shard("auto", {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"}) \
        == Shard(0, 2)  # torchrun inside a Slurm job
    assert parse_shard("auto", {"RANK": "0", "WORLD_SIZE": "1", "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) \
        == Shard(3, 4)  # a single-process torchrun does not decide
    assert parse_shard("auto", {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == Shard(0, 1)
    for text in ("", "1", "1/", "a/b", "-1/2", "1/2/3", "1.5/2"):
        with pytest.raises(ConfigError, match="i/n"):
            parse_shard(text)
    for text in ("4/4", "5/4", "0/0"):
        with pytest.raises(ConfigError, match="0 <= i < n"):
            parse_shard(text)
    with pytest.raises(ConfigError, match="no launcher variables"):
        parse_shard("auto", {"RANK": "0"})
    with pytest.raises(ConfigError, match="not integers"):
        parse_shard("auto", {"RANK": "zero", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="0 <= i < n"):
        parse_shard("auto", {"RANK": "2", "WORLD_SIZE": "2"})


def test_shard_of_is_a_stable_hash_of_the_key():
    for key in ("a/b.png", "identité/0001.jpg", ""):
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
        for count in (2, 7, 1000):
            assert shard_of(key, count) == int.from_bytes(digest, "little") % count == shard_of(key, count)


def test_select_shard_partitions_files_stably_wherever_the_folder_lives(tmp_path):
    names = [f"id{i // 10:03d}/{i % 10}.jpg" for i in range(1000)]
    here, there = tmp_path / "here" / "faces", tmp_path / "mnt" / "deep" / "copy"
    here.mkdir(parents=True)
    there.mkdir(parents=True)
    files = [here / name for name in names]
    parts = [select_shard(files, [here], Shard(i, 4)) for i in range(4)]
    assert sorted(p for part in parts for p in part) == sorted(files) and sum(map(len, parts)) == 1000
    assert all(part == [p for p in files if p in set(part)] for part in parts)  # input order kept
    assert all(200 <= len(part) <= 300 for part in parts), [len(part) for part in parts]
    moved = [[p.relative_to(there).as_posix() for p in select_shard([there / n for n in names], [there], Shard(i, 4))]
             for i in range(4)]
    assert moved == [[p.relative_to(here).as_posix() for p in part] for part in parts]
    assert select_shard(files[::-1], [here], Shard(1, 4)) == parts[1][::-1]  # input order does not matter
    assert select_shard(files, [here], None) == files == select_shard(files, [here], Shard(0, 1))


def test_shard_output(tmp_path):
    out = tmp_path / "scores.{shard}.csv"
    assert shard_output(out, Shard(3, 8)) == tmp_path / "scores.00003-of-00008.csv"
    assert shard_output(tmp_path / "scores.csv", Shard(3, 8)) == tmp_path / "scores.csv"
    with pytest.raises(ConfigError, match="no --shard"):
        shard_output(out, None)


# ----------------------------------------------------------------------------- score → shards → merge


@pytest.fixture(scope="module")
def sharded_scores(tmp_path_factory, faces, scorer):
    """An unsharded scoring run and the same job in 3 shards (batch size 1: exact same values)."""
    root = tmp_path_factory.mktemp("sharded")
    reference = root / "all.csv"
    score_files(scorer, [faces], reference, batch_size=1, workers=0, fingerprint="q1")
    parts = []
    for i in range(3):
        summary = score_files(scorer, [faces], root / "parts" / f"s{i}.csv", batch_size=1, workers=2,
                              fingerprint="q1", shard=Shard(i, 3))
        assert summary.shard == f"{i}/3" and summary.total > 0
        parts.append(summary.out)
    return reference, parts


def test_sharded_scores_merge_into_the_unsharded_result(sharded_scores, tmp_path):
    reference, parts = sharded_scores
    listed = sorted(parts[0].parent.glob("*.csv"))  # a shell glob also matches the errors CSVs
    assert any(p.name.endswith(".errors.csv") for p in listed)
    out = tmp_path / "merged.csv"
    summary = merge_outputs(listed, out)
    expected = read_scores(reference)
    assert read_scores(out) == expected and len(expected) == 30
    assert (summary["parts"], summary["rows"], summary["skipped"], summary["missing_shards"]) == (3, 30, 1, [])
    errors = errors_path(out).read_text().splitlines()
    assert errors[0] == "path,reason" and len(errors) == 2 and "zz_corrupt.png" in errors[1]
    assert errors[1:] == errors_path(reference).read_text().splitlines()[1:]
    record = json.loads(record_path(out).read_text())
    assert record["merged_from"] == [str(p) for p in parts] and record["total"] == 31
    assert all(set(read_scores(p)).isdisjoint(read_scores(q)) for p in parts for q in parts if p != q)


def copy_part(part: Path, folder: Path, record: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(part, folder / part.name)
    if record:
        shutil.copy(record_path(part), record_path(folder / part.name))
    return folder / part.name


def test_merge_refusals(sharded_scores, tmp_path):
    reference, parts = sharded_scores
    out = tmp_path / "merged.csv"
    with pytest.raises(DataError, match="shards 2 of 3 are missing"):
        merge_outputs(parts[:2], out)
    summary = merge_outputs(parts[:2], out, partial=True)
    assert summary["missing_shards"] == [2] and summary["rows"] == sum(len(read_scores(p)) for p in parts[:2])
    assert json.loads(record_path(out).read_text())["missing_shards"] == [2]
    with pytest.raises(DataError, match="already exists"):
        merge_outputs(parts, out)
    assert merge_outputs(parts, out, overwrite=True)["rows"] == 30
    with pytest.raises(DataError, match="is shard 0/3 again"):
        merge_outputs([parts[0], copy_part(parts[0], tmp_path / "copy"), parts[1], parts[2]], tmp_path / "m1.csv")
    other = copy_part(parts[1], tmp_path / "other")
    record = json.loads(record_path(other).read_text())
    record_path(other).write_text(json.dumps({**record, "model_digest": "q2"}))
    with pytest.raises(DataError, match="model_digest differs"):
        merge_outputs([parts[0], other, parts[2]], tmp_path / "m2.csv")
    bare = copy_part(parts[1], tmp_path / "bare", record=False)
    with pytest.raises(DataError, match="has no run record"):
        merge_outputs([parts[0], bare, parts[2]], tmp_path / "m3.csv")
    with pytest.raises(DataError, match="is not a shard"):
        merge_outputs([reference, *parts], tmp_path / "m4.csv")
    with pytest.raises(DataError, match="is not a .npz file"):
        merge_outputs(parts, tmp_path / "m5.npz")
    assert not any((tmp_path / f"m{i}.{s}").exists() for i in range(1, 6) for s in ("csv", "npz"))


# ----------------------------------------------------------------------------- embeddings


def load_npz(path: Path) -> tuple[list[Path], np.ndarray]:
    with np.load(path) as archive:
        assert set(archive.files) == {"paths", "embeddings"}
        return [Path(p) for p in archive["paths"].tolist()], archive["embeddings"]


def test_embed_files_matches_the_embedder_with_and_without_flip(faces, embedder, tmp_path):
    good = image_files(faces)[:-1]
    summary = embed_files(embedder, [faces], tmp_path / "emb.npz", batch_size=8, workers=2)
    assert (summary.kind, summary.total, summary.done, summary.skipped) == ("embeddings", 31, 30, 1)
    assert summary.errors_csv == tmp_path / "emb.errors.csv" and "zz_corrupt.png" in summary.errors_csv.read_text()
    paths, vectors = load_npz(summary.out)
    assert paths == good and vectors.shape == (30, 16) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, embedder.embed(good), atol=1e-5)
    flipped = embed_files(embedder, [faces], tmp_path / "flip.npz", flip=True, batch_size=8, workers=0)
    _, flip_vectors = load_npz(flipped.out)
    np.testing.assert_allclose(flip_vectors, embedder.embed(good, flip=True), atol=1e-5)
    images = load_images(good, SIZE)[0]
    with torch.no_grad():  # flip: the normalised sum of the raw outputs of the image and its mirror
        both = sum(embedder.model(preprocess(torch.from_numpy(np.ascontiguousarray(x)), embedder.model.normalization)).numpy()
                   for x in (images, images[:, :, ::-1]))
    np.testing.assert_allclose(flip_vectors, both / np.linalg.norm(both, axis=1, keepdims=True), atol=1e-5)
    assert np.abs(flip_vectors - vectors).max() > 1e-3
    assert json.loads(record_path(flipped.out).read_text())["flip"] is True


class Interrupted(Exception):
    """A simulated crash."""


class FlakyEmbedder:
    """Delegates to a real embedder, counts images, and raises on call number `fail_on`."""

    task = "recognition"

    def __init__(self, embedder, fail_on=None):
        self.embedder, self.fail_on, self.images, self.calls = embedder, fail_on, 0, 0
        self.input_size, self.embedding_size = embedder.input_size, embedder.embedding_size
        self.geometry = embedder.geometry

    def infer(self, batch, flip=False):
        self.calls += 1
        if self.calls == self.fail_on:
            raise Interrupted()
        self.images += len(batch)
        return self.embedder.infer(batch, flip=flip)


def test_embed_files_resumes_after_an_interruption(faces, embedder, tmp_path):
    reference = embed_files(embedder, [faces], tmp_path / "ref.npz", batch_size=8, workers=0).out
    out = tmp_path / "emb.npz"
    with pytest.raises(Interrupted):
        embed_files(FlakyEmbedder(embedder, fail_on=3), [faces], out, batch_size=8, workers=2)
    assert journal_path(out).is_file() and not out.exists()
    with pytest.raises(DataError, match=r"its flip differ"):
        embed_files(embedder, [faces], out, flip=True, batch_size=8, resume=True)
    model = FlakyEmbedder(embedder)
    summary = embed_files(model, [faces], out, batch_size=8, resume=True, workers=0)
    assert (summary.resumed, summary.done, summary.skipped, model.images) == (16, 14, 1, 14)
    assert not journal_path(out).exists()
    paths, vectors = load_npz(out)
    ref_paths, ref_vectors = load_npz(reference)
    assert paths == ref_paths
    np.testing.assert_allclose(vectors, ref_vectors, atol=1e-6)


def test_resume_refuses_an_output_of_another_model(faces, scorer, tmp_path):
    out = tmp_path / "scores.csv"
    score_files(scorer, [faces], out, workers=0, fingerprint="q1")
    with pytest.raises(DataError, match="model"):
        score_files(scorer, [faces], out, workers=0, fingerprint="q2", resume=True)


def test_sharded_embeddings_merge_into_the_unsharded_result(faces, embedder, tmp_path):
    reference = embed_files(embedder, [faces], tmp_path / "all.npz", batch_size=1, workers=0, fingerprint="r").out
    parts = [embed_files(embedder, [faces], tmp_path / f"e{i}.npz", batch_size=1, workers=0,
                         fingerprint="r", shard=Shard(i, 2)).out for i in range(2)]
    merged = tmp_path / "merged.npz"
    assert merge_outputs(parts[::-1], merged)["rows"] == 30
    paths, vectors = load_npz(merged)
    assert paths == load_npz(parts[0])[0] + load_npz(parts[1])[0]  # shard order, whatever the order given
    ref_paths, ref_vectors = load_npz(reference)
    expected = dict(zip(ref_paths, ref_vectors))
    assert set(paths) == set(expected)
    np.testing.assert_array_equal(vectors, np.stack([expected[p] for p in paths]))
    assert "zz_corrupt.png" in errors_path(merged).read_text()


# ----------------------------------------------------------------------------- backends


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FACEKD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_open_model_torch_and_onnx_give_the_same_scores(quality_file, faces, cache):
    model, choice = open_model(quality_file, backend="torch", threads=1, batch_size=8)
    assert isinstance(model, QualityModel) and isinstance(choice, BackendChoice)
    assert (choice.backend, choice.device, choice.threads, choice.batch_size) == ("torch", "cpu", 1, 8)
    assert choice.probe == {}
    exported = cache / "onnx" / f"{file_digest(quality_file)}.onnx"
    assert not exported.exists()
    onnx_model, onnx_choice = open_model(quality_file, backend="onnx", threads=1, batch_size=8)
    assert isinstance(onnx_model, OnnxQualityModel) and onnx_choice.backend == "onnx"
    assert exported.is_file()
    stamp = exported.stat().st_mtime_ns
    images = image_files(faces)[:-1]
    scores = onnx_model.score(images)
    np.testing.assert_allclose(scores, model.score(images), atol=1e-4)
    assert np.ptp(scores) > 1e-2
    again, _ = open_model(quality_file, backend="onnx", threads=1)
    assert exported.stat().st_mtime_ns == stamp  # the cached export is reused
    np.testing.assert_array_equal(again.score(images), scores)
    direct, direct_choice = open_model(exported, threads=1)  # an .onnx file runs on ONNX Runtime
    assert isinstance(direct, OnnxQualityModel) and direct_choice.reason == "an .onnx model file"


def test_open_model_auto_times_both_backends(quality_file, cache, monkeypatch):
    monkeypatch.setattr("facekd.inference.backend.PROBE_SECONDS", 0.05)
    model, choice = open_model(quality_file, backend="auto", threads=1, batch_size=16)
    assert set(choice.probe) == {f"{name}/1/{batch}" for name in ("torch", "onnx") for batch in (8, 16)}
    assert all(v > 0 for v in choice.probe.values()) and choice.threads == 1 and choice.batch_size in (8, 16)
    # no decoding to weigh: the fastest wins (an earlier candidate keeps ties within 2%)
    assert choice.probe[f"{choice.backend}/1/{choice.batch_size}"] >= max(choice.probe.values()) / 1.02
    assert isinstance(model, OnnxQualityModel if choice.backend == "onnx" else QualityModel)
    assert model.batch_size == choice.batch_size
    assert "fastest here" in choice.reason and choice.to_dict()["probe"] == choice.probe
    assert (cache / "onnx" / f"{file_digest(quality_file)}.onnx").is_file()


def test_thread_counts_and_pipeline_rate():
    assert [thread_counts(n) for n in (1, 2, 6, 8)] == [[1], [1, 2], [1, 2, 4, 6], [1, 2, 4, 8]]
    assert pipeline_rate(100.0, 1, 0.0, 2) == 100.0  # no decoding: the model's own rate
    # 2 cores, 10 ms decoding an image, 2 threads at 1000 img/s: 2 / (0.01 + 0.002) img/s
    assert pipeline_rate(1000.0, 2, 0.01, 2) == pytest.approx(2 / 0.012)


def test_open_model_refusals(quality_file, cache, tmp_path):
    with pytest.raises(ConfigError, match="backend must be one of"):
        open_model(quality_file, backend="tensorrt")
    for threads in (0, -2, 1.5, True, "4"):
        with pytest.raises(ConfigError, match="threads must be a positive integer"):
            open_model(quality_file, backend="torch", threads=threads)
    with pytest.raises(ConfigError, match="device must be"):
        open_model(quality_file, backend="torch", device="banana")
    onnx_file = tmp_path / "q.onnx"
    onnx_file.write_bytes(b"")
    with pytest.raises(ConfigError, match="runs on ONNX Runtime"):
        open_model(onnx_file, backend="torch")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            open_model(quality_file, backend="torch", device="cuda")


def test_open_model_recognition_gives_an_embedder(recognition_file, cache):
    model, _ = open_model(recognition_file, backend="torch", threads=1)
    assert isinstance(model, FaceEmbedder) and model.embedding_size == 16


# ----------------------------------------------------------------------------- CLI


def test_cli_sharded_scoring_and_merge(quality_file, faces, sharded_scores, tmp_path, capsys):
    reference, _ = sharded_scores
    common = [str(quality_file), str(faces), "--out", str(tmp_path / "s.{shard}.csv"), "--backend", "torch",
              "--threads", "1", "--workers", "2", "--batch-size", "1", "-q"]
    assert main(["quality", "score", *common, "--shard", "0/2"]) == 0
    assert main(["quality", "score", *common, "--shard", "1/2"]) == 0
    parts = [tmp_path / f"s.0000{i}-of-00002.csv" for i in range(2)]
    assert all(p.is_file() for p in parts)
    assert json.loads(record_path(parts[0]).read_text())["model_digest"] == file_digest(quality_file)
    assert main(["merge", *map(str, parts), "--out", str(tmp_path / "merged.csv")]) == 0
    assert read_scores(tmp_path / "merged.csv") == read_scores(reference)
    capsys.readouterr()
    assert main(["merge", *map(str, parts), "--out", str(tmp_path / "merged.csv")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_shard_auto_needs_shard_in_the_output(quality_file, faces, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    args = ["quality", "score", str(quality_file), str(faces), "--backend", "torch", "--threads", "1", "-q",
            "--shard", "auto", "--out"]
    assert main([*args, str(tmp_path / "scores.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("facekd: error:") and "--shard auto" in err and "{shard}" in err
    assert list(tmp_path.iterdir()) == []
    assert main([*args, str(tmp_path / "scores.{shard}.csv")]) == 0
    assert json.loads((tmp_path / "scores.00000-of-00002.run.json").read_text())["shard"] == "0/2"


def test_file_names_that_are_not_utf8_survive_scoring_resume_and_merge(faces, scorer, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    odd = folder / os.fsdecode(b"\xffodd.png")
    shutil.copy(image_files(faces)[0], odd)
    shutil.copy(image_files(faces)[1], folder / "plain.png")
    out = score_files(scorer, [folder], tmp_path / "s.csv", workers=0, fingerprint="q").out
    assert set(read_scores(out)) == {odd, folder / "plain.png"}
    assert score_files(scorer, [folder], out, workers=0, fingerprint="q", resume=True).resumed == 2
    parts = [score_files(scorer, [folder], tmp_path / f"p{i}.csv", workers=0, fingerprint="q",
                         shard=Shard(i, 2)).out for i in range(2)]
    merge_outputs(parts, tmp_path / "m.csv")
    assert read_scores(tmp_path / "m.csv") == pytest.approx(read_scores(out), abs=1e-5)  # batch of 1 vs 2
