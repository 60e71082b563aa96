"""Split a batch job over machines or processes: `--shard i/n` keeps every file whose stable
hash falls in shard i of n; `facekd merge` joins the n outputs.

A file's shard depends only on its key, the path relative to the input (folder, or the folder
of an image list) that named it, hashed with BLAKE2b: the split does not change with the order
of the inputs, with files added elsewhere, or with where a node mounts the data, and each shard
gets 1/n of the files up to sampling noise. `--shard auto` takes i and n from the launcher:
torchrun (RANK, WORLD_SIZE), a Slurm job array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT)
or Slurm tasks (SLURM_PROCID, SLURM_NTASKS)."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from facekd.errors import ConfigError
from facekd.io.formats import absolute

__all__ = ["Shard", "parse_shard", "select_shard", "shard_key", "shard_of", "shard_output"]

_LAUNCHERS = (("RANK", "WORLD_SIZE"), ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
              ("SLURM_PROCID", "SLURM_NTASKS"))


@dataclass(frozen=True)
class Shard:
    """Shard `index` (0-based) of `count`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not (isinstance(self.count, int) and isinstance(self.index, int) and 0 <= self.index < self.count):
            raise ConfigError(f"shard must be i/n with 0 <= i < n, got {self.index}/{self.count}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def tag(self) -> str:
        """`00003-of-00008`: what `{shard}` in an output path becomes."""
        return f"{self.index:05d}-of-{self.count:05d}"


def parse_shard(text: str | None, environ: Mapping[str, str] | None = None) -> Shard | None:
    """`"i/n"` → Shard(i, n); `"auto"` → from the launcher's variables; None → None."""
    if text is None:
        return None
    environ = os.environ if environ is None else environ
    if text == "auto":
        return _launcher_shard(environ)
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ConfigError(f"--shard must be i/n (e.g. 0/8) or auto, got {text!r}")
    return Shard(int(match.group(1)), int(match.group(2)))


def _launcher_shard(environ: Mapping[str, str]) -> Shard:
    """The first launcher that started more than one process decides; none found is an error,
    only single-process ones give shard 0/1. A Slurm array's ids start at SLURM_ARRAY_TASK_MIN."""
    found = False
    for rank, world in _LAUNCHERS:
        if rank not in environ or world not in environ:
            continue
        found = True
        try:
            index, count = int(environ[rank]), int(environ[world])
            index -= int(environ.get("SLURM_ARRAY_TASK_MIN", 0)) if rank == "SLURM_ARRAY_TASK_ID" else 0
        except ValueError:
            raise ConfigError(f"--shard auto: {rank}={environ[rank]!r}, {world}={environ[world]!r} "
                              "are not integers") from None
        if count > 1:
            return Shard(index, count)
    if found:
        return Shard(0, 1)
    names = ", ".join(f"{rank}/{world}" for rank, world in _LAUNCHERS)
    raise ConfigError(f"--shard auto: no launcher variables found ({names}); give --shard i/n")


def shard_of(key: str, count: int) -> int:
    """The shard (0..count-1) of a file key: BLAKE2b-64 of its UTF-8 bytes, modulo count."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


def shard_key(path: Path, bases: Sequence[Path]) -> str:
    """`path` relative to the first base folder holding it (posix), else its absolute path."""
    for base in bases:
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            continue
    return path.as_posix()


def input_bases(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The folder each input names files relative to: a folder itself, else its parent."""
    bases = []
    for item in inputs:
        path = absolute(item)
        bases.append(path if path.is_dir() else path.parent)
    return bases


def select_shard(files: Sequence[Path], inputs: Sequence[str | os.PathLike], shard: Shard | None) -> list[Path]:
    """The files of `shard` (all of them when None), in their input order."""
    if shard is None or shard.count == 1:
        return list(files)
    bases = input_bases(inputs)
    return [path for path in files if shard_of(shard_key(path, bases), shard.count) == shard.index]


def shard_output(out: str | os.PathLike, shard: Shard | None) -> Path:
    """The output path of a shard: `{shard}` in `out` replaced by `Shard.tag`. Several shards
    writing one output would clobber each other, so a sharded job whose path lacks `{shard}`
    is accepted only when launched by hand (`i/n` given, the user names each output)."""
    text = os.fspath(out)
    if "{shard}" in text:
        if shard is None:
            raise ConfigError(f"output {text!r} contains {{shard}} but no --shard was given")
        text = text.replace("{shard}", shard.tag)
    return absolute(text)
