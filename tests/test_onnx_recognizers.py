"""ONNX recognizers from elsewhere (insightface's model zoo: float32 NCHW input, normalisation
outside the graph, no facekd metadata) wherever a recognizer goes: `facekd.load`, `embed`,
`eval`, EDC and the distillation teacher."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import facekd
from facekd.cli import main
from facekd.errors import ConfigError, DataError
from facekd.inference import InputConvention
from facekd.models import build_model
from facekd.models.artifact import save_model
from facekd.synth import generate_identities
from helpers import lively, tiny_recognition_config
from reference_efficient_fiqa import randomised
from reference_insightface import reference_embeddings, reference_network

INSIGHTFACE = InputConvention.from_options(preset="insightface")


def export_foreign(network: torch.nn.Module, path, size: int = 112, dynamic_embedding: bool = False):
    """`network` as insightface's zoo ships recognizers: input `input.1` float32 (N, 3, S, S),
    output `fc1`, no metadata."""
    axes = {"input.1": {0: "N"}, "fc1": {0: "N", 1: "D"} if dynamic_embedding else {0: "N"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(network.eval(), (torch.zeros(1, 3, size, size),), str(path), dynamo=False,
                          input_names=["input.1"], output_names=["fc1"], dynamic_axes=axes)
    return path


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A randomised arcface_torch MobileFaceNet exported like a model-zoo graph, and test faces."""
    folder = tmp_path_factory.mktemp("zoo")
    reference = randomised(reference_network("mbf", 128), seed=3)
    faces = np.random.default_rng(1).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    return reference, export_foreign(reference, folder / "w600k_mbf.onnx"), faces


def test_a_zoo_graph_needs_its_convention_and_then_matches_the_reference(zoo):
    reference, graph, faces = zoo
    with pytest.raises(DataError, match=r"w600k_mbf\.onnx: not a facekd model file \(no facekd metadata\).*--preset insightface"):
        facekd.load(graph)
    embedder = facekd.load(graph, convention=INSIGHTFACE)
    assert embedder.embedding_size == 128 and embedder.input_size == 112
    assert embedder.info["input_convention"]["mean"] == [127.5] * 3
    expected = _unit(reference_embeddings(reference, faces))
    assert np.abs(embedder.embed(faces) - expected).max() <= 1e-4
    # BGR: the graph gets the channels swapped, which changes the embeddings
    bgr = facekd.load(graph, convention=InputConvention.from_options(preset="insightface", bgr=True)).embed(faces)
    assert np.abs(bgr - _unit(reference_embeddings(reference, np.ascontiguousarray(faces[..., ::-1])))).max() <= 1e-4
    assert np.abs(bgr - expected).max() > 1e-2


