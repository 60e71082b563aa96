"""Readable logs: plain progress lines off a terminal, -q, and the trainer's metrics.csv and
TensorBoard files beside metrics.jsonl."""

from __future__ import annotations

import argparse
import csv
import io
import json
import re

import pytest

from facekd.cli import _progress, main
from facekd.engine import Trainer
from facekd.engine.loggers import tensorboard_available
from facekd.errors import ConfigError
from facekd.progress import PlainProgress, Progress, RichProgress
from facekd.synth import generate_quality
from test_engine import MSE, Regression, config, linear
from test_quality_pipeline import TINY

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
BAR_DRAWING = ("━", "╸", "╺", "…")


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


# ----------------------------------------------------------------------------- plain reporter

def test_plain_progress_writes_a_line_per_interval_and_one_at_the_end():
    clock, out = Clock(), io.StringIO()
    progress = PlainProgress(out, interval=10, clock=clock)
    with progress.task("epoch 3/8", total=250, unit="img") as bar:
        for _ in range(12):  # 12 advances of 10 items, 2 s apart: a line at 10 s and 20 s
            clock.now += 2
            bar.advance(10, loss=0.7071, lr=0.0012)
        progress.log("halfway")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert re.fullmatch(rf"{STAMP}  epoch 3/8  50/250 \(20%\)  5\.0 img/s  eta 0:00:40  loss=0\.7071 lr=0\.0012",
                        lines[0])
    assert re.fullmatch(rf"{STAMP}  epoch 3/8  100/250 \(40%\)  5\.0 img/s  eta 0:00:30  loss=0\.7071 lr=0\.0012",
                        lines[1])
    assert re.fullmatch(rf"{STAMP}  halfway", lines[2])
    assert re.fullmatch(rf"{STAMP}  epoch 3/8  120/250 \(48%\)  5\.0 img/s  done in 0:00:24  loss=0\.7071 lr=0\.0012",
                        lines[3])


def test_plain_progress_interval_zero_writes_every_step_and_handles_unknown_totals():
    clock, out = Clock(), io.StringIO()
    progress = PlainProgress(out, interval=0, clock=clock)
    for _ in progress.track(iter(range(3)), "reading"):
        clock.now += 1
    lines = out.getvalue().splitlines()
    assert [line.split("  ", 1)[1] for line in lines] == [
        "reading  1  1.0/s", "reading  2  1.0/s", "reading  3  1.0/s", "reading  3  1.0/s  done in 0:00:03"]


