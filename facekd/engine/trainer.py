"""The one training loop of facekd. A stage (teacher training, self-training, any
distillation) is a model + a loss + data; the loop, devices, precision, checkpoints and exact
resume are the same for all of them.

Conventions for what a stage passes in:

- `loss_fn` is an `nn.Module` called as `loss_fn(model, batch) -> (loss, metrics)`, `loss` a
  scalar tensor and `metrics` a dict of floats or 0-d tensors (logged, averaged over ranks).
  Its parameters are trained only if it returns them from a `trainable_parameters()` method
  (e.g. the class centres of a margin softmax); a teacher inside it must be frozen with
  `freeze(teacher)`. A loss parameter that requires grad but is neither is refused. Its
  buffers (e.g. EKD's moving-average thresholds) are checkpointed; the weights of frozen
  submodules are not (they do not change).
- `freeze(module)` turns gradients off and tags the module; the trainer keeps every tagged
  module (in the model or the loss) in eval mode whenever it switches the stage to training.
- `train_dataset` is a map-style dataset returning tensors or tuples/dicts of tensors. Random
  augmentation should draw from `facekd.engine.sample_rng(index)`: it is then reproducible
  whatever `num_workers` and across a resume.
- A dataset may report items it could not load (e.g. a streamed image that fails to decode
  in a worker; the item itself must keep the loss unaffected, e.g. weight 0): with a
  `note_batch(batch)` method it is handed every batch this rank loads, in the training
  process, before the forward; with `failures()` (a picklable list) and `add_failures(list)`
  the lists of every rank are kept in the checkpoints, restored on resume, and merged into
  every rank's dataset at the end of `fit`.
- `evaluate(model) -> dict[str, float]` runs on rank 0 only, in eval mode, under
  `torch.no_grad()`, in full precision, with the model on the training device, and without
  disturbing the training RNG streams; its result is broadcast so every rank returns the same.
  Under DDP the other ranks wait in that broadcast, so an evaluation must finish within the
  process group's timeout (torch's default: 10 min with NCCL, 30 min with gloo): keep
  periodic evaluation short and run full test sets after training.

What a run does and writes:

- Each optimizer step: `accumulate_grad_batches` forwards (autocast per `precision`) and
  backwards of loss/accumulation (gradient sync only on the last), optional gradient-norm
  clipping, the step with the learning rate of `LRSchedule` at that step, the EMA update.
- With `ema_decay`, evaluation uses the EMA weights and they are copied into the model at the
  end; the checkpoint keeps both.
- `out_dir/metrics.jsonl`: one JSON line per log step ("event": "train": step, epoch, lr,
  loss, the loss's metrics, img/s) and per evaluation ("event": "eval"); the same records in
  `out_dir/metrics.csv` and, when tensorboard is importable, `out_dir/tensorboard/` (tags
  `train/loss`, `eval/srcc`, ...; see `facekd.engine.loggers`).
- `out_dir/checkpoints/last.ckpt`, atomically replaced every `checkpoint_every_steps` and at
  every epoch end (rank 0 writes, every rank reads: multi-node runs need a shared out_dir).
  Resuming restores everything, RNG states of every rank included, and truncates
  metrics.jsonl to what it was at the checkpoint (metrics.csv is rebuilt from it): on CPU a
  resumed run ends bit-identical to an uninterrupted one (on GPU, up to nondeterministic kernels).
- Several processes (DDP): every trainable parameter must take part in the loss (no unused
  parameters), the loss's metric keys must be the same on every rank, and all ranks must see
  the same number of batches.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Iterator, Literal, Mapping, Optional, Union

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from facekd.config import ConfigModel
from facekd.engine.checkpoint import (config_differences, config_fingerprint, load_checkpoint, preserved_rng,
                                      rng_state, save_checkpoint, set_rng_state)
from facekd.engine.distributed import (BatchSampler, DeterministicBatchSampler, _EpochDataset,
                                       derive_seed, gather_objects, seed_everything)
from facekd.engine.ema import ModelEma
from facekd.engine.loggers import MetricLoggers, tensorboard_available
from facekd.engine.schedule import LRSchedule
from facekd.errors import ConfigError, DataError, FacekdError
from facekd.progress import Progress

FROZEN_ATTR = "_facekd_frozen"

BatchSamplerFactory = Callable[[int, int], BatchSampler]
"""Called as `factory(rank, world_size)` once the processes exist; returns this rank's sampler."""


