"""Exponential moving average of a model's weights (parameters and buffers)."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn


def _tensors(module: nn.Module):
    return itertools.chain(module.named_parameters(), module.named_buffers())


class ModelEma:
    """A frozen copy of `model` whose floating-point state follows
    `ema = d·ema + (1−d)·model` after every optimizer step, with the warm-up
    `d = min(decay, (1 + n) / (10 + n))` (n = updates so far) so early averages are not
    dominated by the random initialisation. Integer state (e.g. BatchNorm's
    `num_batches_tracked`) is copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    def decay_at(self, updates: int) -> float:
        return min(self.decay, (1.0 + updates) / (10.0 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay_at(self.updates)
        current = dict(_tensors(model))
        for name, avg in _tensors(self.module):  # each tensor once, even when weights are tied
            value = current[name].detach()
            if avg.is_floating_point():
                avg.mul_(d).add_(value.to(avg.dtype), alpha=1.0 - d)
            else:
                avg.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"updates": self.updates, "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["weights"])
