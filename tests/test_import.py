"""`facekd import`: Efficient-FIQA's and timm's checkpoints, with parity against the reference code.

The reference networks (tests/reference_efficient_fiqa.py) are built the way Efficient-FIQA's
`models/FIQA_model.py` builds them, their random weights saved with
`torch.save(model.state_dict())` as its training scripts save them, and scored as its `test.py`
scores.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

import facekd
from facekd.cli import main
from facekd.errors import ConfigError, DataError
from facekd.io.images import write_image
from facekd.models.artifact import read_model_info
from facekd.models.importers import import_checkpoint
from helpers import CodePayload
from reference_efficient_fiqa import (ReferenceEdgeNeXt, ReferenceFIQASwin, ReferenceSwinIQA, randomised,
                                      reference_scores)

PARITY = 1e-4


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Non-square and square PNG images of several sizes (PNG: both decoders see the same pixels)."""
    folder = tmp_path_factory.mktemp("parity_images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(400, 300), (353, 512), (352, 352), (250, 260), (600, 450)]):
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = np.stack([(xx * (c + 1) + yy * (3 - c)) % 256 for c in range(3)], axis=-1)
        noise = rng.integers(0, 64, (h, w, 3))
        path = folder / f"face{i}.png"
        write_image(path, np.clip(smooth * 0.75 + noise, 0, 255).astype(np.uint8))
        paths.append(path)
    return paths


def _check_parity(reference: nn.Module, checkpoint, paths, size: int, tmp_path, onnx: bool = True):
    out = tmp_path / "imported.safetensors"
    report = import_checkpoint("efficient-fiqa", checkpoint, out)
    assert report.input_size == size and report.resize == "center_crop"
    expected = reference_scores(reference, paths, size)
    assert expected.std() > 1e-3  # the scores differ between images: a real comparison
    scores = facekd.load(out).score(paths)
    assert np.abs(scores - expected).max() <= PARITY
    if onnx:
        from facekd.export import export_onnx

        onnx_path = tmp_path / "imported.onnx"
        export_onnx(out, onnx_path)
        onnx_scores = facekd.load(onnx_path).score(paths)
        assert np.abs(onnx_scores - expected).max() <= PARITY
    return report


def test_efficient_fiqa_edgenext_student_parity_torch_and_onnx(images, tmp_path):
    torch.manual_seed(0)
    reference = randomised(ReferenceEdgeNeXt(), seed=1)
    checkpoint = tmp_path / "EdgeNeXt_XXS_checkpoint.pt"
    torch.save(reference.state_dict(), checkpoint)
    report = _check_parity(reference, checkpoint, images, 352, tmp_path)
    assert report.arch == "timm/edgenext_xx_small" and report.params == 1_179_641
    info = read_model_info(report.path)
    assert info.options["resize"] == "center_crop" and info.options["head_activation"] == "none"
    assert info.training_config["imported_from"]["file"] == "EdgeNeXt_XXS_checkpoint.pt"
    assert info.normalization["std"] == pytest.approx([0.229 * 255, 0.224 * 255, 0.225 * 255])


def test_efficient_fiqa_swin_b_teacher_parity_torch(images, tmp_path):
    """The released teacher's network at its size (448); ONNX is checked on Swin-T below and on
    Swin-B by benchmarks/import_parity.py (a 350 MB graph is too slow for the test suite)."""
    torch.manual_seed(0)
    reference = randomised(ReferenceFIQASwin("swin_b"), seed=2)
    checkpoint = tmp_path / "Swin_B_checkpoint.pt"
    torch.save(reference.state_dict(), checkpoint)
    report = _check_parity(reference, checkpoint, images[:2], 448, tmp_path, onnx=False)
    assert report.arch == "torchvision/swin_b"


def test_efficient_fiqa_swin_iqa_layout_parity_torch_and_onnx(images, tmp_path):
    """Swin_b_IQA's layout (`feature_extraction.` once), on a Swin-T at 224 (`--input-size`)."""
    torch.manual_seed(0)
    reference = randomised(ReferenceSwinIQA("swin_t"), seed=3)
    checkpoint = tmp_path / "swin_t_iqa.pth"
    torch.save(reference.state_dict(), checkpoint)
    out = tmp_path / "swin_t.safetensors"
    report = import_checkpoint("efficient-fiqa", checkpoint, out, input_size=224)
    assert report.arch == "torchvision/swin_t"
    expected = reference_scores(reference, images, 224)
    assert np.abs(facekd.load(out).score(images) - expected).max() <= PARITY
    from facekd.export import export_onnx

    export_onnx(out, tmp_path / "swin_t.onnx")
    assert np.abs(facekd.load(tmp_path / "swin_t.onnx").score(images) - expected).max() <= PARITY


def test_dataparallel_prefix_is_accepted(tmp_path, images):
    reference = randomised(ReferenceEdgeNeXt(), seed=4)
    checkpoint = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, checkpoint)
    out = tmp_path / "dp.safetensors"
    import_checkpoint("efficient-fiqa", checkpoint, out)
    assert np.abs(facekd.load(out).score(images[:2]) - reference_scores(reference, images[:2], 352)).max() <= PARITY