def freeze(module: nn.Module) -> nn.Module:
    """Mark `module` frozen: no gradients, eval mode, kept in eval mode by the trainer."""
    module.requires_grad_(False)
    module.eval()
    setattr(module, FROZEN_ATTR, True)
    return module


def is_frozen(module: nn.Module) -> bool:
    return bool(getattr(module, FROZEN_ATTR, False))


def _norm_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of the normalisation layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm) in `module`."""
    kinds = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    return [p for m in module.modules() if isinstance(m, kinds) for p in m.parameters(recurse=False)]


# ----------------------------------------------------------------------------- config

class TrainConfig(ConfigModel):
    """Settings of one training stage. Epoch-valued settings (warmup_epochs, milestones) are
    converted to optimizer steps; `batch_size` is per process and per micro-batch, so the
    global batch is batch_size × devices × num_nodes × accumulate_grad_batches."""

    epochs: int = Field(10, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)  # if set, overrides epochs: train this many optimizer steps
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    weight_decay_norms: bool = True  # false: no weight decay on normalisation layers (BatchNorm, LayerNorm, ...)
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD only
    nesterov: bool = False  # SGD only
    schedule: Literal["cosine", "poly", "steps", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    warmup_start_factor: float = Field(0.01, gt=0, le=1)
    min_lr_factor: float = Field(0.0, ge=0, le=1)
    poly_power: float = Field(1.0, gt=0)
    milestones: list[Annotated[float, Field(ge=0)]] = []  # epochs, for schedule='steps'
    gamma: float = Field(0.1, gt=0, le=1)
    precision: Literal["32", "bf16-mixed", "16-mixed"] = "32"
    accumulate_grad_batches: int = Field(1, ge=1)
    clip_grad_norm: Optional[float] = Field(None, gt=0)
    ema_decay: Optional[float] = Field(None, ge=0, lt=1)
    eval_every_epochs: int = Field(1, ge=0)  # 0: evaluate only at the end
    checkpoint_every_steps: int = Field(0, ge=0)  # 0: checkpoint only at epoch ends
    log_every_steps: int = Field(50, ge=1)
    seed: int = Field(0, ge=0)
    num_workers: int = Field(0, ge=0)
    devices: int = Field(1, ge=1)
    accelerator: Literal["auto", "cpu", "cuda"] = "auto"
    num_nodes: int = Field(1, ge=1)
    strategy: Literal["auto", "ddp"] = "auto"
    channels_last: bool = False

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_sgd_momentum(cls, nesterov: bool, info: ValidationInfo) -> bool:
        if nesterov and (info.data.get("optimizer") != "sgd" or info.data.get("momentum") == 0):
            raise ValueError("needs optimizer 'sgd' with momentum > 0")
        return nesterov

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, milestones: list[float]) -> list[float]:
        if milestones != sorted(milestones):
            raise ValueError(f"must be epochs in increasing order, got {milestones}")
        return milestones

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


@dataclass
class TrainResult:
    """What `Trainer.fit` returns. After fit the caller's model holds the final weights
    (the EMA weights when `ema_decay` is set) and is in eval mode."""

    metrics: dict[str, float]  # final evaluation; empty without `evaluate`
    history: list[dict[str, Any]]  # the records of metrics.jsonl (rank 0; empty on other ranks)
    checkpoint: Path  # out_dir/checkpoints/last.ckpt
    steps: int  # optimizer steps in the whole run
    epochs: int
    precision: str  # the Fabric precision actually used
    resumed_from_step: Optional[int] = None


# ----------------------------------------------------------------------------- internals

class _Inputs:
    """Carries the batch through Fabric's module wrapper untouched: the wrapper would cast
    every float input (labels included) to bf16/fp16 under mixed precision. Autocast still
    applies inside the forward."""

    __slots__ = ("batch",)

    def __init__(self, batch: Any):
        self.batch = batch


class _Stage(nn.Module):
    """Model and loss as one module, so DDP synchronises every trained parameter."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, inputs: _Inputs):
        return self.loss_fn(self.model, inputs.batch)

    def train(self, mode: bool = True) -> "_Stage":
        super().train(mode)
        for module in self.modules():
            if is_frozen(module):
                module.train(False)
        return self


