import json
import struct

import numpy as np
import pytest
import torch

import facekd
from facekd.errors import DataError, FacekdError
from facekd.io.images import resize_to, write_image
from facekd.models import build_model
from facekd.models.artifact import load_model, read_model_info, save_model
from facekd.inference.predictors import FaceEmbedder, QualityModel, preprocess


def _faces(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def recognizer():
    torch.manual_seed(0)
    return build_model("mobilefacenet", input_size=64, embedding_size=128).eval()


@pytest.fixture(scope="module")
def quality():
    torch.manual_seed(1)
    return build_model("timm/mobilenetv3_small_100", input_size=64).eval()


def test_recognition_round_trip(tmp_path, recognizer):
    path = save_model(recognizer, tmp_path / "fr.safetensors", training_config={"lr": 0.1},
                      metrics={"tpr@1e-3": 0.5})
    info = read_model_info(path)
    assert (info.task, info.arch, info.input_size, info.embedding_size) == ("recognition", "mobilefacenet", 64, 128)
    assert info.training_config == {"lr": 0.1} and info.metrics == {"tpr@1e-3": 0.5}
    loaded = load_model(path)
    for name, tensor in recognizer.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    embedder = facekd.load(path)
    assert isinstance(embedder, FaceEmbedder) and embedder.embedding_size == 128
    images = _faces(3, 80)
    emb = embedder.embed(images)
    assert emb.shape == (3, 128) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    with torch.inference_mode():
        resized = np.stack([resize_to(im, (64, 64)) for im in images])
        direct = recognizer(preprocess(resized, recognizer.normalization)).numpy()
    direct /= np.linalg.norm(direct, axis=1, keepdims=True)
    np.testing.assert_allclose(emb, direct, atol=1e-5)
    flipped = embedder.embed(images, flip=True)
    assert flipped.shape == emb.shape and not np.allclose(flipped, emb)


def test_quality_round_trip_paths_folders_arrays(tmp_path, quality):
    path = save_model(quality, tmp_path / "q.safetensors")
    scorer = facekd.load(path, batch_size=2)
    assert isinstance(scorer, QualityModel)
    images = _faces(5, 64, seed=3)
    folder = tmp_path / "imgs"
    for i, image in enumerate(images):
        write_image(folder / "sub" / f"{i}.png", image)
    from_arrays = scorer.score(images)
    from_folder = scorer.score(folder)
    from_paths = scorer.score([folder / "sub" / f"{i}.png" for i in range(5)])
    assert from_arrays.shape == (5,)
    np.testing.assert_allclose(from_folder, from_arrays, atol=1e-5)
    np.testing.assert_allclose(from_paths, from_arrays, atol=1e-5)
    # one image alone gives the same score as inside a batch (eval mode, no batch coupling)
    np.testing.assert_allclose(scorer.score(images[2]), from_arrays[2:3], atol=1e-5)


def test_bad_model_files(tmp_path, quality):
    with pytest.raises(DataError, match="file not found"):
        facekd.load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a model at all")
    with pytest.raises(DataError, match="garbage.safetensors: not a readable safetensors"):
        facekd.load(garbage)
    good = save_model(quality, tmp_path / "good.safetensors")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated.safetensors"):
        facekd.load(truncated)
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"framework": "other"})
    with pytest.raises(DataError, match="not a facekd model file"):
        read_model_info(foreign)
    pickled = tmp_path / "pickled.safetensors"
    torch.save(quality.state_dict(), pickled)
    with pytest.raises(DataError, match="pickled.safetensors"):
        facekd.load(pickled)


def _with_metadata(path, out, **changes):
    """A copy of a safetensors file with some metadata values replaced (header rewritten by hand)."""
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    header["__metadata__"].update(changes)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    out.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + header_len:])
    return out


def test_weights_that_do_not_match_their_architecture(tmp_path, quality):
    path = save_model(quality, tmp_path / "q.safetensors")
    bad = _with_metadata(path, tmp_path / "mismatch.safetensors", arch="timm/mobilenetv3_large_100")
    with pytest.raises(DataError, match="do not match architecture 'timm/mobilenetv3_large_100'"):
        facekd.load(bad)


def test_model_file_of_a_retired_architecture_is_refused_in_one_line(tmp_path, quality):
    path = save_model(quality, tmp_path / "q.safetensors")
    old = _with_metadata(path, tmp_path / "old.safetensors", arch="edgenext_xxs")
    with pytest.raises(DataError) as info:
        facekd.load(old)
    message = str(info.value)
    assert "old.safetensors" in message and "'edgenext_xxs'" in message and "retired" in message
    assert "'timm/edgenext_xx_small'" in message and "\n" not in message


def test_load_never_fetches_pretrained_weights(tmp_path, monkeypatch):
    """A model trained from `pretrained: true` records it, and loading it needs no network."""
    import timm.models._builder as timm_builder

    model = build_model("timm/mobilenetv3_small_050", 64, load_pretrained=False, pretrained=True)
    path = save_model(model.eval(), tmp_path / "pre.safetensors")
    assert read_model_info(path).options["pretrained"] is True

    def no_download(*args, **kwargs):
        raise AssertionError("tried to fetch pretrained weights")

    monkeypatch.setattr(timm_builder, "load_pretrained", no_download)
    monkeypatch.setattr(timm_builder, "load_custom_pretrained", no_download)
    with pytest.raises(AssertionError, match="tried to fetch"):  # the guard is real
        build_model("timm/mobilenetv3_small_050", 64, pretrained=True)
    loaded = load_model(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_save_is_atomic(tmp_path, quality, monkeypatch):
    path = tmp_path / "q.safetensors"
    save_model(quality, path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("facekd.io.atomic.os.replace", broken)
    with pytest.raises(OSError):
        save_model(build_model("timm/mobilenetv3_small_100", input_size=64), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["q.safetensors"]


def test_no_images(tmp_path, quality):
    scorer = QualityModel(quality)
    with pytest.raises(FacekdError):
        scorer.score([])


def test_damaged_metadata_and_bad_batch_size(tmp_path, quality):
    from facekd.errors import ConfigError

    path = save_model(quality, tmp_path / "q.safetensors")
    bad = _with_metadata(path, tmp_path / "damaged.safetensors", options="[1]")
    with pytest.raises(DataError, match="damaged.safetensors: damaged facekd metadata"):
        facekd.load(bad)
    for size in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="batch_size"):
            facekd.load(path, batch_size=size)
