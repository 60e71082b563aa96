from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from facekd.engine.distributed import _EpochDataset
from facekd.errors import ConfigError, DataError
from facekd.io.formats import LabeledImage, read_mos_csv
from facekd.io.images import Resize, probe_image, read_image, resize_shorter_side, resize_to, write_image
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


# ----------------------------------------------------------------------------- streaming


def undecodable_png(path: Path, good: Path) -> Path:
    """A PNG whose structure is intact (signature, IHDR, every chunk length, IEND) but whose
    compressed pixel data is garbage: `probe_image` accepts it, `read_image` refuses it."""
    data = bytearray(good.read_bytes())
    pos = data.find(b"IDAT")
    (length,) = struct.unpack(">I", data[pos - 4:pos])
    for i in range(pos + 4 + 8, pos + 4 + length - 8):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def oblong(data, tmp_path_factory) -> list[QualitySample]:
    """Non-square images (portrait and landscape), so shorter-side resizing and crops matter."""
    folder = tmp_path_factory.mktemp("oblong")
    samples = []
    for i, sample in enumerate(from_csv(data / "labeled.csv")[:10]):
        image = read_image(sample.path)
        image = image[:, 5:55] if i % 2 else image[7:, :]  # 64x50 or 57x64
        path = folder / f"{i:02d}.png"
        write_image(path, np.ascontiguousarray(image))
        samples.append(QualitySample(path, sample.mos))
    return samples


def loader_items(dataset, seed: int, epoch: int, workers: int, batch: int = 5) -> dict[str, torch.Tensor]:
    """Every item of an epoch read as the trainer reads them: a DataLoader over _EpochDataset."""
    loader = DataLoader(_EpochDataset(dataset, seed, epoch), batch_size=batch, num_workers=workers,
                        shuffle=False)
    batches = list(loader)
    return {key: torch.cat([b[key] for b in batches]) for key in ("image", "mos", "weight", "index", "failed")}


def test_probe_image_accepts_an_intact_structure_that_read_image_refuses(data, tmp_path):
    good = from_csv(data / "test.csv")[0].path
    bad = undecodable_png(tmp_path / "garbled.png", good)
    assert probe_image(good) == ("PNG", SIZE, SIZE) and probe_image(bad) == ("PNG", SIZE, SIZE)
    with pytest.raises(DataError, match="corrupt PNG"):
        read_image(bad)
    for name, path in bad_files(tmp_path / "bad", good).items():
        with pytest.raises(DataError, match={"truncated": "truncated PNG", "text": "not a supported image",
                                             "missing": "not found"}[name]):
            probe_image(path)


def test_training_streams_and_evaluation_caches_by_default(data):
    samples = from_csv(data / "labeled.csv")
    train = QualityDataset(samples, SIZE, QUALITY_NORMALIZATION, train=True, workers=0)
    evaluation = QualityDataset(samples, SIZE, QUALITY_NORMALIZATION, workers=0)
    assert (train.cache, train.images, train.memory_bytes) == (False, None, 0)
    assert evaluation.cache and evaluation.memory_bytes == 24 * SIZE * SIZE * 3
    with pytest.raises(ConfigError, match="cache"):
        QualityDataset(samples, SIZE, QUALITY_NORMALIZATION, cache="yes")
    with pytest.raises(ConfigError, match="transform"):
        QualityDataset(samples, SIZE, QUALITY_NORMALIZATION, transform="random_erase")


@pytest.mark.parametrize("geometry", [Resize(SIZE), Resize(48), Resize(40, "center_crop")], ids=repr)
def test_streamed_evaluation_set_equals_the_cached_one(data, oblong, tmp_path, geometry):
    bad = bad_files(tmp_path, oblong[0].path)
    samples = [*oblong[:4], QualitySample(bad["truncated"], 1.0), *from_csv(data / "test.csv")[:3],
               QualitySample(bad["missing"], 2.0), *oblong[4:]]
    cached = QualityDataset(samples, geometry, QUALITY_NORMALIZATION, cache=True, workers=2)
    streamed = QualityDataset(samples, geometry, QUALITY_NORMALIZATION, cache=False, workers=2)
    assert streamed.images is None and cached.images.shape == (len(samples) - 2, geometry.size, geometry.size, 3)
    assert streamed.samples == cached.samples and len(streamed) == len(samples) - 2
    assert streamed.errors == cached.errors and [p for p, _ in streamed.errors] == [bad["truncated"], bad["missing"]]
    for index in range(len(streamed)):
        a, b = streamed[index], cached[index]
        assert a.keys() == b.keys()
        for key in ("image", "mos", "weight", "index", "failed"):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (index, key)
        expected = geometry(read_image(samples[index if index < 4 else index + 1 if index < 7 else index + 2].path))
        np.testing.assert_array_equal(streamed.image(index), expected)
    for (x, ok_x), (y, ok_y) in zip(streamed.iter_batches(3, workers=2), cached.iter_batches(3)):
        np.testing.assert_array_equal(x, y)
        assert ok_x.all() and ok_y.all()