class _BatchWindow:
    """Batches [start, stop) of a sampler's epoch; the skipped ones are never loaded."""

    def __init__(self, sampler: BatchSampler, start: int, stop: int):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.sampler), self.start, self.stop)


class _LogWindow:
    """Running sums of loss and metrics between two log lines (part of the checkpoint, so
    the first line after a resume averages the same steps as without the interruption).
    Tensor values stay on their device until the log step: no host sync per batch."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.batches = 0
        self.samples = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, metrics: Mapping[str, Any], samples: int) -> None:
        for key, value in {"loss": loss, **metrics}.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.batches += 1
        self.samples += samples

    def means(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(v, dtype=torch.float32, device=device) / max(1, self.batches)
                for k, v in sorted(self.sums.items())}

    def state(self) -> dict[str, Any]:
        sums = {k: [float(v), torch.is_tensor(v)] for k, v in self.sums.items()}
        return {"sums": sums, "batches": self.batches, "samples": self.samples}

    def load(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.reset()
        self.sums = {k: torch.tensor(v, dtype=torch.float32, device=device) if is_tensor else v
                     for k, (v, is_tensor) in state["sums"].items()}
        self.batches, self.samples = int(state["batches"]), int(state["samples"])


def _batch_size(batch: Any) -> int:
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.ndim else 1
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        size = _batch_size(item)
        if size:
            return size
    return 0


def _channels_last(batch: Any) -> Any:
    if torch.is_tensor(batch):
        return batch.contiguous(memory_format=torch.channels_last) if batch.ndim == 4 and batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {k: _channels_last(v) for k, v in batch.items()}
    if type(batch) in (list, tuple):
        return type(batch)(_channels_last(v) for v in batch)
    return batch


def _frozen_prefixes(module: nn.Module) -> tuple[str, ...]:
    return tuple(f"{name}." for name, sub in module.named_modules() if name and is_frozen(sub))


def _loss_state(loss_fn: nn.Module) -> dict[str, torch.Tensor]:
    skip = _frozen_prefixes(loss_fn)
    return {k: v for k, v in loss_fn.state_dict().items() if not (skip and k.startswith(skip))}


def _start_fabric(cfg: TrainConfig):
    """Create the Fabric for `cfg` and start its processes; returns (fabric, precision used)."""
    from lightning_fabric import Fabric
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    cuda = torch.cuda.is_available()
    if cfg.accelerator == "cuda" and not cuda:
        raise ConfigError("train.accelerator: 'cuda' requested but no CUDA device is available")
    on_cuda = cfg.accelerator == "cuda" or (cfg.accelerator == "auto" and cuda)
    precision = {"32": "32-true"}.get(cfg.precision, cfg.precision)
    if precision == "16-mixed" and not on_cuda:
        precision = "bf16-mixed"  # fp16 autocast needs CUDA's gradient scaler; bf16 needs none
    if precision == "bf16-mixed" and on_cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision: this GPU has no bfloat16 support; use '16-mixed'")
    fabric_log = logging.getLogger("lightning_fabric")
    level = fabric_log.level
    fabric_log.setLevel(logging.WARNING)  # the library does not print; Fabric's info lines would
    try:
        fabric = Fabric(accelerator="cuda" if on_cuda else "cpu", devices=cfg.devices, num_nodes=cfg.num_nodes,
                        strategy=cfg.strategy, precision=precision)
        fabric.launch()
    except (ValueError, TypeError, RuntimeError, MisconfigurationException) as exc:
        hint = (" Several processes need a script or CLI run (or torchrun), not an interactive session."
                if cfg.devices * cfg.num_nodes > 1 else "")
        raise ConfigError(f"train: cannot start Fabric (accelerator={cfg.accelerator}, devices={cfg.devices}, "
                          f"num_nodes={cfg.num_nodes}, strategy={cfg.strategy}): {exc}.{hint}") from None
    finally:
        fabric_log.setLevel(level)
    if fabric.world_size > 1 and not _exit_hook:
        _exit_hook.append(atexit.register(_close_process_group))
    return fabric, precision


_exit_hook: list[Callable[[], None]] = []


def _close_process_group() -> None:
    """Tear the process group down at exit: left to the interpreter, gloo's threads may abort."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launch(config: TrainConfig) -> None:
    """Start the training processes now (and the process group), so code that runs before the
    first `fit` (data preparation, pseudo-labelling) already knows its `rank()`.

    With `devices > 1` and no external launcher, the current script is started again once
    per extra device (Fabric's subprocess launcher): every process runs the same program.
    `fit` calls this itself; calling it again is harmless."""
    _start_fabric(config)


