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
    assert count_flops(model, 10) == 4 * 3 * 9 * 64
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


STUDENTS = ("edgenext_xxs", "mobilenetv3_small", "mobilenetv3_large_050")
TEACHERS = ("iresnet18_quality", "iresnet50_quality", "mobilenetv3_large")


def test_every_quality_arch_is_a_known_student_or_teacher():
    assert sorted(s.name for s in available_archs("quality")) == sorted(STUDENTS + TEACHERS)


@pytest.mark.parametrize("name", STUDENTS)
def test_students_within_budget_at_default_size(name):
    spec = get_arch(name)
    model = _meta(spec.name)
    assert count_params(model) <= 1.5e6
    assert count_flops(model, spec.input_size) <= 0.35e9


def test_edgenext_xxs_matches_published_size():
    model = _meta("edgenext_xxs", 256)
    assert 1.1e6 <= count_params(model) <= 1.3e6  # 1.33 M published with a 1000-class head
    assert 0.24e9 <= count_flops(model, 256) <= 0.28e9  # 0.261 G published at 256
    assert count_flops(model, 352) > count_flops(model, 288) > count_flops(model, 256)


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
    rows = cost_report(["mobilefacenet", "edgenext_xxs"], measure=False, progress=recorder)
    assert [r["arch"] for r in rows] == ["mobilefacenet", "edgenext_xxs"]
    assert recorder.tasks == [("cost report", 2)] and recorder.advanced == 2
    for row in rows:
        model = _meta(row["arch"])
        assert row["params"] == count_params(model)
        assert row["gflops"] == pytest.approx(count_flops(model, row["input_size"]) / 1e9)
        assert row["latency_ms_b1"] is None and row["throughput_b64"] is None
    assert rows[1]["task"] == "quality" and rows[1]["input_size"] == 288
    assert cost_report(["mobilenetv3_small"], input_size=160, measure=False)[0]["input_size"] == 160


def test_cost_report_measured_small_arch():
    row = cost_report(["mobilenetv3_small"], input_size=64, batch_throughput=4)[0]
    assert row["latency_ms_b1"] > 0 and row["throughput_b64"] > 0
    assert row["latency_batch"] == 1 and row["throughput_batch"] == 4
    assert row["latency_iters"] >= 1 and row["throughput_iters"] >= 1


def test_cost_report_bad_input_fails_before_work():
    with pytest.raises(ConfigError, match="unknown architecture"):
        cost_report(["mobilefacenet", "nosuchnet"], measure=False)
    with pytest.raises(ConfigError, match="multiple of 32"):
        cost_report(["mobilefacenet", "edgenext_xxs"], input_size=112, measure=False)


def test_format_cost_table():
    rows = cost_report(["mobilefacenet", "mobilenetv3_small"], measure=False)
    table = format_cost_table(rows)
    assert GFLOPS_NOTE in str(table.title)
    assert table.row_count == 2
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "mobilefacenet" in text and "mobilenetv3_small" in text
    assert f"{rows[0]['params'] / 1e6:.3f}" in text and "–" in text