@pytest.mark.parametrize("transform", ["flip_shift", "resize_random_crop"])
def test_streamed_training_items_are_deterministic_and_the_same_with_workers(oblong, transform):
    streamed = QualityDataset(oblong, 48, QUALITY_NORMALIZATION, train=True, transform=transform, workers=0)
    cached = QualityDataset(oblong, 48, QUALITY_NORMALIZATION, train=True, transform=transform, cache=True,
                            workers=0)
    serial = loader_items(streamed, seed=5, epoch=2, workers=0)
    parallel = loader_items(streamed, seed=5, epoch=2, workers=2)
    again = loader_items(streamed, seed=5, epoch=2, workers=2, batch=3)
    from_cache = loader_items(cached, seed=5, epoch=2, workers=0)
    for key in serial:
        assert torch.equal(serial[key], parallel[key]) and torch.equal(serial[key], again[key]), key
        assert torch.equal(serial[key], from_cache[key]), key
    assert serial["index"].tolist() == list(range(len(oblong))) and not serial["failed"].any()
    other_epoch = loader_items(streamed, seed=5, epoch=3, workers=2)["image"]
    other_seed = loader_items(streamed, seed=6, epoch=2, workers=0)["image"]
    assert sum(not torch.equal(a, b) for a, b in zip(serial["image"], other_epoch)) >= len(oblong) // 2
    assert sum(not torch.equal(a, b) for a, b in zip(serial["image"], other_seed)) >= len(oblong) // 2


def test_resize_random_crop_is_a_crop_of_the_shorter_side_resize(oblong):
    size, seed, epoch = 40, 11, 1
    streamed = QualityDataset(oblong, size, QUALITY_NORMALIZATION, train=True, transform="resize_random_crop",
                              workers=0)
    cached = QualityDataset(oblong, size, QUALITY_NORMALIZATION, train=True, transform="resize_random_crop",
                            cache=True, workers=2)
    wrapped, wrapped_cached = _EpochDataset(streamed, seed, epoch), _EpochDataset(cached, seed, epoch)
    offsets = set()
    for index, sample in enumerate(oblong):
        resized = resize_shorter_side(read_image(sample.path), size)
        assert min(resized.shape[:2]) == size and max(resized.shape[:2]) > size
        # the cache holds the shorter-side-resized image, not a square
        np.testing.assert_array_equal(cached.images[index], resized)
        rng = np.random.default_rng([seed, epoch, index])
        top = int(rng.integers(0, resized.shape[0] - size + 1))
        left = int(rng.integers(0, resized.shape[1] - size + 1))
        expected = resized[top:top + size, left:left + size]
        np.testing.assert_array_equal(to_uint8(wrapped[index]["image"]), expected)
        assert torch.equal(wrapped[index]["image"], wrapped_cached[index]["image"])
        offsets.add((top, left))
        # un-augmented (prediction) input: Resize(S) + CenterCrop(S)
        np.testing.assert_array_equal(streamed.image(index), Resize(size, "center_crop")(read_image(sample.path)))
    assert len(offsets) > 3
    assert cached.memory_bytes == sum(image.nbytes for image in cached.images)


