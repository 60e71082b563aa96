"""Learning-rate schedules as a pure function of the optimizer step, so a resumed run sets
exactly the learning rate the uninterrupted run had."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """Multiplier of the base learning rate at optimizer step `step` (0-based).

    factor(step) = warm-up(step) × main(step):
    - warm-up rises linearly from `warmup_start_factor` to 1 over `warmup_steps` steps;
    - 'cosine' and 'poly' decay from 1 to `min_lr_factor`, starting after the warm-up and
      reaching the floor at `total_steps`; 'steps' multiplies by `gamma` at each milestone
      (in steps); 'constant' is 1."""

    schedule: str
    total_steps: int
    warmup_steps: int = 0
    warmup_start_factor: float = 0.01
    min_lr_factor: float = 0.0
    poly_power: float = 1.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    @classmethod
    def from_config(cls, config, steps_per_epoch: int, total_steps: int) -> "LRSchedule":
        """Build from a `TrainConfig` (epochs converted to steps with `steps_per_epoch`)."""
        return cls(
            schedule=config.schedule,
            total_steps=total_steps,
            warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)),
            warmup_start_factor=config.warmup_start_factor,
            min_lr_factor=config.min_lr_factor,
            poly_power=config.poly_power,
            milestones=tuple(int(round(m * steps_per_epoch)) for m in config.milestones),
            gamma=config.gamma,
        )

    def factor(self, step: int) -> float:
        return self._warmup(step) * self._main(step)

    def _warmup(self, step: int) -> float:
        if step >= self.warmup_steps:
            return 1.0
        return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * step / self.warmup_steps

    def _main(self, step: int) -> float:
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "steps":
            return self.gamma ** sum(step >= m for m in self.milestones)
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        if self.schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * t))
        elif self.schedule == "poly":
            shape = (1.0 - t) ** self.poly_power
        else:
            raise ValueError(f"schedule: unknown schedule {self.schedule!r}")
        return self.min_lr_factor + (1.0 - self.min_lr_factor) * shape