def test_checkpoint_with_a_code_payload_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"quality.0.weight": torch.zeros(1), "payload": CodePayload(marker)}, checkpoint)
    out = tmp_path / "out.safetensors"
    with pytest.raises(DataError, match=r"evil\.pt.*refused.*weights_only=True"):
        import_checkpoint("efficient-fiqa", checkpoint, out)
    assert not marker.exists() and not out.exists()
    assert main(["import", "efficient-fiqa", str(checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "evil.pt" in err
    assert not marker.exists() and not out.exists()


def test_wrong_or_missing_keys_name_the_first_few_and_write_nothing(tmp_path):
    reference = ReferenceEdgeNeXt()
    state = reference.state_dict()
    out = tmp_path / "out.safetensors"
    broken = {k: v for k, v in state.items() if not k.startswith("feature_extraction.stages.3.")}
    torch.save(broken, tmp_path / "missing.pt")
    with pytest.raises(DataError, match=r"missing\.pt.*EdgeNeXt.*first keys"):
        import_checkpoint("efficient-fiqa", tmp_path / "missing.pt", out)
    torch.save({"backbone.conv.weight": torch.zeros(2), "fc.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(DataError, match=r"not an Efficient-FIQA checkpoint.*found backbone\.conv\.weight, fc\.weight"):
        import_checkpoint("efficient-fiqa", tmp_path / "other.pt", out)
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(DataError, match=r"unexpected keys beside the network: extra\.weight"):
        import_checkpoint("efficient-fiqa", tmp_path / "extra.pt", out)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(DataError, match=r"garbage\.pt"):
        import_checkpoint("efficient-fiqa", tmp_path / "garbage.pt", out)
    with pytest.raises(DataError, match="not found"):
        import_checkpoint("efficient-fiqa", tmp_path / "absent.pt", out)
    with pytest.raises(ConfigError, match="unknown checkpoint format"):
        import_checkpoint("caffe", tmp_path / "extra.pt", out)
    assert not out.exists()


def test_timm_state_dict_as_a_quality_trunk(tmp_path, images):
    source = randomised(timm.create_model("mobilenetv3_small_050"), seed=5)  # with its classifier
    torch.save(source.state_dict(), tmp_path / "mbv3.pth")
    out = tmp_path / "mbv3.safetensors"
    assert main(["import", "timm", str(tmp_path / "mbv3.pth"), "--arch", "timm/mobilenetv3_small_050",
                 "--input-size", "96", "--out", str(out), "-q"]) == 0
    model = facekd.models.artifact.load_model(out)
    assert model.arch == "timm/mobilenetv3_small_050" and model.input_size == 96
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(model.backbone(x), source.forward_features(x), atol=1e-5)
    with pytest.raises(ConfigError, match="needs --arch timm/<name>"):
        import_checkpoint("timm", tmp_path / "mbv3.pth", tmp_path / "x.safetensors")
    with pytest.raises(DataError, match=r"mbv3\.pth.*shape mismatches|mbv3\.pth.*missing keys"):
        import_checkpoint("timm", tmp_path / "mbv3.pth", tmp_path / "x.safetensors", arch="timm/mobilenetv3_small_100")
