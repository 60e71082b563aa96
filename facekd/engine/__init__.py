"""facekd.engine: the one training loop (on lightning-fabric), checkpoints, LR schedules,
EMA and data-parallel helpers. Importing it starts nothing; Fabric is imported by `fit`."""

from __future__ import annotations

from facekd.engine.checkpoint import config_fingerprint, load_checkpoint, save_checkpoint
from facekd.engine.distributed import (BatchSampler, DeterministicBatchSampler, all_gather_with_grad, barrier,
                                       derive_seed, is_main_process, rank, sample_rng, seed_everything,
                                       world_size)
from facekd.engine.ema import ModelEma
from facekd.engine.schedule import LRSchedule
from facekd.engine.trainer import (BatchSamplerFactory, TrainConfig, Trainer, TrainResult, freeze, is_frozen,
                                   launch)

__all__ = [
    "BatchSampler", "BatchSamplerFactory", "DeterministicBatchSampler", "LRSchedule", "ModelEma", "TrainConfig",
    "TrainResult", "Trainer", "all_gather_with_grad", "barrier", "config_fingerprint", "derive_seed", "freeze",
    "is_frozen", "is_main_process", "launch", "load_checkpoint", "rank", "sample_rng", "save_checkpoint", "seed_everything",
    "world_size",
]
