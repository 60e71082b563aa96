"""Two CPU processes through Fabric (DDP over gloo): a 2-process run of the tiny job matches
the 1-process run at the same global batch, and `all_gather_with_grad` gathers and routes
gradients back to each rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

JOBS = Path(__file__).parent / "jobs"

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def run(script: str, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(JOBS / script), *args], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_match_one_process_at_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run("train_tiny.py", "--out", str(one), "--result", str(one) + ".pt", "--plain", "--batch", "8")
    run("train_tiny.py", "--out", str(two), "--result", str(two) + ".pt", "--plain", "--batch", "4",
        "--devices", "2")
    a, b = torch.load(str(one) + ".pt"), torch.load(str(two) + ".pt")
    assert a["steps"] == b["steps"] == 12
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=1e-5, rtol=0), key
    assert b["metrics"]["mse"] == pytest.approx(a["metrics"]["mse"], abs=1e-5)
    # one checkpoint, written by rank 0, holding both ranks' RNG states
    from facekd.engine import load_checkpoint
    state = load_checkpoint(two / "checkpoints" / "last.ckpt")
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])
    # metrics.csv written once (rank 0): one row per metrics.jsonl record
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    rows = (two / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 1 + len(records)
    assert [row.split(",")[0] for row in rows[1:]] == [str(r["epoch"]) for r in records]


def test_all_gather_with_grad_and_two_fits_in_two_processes(tmp_path):
    run("gather.py", str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    local = [torch.arange(6, dtype=torch.float32).view(3, 2) + 100 * r for r in range(2)]
    expected = torch.cat(local).tolist()
    weights = [torch.arange(12, dtype=torch.float32).view(6, 2) * (r + 1) for r in range(2)]
    for r, seen in enumerate(ranks):
        assert seen["rank"] == r and seen["world_size"] == 2
        assert seen["gathered"] == expected
        # rank r's rows feed the loss of every rank: the gradient is the sum of their weights
        assert seen["grad"] == (weights[0] + weights[1])[3 * r:3 * r + 3].tolist()
    # two stages trained one after the other in the same processes; the ranks agree on the weights
    assert [s["steps"] for s in ranks[0]["stages"]] == [4, 4]
    assert ranks[0]["stages"] == ranks[1]["stages"]
    assert ranks[0]["stages"][0]["weight"] != ranks[0]["stages"][1]["weight"]
