"""Parameter and multiply-add counts, latency measurement and the cost report."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from torch import nn

from facekd.errors import ConfigError
from facekd.models import (GFLOPS_NOTE, available_archs, build_model, cost_report, count_flops, count_params, get_arch,
                           format_cost_table, measure_latency)
from facekd.progress import Progress, ProgressTask


def _meta(arch: str, input_size: int | None = None):
    with torch.device("meta"):
        return build_model(arch, input_size)


def test_count_flops_linear_is_hand_mac_count():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    assert count_flops(model, 4) == 48 * 5  # bias adds are not multiply-adds


def test_count_flops_conv_is_hand_mac_count():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    assert count_flops(conv, 16) == 8 * 3 * 9 * (8 * 8)
    assert count_flops(conv, (16, 32)) == 8 * 3 * 9 * (8 * 16)
    grouped = nn.Sequential(nn.Conv2d(3, 6, 1, bias=False), nn.Conv2d(6, 6, 3, padding=1, groups=6))
    assert count_flops(grouped, 8) == 3 * 6 * 64 + 6 * 9 * 64


def test_count_flops_restores_mode_and_works_on_meta():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    assert count_flops(model, 10) == 4 * 3 * 9 * 64 + 2 * 4 * 64  # BN counted as in eval (fvcore)
    assert model.training
    with torch.device("meta"):
        meta = nn.Conv2d(3, 4, 3)
    assert count_flops(meta, 10) == 4 * 3 * 9 * 64


def test_count_params_all_and_trainable():
    model = nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 2))
    assert count_params(model) == 7 * 5 + 5 + 5 * 2 + 2
    model[1].weight.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 7 * 5 + 5 + 2


@pytest.mark.parametrize("arch,params_m,gflops", [
    ("mobilefacenet", (0.9, 1.3), (0.18, 0.26)),
    ("iresnet18", (23.0, 25.0), (2.4, 2.8)),
    ("iresnet50", (40.0, 46.0), (6.0, 6.6)),
    ("iresnet100", (62.0, 68.0), (11.5, 12.6)),
])
def test_recognition_costs_match_published_figures(arch, params_m, gflops):
    model = _meta(arch)
    assert params_m[0] <= count_params(model) / 1e6 <= params_m[1]
    assert gflops[0] <= count_flops(model, 112) / 1e9 <= gflops[1]


STUDENTS = ("timm/edgenext_xx_small", "timm/mobilenetv3_small_100", "timm/mobilenetv3_large_075")


def test_named_quality_archs_are_the_face_teachers():
    assert sorted(s.name for s in available_archs("quality")) == ["iresnet18_quality", "iresnet50_quality"]


@pytest.mark.parametrize("name", STUDENTS)
def test_students_within_budget_at_default_size(name):
    spec = get_arch(name)
    model = _meta(spec.name)
    assert count_params(model) <= 2.5e6
    assert count_flops(model, spec.input_size) <= 0.35e9


def test_efficient_fiqa_student_has_the_challenge_cost_figures():
    """VQualA 2025 FIQA challenge, 1st place: 1.1796 M params, 0.3313 GFLOPs at 288×288; the
    same student is 0.495 G at 352. Its head is timm's replaced by an identity (norm included)
    + GAP + Linear(168, 128) + Linear(128, 1)."""
    with torch.device("meta"):
        model = build_model("timm/edgenext_xx_small", 288, head_hidden=[128], head_activation="none", dropout=0.0)
    assert count_params(model) == 1_179_641
    assert round(count_flops(model, 288) / 1e9, 4) == 0.3313
    assert round(count_flops(model, 352) / 1e9, 3) == 0.495
    assert 0.255e9 <= count_flops(model, 256) <= 0.265e9  # timm's card: 0.26 GMACs at 256


def test_count_flops_counts_norms_and_pooling_as_fvcore():
    bn = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))
    assert count_flops(bn, 5) == 3 * 4 * 25 + 2 * 4 * 25  # eval BN with affine: 2 per element
    ln = nn.Sequential(nn.Flatten(), nn.LayerNorm(12), nn.LayerNorm(12, elementwise_affine=False))
    assert count_flops(ln, 2) == 5 * 12 + 4 * 12
    assert count_flops(nn.AdaptiveAvgPool2d(2), 6) == 3 * 36  # (global pooling runs as a mean: not counted)


def test_measure_latency_iteration_budget():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).train()
    result = measure_latency(model, 16, batch=2, warmup=2, min_time_s=100, max_time_s=100, max_iters=4)
    assert result["iterations"] == 4 and result["warmup"] == 2 and result["batch"] == 2
    assert result["min_ms"] <= result["median_ms"]
    assert result["images_per_s"] == pytest.approx(2 / (result["median_ms"] / 1e3))
    assert model.training
    # A pass longer than the whole budget still gives one timed full-batch pass, no more.
    big = measure_latency(model, 16, batch=8, warmup=3, max_time_s=0.0)
    assert big["iterations"] == 1 and big["warmup"] == 3 and big["batch"] == 8
    with pytest.raises(ConfigError):
        measure_latency(model, 16, batch=0)


class _Recorder(Progress):
    def __init__(self):
        self.tasks: list[tuple[str, int | None]] = []
        self.advanced = 0

    def task(self, description, total=None, unit=""):
        self.tasks.append((description, total))
        owner = self

        class _Task(ProgressTask):
            def advance(self, n=1, **info):
                owner.advanced += n

        return _Task()


def test_cost_report_cheap_mode():
    recorder = _Recorder()
    rows = cost_report(["mobilefacenet", "timm/edgenext_xx_small"], measure=False, progress=recorder)
    assert [r["arch"] for r in rows] == ["mobilefacenet", "timm/edgenext_xx_small"]
    assert recorder.tasks == [("cost report", 2)] and recorder.advanced == 2
    for row in rows:
        model = _meta(row["arch"])
        assert row["params"] == count_params(model)
        assert row["gflops"] == pytest.approx(count_flops(model, row["input_size"]) / 1e9)
        assert row["latency_ms_b1"] is None and row["throughput_b64"] is None
    assert rows[1]["task"] == "quality" and rows[1]["input_size"] == 256
    assert rows[1]["description"] == get_arch("timm/edgenext_xx_small").description
    assert cost_report(["timm/mobilenetv3_small_100"], input_size=160, measure=False)[0]["input_size"] == 160


def test_cost_report_measured_small_arch():
    row = cost_report(["timm/mobilenetv3_small_100"], input_size=64, batch_throughput=4)[0]
    assert row["latency_ms_b1"] > 0 and row["throughput_b64"] > 0
    assert row["latency_batch"] == 1 and row["throughput_batch"] == 4
    assert row["latency_iters"] >= 1 and row["throughput_iters"] >= 1


def test_cost_report_bad_input_fails_before_work():
    with pytest.raises(ConfigError, match="unknown architecture"):
        cost_report(["mobilefacenet", "nosuchnet"], measure=False)
    with pytest.raises(ConfigError, match="multiple of 32"):
        cost_report(["mobilefacenet", "timm/edgenext_xx_small"], input_size=112, measure=False)


def test_format_cost_table():
    rows = cost_report(["mobilefacenet", "timm/mobilenetv3_small_100"], measure=False)
    table = format_cost_table(rows)
    assert GFLOPS_NOTE in str(table.title)
    assert table.row_count == 2
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "mobilefacenet" in text and "timm/mobilenetv3_small_100" in text
    assert f"{rows[0]['params'] / 1e6:.3f}" in text and "–" in text


def test_paper_config_is_the_efficient_fiqa_setting():
    """configs/quality/paper.yaml: Swin-B teacher at 448, EdgeNeXt-XXS student at 352, both from
    ImageNet weights, the seed's optimiser, schedule, loss and transforms."""
    from facekd.config import load_config
    from facekd.demo import CONFIGS
    from facekd.quality.config import QualityRunConfig

    cfg = load_config(CONFIGS / "quality" / "paper.yaml", QualityRunConfig)
    assert (cfg.teacher.arch, cfg.teacher.input_size) == ("torchvision/swin_b", 448)
    assert (cfg.student.arch, cfg.student.input_size) == ("timm/edgenext_xx_small", 352)
    for choice in (cfg.teacher, cfg.student):
        assert choice.options["pretrained"] is True and choice.options["resize"] == "center_crop"
    for train in (cfg.teacher_train, cfg.student_train):
        assert (train.optimizer, train.lr, train.weight_decay, train.epochs, train.batch_size) == \
            ("adamw", 1e-4, 1e-6, 30, 32)
        assert (train.schedule, train.milestones, train.gamma) == ("steps", [10, 20], 0.1)
    assert cfg.train_transform == "resize_random_crop"
    assert (cfg.loss.mse, cfg.loss.plcc, cfg.loss.plcc_form) == (1.0, 1.0, "reference")
    with torch.device("meta"):
        student = build_model(cfg.student.arch, cfg.student.input_size, load_pretrained=False, **cfg.student.options)
        teacher = build_model(cfg.teacher.arch, cfg.teacher.input_size, load_pretrained=False, **cfg.teacher.options)
    assert count_params(student) == 1_179_641 and round(count_flops(student, 352) / 1e9, 3) == 0.495
    assert teacher.backbone.out_channels == 1024 and 86.8e6 < count_params(teacher) < 87.0e6
