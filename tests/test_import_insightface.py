"""`facekd import insightface`: arcface_torch's `backbone.pth`, with parity against networks built
in its layout (tests/reference_insightface.py), their random weights saved with
`torch.save(backbone.state_dict())` as arcface_torch's training saves them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import facekd
from facekd.cli import main
from facekd.errors import ConfigError, DataError
from facekd.models import build_model
from facekd.models.artifact import read_model_info
from facekd.models.importers import INSIGHTFACE_ARCHS, import_checkpoint, insightface_key
from helpers import CodePayload
from reference_efficient_fiqa import randomised
from reference_insightface import reference_embeddings, reference_network


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)


@pytest.mark.parametrize("arch", sorted(INSIGHTFACE_ARCHS))
def test_every_arch_maps_onto_the_published_key_layout(arch):
    """Every key and shape of arcface_torch's network has exactly one facekd counterpart."""
    name, options = INSIGHTFACE_ARCHS[arch]
    with torch.device("meta"):
        reference = {k: tuple(v.shape) for k, v in reference_network(arch).state_dict().items()}
        model = build_model(name, 112, load_pretrained=False, **options)
    last = len(model.backbone.layers) - 1 if name == "mobilefacenet" else 0
    mapped = {insightface_key(k, last): tuple(v.shape) for k, v in model.state_dict().items()}
    assert mapped == reference


@pytest.mark.parametrize("arch, embedding", [("r18", 512), ("mbf", 256), ("mbf_large", 512)])
def test_import_parity_torch_and_onnx(arch, embedding, faces, tmp_path):
    from facekd.export import export_onnx

    reference = randomised(reference_network(arch, embedding), seed=1)
    checkpoint = tmp_path / "backbone.pth"
    torch.save(reference.state_dict(), checkpoint)
    out = tmp_path / "teacher.safetensors"
    report = import_checkpoint("insightface", checkpoint, out, arch=arch)
    assert (report.input_size, report.tensors) == (112, len(reference.state_dict()))
    info = read_model_info(out)
    assert info.embedding_size == embedding and info.training_config["imported_from"]["format"] == "insightface"
    expected = _unit(reference_embeddings(reference, faces))
    assert np.abs(expected @ expected.T - np.eye(len(faces))).max() > 0.01  # distinct embeddings
    assert np.abs(facekd.load(out).embed(faces) - expected).max() <= 1e-5
    export_onnx(out, tmp_path / "teacher.onnx")
    assert np.abs(facekd.load(tmp_path / "teacher.onnx").embed(faces) - expected).max() <= 1e-4


def test_ddp_prefix_and_cli(faces, tmp_path, capsys):
    reference = randomised(reference_network("r18"), seed=2)
    checkpoint = tmp_path / "backbone.pth"
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, checkpoint)
    out = tmp_path / "r18.safetensors"
    assert main(["import", "insightface", str(checkpoint), "--arch", "r18", "--out", str(out)]) == 0
    assert "iresnet18" in capsys.readouterr().out
    expected = _unit(reference_embeddings(reference, faces[:2]))
    assert np.abs(facekd.load(out).embed(faces[:2]) - expected).max() <= 1e-5


def test_wrong_keys_arch_or_size_name_the_reason_and_write_nothing(tmp_path):
    state = reference_network("mbf").state_dict()
    out = tmp_path / "out.safetensors"
    cases = [
        ({k: v for k, v in state.items() if k != "conv_sep.layers.1.weight"}, "mbf",
         r"bad\.pth.*missing keys: conv_sep\.layers\.1\.weight"),
        ({**state, "extra.weight": torch.zeros(1)}, "mbf", r"bad\.pth.*unexpected keys: extra\.weight"),
        (state, "r50", r"bad\.pth.*not an arcface_torch r50 backbone.*missing keys: conv1\.weight"),
        (reference_network("mbf_large").state_dict(), "mbf", r"bad\.pth.*(missing|unexpected) keys"),
        ({**state, "layers.0.layers.0.weight": torch.zeros(64, 3, 3, 3)}, "mbf",
         r"bad\.pth.*shapes do not fit arcface_torch mbf: layers\.0\.layers\.0\.weight \(64, 3, 3, 3\)"),
    ]
    for weights, arch, message in cases:
        torch.save(weights, tmp_path / "bad.pth")
        with pytest.raises(DataError, match=message):
            import_checkpoint("insightface", tmp_path / "bad.pth", out, arch=arch)
        assert not out.exists()
    with pytest.raises(ConfigError, match="needs --arch, one of r18, r34, r50, r100, mbf, mbf_large"):
        import_checkpoint("insightface", tmp_path / "bad.pth", out)
    with pytest.raises(ConfigError, match="112×112"):
        import_checkpoint("insightface", tmp_path / "bad.pth", out, arch="mbf", input_size=224)
    assert not out.exists()


def test_backbone_pth_with_a_code_payload_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "backbone.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": CodePayload(marker)}, checkpoint)
    out = tmp_path / "out.safetensors"
    assert main(["import", "insightface", str(checkpoint), "--arch", "r50", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "backbone.pth" in err and "weights_only=True" in err
    assert not marker.exists() and not out.exists()