def test_a_header_check_reject_is_listed_at_construction_and_a_decode_failure_when_read(data, tmp_path):
    samples = from_csv(data / "labeled.csv")[:8]
    bad = bad_files(tmp_path, samples[0].path)
    garbled = undecodable_png(tmp_path / "garbled.png", samples[1].path)
    mixed = [*samples[:3], QualitySample(garbled, 4.0, 0.5), QualitySample(bad["truncated"], 1.0), *samples[3:]]
    dataset = QualityDataset(mixed, SIZE, QUALITY_NORMALIZATION, train=True, workers=2)
    assert len(dataset) == 9 and dataset.paths[3] == garbled  # passed the header check: still in the set
    assert [p for p, _ in dataset.errors] == [bad["truncated"]] and "truncated PNG" in dataset.errors[0][1]
    items = loader_items(dataset, seed=0, epoch=0, workers=2, batch=4)
    assert items["failed"].tolist() == [i == 3 for i in range(9)]
    assert items["weight"][3] == 0 and items["weight"][2] == 1 and not items["image"][3].any()
    # a loader batch reports it; the dataset records it once, after the header-check rejects
    for batch in DataLoader(_EpochDataset(dataset, 0, 0), batch_size=4, num_workers=2):
        dataset.note_batch(batch)
    assert [p for p, _ in dataset.errors] == [bad["truncated"], garbled]
    assert "corrupt PNG" in dataset.errors[1][1] and dataset.failures() == [(3, dataset.errors[1][1])]
    # an evaluation set that streams scores it NaN and records it too
    from facekd.models import build_model
    from facekd.quality.pseudo import predict

    evaluation = QualityDataset(mixed, SIZE, QUALITY_NORMALIZATION, cache=False, workers=0)
    assert [p for p, _ in evaluation.errors] == [bad["truncated"]]
    net = build_model("timm/mobilenetv3_small_050", input_size=SIZE).eval()
    scores = predict(net, evaluation, batch_size=4)
    assert np.isnan(scores[3]) and np.isfinite(np.delete(scores, 3)).all()
    assert [p for p, _ in evaluation.errors] == [bad["truncated"], garbled]
    cached_scores = predict(net, QualityDataset([s for s in mixed if s.path != garbled], SIZE,
                                                QUALITY_NORMALIZATION, workers=0), batch_size=4)
    np.testing.assert_allclose(np.delete(scores, 3), cached_scores, rtol=1e-5, atol=1e-6)


def test_quality_loss_ignores_weight_zero_samples_in_every_term():
    from facekd.losses.quality import QualityLoss

    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(9, generator=generator), torch.randn(9, generator=generator) * 5
    weight = torch.rand(9, generator=generator) + 0.5
    weight[[2, 6]] = 0
    keep = weight > 0
    loss = QualityLoss({"mse": 1.0, "l1": 0.5, "plcc": 1.0, "srcc": 0.5})
    with_zeros, terms = loss.terms(pred, target, weight)
    pred_junk = pred.clone()
    pred_junk[[2, 6]] = torch.tensor([1e3, -1e3])  # whatever the model says about them
    junk, _ = loss.terms(pred_junk, target, weight)
    without, expected = loss.terms(pred[keep], target[keep], weight[keep])
    assert torch.allclose(with_zeros, without, atol=1e-5) and torch.allclose(junk, without, atol=1e-5)
    assert all(torch.allclose(terms[k], expected[k], atol=1e-5) for k in expected)


def test_trainer_records_decode_failures_keeps_them_in_checkpoints_and_is_not_stopped(data, tmp_path):
    from facekd.engine import Trainer, TrainConfig, load_checkpoint
    from facekd.losses.quality import QualityLoss
    from facekd.models import build_model

    samples = from_csv(data / "labeled.csv")
    garbled = undecodable_png(tmp_path / "garbled.png", samples[5].path)
    mixed = [*samples[:5], QualitySample(garbled, samples[5].mos), *samples[6:]]

    def fit(out: Path, workers: int, resume="auto", **extra):
        torch.manual_seed(0)
        net = build_model("timm/mobilenetv3_small_050", input_size=SIZE)
        dataset = QualityDataset(mixed, SIZE, QUALITY_NORMALIZATION, train=True, workers=0)
        config = TrainConfig(epochs=2, batch_size=8, accelerator="cpu", num_workers=workers, log_every_steps=1,
                             **extra)
        result = Trainer(config, out).fit(net, QualityLoss(), dataset, resume=resume)
        return dataset, result, net

    dataset, result, net = fit(tmp_path / "a", workers=2)
    assert result.steps == 6 and all(math.isfinite(r["loss"]) for r in result.history if r["event"] == "train")
    assert dataset.errors == [(garbled, dataset.errors[0][1])] and "corrupt PNG" in dataset.errors[0][1]
    assert load_checkpoint(result.checkpoint)["ranks"][0]["failures"] == [(5, dataset.errors[0][1])]
    # the same run without workers gives the same weights; a resumed run restores the record
    serial, _, serial_net = fit(tmp_path / "b", workers=0)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), serial_net.state_dict().values()))
    resumed, again, _ = fit(tmp_path / "a", workers=0, resume=True)
    assert again.resumed_from_step == 6 and resumed.errors == dataset.errors
