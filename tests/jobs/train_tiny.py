"""A tiny training job run as a real process by tests/test_resume.py and tests/test_distributed.py.

It has dropout, BatchNorm, a random augmentation drawn from `sample_rng`, a frozen teacher and
a loss with a moving-average buffer (like EKD's thresholds); `--plain` removes everything
random or batch-dependent so a 1-process and a 2-process run compute the same thing.
`--kill-after K` makes the process SIGKILL itself at its K-th micro-batch."""

from __future__ import annotations

import argparse
import json
import os
import signal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from facekd.engine import TrainConfig, Trainer, freeze, sample_rng, seed_everything


class TinyData(Dataset):
    def __init__(self, n: int, augment: bool):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = self.x.mean(dim=(1, 2, 3)) * 3 + 0.1 * torch.randn(n, generator=g)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i]
        if self.augment:
            rng = sample_rng(i)
            if rng.random() < 0.5:
                x = x.flip(-1)
            x = x + torch.from_numpy(rng.normal(0.0, 0.1, size=tuple(x.shape)).astype("float32"))
        return x, self.y[i]


def tiny_model(plain: bool) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Identity() if plain else nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.0 if plain else 0.3), nn.Linear(16, 1))


class DistillLoss(nn.Module):
    def __init__(self, kill_after: int, stateful: bool):
        super().__init__()
        self.teacher = freeze(nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(192, 1)))
        self.register_buffer("avg", torch.zeros(()))
        self.kill_after, self.stateful, self.calls = kill_after, stateful, 0

    def forward(self, model, batch):
        self.calls += 1
        if self.calls == self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.teacher.training:
            raise AssertionError("frozen teacher in training mode")
        x, y = batch
        out = model(x).squeeze(1)
        task = F.mse_loss(out, y)
        distill = F.mse_loss(out, self.teacher(x).squeeze(1))
        weight = 1.0
        if self.stateful:
            with torch.no_grad():
                self.avg.mul_(0.9).add_(0.1 * task.detach())
            weight = 1.0 / (1.0 + self.avg)
        return task + 0.1 * weight * distill, {"task": task.detach()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--kill-after", type=int, default=0)
    parser.add_argument("--plain", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    seed_everything(7)
    model = tiny_model(args.plain)
    loss = DistillLoss(args.kill_after, stateful=not args.plain)
    data = TinyData(64, augment=not args.plain)
    eval_x, eval_y = data.x[:16], data.y[:16]

    def evaluate(m: nn.Module) -> dict[str, float]:
        device = next(m.parameters()).device
        return {"mse": float(F.mse_loss(m(eval_x.to(device)).squeeze(1), eval_y.to(device)))}

    config = TrainConfig(epochs=args.epochs, batch_size=args.batch, accumulate_grad_batches=args.accum,
                         optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4,
                         schedule="cosine", warmup_epochs=1.0, clip_grad_norm=1.0, ema_decay=0.9,
                         checkpoint_every_steps=2, log_every_steps=1, seed=11, num_workers=args.workers,
                         devices=args.devices, accelerator="cpu")
    result = Trainer(config, args.out).fit(model, loss, data, evaluate=evaluate)
    if result.history:  # rank 0
        torch.save({"model": model.state_dict(), "loss": loss.state_dict(), "metrics": result.metrics,
                    "resumed_from_step": result.resumed_from_step, "steps": result.steps}, args.result)
        with open(args.result + ".history.json", "w", encoding="utf-8") as handle:
            json.dump(result.history, handle)


if __name__ == "__main__":
    main()
