"""Exact resume after a real SIGKILL: a run killed mid-training and restarted ends with
bit-identical weights, loss state, optimizer state, metrics and log to an uninterrupted run,
with num_workers=0 and with num_workers=2 (tests/jobs/train_tiny.py: dropout, BatchNorm,
random augmentation, gradient accumulation, warm-up + cosine, EMA, a frozen teacher and a
stateful loss)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from facekd.engine import load_checkpoint

JOB = Path(__file__).parent / "jobs" / "train_tiny.py"


def run_job(out: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the job; its output goes to a file, not a pipe: DataLoader workers orphaned by a
    SIGKILL would hold a pipe open for seconds after the job itself died."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = Path(str(out) + ".log")
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, str(JOB), "--out", str(out), "--result", str(out) + ".pt", *args],
                              env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=180)
    done.stderr = log.read_text()
    return done


def finish(out: Path, *args: str) -> None:
    done = run_job(out, *args)
    assert done.returncode == 0, done.stderr[-3000:]


def kill_at(out: Path, batches: int, *args: str) -> None:
    killed = run_job(out, "--kill-after", str(batches), *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert not (Path(str(out) + ".pt")).exists()


def assert_same_tensors(a, b, where: str = "") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def history(out: Path) -> list[dict]:
    lines = json.loads(Path(str(out) + ".pt.history.json").read_text())
    return [{k: v for k, v in line.items() if k != "img/s"} for line in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    finish(out)
    return out


def compare(run: Path, reference: Path) -> None:
    a, b = torch.load(str(reference) + ".pt"), torch.load(str(run) + ".pt")
    assert b["resumed_from_step"] is not None and b["steps"] == a["steps"] == 12
    assert_same_tensors(a["model"], b["model"], "final model")
    assert_same_tensors(a["loss"], b["loss"], "loss state")
    assert a["metrics"] == b["metrics"]
    ckpt_a = load_checkpoint(reference / "checkpoints" / "last.ckpt")
    ckpt_b = load_checkpoint(run / "checkpoints" / "last.ckpt")
    for key in ("model", "ema", "optimizer", "loss", "step", "epoch", "position"):
        assert_same_tensors(ckpt_a[key], ckpt_b[key], key)
    assert history(run) == history(reference)
    steps = [line["step"] for line in history(run) if line["event"] == "train"]
    assert steps == list(range(1, 13))


def test_sigkill_then_resume_is_bit_identical(tmp_path, reference):
    out = tmp_path / "run"
    kill_at(out, 15)  # first micro-batch of step 8; resumes inside epoch 2 from step 6 and redoes step 7
    finish(out)
    compare(out, reference)


def test_sigkill_then_resume_with_workers_is_bit_identical(tmp_path, reference):
    out = tmp_path / "run"
    kill_at(out, 22, "--workers", "2")  # second micro-batch of step 11; resumes inside epoch 3 from step 10
    finish(out, "--workers", "2")
    compare(out, reference)
