"""Identity-labelled training images (an identity folder tree or an insightface RecordIO) and
the balanced P×K batch sampler of margin-softmax training and EKD.

`RecognitionDataset` either decodes every image once and keeps uint8 copies in memory
(`cache=True`; "auto" does so when they fit in `cache_limit_bytes`), skipping and listing
unreadable images in `.errors`, or decodes each image when it is read (MS1MV2's 5.8 M images
do not fit in memory); an unreadable image then stops training with a DataError naming it.
Augmentation (`TRAIN_TRANSFORMS`) is insightface's by default: a horizontal flip with
probability 0.5, drawn from `facekd.engine.sample_rng` so it is the same whatever the number
of workers or processes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from facekd.engine.distributed import derive_seed
from facekd.errors import ConfigError, DataError
from facekd.inference.predictors import check_normalization, preprocess
from facekd.io.formats import absolute, file_digest, read_identity_folder
from facekd.io.images import decode_image, read_image, resize_to
from facekd.progress import Progress

PathLike = str | os.PathLike
DEFAULT_CACHE_LIMIT = 4 << 30
#: flip: mirrored with probability 0.5 (insightface); none; flip_shift: the flip, then shifted by
#: up to 1/16 of the side in x and y (edge pixels repeated), for small sets.
TRAIN_TRANSFORMS = ("flip", "none", "flip_shift")


class IdentitySource:
    """Where identity-labelled images come from: `labels[i]` for image i, `read(i)` its RGB
    uint8 pixels, `name(i)` a string naming it in errors (a path, or `file.rec#key`)."""

    def __init__(self, path: PathLike, progress: Progress | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(self.path, "training data not found (an identity folder or a .rec file)")
        rec = self.path / "train.rec" if self.path.is_dir() else self.path
        if rec.suffix == ".rec" and rec.is_file() and (self.path.is_file() or not _has_identity_folders(self.path)):
            from facekd.io.recordio import read_insightface_dataset

            self._rec = read_insightface_dataset(rec, progress=progress)
            self._paths: list[Path] | None = None
            self.labels = np.asarray(self._rec.labels, dtype=np.int64)
            self.num_classes = int(self._rec.num_classes)
            self.kind = "recordio"
            self.path = rec
        else:
            folder = read_identity_folder(self.path)
            self._rec = None
            self._paths = list(folder.paths)
            self.labels = np.asarray(folder.labels, dtype=np.int64)
            self.num_classes = folder.num_classes
            self.kind = "folder"
        if len(self.labels) == 0:
            raise DataError(self.path, "holds no training images")
        if self.num_classes < 2:
            raise DataError(self.path, f"needs at least 2 identities for a margin softmax, found {self.num_classes}")

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, index: int) -> str:
        if self._paths is not None:
            return str(self._paths[index])
        return f"{self.path}#{int(self._rec.image_keys[index])}"

    def read(self, index: int) -> np.ndarray:
        if self._paths is not None:
            return read_image(self._paths[index])
        return decode_image(self._rec.image_bytes(index), source=self.name(index))

    def digest(self) -> str:
        """What identifies this set's images, in order (16 hex): for a folder each image's path
        relative to it, label and byte size; for a RecordIO its index file, the `.rec` size and
        the labels. A copy elsewhere keeps it; adding, removing, relabelling or resizing a file
        changes it."""
        hasher = hashlib.sha256(f"{self.kind}\n".encode())
        if self._paths is not None:
            root = absolute(self.path)
            for path, label in zip(self._paths, self.labels.tolist()):
                hasher.update(f"{path.relative_to(root)}\0{label}\0{path.stat().st_size}\n".encode())
        else:
            hasher.update(f"{file_digest(self._rec.reader.idx_path)}\0{os.path.getsize(self.path)}\n".encode())
            hasher.update(self.labels.tobytes())
            hasher.update(np.asarray(self._rec.image_keys, dtype=np.int64).tobytes())
        return hasher.hexdigest()[:16]


def _has_identity_folders(path: Path) -> bool:
    return any(entry.is_dir() and not entry.name.startswith(".") for entry in os.scandir(path))


class RecognitionDataset(Dataset):
    """Item i: {"image": float32 (3, S, S) normalised, "label": int64, "index": int64, and in
    training "sample": int64 (the image's index in `source`), "flip": bool (mirrored)}."""

    def __init__(self, source: IdentitySource, input_size: int, normalization: Mapping[str, Sequence[float]],
                 train: bool = True, cache: bool | str = "auto", cache_limit_bytes: int = DEFAULT_CACHE_LIMIT,
                 progress: Progress | None = None, workers: int | None = None, transform: str = "flip"):
        from facekd.io.decode import check_workers

        if transform not in TRAIN_TRANSFORMS:
            raise ConfigError(f"train_transform: expected one of {', '.join(TRAIN_TRANSFORMS)}, got {transform!r}")
        self.source = source
        self.input_size = int(input_size)
        self.train = bool(train)
        self.transform = transform
        self.normalization = check_normalization(normalization)
        if cache not in (True, False, "auto"):
            raise ConfigError(f"cache: expected true, false or auto, got {cache!r}")
        needed = len(source) * self.input_size ** 2 * 3
        self.cached = cache is True or (cache == "auto" and needed <= cache_limit_bytes)
        self.errors: list[tuple[str, str]] = []
        self.indices = np.arange(len(source))
        self.images: np.ndarray | None = None
        if self.cached:
            self._decode_all(progress or Progress(), check_workers(workers))
        self.labels = source.labels[self.indices]

    def _load(self, index: int) -> np.ndarray:
        return resize_to(self.source.read(index), (self.input_size, self.input_size))

    def _decode_all(self, progress: Progress, workers: int) -> None:
        from facekd.io.decode import attempt, map_ordered

        def load(index: int):
            return attempt(self._load, index)

        images = np.empty((len(self.source), self.input_size, self.input_size, 3), dtype=np.uint8)
        kept: list[int] = []
        with progress.task("decoding training images", len(self.source)) as bar:
            for index, result in enumerate(map_ordered(load, range(len(self.source)), workers)):
                if isinstance(result, str):
                    self.errors.append((self.source.name(index), result))
                else:
                    images[len(kept)] = result
                    kept.append(index)
                bar.advance()
        if not kept:
            name, reason = self.errors[0]
            raise DataError(self.source.path, f"none of the {len(self.source)} images could be read "
                                              f"(first: {name}: {reason})")
        self.indices = np.asarray(kept, dtype=np.int64)
        self.images = images if len(kept) == len(images) else images[: len(kept)].copy()

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        image = self.images[index] if self.images is not None else self._load(int(self.indices[index]))
        item = {"label": torch.tensor(int(self.labels[index]), dtype=torch.int64),
                "index": torch.tensor(index, dtype=torch.int64)}
        if self.train:
            from facekd.engine import sample_rng

            rng = sample_rng(index)
            flip = self.transform != "none" and rng.random() < 0.5
            if flip:
                image = image[:, ::-1]
            if self.transform == "flip_shift":
                image = _shifted(image, *rng.integers(-(self.input_size // 16), self.input_size // 16 + 1, size=2))
            item.update(sample=torch.tensor(int(self.indices[index]), dtype=torch.int64),
                        flip=torch.tensor(flip))
        return {"image": preprocess(image, self.normalization)[0], **item}


def _shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`image` moved down by dy and right by dx pixels, the edge pixels repeated into the gap."""
    height, width = image.shape[:2]
    rows = np.clip(np.arange(height) - dy, 0, height - 1)
    cols = np.clip(np.arange(width) - dx, 0, width - 1)
    return image[rows[:, None], cols[None, :]]


class IdentityBatchSampler:
    """Balanced batches: P identities × K images each, plus a share of uniformly random images.

    Each global batch (batch_size × world_size images) holds `round(random_fraction · global)`
    random images; the rest is filled with K images of each of the next identities of a
    shuffled identity order (identities with fewer than K images give all they have, those
    with one image are never drawn as P×K identities since they make no positive pair). The
    global batch's balanced and random parts are each dealt `rank::world_size`, the random images
    last in each process's batch, so a run on N processes sees the same global batches as one
    process with N× the batch. An epoch has len(labels) // global batches, or with
    `epoch="random_images"` len(labels) // random images a global batch (TFace's EKD sampler:
    its epoch covers the set once with the random part alone); everything is drawn from
    (seed, epoch) alone, as the trainer's resume requires."""

    def __init__(self, labels: Sequence[int], batch_size: int, images_per_identity: int, *,
                 random_fraction: float = 0.0, seed: int = 0, rank: int = 0, world_size: int = 1,
                 epoch: str = "images"):
        labels = np.asarray(labels, dtype=np.int64)
        self.global_batch = int(batch_size) * int(world_size)
        if not 2 <= images_per_identity <= self.global_batch:
            raise ConfigError(f"sampler.images_per_identity: must be in [2, global batch {self.global_batch}], "
                              f"got {images_per_identity}")
        if not 0.0 <= random_fraction < 1.0:
            raise ConfigError(f"sampler.random_fraction: must be in [0, 1), got {random_fraction}")
        order = np.argsort(labels, kind="stable")
        ids, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        self._members = {int(i): order[s:s + c] for i, s, c in zip(ids, starts, counts) if c >= 2}
        if not self._members:
            raise DataError("training data", "no identity has 2 or more images: P×K batches need positive pairs")
        self.num_samples = len(labels)
        self.batch_size = int(batch_size)
        self.images_per_identity = int(images_per_identity)
        self.random_count = int(round(random_fraction * self.global_batch))
        if epoch not in ("images", "random_images") or (epoch == "random_images" and not self.random_count):
            raise ConfigError(f"sampler.epoch: must be images, or random_images with random_fraction > 0, got {epoch!r}")
        self.epoch_of = epoch
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples // (self.random_count if self.epoch_of == "random_images" else self.global_batch)

    def __iter__(self):
        rng = np.random.default_rng(derive_seed(self.seed, self.epoch, 7))
        identities = np.fromiter(self._members, dtype=np.int64)
        queue: list[int] = []
        for _ in range(len(self)):
            batch: list[int] = []
            while len(batch) < self.global_batch - self.random_count:
                if not queue:
                    queue = rng.permutation(identities).tolist()
                members = self._members[queue.pop()]
                take = min(self.images_per_identity, len(members), self.global_batch - self.random_count - len(batch))
                batch.extend(rng.choice(members, size=take, replace=False).tolist())
            random = rng.integers(0, self.num_samples, size=self.random_count).tolist()
            yield batch[self.rank::self.world_size] + random[self.rank::self.world_size]
