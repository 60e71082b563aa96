import numpy as np
import pytest

import facekd
from helpers import lively
from facekd.errors import ConfigError, DataError, FacekdError
from facekd.export import export_onnx, read_onnx_info
from facekd.inference.predictors import OnnxFaceEmbedder, OnnxQualityModel, load_onnx, make_session
from facekd.io.images import write_image
from facekd.models import build_model
from facekd.models.artifact import read_model_info, save_model
from facekd.inference.predictors import FaceEmbedder, QualityModel


def _faces(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def quality_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quality")
    model = lively(build_model("timm/mobilenetv3_small_100", input_size=64), seed=1)
    path = save_model(model, folder / "q.safetensors", training_config={"lr": 0.01}, metrics={"srcc": 0.5})
    report = export_onnx(path, folder / "q.onnx")
    return path, report


@pytest.fixture(scope="module")
def recognition_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recognition")
    model = lively(build_model("mobilefacenet", input_size=64, embedding_size=128), seed=2)
    path = save_model(model, folder / "fr.safetensors")
    report = export_onnx(path, folder / "fr.onnx", batch_for_check=2)
    return path, report


def test_quality_export_report_and_dynamic_batch(quality_files):
    source, report = quality_files
    assert report.path.is_file() and report.size_bytes == report.path.stat().st_size
    assert report.checked and report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    assert (report.input_name, report.output_name, report.opset) == ("images", "scores", 17)
    assert report.input_shape == ("batch", 64, 64, 3) and report.output_shape == ("batch",)
    torch_model = facekd.load(source)
    session = make_session(report.path, threads=1)
    for batch in (1, 5):
        images = _faces(batch, 64, seed=batch)
        (scores,) = session.run(None, {"images": images})
        assert scores.shape == (batch,) and scores.dtype == np.float32
        np.testing.assert_allclose(scores, torch_model.score(images), atol=1e-4)
    # the outputs are not trivially equal: different images get different scores
    assert np.ptp(session.run(None, {"images": _faces(5, 64, seed=9)})[0]) > 1e-2


def test_onnx_scores_match_torch_on_arrays_and_folders(quality_files, tmp_path):
    source, report = quality_files
    onnx_scorer = facekd.load(report.path, batch_size=2)
    torch_scorer = facekd.load(source, batch_size=2)
    assert isinstance(onnx_scorer, OnnxQualityModel) and isinstance(torch_scorer, QualityModel)
    images = _faces(5, 80, seed=4)  # not the input size: both resize the same way
    expected = torch_scorer.score(images)
    np.testing.assert_allclose(onnx_scorer.score(images), expected, atol=1e-4)
    for i, image in enumerate(images):
        write_image(tmp_path / "faces" / f"{i}.png", image)
    from_folder = onnx_scorer.score(tmp_path / "faces")
    assert from_folder.shape == (5,) and from_folder.dtype == np.float32
    np.testing.assert_allclose(from_folder, torch_scorer.score(tmp_path / "faces"), atol=1e-4)
    np.testing.assert_allclose(onnx_scorer.score(images[3]), expected[3:4], atol=1e-4)
    with pytest.raises(FacekdError, match="no images"):
        onnx_scorer.score([])
    assert onnx_scorer.info["arch"] == "timm/mobilenetv3_small_100" and onnx_scorer.info["format"] == "onnx"


def test_embedder_matches_torch(recognition_files):
    source, report = recognition_files
    assert report.checked and report.max_abs_diff < 1e-4
    assert report.output_name == "embeddings" and report.output_shape == ("batch", 128)
    onnx_embedder = load_onnx(report.path, threads=1, batch_size=3)
    torch_embedder = facekd.load(source)
    assert isinstance(onnx_embedder, OnnxFaceEmbedder) and isinstance(torch_embedder, FaceEmbedder)
    assert onnx_embedder.embedding_size == 128
    images = _faces(4, 64, seed=7)
    for flip in (False, True):
        got = onnx_embedder.embed(images, flip=flip)
        assert got.shape == (4, 128) and got.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(got, torch_embedder.embed(images, flip=flip), atol=1e-4)
    # the graph's own output is the raw embedding, as documented
    (raw,) = make_session(report.path).run(None, {"images": images})
    assert raw.shape == (4, 128) and not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-2)


