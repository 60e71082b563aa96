"""Two CPU processes started by `facekd.engine.launch` (Fabric DDP, gloo): checks
`all_gather_with_grad`, then runs two short `fit`s in the same processes (a multi-stage
pipeline). Each rank writes `<out>/rank<r>.json`. Run by tests/test_distributed.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from facekd.engine import TrainConfig, Trainer, all_gather_with_grad, launch, rank, world_size


class MSE(nn.Module):
    def forward(self, model, batch):
        x, y = batch
        return F.mse_loss(model(x).squeeze(1), y), {}


def main() -> None:
    out = Path(sys.argv[1])
    config = TrainConfig(epochs=1, batch_size=4, optimizer="sgd", lr=0.1, accelerator="cpu", devices=2)
    launch(config)
    r = rank()
    local = (torch.arange(6, dtype=torch.float32).view(3, 2) + 100 * r).requires_grad_(True)
    gathered = all_gather_with_grad(local)
    weights = torch.arange(12, dtype=torch.float32).view(6, 2) * (r + 1)  # differs per rank
    (gathered * weights).sum().backward()

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, generator=g), torch.randn(32, generator=g))
    stages = []
    for stage in range(2):
        torch.manual_seed(stage + 10 * r)  # different initialisation per rank: DDP must broadcast rank 0's
        model = nn.Linear(3, 1)
        result = Trainer(config, out / f"stage{stage}").fit(model, MSE(), data)
        stages.append({"steps": result.steps, "weight": model.weight.tolist()})
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{r}.json").write_text(json.dumps({
        "rank": r, "world_size": world_size(), "gathered": gathered.tolist(), "grad": local.grad.tolist(),
        "stages": stages}))


if __name__ == "__main__":
    main()
