"""Architectures, heads, registry and the FaceModel wrapper."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from facekd.errors import ConfigError, FacekdError
from facekd.models import (QualityHead, available_archs, build_model, get_arch,
                           register_arch)
from facekd.inference.predictors import preprocess
from facekd.models import registry
from facekd.models.heads import EmbeddingHead

REQUIRED = {
    "iresnet18": "recognition", "iresnet34": "recognition", "iresnet50": "recognition",
    "iresnet100": "recognition", "mobilefacenet": "recognition", "iresnet18_quality": "quality",
    "iresnet50_quality": "quality",
}
FAMILY_MEMBERS = ["timm/mobilenetv3_small_100", "timm/edgenext_xx_small", "torchvision/swin_t"]


def _meta_model(arch: str, input_size: int | None = None, **options):
    with torch.device("meta"):
        return build_model(arch, input_size, **options)


def test_required_archs_registered_with_task_and_size():
    specs = {spec.name: spec for spec in available_archs()}
    for name, task in REQUIRED.items():
        assert specs[name].task == task
        assert specs[name].description
    assert all(specs[n].input_size == 112 for n in ("iresnet18", "iresnet50", "iresnet100", "mobilefacenet"))
    assert {s.name for s in available_archs("quality")} >= {"iresnet18_quality", "iresnet50_quality"}
    assert all(s.task == "recognition" for s in available_archs("recognition"))
    with pytest.raises(ConfigError, match="unknown task"):
        available_archs("detection")


@pytest.mark.parametrize("spec", available_archs() + [get_arch(n) for n in FAMILY_MEMBERS], ids=lambda s: s.name)
def test_every_arch_output_shape_on_meta(spec):
    model = _meta_model(spec.name)
    size = spec.input_size
    feats = model.features(torch.zeros(3, 3, size, size, device="meta"))
    assert feats.shape == (3, model.backbone.out_channels, size // spec.stride, size // spec.stride)
    out = model.eval()(torch.zeros(3, 3, size, size, device="meta"))
    if spec.task == "recognition":
        assert out.shape == (3, 512) and model.embedding_size == 512
    else:
        assert out.shape == (3,) and model.embedding_size is None


@pytest.mark.parametrize("arch,size", [("mobilefacenet", 112), ("mobilefacenet", 128),
                                       ("timm/mobilenetv3_small_100", 160), ("timm/mobilenetv3_small_050", 288),
                                       ("timm/mobilenetv3_large_100", 224), ("timm/edgenext_xx_small", 160),
                                       ("timm/edgenext_xx_small", 256), ("iresnet18", 112),
                                       ("torchvision/swin_t", 64)])
def test_real_forward_and_backward(arch, size):
    torch.manual_seed(0)
    model = build_model(arch, size)
    x = torch.randn(2, 3, size, size)
    out = model.train()(x)
    assert torch.isfinite(out).all()
    out.pow(2).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # every trainable parameter takes part in the forward pass
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    expected = (2, 512) if model.task == "recognition" else (2,)
    assert a.shape == expected


def test_timm_trunk_is_timms_model_without_unused_modules():
    import timm

    model = build_model("timm/edgenext_xx_small", 256)
    assert isinstance(model.backbone.model, timm.models.EdgeNeXt)
    assert [len(stage.blocks) for stage in model.backbone.model.stages] == [2, 2, 6, 2]
    assert model.backbone.out_channels == 168
    assert isinstance(model.backbone.model.head, nn.Identity)  # its norm + classifier: never called
    mbv3 = _meta_model("timm/mobilenetv3_large_100")
    assert isinstance(mbv3.backbone.model.conv_head, nn.Identity) and mbv3.backbone.out_channels == 960
    # a timm state dict maps 1:1 onto backbone.model.*
    reference = timm.create_model("edgenext_xx_small", num_classes=0)
    ours = {k.removeprefix("backbone.model."): v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    assert set(ours) == {k for k in reference.state_dict() if not k.startswith("head.")}


def test_family_specs_take_normalization_and_size_from_the_pretrained_config():
    edge = get_arch("timm/edgenext_xx_small")
    assert edge.input_size == 256 and edge.task == "quality"
    assert edge.normalization["mean"] == pytest.approx([0.485 * 255, 0.456 * 255, 0.406 * 255])
    swin = get_arch("torchvision/swin_b")
    assert swin.input_size == 224 and swin.default_options["drop_path"] == pytest.approx(0.5)
    assert _meta_model("torchvision/swin_b", 448).backbone.out_channels == 1024
    with pytest.raises(ConfigError, match=r"timm has no model 'edgenext_xx_smal'.*did you mean timm/edgenext_xx_small"):
        get_arch("timm/edgenext_xx_smal")
    with pytest.raises(ConfigError, match="torchvision backbones: torchvision/swin_t"):
        get_arch("torchvision/resnet50")


def test_retired_architectures_say_what_replaces_them():
    for old, new in registry.RETIRED_ARCHS.items():
        with pytest.raises(ConfigError, match=f"{old!r}.*retired; use {new!r}"):
            build_model(old)
        get_arch(new)  # the replacement exists


def test_pretrained_path_loads_a_local_state_dict(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = timm.create_model("mobilenetv3_small_050")  # with its classifier, as a hub file has it
    path = tmp_path / "mbv3.safetensors"
    save_file(source.state_dict(), str(path))
    model = build_model("timm/mobilenetv3_small_050", 64, pretrained=str(path))
    assert torch.equal(model.backbone.model.conv_stem.weight, source.conv_stem.weight)
    assert model.options["pretrained"] == str(path)
    again = build_model("timm/mobilenetv3_small_050", 64, load_pretrained=False, pretrained=str(path))
    assert not torch.equal(again.backbone.model.conv_stem.weight, source.conv_stem.weight)  # not read
    torch.save({"conv_stem.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(FacekdError, match=r"wrong.pth.*missing keys: .*unexpected keys: conv_stem.weight|"
                                          r"wrong.pth.*missing keys"):
        build_model("timm/mobilenetv3_small_050", 64, pretrained=str(tmp_path / "wrong.pth"))
    with pytest.raises(FacekdError, match="not found"):
        build_model("torchvision/swin_t", 64, pretrained=str(tmp_path / "absent.pth"))


def test_input_size_must_fit_the_stride():
    with pytest.raises(ConfigError, match="multiple of 32"):
        _meta_model("timm/edgenext_xx_small", 100)
    with pytest.raises(ConfigError, match="multiple of 16"):
        _meta_model("iresnet50", 120)
    with pytest.raises(ConfigError, match="integer"):
        build_model("mobilefacenet", "112")
    model = _meta_model("iresnet18", 128)  # recognition nets take other sizes too: the FC follows
    assert model.head.fc.in_features == 512 * 8 * 8
    assert model.eval()(torch.zeros(1, 3, 128, 128, device="meta")).shape == (1, 512)


def test_options_stored_json_and_rebuild_identical():
    model = build_model("timm/edgenext_xx_small", 160, head_hidden=(64, 32), dropout=0.2, drop_path=0.1,
                        resize="center_crop")
    assert model.options == {"pretrained": False, "drop_path": 0.1, "head_hidden": [64, 32], "dropout": 0.2,
                             "head_norm": False, "head_activation": "gelu", "resize": "center_crop"}
    assert model.geometry.mode == "center_crop" and model.geometry.size == 160
    meta = json.loads(json.dumps(model.metadata()))
    assert meta["arch"] == "timm/edgenext_xx_small" and meta["input_size"] == 160 and meta["task"] == "quality"
    rebuilt = build_model(meta["arch"], meta["input_size"], **meta["options"])
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    rebuilt.load_state_dict(a)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), rebuilt.eval()(x))


def test_options_change_the_model():
    small = _meta_model("mobilefacenet", embedding_size=128, width_mult=0.5, blocks=[2, 2, 2, 2])
    assert small.embedding_size == 128
    assert small.eval()(torch.zeros(1, 3, 112, 112, device="meta")).shape == (1, 128)
    base = _meta_model("mobilefacenet")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(small) < n(base)
    wide = _meta_model("timm/mobilenetv3_small_100")
    assert wide.backbone.out_channels > _meta_model("timm/mobilenetv3_small_050").backbone.out_channels
    linear = _meta_model("timm/edgenext_xx_small", head_activation="none").head
    assert not any(isinstance(m, nn.GELU) for m in linear.mlp)
    head = _meta_model("iresnet18_quality", head_hidden=[64, 16]).head
    assert [m.out_features for m in head.mlp if isinstance(m, nn.Linear)] == [64, 16, 1]
    assert _meta_model("iresnet34", dropout=0.3).head.dropout.p == 0.3


@pytest.mark.parametrize("options,needle", [
    ({"dropout": 1.5}, "dropout"), ({"embedding_size": 0}, "embedding_size"),
    ({"embedding_size": True}, "embedding_size"), ({"width_mult": -1}, "width_mult"),
    ({"blocks": [1, 2, 3]}, "blocks"), ({"embedding_size": 64.5}, "embedding_size"),
])
def test_bad_option_values_name_the_option(options, needle):
    with pytest.raises(ConfigError, match=needle):
        build_model("mobilefacenet", **options)


@pytest.mark.parametrize("value", ["wide", [64, 0], [32.5], None])
def test_bad_head_hidden(value):
    with pytest.raises(ConfigError, match="head_hidden"):
        _meta_model("timm/mobilenetv3_small_100", head_hidden=value)


def test_unknown_option_and_arch_errors():
    with pytest.raises(ConfigError, match=r"unknown option 'colour'.*valid options: dropout, embedding_size"):
        build_model("iresnet18", colour=1)
    with pytest.raises(ConfigError, match="iresnet50_quality"):
        build_model("iresnet50", task="quality")
    with pytest.raises(FacekdError, match=r"did you mean 'mobilefacenet'\?") as info:
        get_arch("mobilefacent")
    assert "iresnet50_quality" in str(info.value) and "timm/<name>" in str(info.value)  # lists the choices
    with pytest.raises(ConfigError, match="unknown architecture 'resnet9000'"):
        build_model("resnet9000")


def test_normalization_per_task_and_normalize_layouts():
    rec = build_model("mobilefacenet")
    qual = build_model("timm/mobilenetv3_small_100", 64)
    assert rec.normalization == {"mean": [127.5] * 3, "std": [127.5] * 3}
    assert qual.normalization["mean"] == pytest.approx([0.485 * 255, 0.456 * 255, 0.406 * 255])
    assert qual.normalization["std"] == pytest.approx([0.229 * 255, 0.224 * 255, 0.225 * 255])
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, size=(2, 20, 24, 3), dtype=np.uint8)
    a = preprocess(nhwc, rec.normalization)
    b = preprocess(torch.from_numpy(nhwc).permute(0, 3, 1, 2), rec.normalization)
    c = preprocess(nhwc[0], rec.normalization)  # single HWC image
    assert a.shape == (2, 3, 20, 24) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(a[:1], c)
    pixel = nhwc[1, 5, 7].astype(np.float64)
    assert a[1, :, 5, 7].double().numpy() == pytest.approx((pixel - 127.5) / 127.5)
    white = preprocess(np.full((4, 4, 3), 255.0, dtype=np.float32), qual.normalization)
    assert white[0, :, 0, 0].tolist() == pytest.approx([(255 - m) / s for m, s in
                                                          zip(qual.normalization["mean"], qual.normalization["std"])])


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8),
                                 np.zeros((1, 1, 8, 8, 3), np.uint8), np.zeros((8, 8, 3), bool), "image"])
def test_normalize_rejects_bad_batches(bad):
    with pytest.raises(FacekdError):
        preprocess(bad, registry.RECOGNITION_NORMALIZATION)


def test_heads():
    head = QualityHead(168, hidden=(128,), dropout=0.0)
    assert sum(p.numel() for p in head.parameters()) == 168 * 128 + 128 + 128 + 1
    with_norm = QualityHead(168, hidden=(128,), norm=True)
    assert sum(p.numel() for p in with_norm.parameters()) == 168 * 128 + 128 + 128 + 1 + 2 * 168
    assert head(torch.randn(5, 168, 3, 3)).shape == (5,)
    linear = QualityHead(16, hidden=())
    x = torch.randn(3, 16, 2, 2)
    fc = linear.mlp[0]
    assert torch.allclose(linear(x), x.mean(dim=(2, 3)) @ fc.weight[0] + fc.bias[0], atol=1e-6)
    emb = EmbeddingHead(32, 7, embedding_size=64)
    assert emb.fc.in_features == 32 * 49 and not emb.features.weight.requires_grad
    assert emb.eval()(torch.randn(2, 32, 7, 7)).shape == (2, 64)


def test_quality_teacher_trunk_loads_recognition_trunk():
    rec = build_model("iresnet18")
    teacher = build_model("iresnet18_quality", 112)
    teacher.backbone.load_state_dict(rec.backbone.state_dict())  # strict: same names and shapes
    assert torch.equal(teacher.backbone.conv1.weight, rec.backbone.conv1.weight)


def test_register_custom_arch(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_arch("tiny_test_net", "quality", 32, "test net", stride=8)
    def _tiny(input_size: int, *, head_hidden=(4,), dropout: float = 0.0):
        trunk = nn.Conv2d(3, 6, 8, stride=8)
        trunk.out_channels = 6
        return trunk, QualityHead(6, head_hidden, dropout)

    spec = get_arch("tiny_test_net")
    assert spec.default_options == {"head_hidden": [4], "dropout": 0.0, "resize": "stretch"}
    model = build_model("tiny_test_net", 16, head_hidden=[3])
    assert model(torch.randn(2, 3, 16, 16)).shape == (2,)
    assert model.options == {"head_hidden": [3], "dropout": 0.0, "resize": "stretch"}
    with pytest.raises(ValueError, match="already registered"):
        register_arch("tiny_test_net", "quality", 32, "again")(_tiny)
    with pytest.raises(ValueError, match="no check"):
        register_arch("tiny_bad", "quality", 32, "bad")(lambda input_size, *, speed=1: None)


@pytest.mark.parametrize("name,kind", [("timm/vit_tiny_patch16_224", "pooled"),
                                       ("timm/swin_tiny_patch4_window7_224", "NHWC"),
                                       ("timm/convnext_atto", "NCHW")])
def test_any_timm_model_is_a_trunk_whatever_its_output_layout(name, kind):
    model = _meta_model(name)
    assert model.backbone.kind == kind
    size = model.input_size
    features = model.features(torch.zeros(2, 3, size, size, device="meta"))
    assert features.ndim == 4 and features.shape[:2] == (2, model.backbone.out_channels)
    assert model.eval()(torch.zeros(2, 3, size, size, device="meta")).shape == (2,)
    if kind == "pooled":  # ViT-style: a fixed input size
        with pytest.raises(ConfigError, match="takes only 224"):
            _meta_model(name, 256)


def test_timm_trunk_trains_every_parameter():
    torch.manual_seed(0)
    model = build_model("timm/convnext_atto", 64).train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
