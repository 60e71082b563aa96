from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from facekd.engine.distributed import _EpochDataset
from facekd.errors import ConfigError, DataError
from facekd.io.formats import LabeledImage, read_mos_csv
from facekd.io.images import read_image, resize_to
from facekd.models import QUALITY_NORMALIZATION
from facekd.io.decode import load_images
from facekd.quality.data import QualityDataset, QualitySample, concat_samples, from_csv, from_list
from facekd.synth import generate_quality

SIZE = 64
MEAN = np.asarray(QUALITY_NORMALIZATION["mean"], dtype=np.float32)
STD = np.asarray(QUALITY_NORMALIZATION["std"], dtype=np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quality") / "data"
    generate_quality(root, labeled=24, unlabeled=16, test=8, size=SIZE, workers=0)
    return root


def bad_files(folder: Path, good: Path) -> dict[str, Path]:
    """A truncated PNG, a text file named .png and a missing file."""
    folder.mkdir(parents=True, exist_ok=True)
    truncated = folder / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    text = folder / "notes.png"
    text.write_text("not an image\n")
    return {"truncated": truncated, "text": text, "missing": folder / "gone.png"}


def to_uint8(item_image: torch.Tensor) -> np.ndarray:
    """Undo the normalisation of a dataset item: (3, H, W) float -> (H, W, 3) uint8."""
    hwc = item_image.numpy().transpose(1, 2, 0) * STD + MEAN
    return np.clip(np.rint(hwc), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- load_images


def test_load_images_keeps_order_skips_and_reports_bad_files(data, tmp_path):
    good = [row.path for row in read_mos_csv(data / "labeled.csv")][:4]
    bad = bad_files(tmp_path / "bad", good[0])
    paths = [good[0], bad["truncated"], good[1], bad["text"], good[2], bad["missing"], good[3]]
    images, kept, errors = load_images(paths, 32, workers=2)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert kept.tolist() == [0, 2, 4, 6]
    for row, index in enumerate(kept):
        np.testing.assert_array_equal(images[row], resize_to(read_image(paths[index]), (32, 32)))
    reasons = dict(errors)
    assert [p for p, _ in errors] == [bad["truncated"], bad["text"], bad["missing"]]
    assert "truncated PNG" in reasons[bad["truncated"]]
    assert "not a supported image" in reasons[bad["text"]]
    assert "not found" in reasons[bad["missing"]]
    serial = load_images(paths, 32, workers=0)
    np.testing.assert_array_equal(serial[0], images)
    assert serial[1].tolist() == kept.tolist() and serial[2] == errors


def test_load_images_refuses_bad_settings(data):
    with pytest.raises(ConfigError, match="size"):
        load_images([data / "labeled.csv"], 0)
    with pytest.raises(ConfigError, match="workers"):
        load_images([data / "labeled.csv"], 8, workers=-1)


# ----------------------------------------------------------------------------- dataset


def test_dataset_items_are_normalised_images_with_labels(data):
    samples = from_csv(data / "labeled.csv")
    dataset = QualityDataset(samples, SIZE, QUALITY_NORMALIZATION, train=False, workers=0)
    assert len(dataset) == 24 and dataset.errors == []
    assert dataset.memory_bytes == 24 * SIZE * SIZE * 3
    np.testing.assert_array_equal(dataset.mos, [s.mos for s in samples])
    for index in (0, 17):
        item = dataset[index]
        assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
        expected = (read_image(samples[index].path).astype(np.float32) - MEAN) / STD
        np.testing.assert_allclose(item["image"].numpy(), expected.transpose(2, 0, 1), atol=1e-5)
        assert item["mos"].dtype == torch.float32 and item["mos"].ndim == 0
        assert item["mos"].item() == pytest.approx(samples[index].mos, rel=1e-6)
        assert item["weight"].item() == 1.0 and item["index"].dtype == torch.int64
        assert item["index"].item() == index
    assert torch.equal(dataset[3]["image"], dataset[3]["image"])  # evaluation: no augmentation


def test_dataset_resizes_to_the_input_size(data):
    dataset = QualityDataset(from_csv(data / "test.csv"), 40, QUALITY_NORMALIZATION, workers=0)
    assert dataset.images.shape == (8, 40, 40, 3)
    assert dataset[0]["image"].shape == (3, 40, 40)


def test_dataset_skips_and_lists_bad_files_and_refuses_an_all_bad_set(data, tmp_path):
    samples = from_csv(data / "test.csv")
    bad = bad_files(tmp_path, samples[0].path)
    mixed = [samples[0], QualitySample(bad["truncated"], 2.0), samples[1], QualitySample(bad["missing"], 3.0)]
    dataset = QualityDataset(mixed, SIZE, QUALITY_NORMALIZATION, train=True, workers=0)
    assert dataset.paths == [samples[0].path, samples[1].path]
    assert [p for p, _ in dataset.errors] == [bad["truncated"], bad["missing"]]
    assert dataset.mos.tolist() == [samples[0].mos, samples[1].mos]
    only_bad = [QualitySample(bad["text"], 1.0), QualitySample(bad["missing"], 1.0)]
    with pytest.raises(DataError, match=r"none of the 2 images could be read .*notes\.png"):
        QualityDataset(only_bad, SIZE, QUALITY_NORMALIZATION, source="set.csv", workers=0)
    with pytest.raises(DataError, match="no samples"):
        QualityDataset([], SIZE, QUALITY_NORMALIZATION)


def test_training_set_refuses_unlabeled_samples_but_prediction_set_takes_them(data):
    unlabeled = from_list(data / "unlabeled_1.txt")
    assert len(unlabeled) == 8 and all(math.isnan(s.mos) for s in unlabeled)
    with pytest.raises(DataError, match=r"000000\.png: mos nan is not a finite number"):
        QualityDataset(unlabeled, SIZE, QUALITY_NORMALIZATION, train=True, workers=0)
    dataset = QualityDataset(unlabeled, SIZE, QUALITY_NORMALIZATION, train=False, workers=0)
    assert math.isnan(dataset[0]["mos"].item())


def test_dataset_refuses_bad_normalization_and_shift(data):
    samples = from_csv(data / "test.csv")[:1]
    with pytest.raises(ConfigError, match="normalization"):
        QualityDataset(samples, SIZE, {"mean": [0, 0, 0], "std": [1, 0, 1]})
    with pytest.raises(ConfigError, match="normalization"):
        QualityDataset(samples, SIZE, {"mean": [0, 0]})
    with pytest.raises(ConfigError, match="max_shift"):
        QualityDataset(samples, SIZE, QUALITY_NORMALIZATION, max_shift=SIZE)


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_is_deterministic_per_seed_epoch_and_index(data):
    dataset = QualityDataset(from_csv(data / "labeled.csv"), SIZE, QUALITY_NORMALIZATION, train=True, workers=0)
    with pytest.raises(RuntimeError, match="sample_rng"):
        dataset[0]  # augmentation draws only from the trainer's per-sample generator

    def epoch_images(seed: int, epoch: int) -> list[torch.Tensor]:
        wrapped = _EpochDataset(dataset, seed, epoch)
        return [wrapped[i]["image"] for i in range(len(dataset))]

    first = epoch_images(7, 1)
    again = epoch_images(7, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # read in another order: still the same per index
    wrapped = _EpochDataset(dataset, 7, 1)
    assert torch.equal(wrapped[5]["image"], first[5]) and torch.equal(wrapped[2]["image"], first[2])
    other_epoch = epoch_images(7, 2)
    other_seed = epoch_images(8, 1)
    assert sum(not torch.equal(a, b) for a, b in zip(first, other_epoch)) >= len(dataset) // 2
    assert sum(not torch.equal(a, b) for a, b in zip(first, other_seed)) >= len(dataset) // 2


def test_augmentation_only_flips_and_shifts_without_resampling(data):
    dataset = QualityDataset(from_csv(data / "labeled.csv"), SIZE, QUALITY_NORMALIZATION, train=True,
                             max_shift=4, workers=0)
    wrapped = _EpochDataset(dataset, 3, 0)
    s, n = 4, SIZE
    flips, shifts = 0, set()
    for index in range(len(dataset)):
        original = dataset.image(index).astype(np.int16)
        augmented = to_uint8(wrapped[index]["image"]).astype(np.int16)
        matches = []
        for flipped in (False, True):
            source = original[:, ::-1] if flipped else original
            padded = np.pad(source, ((s, s), (s, s), (0, 0)), mode="reflect")  # mirror without edge repeat
            for dy in range(-s, s + 1):
                for dx in range(-s, s + 1):
                    if np.array_equal(augmented, padded[s + dy:s + dy + n, s + dx:s + dx + n]):
                        matches.append((flipped, dy, dx))
        assert len(matches) >= 1, f"sample {index} is not a flip/shift of its image"
        flips += matches[0][0]
        shifts.add(matches[0][1:])
    assert 0 < flips < len(dataset)  # both branches of p = 0.5 occur
    assert len(shifts) > 3  # and various shifts


def test_no_shift_means_flip_only(data):
    dataset = QualityDataset(from_csv(data / "test.csv"), SIZE, QUALITY_NORMALIZATION, train=True,
                             max_shift=0, workers=0)
    wrapped = _EpochDataset(dataset, 0, 0)
    for index in range(len(dataset)):
        augmented = to_uint8(wrapped[index]["image"])
        image = dataset.image(index)
        assert np.array_equal(augmented, image) or np.array_equal(augmented, image[:, ::-1])


# ----------------------------------------------------------------------------- sample lists


def test_from_csv_reads_weights_and_concat_keeps_first_occurrence(data, tmp_path):
    labeled = from_csv(data / "labeled.csv")
    csv_path = tmp_path / "pseudo.csv"
    csv_path.write_text(f"path,mos,weight\n{labeled[0].path},1.5,0.25\n{data / 'x.png'},2.5,1\n")
    pseudo = from_csv(csv_path)
    assert pseudo[0] == LabeledImage(labeled[0].path, 1.5, 0.25)
    combined = concat_samples(labeled, pseudo)
    assert len(combined) == len(labeled) + 1
    assert combined[0] == labeled[0]  # the ground-truth label wins
    assert combined[-1] == pseudo[1]
    with pytest.raises(DataError, match="more than one sample set"):
        concat_samples(labeled, pseudo, duplicates="error")
    with pytest.raises(ConfigError):
        concat_samples(labeled, duplicates="last")
