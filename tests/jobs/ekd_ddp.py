"""EKD across two CPU processes started by `facekd.engine.launch` (Fabric DDP, gloo).

A fixed global batch (8 identities x 8 images) is split into two contiguous halves; rank r
computes EKD on its half for three training steps (the loss all-gathers the global batch),
plain and with a cross-batch memory (100 entries: filled after two steps, then first in, first
out), and writes `<out>/rank<r>.json`: per run and step the loss, metrics, thresholds, memory
and the gradient w.r.t. its own half. tests/test_distill_losses.py imports `global_batch` and
`STEPS`/`RUNS` from this file to compute the one-process reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

IDENTITIES, IMAGES, STUDENT_DIM, TEACHER_DIM = 8, 8, 16, 24
STEPS = 3
# top_k fewer than the 1792 batch negatives: the hard-negative selection is exercised
RUNS = {"plain": {"top_k": 500}, "memory": {"top_k": 500, "memory": 100}}


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student (64, 16), teacher (64, 24), labels (64,)) of `step`: clustered by identity."""
    g = torch.Generator().manual_seed(1000 + step)
    labels = torch.arange(IDENTITIES).repeat_interleave(IMAGES)
    s_centres = torch.randn(IDENTITIES, STUDENT_DIM, generator=g)
    t_centres = torch.randn(IDENTITIES, TEACHER_DIM, generator=g)
    student = s_centres[labels] + 0.8 * torch.randn(len(labels), STUDENT_DIM, generator=g)
    teacher = t_centres[labels] + 0.5 * torch.randn(len(labels), TEACHER_DIM, generator=g)
    return student, teacher, labels


def main() -> None:
    from facekd.engine import TrainConfig, launch, rank, world_size
    from facekd.losses.distill import EKDLoss

    out = Path(sys.argv[1])
    launch(TrainConfig(accelerator="cpu", devices=2))
    r, world = rank(), world_size()
    runs = {}
    for name, options in RUNS.items():
        loss_fn = EKDLoss(**options).train()
        steps = runs[name] = []
        for step in range(STEPS):
            student, teacher, labels = global_batch(step)
            half = len(labels) // world
            mine = slice(r * half, (r + 1) * half)
            local = student[mine].clone().requires_grad_(True)
            loss, metrics = loss_fn(local, teacher[mine], labels[mine])
            loss.backward()
            steps.append({"loss": loss.item(), "metrics": {k: v.item() for k, v in metrics.items()},
                          "state": {k: v.tolist() for k, v in loss_fn.state_dict().items()},
                          "grad": local.grad.tolist()})
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{r}.json").write_text(json.dumps({"rank": r, "world_size": world, "runs": runs}))


if __name__ == "__main__":
    main()