# ----------------------------------------------------------------------------- trainer

class Trainer:
    """Runs `fit` for one stage, writing `out_dir/metrics.jsonl` and
    `out_dir/checkpoints/last.ckpt`.

    `extra_config` (JSON-able, e.g. the stage's model and loss settings) is stored in the
    checkpoint and fingerprinted with the TrainConfig: resuming with different settings is
    refused with the list of differences. `tensorboard`: write TensorBoard event files (None:
    when tensorboard is importable; True without it fails)."""

    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike, progress: Progress | None = None,
                 extra_config: Mapping[str, Any] | None = None, tensorboard: bool | None = None):
        self.config = config
        self.out_dir = Path(out_dir)
        self.progress = progress or Progress()
        self.extra_config = dict(extra_config or {})
        if tensorboard and not tensorboard_available():
            raise ConfigError("tensorboard: not installed (pip install 'facekd[tensorboard]')")
        self.tensorboard = tensorboard

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoints" / "last.ckpt"

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def settings(self) -> dict[str, Any]:
        """What the checkpoint fingerprint covers (plus the non-fingerprinted train fields)."""
        return {**self.config.to_dict(), "extra": self.extra_config}

    def fit(self, model: nn.Module, loss_fn: nn.Module, train_dataset: Dataset, *,
            evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
            param_groups: Iterable[dict[str, Any]] | None = None,
            batch_sampler: BatchSamplerFactory | None = None,
            resume: Union[bool, Literal["auto"]] = "auto") -> TrainResult:
        """Train `model` in place with `loss_fn` on `train_dataset`.

        resume: 'auto' continues from `last.ckpt` when it exists; True requires it; False
        starts over (removing an old checkpoint and metrics log).
        param_groups: optimizer groups (dicts with 'params' and optional 'lr', 'weight_decay');
        default: the model's trainable parameters plus `loss_fn.trainable_parameters()`.
        batch_sampler: a factory `(rank, world_size) -> BatchSampler` replacing the default
        `DeterministicBatchSampler(len(dataset), batch_size, seed=seed)`."""
        if resume not in (True, False, "auto"):
            raise ConfigError(f"resume: must be true, false or 'auto', got {resume!r}")
        run = _Run(self, model, loss_fn, train_dataset, evaluate, param_groups, batch_sampler)
        return run.execute(resume)