def test_metadata_round_trip(quality_files, recognition_files):
    for source, report in (quality_files, recognition_files):
        original, exported = read_model_info(source), read_onnx_info(report.path)
        for field in ("task", "arch", "input_size", "options", "normalization", "embedding_size",
                      "facekd_version", "training_config", "metrics"):
            assert getattr(exported, field) == getattr(original, field), field
    assert read_onnx_info(quality_files[1].path).metrics == {"srcc": 0.5}
    assert load_onnx(quality_files[1].path).model_info.training_config == {"lr": 0.01}


def test_bad_onnx_files(tmp_path, quality_files, recognition_files):
    import onnx
    from onnx import TensorProto, helper

    with pytest.raises(DataError, match="missing.onnx: file not found"):
        facekd.load(tmp_path / "missing.onnx")
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(DataError, match="dir.onnx: is a folder"):
        load_onnx(tmp_path / "dir.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"definitely not a protobuf \xff\xfe" * 10)
    with pytest.raises(DataError, match="garbage.onnx: not a readable ONNX model"):
        facekd.load(garbage)
    with pytest.raises(DataError, match="garbage.onnx: not a readable ONNX model"):
        read_onnx_info(garbage)
    data = quality_files[1].path.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated.onnx"):
        facekd.load(truncated)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.onnx"):
        facekd.load(empty)

    # a valid ONNX model from another tool: readable, but not a facekd model
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    foreign = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(foreign, tmp_path / "foreign.onnx")
    with pytest.raises(DataError, match="foreign.onnx: not a facekd model file"):
        facekd.load(tmp_path / "foreign.onnx")
    # facekd metadata on a graph that does not fit it
    mismatched = onnx.load(str(recognition_files[1].path))
    for prop in mismatched.metadata_props:
        if prop.key == "task":
            prop.value = "quality"
    onnx.save(mismatched, tmp_path / "mismatch.onnx")
    with pytest.raises(DataError, match="mismatch.onnx: ONNX graph does not match.*'scores'"):
        facekd.load(tmp_path / "mismatch.onnx")
    with pytest.raises(DataError, match="is a quality model, not recognition"):
        OnnxFaceEmbedder(quality_files[1].path)


def test_bad_options(tmp_path, quality_files):
    source, report = quality_files
    for kwargs, name in (({"opset": 5}, "opset"), ({"opset": "17"}, "opset"), ({"batch_for_check": 0}, "batch_for_check"),
                         ({"atol": -1.0}, "atol"), ({"atol": float("nan")}, "atol")):
        with pytest.raises(ConfigError, match=name):
            export_onnx(source, tmp_path / "x.onnx", **kwargs)
    with pytest.raises(ConfigError, match="must end in .onnx"):
        export_onnx(source, tmp_path / "x.safetensors")
    with pytest.raises(DataError, match="nope.safetensors: file not found"):
        export_onnx(tmp_path / "nope.safetensors", tmp_path / "x.onnx")
    for threads in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match="threads"):
            load_onnx(report.path, threads=threads)
    with pytest.raises(ConfigError, match="batch_size"):
        facekd.load(report.path, batch_size=0)
    with pytest.raises(ConfigError, match="on the CPU"):
        facekd.load(report.path, device="cuda")
    assert list(tmp_path.iterdir()) == []


def test_failed_check_writes_nothing(tmp_path, monkeypatch):
    model = lively(build_model("timm/mobilenetv3_small_100", input_size=32), seed=3)
    model.train()
    import facekd.export.onnx as onnx_export

    original = onnx_export.torch_outputs
    monkeypatch.setattr(onnx_export, "torch_outputs", lambda m, images: original(m, images) + 0.5)
    out = tmp_path / "q.onnx"
    with pytest.raises(FacekdError, match="q.onnx: not written, ONNX Runtime differs from PyTorch by 0.5"):
        export_onnx(model, out)
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"previous export")
    with pytest.raises(FacekdError, match="not written"):
        export_onnx(model, out)
    assert out.read_bytes() == b"previous export" and len(list(tmp_path.iterdir())) == 1
    # unchecked export of an in-memory model writes, and leaves the caller's model as it was
    report = export_onnx(model, out, check=False)
    assert not report.checked and report.max_abs_diff is None
    assert read_onnx_info(out).arch == "timm/mobilenetv3_small_100" and model.training
