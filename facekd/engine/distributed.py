"""Process helpers for data-parallel training: rank/world queries, an all-gather that keeps
gradients, a deterministic sharded batch sampler, and per-sample random generators.

Everything here works without a process group too (one process: rank 0 of 1)."""

from __future__ import annotations

import os
import random
from typing import Iterator, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset


# ----------------------------------------------------------------------------- ranks

def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process. Before the process group exists it reads RANK (torchrun)
    or LOCAL_RANK (Fabric's launcher, one node); 0 in a plain single process."""
    if _initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def world_size() -> int:
    """Number of processes taking part in training (1 without a process group)."""
    return dist.get_world_size() if _initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every process; a no-op in a single process."""
    if _initialized():
        dist.barrier()


def gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order, on every rank (picklable objects)."""
    if not _initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0 (same shape on every rank), keeping autograd.

    Convention: every rank computes its loss on the gathered batch. The backward pass sums
    the incoming gradients over ranks before taking this rank's rows, so after DDP averages
    parameter gradients the result is the gradient of the mean of the per-rank losses (the
    exact full-batch gradient when every rank computes the same loss, as EKD does).
    In a single process this returns `tensor` unchanged."""
    if not _initialized() or dist.get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


# ----------------------------------------------------------------------------- seeds

def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative integers (e.g. seed, epoch, index)."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_everything(seed: int) -> None:
    """Seed python `random`, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- samplers

@runtime_checkable
class BatchSampler(Protocol):
    """What the trainer needs from a batch sampler (e.g. a balanced P×K identity sampler).

    - `set_epoch(epoch)` is called before each epoch;
    - iteration yields lists of dataset indices, one list per micro-batch, for THIS rank only;
    - `len()` is the number of batches per epoch and must be equal on every rank;
    - after `set_epoch(e)`, iteration must be a pure function of the sampler's arguments and
      `e`: the trainer resumes inside an epoch by dropping the batches already consumed
      without loading them."""

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[list[int]]: ...


class DeterministicBatchSampler:
    """Shuffled, sharded, drop-last batches: a permutation of `range(num_samples)` drawn from
    (seed, epoch), cut to a multiple of `batch_size * world_size`, and dealt `rank::world_size`.

    The union of the ranks' k-th batches is the k-th batch of a one-process run with batch
    `batch_size * world_size`, so changing the number of processes at a fixed global batch
    keeps the data order."""

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, {world_size}), got {rank}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = len(self)
        if self.shuffle:
            order = np.random.default_rng(derive_seed(self.seed, self.epoch)).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        mine = order[: batches * self.batch_size * self.world_size][self.rank::self.world_size]
        for b in range(batches):
            yield mine[b * self.batch_size:(b + 1) * self.batch_size].tolist()


# ----------------------------------------------------------------------------- per-sample randomness

_sample_context: tuple[int, int] | None = None


def sample_rng(index: int) -> np.random.Generator:
    """A generator for the random augmentation of sample `index`, seeded from the run's seed,
    the current epoch and `index` only. Call it inside `Dataset.__getitem__` when the dataset
    is read by the trainer: augmentation is then the same whatever `num_workers`, the number
    of processes, or where a killed run was resumed."""
    if _sample_context is None:
        raise RuntimeError("sample_rng() works only inside a dataset's __getitem__ called by the facekd trainer")
    seed, epoch = _sample_context
    return np.random.default_rng([seed, epoch, int(index)])


class _EpochDataset(Dataset):
    """Wraps a dataset so that `sample_rng` inside its `__getitem__` knows (seed, epoch)."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        global _sample_context
        _sample_context = (self.seed, self.epoch)
        try:
            return self.dataset[index]
        finally:
            _sample_context = None