class _Run:
    """State of one `fit` call: the loop and its small helpers."""

    def __init__(self, trainer: Trainer, model: nn.Module, loss_fn: nn.Module, dataset: Dataset,
                 evaluate, param_groups, batch_sampler: BatchSamplerFactory | None):
        self.t = trainer
        self.cfg = cfg = trainer.config
        self.model, self.loss_fn, self.dataset, self.evaluate = model, loss_fn, dataset, evaluate
        groups = self._param_groups(param_groups)
        self.fabric, self.precision = _start_fabric(cfg)
        self.rank, self.world = self.fabric.global_rank, self.fabric.world_size
        self.is_main = self.rank == 0
        self.loggers: MetricLoggers | None = None
        self.progress = trainer.progress if self.is_main else Progress()
        if self.precision != {"32": "32-true"}.get(cfg.precision, cfg.precision):
            self.progress.log(f"precision '{cfg.precision}' needs CUDA (fp16 autocast with a gradient scaler); "
                              f"using '{self.precision}' on CPU instead")

        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.stage = _Stage(model, loss_fn)
        self.raw_optimizer = self._make_optimizer(groups)
        self.wrapped, self.optimizer = self.fabric.setup(self.stage, self.raw_optimizer)
        self.ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay is not None else None

        if batch_sampler is not None:
            self.sampler = batch_sampler(self.rank, self.world)
        else:
            self.sampler = DeterministicBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed, rank=self.rank,
                                                     world_size=self.world)
        self.steps_per_epoch = len(self.sampler) // cfg.accumulate_grad_batches
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"train.batch_size: {len(dataset)} samples give {len(self.sampler)} batches per process, fewer than "
                f"accumulate_grad_batches={cfg.accumulate_grad_batches} (batch_size={cfg.batch_size}, "
                f"processes={self.world}); use a smaller batch or more data")
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.schedule = LRSchedule.from_config(cfg, self.steps_per_epoch, self.total_steps)
        self.fingerprint = config_fingerprint(trainer.settings())

        self.step = 0  # optimizer steps done
        self.epoch = 0  # current epoch (0-based)
        self.position = 0  # optimizer steps done inside the current epoch
        self.last_eval: dict[str, Any] | None = None
        self.window = _LogWindow()
        self.shown: dict[str, float] = {}
        note = getattr(dataset, "note_batch", None)
        self._note_batch = note if callable(note) else None
        tracks = callable(getattr(dataset, "failures", None)) and callable(getattr(dataset, "add_failures", None))
        self._tracks_failures = tracks

    # --------------------------------------------------------------------- setup

    def _param_groups(self, param_groups) -> list[dict[str, Any]]:
        if param_groups is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            extra = getattr(self.loss_fn, "trainable_parameters", None)
            if callable(extra):
                params += [p for p in extra() if p.requires_grad]
            groups = [{"params": params}]
            if not self.cfg.weight_decay_norms:
                norms = {id(p) for m in [self.model, self.loss_fn] for p in _norm_parameters(m)}
                groups = [{"params": [p for p in params if id(p) not in norms]},
                          {"params": [p for p in params if id(p) in norms], "weight_decay": 0.0}]
        else:
            groups = [dict(g, params=list(g["params"])) for g in param_groups]
        for group in groups:
            group.setdefault("lr", self.cfg.lr)
            group["base_lr"] = group["lr"]
        trained = {id(p) for g in groups for p in g["params"]}
        if not trained:
            raise ValueError("nothing to train: the model has no parameter that requires grad")
        stray = [n for n, p in self.loss_fn.named_parameters() if p.requires_grad and id(p) not in trained]
        if stray:
            raise ValueError(f"loss parameters {stray[:3]} require grad but are not trained: freeze their module "
                             f"with facekd.engine.freeze(...) or return them from loss_fn.trainable_parameters()")
        return groups

    def _make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        cfg = self.cfg
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                   weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    # --------------------------------------------------------------------- run

    def execute(self, resume) -> TrainResult:
        resumed_from = self._start_or_resume(resume)
        if self.is_main:
            self.loggers = MetricLoggers(self.t.out_dir, tensorboard=self.t.tensorboard, resumed_step=resumed_from,
                                         history=self._read_history() if resumed_from is not None else ())
        try:
            return self._train(resumed_from)
        finally:
            if self.loggers is not None:
                self.loggers.close()

    def _train(self, resumed_from: int | None) -> TrainResult:
        self.stage.train()
        while self.step < self.total_steps:
            self._train_epoch()
        if self.evaluate is not None and (self.last_eval is None or self.last_eval["step"] != self.step):
            self._run_evaluation()
        if self.ema is not None:
            self.model.load_state_dict(self.ema.module.state_dict())
        if self._tracks_failures:  # every rank's dataset learns what the others could not load
            for failures in gather_objects(list(self.dataset.failures())):
                self.dataset.add_failures(failures)
        self.stage.eval()
        history = self._read_history() if self.is_main else []
        return TrainResult(metrics=dict(self.last_eval["metrics"]) if self.last_eval else {}, history=history,
                           checkpoint=self.t.checkpoint_path, steps=self.step, epochs=self.num_epochs,
                           precision=self.precision, resumed_from_step=resumed_from)

    def _train_epoch(self) -> None:
        cfg, accum = self.cfg, self.cfg.accumulate_grad_batches
        steps = min(self.steps_per_epoch, self.total_steps - self.epoch * self.steps_per_epoch)
        loader = self._loader(start=self.position * accum, stop=steps * accum)
        with self.progress.task(f"epoch {self.epoch + 1}/{self.num_epochs}", total=steps, unit="step") as bar:
            if self.position:
                bar.advance(self.position)
            for i, batch in enumerate(loader):
                if self._note_batch is not None:
                    self._note_batch(batch)
                last_micro = (i + 1) % accum == 0
                with self.fabric.no_backward_sync(self.wrapped, enabled=not last_micro):
                    loss, metrics = self._forward(batch)
                    self.fabric.backward(loss / accum)
                self.window.add(loss, metrics, _batch_size(batch) * self.world)
                if not last_micro:
                    continue
                self._optimizer_step()
                self.step += 1
                self.position += 1
                if self.step % cfg.log_every_steps == 0:
                    self._log_train()
                bar.advance(1, **self.shown)
                every = cfg.checkpoint_every_steps
                if every and self.step % every == 0 and self.position < steps:  # epoch ends save below
                    self._save()
        self.epoch += 1
        self.position = 0
        if self.evaluate is not None and cfg.eval_every_epochs and self.epoch % cfg.eval_every_epochs == 0:
            self._run_evaluation()
        self._save()

    def _loader(self, start: int, stop: int) -> DataLoader:
        cfg = self.cfg
        self.sampler.set_epoch(self.epoch)
        return DataLoader(
            _EpochDataset(self.dataset, cfg.seed, self.epoch),
            batch_sampler=_BatchWindow(self.sampler, start, stop),
            num_workers=cfg.num_workers,
            generator=torch.Generator().manual_seed(derive_seed(cfg.seed, self.epoch, self.rank)),
            pin_memory=self.fabric.device.type == "cuda",
        )

    def _forward(self, batch: Any):
        batch = self.fabric.to_device(batch)
        if self.cfg.channels_last:
            batch = _channels_last(batch)
        out = self.wrapped(_Inputs(batch))
        if not (isinstance(out, tuple) and len(out) == 2 and torch.is_tensor(out[0]) and out[0].ndim == 0
                and isinstance(out[1], Mapping)):
            raise TypeError("loss_fn(model, batch) must return (scalar loss tensor, dict of metrics)")
        return out

    def _optimizer_step(self) -> None:
        factor = self.schedule.factor(self.step)
        for group in self.raw_optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        if self.cfg.clip_grad_norm is not None:
            self.fabric.clip_gradients(self.wrapped, self.optimizer, max_norm=self.cfg.clip_grad_norm,
                                       error_if_nonfinite=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)

    # --------------------------------------------------------------------- logging and evaluation

    def _log_train(self) -> None:
        w = self.window
        means = w.means(self.fabric.device)
        reduced = self.fabric.all_reduce(torch.stack(list(means.values())), reduce_op="mean")
        values = dict(zip(means, reduced.tolist()))
        if not math.isfinite(values["loss"]):
            raise FacekdError(f"training diverged: loss is {values['loss']} at step {self.step} "
                              f"(lower lr, add warm-up or set clip_grad_norm)")
        elapsed = max(time.perf_counter() - w.started, 1e-9)
        lr = self.raw_optimizer.param_groups[0]["lr"]
        record = {"event": "train", "step": self.step, "epoch": self.epoch + 1, "lr": lr, **values,
                  "img/s": w.samples / elapsed}
        self._append(record)
        self.shown = {"loss": values["loss"], "lr": lr, "img/s": round(w.samples / elapsed, 1)}
        w.reset()

    def _run_evaluation(self) -> None:
        outcome: tuple[str, Any] = ("ok", None)
        error: BaseException | None = None
        if self.is_main:
            target = self.ema.module if self.ema is not None else self.model
            target.eval()
            try:
                with preserved_rng(), torch.no_grad():
                    result = self.evaluate(target)
                outcome = ("ok", {str(k): float(v) for k, v in dict(result).items()})
            except BaseException as exc:  # tell the other ranks before raising, so none waits forever
                error, outcome = exc, ("error", f"{type(exc).__name__}: {exc}")
            finally:
                self.stage.train()
        outcome = self.fabric.broadcast(outcome, src=0)
        if error is not None:
            raise error
        if outcome[0] == "error":
            raise RuntimeError(f"evaluation failed on rank 0: {outcome[1]}")
        self.last_eval = {"step": self.step, "epoch": self.epoch, "metrics": outcome[1]}
        self._append({"event": "eval", "step": self.step, "epoch": self.epoch, **outcome[1]})

    def _append(self, record: dict[str, Any]) -> None:
        if self.is_main:
            self.t.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.t.metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            self.loggers.log(record)

    def _read_history(self) -> list[dict[str, Any]]:
        path = self.t.metrics_path
        if not path.is_file():
            return []
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    # --------------------------------------------------------------------- checkpoints

    def _save(self) -> None:
        # Every rank holds the same weights, so every rank reaches the same verdict (no collective).
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise FacekdError(f"training diverged: non-finite weights at step {self.step}; the last good "
                              f"checkpoint {self.t.checkpoint_path} is kept (lower the learning rate or "
                              f"enable clip_grad_norm)")
        mine = {"rng": rng_state(), "window": self.window.state()}
        if self._tracks_failures:
            mine["failures"] = list(self.dataset.failures())
        per_rank = gather_objects(mine)
        if not self.is_main:
            return
        metrics = self.t.metrics_path
        save_checkpoint(self.t.checkpoint_path, {
            "config": self.t.settings(),
            "fingerprint": self.fingerprint,
            "step": self.step, "epoch": self.epoch, "position": self.position,
            "steps_per_epoch": self.steps_per_epoch, "num_samples": len(self.dataset), "world_size": self.world,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.raw_optimizer.state_dict(),
            "precision": self.fabric.strategy.precision.state_dict(),
            "loss": _loss_state(self.loss_fn),
            "ranks": per_rank,
            "last_eval": self.last_eval,
            "metrics_bytes": metrics.stat().st_size if metrics.is_file() else 0,
        })

    def _start_or_resume(self, resume) -> int | None:
        path = self.t.checkpoint_path
        exists = self.fabric.broadcast(path.is_file() if self.is_main else None, src=0)
        if resume is True and not exists:
            raise DataError(path, "resume requested but there is no checkpoint")
        if resume is False or not exists:
            if self.is_main:
                path.unlink(missing_ok=True)
                self.t.metrics_path.unlink(missing_ok=True)
            self.fabric.barrier()
            seed_everything(derive_seed(self.cfg.seed, self.rank))
            return None
        self._restore(load_checkpoint(path), path)
        return self.step

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        if state["fingerprint"] != self.fingerprint:
            diff = config_differences(state["config"], self.t.settings())
            raise ConfigError(f"{path}: written by a run with other settings ({'; '.join(diff) or 'unknown'}); "
                              f"resume with the same settings, or use resume=False or another output folder")
        if state.get("num_samples") != len(self.dataset) or state.get("steps_per_epoch") != self.steps_per_epoch:
            raise ConfigError(f"{path}: the training data changed since this checkpoint ({state.get('num_samples')} "
                              f"samples, {state.get('steps_per_epoch')} steps/epoch then; {len(self.dataset)} and "
                              f"{self.steps_per_epoch} now)")
        if state.get("world_size") != self.world:
            raise ConfigError(f"{path}: written by {state.get('world_size')} process(es), resumed with {self.world}; "
                              f"resume with the same devices x num_nodes")
        try:
            self.model.load_state_dict(state["model"])
            self._load_loss_state(state.get("loss", {}))
            self.raw_optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise DataError(path, f"checkpoint does not fit this model/loss/optimizer: {exc}") from None
        if state.get("precision"):  # the gradient scaler of '16-mixed'
            self.fabric.strategy.precision.load_state_dict(state["precision"])
        mine = state["ranks"][self.rank]
        if self._tracks_failures:
            for saved in state["ranks"]:
                self.dataset.add_failures(saved.get("failures", []))
        set_rng_state(mine["rng"])
        self.window.load(mine["window"], self.fabric.device)
        self.step, self.epoch, self.position = int(state["step"]), int(state["epoch"]), int(state["position"])
        self.last_eval = state.get("last_eval")
        if self.is_main:
            self._truncate_metrics(int(state.get("metrics_bytes", 0)))

    def _load_loss_state(self, saved: Mapping[str, torch.Tensor]) -> None:
        result = self.loss_fn.load_state_dict(dict(saved), strict=False)
        skip = _frozen_prefixes(self.loss_fn)
        missing = [k for k in result.missing_keys if not (skip and k.startswith(skip))]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"loss state mismatch (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")

    def _truncate_metrics(self, size: int) -> None:
        """Drop log lines written after the checkpoint, so a resumed run writes no duplicates."""
        path = self.t.metrics_path
        if path.is_file() and path.stat().st_size > size:
            with open(path, "r+b") as handle:
                handle.truncate(size)