def test_insightface_preset_finds_a_normalisation_inside_the_graph(zoo, tmp_path):
    import onnx

    reference, _, faces = zoo

    class Inside(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = reference

        def forward(self, x):
            return self.net((x - 127.5) * (1 / 127.5))

    path = export_foreign(Inside(), tmp_path / "inside.onnx", dynamic_embedding=True)
    graph = onnx.load(str(path))
    for node in graph.graph.node[:8]:  # the mxnet-converted zoo graphs' names
        node.name = {"Sub": "_minusscalar0", "Mul": "_mulscalar0"}.get(node.op_type, node.name)
    onnx.save(graph, str(path))
    embedder = facekd.load(path, convention=INSIGHTFACE)
    assert embedder.info["input_convention"]["mean"] == [0.0] * 3 and embedder.embedding_size == 128
    assert np.abs(embedder.embed(faces) - _unit(reference_embeddings(reference, faces))).max() <= 1e-4
    explicit = facekd.load(path, convention=InputConvention.from_options(preset="insightface", mean=127.5, std=127.5))
    assert explicit.info["input_convention"]["mean"] == [127.5] * 3


def test_convention_errors(zoo, tmp_path):
    _, graph, _ = zoo
    with pytest.raises(ConfigError, match="--input-mean and --input-std"):
        InputConvention.from_options(mean=127.5)
    with pytest.raises(ConfigError, match="input std must be a positive number"):
        InputConvention.from_options(mean=0.0, std=0.0)
    with pytest.raises(ConfigError, match="unknown input preset 'arcface'"):
        InputConvention.from_options(preset="arcface")
    model = build_model("mobilefacenet", 32, embedding_size=16)
    own = save_model(model, tmp_path / "own.safetensors")
    with pytest.raises(ConfigError, match=r"own\.safetensors: a facekd model file carries its input convention"):
        facekd.load(own, convention=INSIGHTFACE)
    from facekd.export import export_onnx

    export_onnx(own, tmp_path / "own.onnx")
    with pytest.raises(ConfigError, match=r"own\.onnx: a facekd export carries its input convention"):
        facekd.load(tmp_path / "own.onnx", convention=INSIGHTFACE)

    class NHWC(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(1, 2))

    nhwc = tmp_path / "nhwc.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(NHWC(), (torch.zeros(1, 112, 112, 3),), str(nhwc), dynamo=False)
    with pytest.raises(DataError, match=r"nhwc\.onnx.*not one float32 \(batch, 3, S, S\) tensor"):
        facekd.load(nhwc, convention=INSIGHTFACE)


@pytest.fixture(scope="module")
def faces32(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces32")
    generate_identities(root / "train", identities=6, images_per_identity=6, size=32, workers=0)
    generate_identities(root / "test", identities=4, images_per_identity=4, size=32, seed=1, workers=0, pairs=20)
    return root


@pytest.fixture(scope="module")
def teacher_pair(faces32, tmp_path_factory):
    """One recognizer twice: a facekd model file and a zoo-style graph of the same network."""
    folder = tmp_path_factory.mktemp("teacher")
    model = lively(build_model("mobilefacenet", 32, embedding_size=32), seed=4)
    own = save_model(model, folder / "teacher.safetensors")
    return own, export_foreign(model, folder / "teacher.onnx", size=32)


def test_embed_eval_and_edc_take_the_zoo_graph(faces32, teacher_pair, tmp_path, capsys):
    from facekd.evaluation.quality_edc import evaluate_edc

    own, graph = teacher_pair
    preset = ["--preset", "insightface"]
    assert main(["recognition", "embed", str(graph), str(faces32 / "test"), "--out", str(tmp_path / "e.npz"),
                 "--backend", "onnx", "-q", *preset]) == 0
    with np.load(tmp_path / "e.npz") as stored:
        embedded = stored["embeddings"]
    paths = sorted((faces32 / "test").rglob("*.png"))
    assert np.abs(embedded - facekd.load(own).embed(paths)).max() <= 1e-4
    capsys.readouterr()
    reports = []
    for model, extra in ((graph, preset), (own, [])):
        assert main(["recognition", "eval", str(model), "--identities", str(faces32 / "test"), "--json", *extra]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    (onnx_report,), (own_report,) = (r["sets"].values() for r in reports)
    assert reports[0]["arch"] == "onnx/teacher.onnx"
    assert onnx_report["auc"] == pytest.approx(own_report["auc"], abs=1e-4)
    quality = save_model(build_model("timm/mobilenetv3_small_100", 32), tmp_path / "q.safetensors")
    edc = [evaluate_edc(model, [quality], identities=faces32 / "test", out=tmp_path / name, fmr=0.05,
                        convention=convention)
           for model, name, convention in ((graph, "onnx", INSIGHTFACE), (own, "own", None))]
    assert edc[0]["threshold"] == pytest.approx(edc[1]["threshold"], abs=1e-4)
    assert edc[0]["comparisons"] == edc[1]["comparisons"]


def test_a_zoo_graph_as_the_distillation_teacher_gives_the_same_losses(faces32, teacher_pair, tmp_path):
    from facekd.recognition.train import train_recognition

    own, graph = teacher_pair
    histories = []
    for teacher, convention, name in ((own, None, "own"), (graph, INSIGHTFACE, "onnx")):
        config = tiny_recognition_config(faces32)
        config.distill.method = "feature"
        report = train_recognition(config, tmp_path / name, role="student", teacher_path=teacher,
                                   teacher_convention=convention)
        assert report["teacher"]["arch"] == ("mobilefacenet" if name == "own" else "onnx/teacher.onnx")
        records = map(json.loads, (tmp_path / name / "train" / "metrics.jsonl").read_text().splitlines())
        histories.append([record["distill"] for record in records if record["event"] == "train"])
    assert histories[0] and len(histories[0]) == len(histories[1])
    assert np.allclose(histories[0], histories[1], rtol=1e-3, atol=1e-5)
    bigger = export_foreign(build_model("mobilefacenet", 48, embedding_size=32), tmp_path / "big.onnx", size=48)
    config = tiny_recognition_config(faces32)
    config.distill.method = "feature"
    with pytest.raises(ConfigError, match=r"big\.onnx: the teacher takes 48px images, the student 32px"):
        train_recognition(config, tmp_path / "big", role="student", teacher_path=bigger, teacher_convention=INSIGHTFACE)
