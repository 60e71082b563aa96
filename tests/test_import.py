"""`facekd import`: Efficient-FIQA's and timm's checkpoints, with parity against the reference code.

The reference networks are built here the way Efficient-FIQA's `models/FIQA_model.py` builds
them (timm `edgenext_xx_small` / torchvision `swin_*` with `head = Identity`, GAP for EdgeNeXt,
two Linear layers), their random weights saved with `torch.save(model.state_dict())` as its
training scripts save them, and scored as its `test.py` scores: PIL image → Resize(S) →
CenterCrop(S) → ToTensor → Normalize(ImageNet) → model.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from torchvision import models as tv_models
from torchvision import transforms

import facekd
from facekd.cli import main
from facekd.errors import ConfigError, DataError
from facekd.io.images import write_image
from facekd.models.artifact import read_model_info
from facekd.models.importers import import_checkpoint

PARITY = 1e-4


class ReferenceEdgeNeXt(nn.Module):
    """FIQA_EdgeNeXt_XXS, as the reference builds it."""

    def __init__(self):
        super().__init__()
        model = timm.create_model("edgenext_xx_small", pretrained=False)
        model.head = nn.Identity()
        self.feature_extraction = model
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.quality = nn.Sequential(nn.Linear(168, 128), nn.Linear(128, 1))

    def forward(self, x):
        return self.quality(torch.flatten(self.avg_pool(self.feature_extraction(x)), 1))


class ReferenceSwinIQA(nn.Module):
    """Swin_b_IQA (torchvision swin with head = Identity + 1024→128→1), for any swin variant."""

    def __init__(self, variant: str = "swin_b"):
        super().__init__()
        model = getattr(tv_models, variant)()
        model.head = nn.Identity()
        self.feature_extraction = model
        width = model.norm.normalized_shape[0]
        self.quality = nn.Sequential(nn.Linear(width, 128), nn.Linear(128, 1))

    def forward(self, x):
        return self.quality(self.feature_extraction(x))


class ReferenceFIQASwin(nn.Module):
    """FIQA_Swin_B: a Swin_b_IQA whose own head is an identity, wrapped with a new head."""

    def __init__(self, variant: str = "swin_b"):
        super().__init__()
        inner = ReferenceSwinIQA(variant)
        inner.quality = nn.Identity()
        self.feature_extraction = inner
        width = inner.feature_extraction.norm.normalized_shape[0]
        self.quality = nn.Sequential(nn.Linear(width, 128), nn.Linear(128, 1))

    def forward(self, x):
        return self.quality(self.feature_extraction(x))


def _reference_scores(model: nn.Module, paths, size: int) -> np.ndarray:
    transform = transforms.Compose([
        transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    model.eval()
    with torch.no_grad():
        return np.array([model(transform(Image.open(p).convert("RGB")).unsqueeze(0)).item() for p in paths])


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere (norms and biases too), so no part of the network is left out."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.dtype.is_floating_point:
                fan_in = int(np.prod(tensor.shape[1:])) if tensor.ndim > 1 else 0
                scale = 1.0 / np.sqrt(fan_in) if fan_in else 0.1
                base = 1.0 if tensor.ndim == 1 and name.endswith(("weight", ".gamma", "running_var")) else 0.0
                noise = scale * torch.randn(tensor.shape, generator=generator)
                tensor.copy_(base + (noise.abs() if name.endswith("running_var") else noise))
    return model.eval()


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
    expected = _reference_scores(reference, paths, size)
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
    reference = _randomised(ReferenceEdgeNeXt(), seed=1)
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
    reference = _randomised(ReferenceFIQASwin("swin_b"), seed=2)
    checkpoint = tmp_path / "Swin_B_checkpoint.pt"
    torch.save(reference.state_dict(), checkpoint)
    report = _check_parity(reference, checkpoint, images[:2], 448, tmp_path, onnx=False)
    assert report.arch == "torchvision/swin_b"


def test_efficient_fiqa_swin_iqa_layout_parity_torch_and_onnx(images, tmp_path):
    """Swin_b_IQA's layout (`feature_extraction.` once), on a Swin-T at 224 (`--input-size`)."""
    torch.manual_seed(0)
    reference = _randomised(ReferenceSwinIQA("swin_t"), seed=3)
    checkpoint = tmp_path / "swin_t_iqa.pth"
    torch.save(reference.state_dict(), checkpoint)
    out = tmp_path / "swin_t.safetensors"
    report = import_checkpoint("efficient-fiqa", checkpoint, out, input_size=224)
    assert report.arch == "torchvision/swin_t"
    expected = _reference_scores(reference, images, 224)
    assert np.abs(facekd.load(out).score(images) - expected).max() <= PARITY
    from facekd.export import export_onnx

    export_onnx(out, tmp_path / "swin_t.onnx")
    assert np.abs(facekd.load(tmp_path / "swin_t.onnx").score(images) - expected).max() <= PARITY


def test_dataparallel_prefix_is_accepted(tmp_path, images):
    reference = _randomised(ReferenceEdgeNeXt(), seed=4)
    checkpoint = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, checkpoint)
    out = tmp_path / "dp.safetensors"
    import_checkpoint("efficient-fiqa", checkpoint, out)
    assert np.abs(facekd.load(out).score(images[:2]) - _reference_scores(reference, images[:2], 352)).max() <= PARITY


class _Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_a_code_payload_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"quality.0.weight": torch.zeros(1), "payload": _Payload(marker)}, checkpoint)
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
    source = _randomised(timm.create_model("mobilenetv3_small_050"), seed=5)  # with its classifier
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