def test_cli_picks_bars_only_on_a_terminal(monkeypatch):
    args = argparse.Namespace(quiet=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert isinstance(_progress(args), PlainProgress)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert isinstance(_progress(args), RichProgress)
    quiet = _progress(argparse.Namespace(quiet=True))
    assert type(quiet) is Progress


# ----------------------------------------------------------------------------- the CLI into a file

@pytest.fixture(scope="module")
def quality_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    generate_quality(root / "data", labeled=40, unlabeled=8, test=16, size=64, workers=0)
    (root / "tiny.yaml").write_text(TINY)
    return root


def _train(root, out, *extra):
    """One tiny teacher; fp16 on CPU makes the trainer log a line (it falls back to fp32)."""
    return main(["quality", "train", str(root / "tiny.yaml"), "--out", str(out), "--data", str(root / "data"),
                 "--set", "teacher_train.log_every_steps=1", "--set", "teacher_train.precision=16-mixed", *extra])


def test_quality_train_into_a_file_writes_plain_lines_with_the_numbers(quality_data, tmp_path, capsys):
    assert _train(quality_data, tmp_path / "run") == 0
    captured = capsys.readouterr()
    assert not any(mark in captured.err for mark in BAR_DRAWING), captured.err
    lines = captured.err.splitlines()
    assert lines and all(re.match(rf"{STAMP}  \S", line) for line in lines), captured.err
    epoch = [line for line in lines if "  epoch 1/1  " in line]
    assert len(epoch) == 1, captured.err
    assert re.search(r"  2/2 \(100%\)  [\d.,]+ step/s  done in \d:\d\d:\d\d  loss=[\d.]+ lr=[\d.e-]+ img/s=[\d.]+$",
                     epoch[0]), epoch[0]
    assert any(re.fullmatch(rf"{STAMP}  precision '16-mixed' needs CUDA .* using '[^']+' on CPU instead", line)
               for line in lines), captured.err
    assert "SRCC" in captured.out and "teacher" in captured.out  # the result table, on stdout
    assert "…" not in captured.out


def test_quiet_prints_the_result_table_and_nothing_else(quality_data, tmp_path, capsys):
    assert _train(quality_data, tmp_path / "run", "-q") == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "SRCC" in captured.out and "teacher" in captured.out
    assert not re.search(STAMP, captured.out)


# ----------------------------------------------------------------------------- metrics.csv and TensorBoard

def _csv_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _evaluate(m):
    return {"bias": m.bias.item()}


def test_metrics_csv_holds_the_records_of_metrics_jsonl(tmp_path):
    Trainer(config(epochs=2), tmp_path, tensorboard=False).fit(linear(), MSE(), Regression(), evaluate=_evaluate)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = _csv_rows(tmp_path / "metrics.csv")
    assert len(rows) == len(records) == 8 + 2
    for row, record in zip(rows, records):
        assert int(row["step"]) == record["step"] and int(row["epoch"]) == record["epoch"]
        if record["event"] == "train":
            assert float(row["train/loss"]) == pytest.approx(record["loss"])
            assert float(row["train/img/s"]) == pytest.approx(record["img/s"]) and row["eval/bias"] == ""
        else:
            assert float(row["eval/bias"]) == pytest.approx(record["bias"]) and row["train/loss"] == ""
    assert not (tmp_path / "tensorboard").exists()


class Crash(Exception):
    pass


class CrashingMSE(MSE):
    def forward(self, model, batch):
        if len(self.seen) + 1 == 7:
            raise Crash()
        return super().forward(model, batch)


def test_resumed_run_has_the_csv_rows_of_an_uninterrupted_one(tmp_path):
    cfg = config(epochs=2, checkpoint_every_steps=5, log_every_steps=1)
    Trainer(cfg, tmp_path / "ref", tensorboard=False).fit(linear(), MSE(), Regression(), evaluate=_evaluate)
    with pytest.raises(Crash):  # checkpoint at step 5, step 6 logged after it, dies in step 7
        Trainer(cfg, tmp_path / "run", tensorboard=False).fit(linear(), CrashingMSE(), Regression(),
                                                               evaluate=_evaluate)
    assert [row["step"] for row in _csv_rows(tmp_path / "run" / "metrics.csv")][-1] == "6"
    Trainer(cfg, tmp_path / "run", tensorboard=False).fit(linear(), MSE(), Regression(), evaluate=_evaluate)
    ref, run = _csv_rows(tmp_path / "ref" / "metrics.csv"), _csv_rows(tmp_path / "run" / "metrics.csv")
    steps = [(row["step"], bool(row["eval/bias"])) for row in run]
    assert steps == [(row["step"], bool(row["eval/bias"])) for row in ref] and len(set(steps)) == len(steps) == 10
    assert [row["train/loss"] for row in run] == [row["train/loss"] for row in ref]


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard is not installed (facekd[tensorboard])")
def test_tensorboard_event_file_is_written(tmp_path):
    Trainer(config(epochs=1), tmp_path).fit(linear(), MSE(), Regression(), evaluate=_evaluate)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    assert {"train/loss", "eval/bias"} <= set(board.Tags()["scalars"])
    assert [e.step for e in board.Scalars("train/loss")] == [1, 2, 3, 4]


@pytest.mark.skipif(tensorboard_available(), reason="tensorboard is installed")
def test_tensorboard_asked_for_without_the_package_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^tensorboard: not installed \(pip install 'facekd\[tensorboard\]'\)$"):
        Trainer(config(epochs=1), tmp_path, tensorboard=True)


class FakeWriter:
    """Stands in for tensorboardX's SummaryWriter: records what the logger asks of it."""
    made: list["FakeWriter"] = []

    def __init__(self, log_dir, **kwargs):
        self.log_dir, self.kwargs, self.scalars, self.closed = log_dir, kwargs, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_tags_and_purge_on_resume_with_a_fake_writer(tmp_path, monkeypatch):
    import sys
    import types

    import lightning_fabric.loggers.tensorboard as board

    monkeypatch.setattr(board, "_TENSORBOARD_AVAILABLE", False)
    monkeypatch.setattr(board, "_TENSORBOARDX_AVAILABLE", True)
    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=FakeWriter))
    monkeypatch.setattr("facekd.engine.loggers.tensorboard_available", lambda: True)
    FakeWriter.made = []
    (tmp_path / "run" / "tensorboard").mkdir(parents=True)
    (tmp_path / "run" / "tensorboard" / "events.out.tfevents.old").write_text("an older run")
    cfg = config(epochs=2, checkpoint_every_steps=5, log_every_steps=1)
    with pytest.raises(Crash):
        Trainer(cfg, tmp_path / "run").fit(linear(), CrashingMSE(), Regression(), evaluate=_evaluate)
    assert not (tmp_path / "run" / "tensorboard" / "events.out.tfevents.old").exists()  # a fresh start
    Trainer(cfg, tmp_path / "run").fit(linear(), MSE(), Regression(), evaluate=_evaluate)
    first, resumed = FakeWriter.made
    assert first.kwargs == {} and resumed.kwargs == {"purge_step": 6}  # hides step 6 of the killed run
    assert first.closed and resumed.closed
    assert first.log_dir.rstrip("/\\") == str(tmp_path / "run" / "tensorboard")
    assert [s for t, _, s in first.scalars if t == "train/loss"] == [1, 2, 3, 4, 5, 6]
    assert [s for t, _, s in resumed.scalars if t == "train/loss"] == [6, 7, 8]
    assert {t for t, _, _ in first.scalars} >= {"train/loss", "train/lr", "train/img/s", "epoch", "eval/bias"}
