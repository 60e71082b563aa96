"""Training checkpoints: one atomically written file holding everything a run needs to go on
exactly where it stopped (weights, optimizer, scaler, loss state, counters, RNG states)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from facekd.errors import DataError
from facekd.io.atomic import atomic_write

CHECKPOINT_FORMAT = "facekd-train-checkpoint"
CHECKPOINT_VERSION = 1

# Settings that do not change what is computed; a run may resume with other values of these.
NON_FINGERPRINT_FIELDS = frozenset({"num_workers", "log_every_steps", "checkpoint_every_steps", "eval_every_epochs"})


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 over the settings that change the result (see NON_FINGERPRINT_FIELDS)."""
    kept = {k: v for k, v in config.items() if k not in NON_FINGERPRINT_FIELDS}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Readable `key: old -> new` lines for the fingerprinted settings that differ."""
    lines = []
    for key in sorted(set(old) | set(new)):
        if key in NON_FINGERPRINT_FIELDS and not prefix:
            continue
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            lines += config_differences(a, b, prefix=f"{prefix}{key}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write `state` with torch.save through a temp file + fsync + rename: a crash leaves
    either the previous checkpoint or the new one, never a torn file."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    with atomic_write(path, "wb") as handle:
        torch.save(payload, handle)


REQUIRED_KEYS = ("config", "fingerprint", "step", "epoch", "position", "model", "optimizer", "ranks")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (tensors on CPU, `weights_only=True`).

    Raises DataError naming the file when it is missing, truncated, corrupt or not ours."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle/torch errors all mean the same to the user
        raise DataError(path, f"unreadable checkpoint (truncated or corrupt): {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(path, "not a facekd training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise DataError(path, f"checkpoint version {state.get('version')!r} is not supported "
                              f"(this facekd reads version {CHECKPOINT_VERSION})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise DataError(path, f"checkpoint lacks {', '.join(missing)}")
    return state


# ----------------------------------------------------------------------------- RNG states

def rng_state() -> dict[str, Any]:
    """This process's RNG states in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # the current device only: asking every visible GPU would open a CUDA context on each
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"name": str(np_state[0]), "keys": [int(k) for k in np_state[1]], "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np.asarray(np_state["keys"], dtype=np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (e.g. evaluation) without disturbing the training RNG streams."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)
