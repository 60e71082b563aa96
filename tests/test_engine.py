"""The training engine in one process: config checks, schedules, sampler, and `Trainer.fit`
behaviour (accumulation, frozen modules, EMA, clipping, checkpoints, precision, logging)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from facekd.config import ConfigModel, config_from_dict
from facekd.engine import (DeterministicBatchSampler, LRSchedule, TrainConfig, Trainer, freeze, load_checkpoint,
                           sample_rng, seed_everything)
from facekd.errors import ConfigError, DataError, FacekdError
from facekd.progress import Progress, ProgressTask


class Regression(Dataset):
    """x in R^4, y = x·w + noise; item = (index, x, y) so losses can see which samples came."""

    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return torch.tensor(i), self.x[i], self.y[i]


class MSE(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen: list[list[int]] = []

    def forward(self, model, batch):
        index, x, y = batch
        self.seen.append(index.tolist())
        loss = F.mse_loss(model(x).squeeze(1), y)
        return loss, {"mse": loss.detach()}


def config(**overrides) -> TrainConfig:
    base = dict(epochs=2, batch_size=8, optimizer="sgd", lr=0.05, momentum=0.0, schedule="constant",
                log_every_steps=1, seed=3, accelerator="cpu")
    return TrainConfig(**{**base, **overrides})


def linear() -> nn.Module:
    seed_everything(1)
    return nn.Linear(4, 1)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- config and schedule

@pytest.mark.parametrize("field,value", [
    ("lr", 0.0), ("lr", float("nan")), ("epochs", 0), ("batch_size", 0), ("optimizer", "adam"),
    ("schedule", "linear"), ("precision", "16"), ("momentum", 1.0), ("warmup_start_factor", 0.0),
    ("milestones", [3, 1]), ("ema_decay", 1.0), ("clip_grad_norm", 0.0), ("devices", 0), ("strategy", "fsdp"),
    ("lr", "0.1"), ("epochs", 2.5), ("channels_last", 1), ("max_steps", 0), ("gamma", 0.0),
])
def test_validate_names_the_bad_field(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        config(**{field: value})
    with pytest.raises(ConfigError, match=rf"train\.{field}: "):
        config_from_dict({"train": {field: value}}, Stage)


class Stage(ConfigModel):
    train: TrainConfig


def test_nesterov_needs_sgd_with_momentum():
    with pytest.raises(ConfigError, match="^nesterov: "):
        config(optimizer="adamw", nesterov=True)
    config(momentum=0.9, nesterov=True)


def test_schedule_warmup_then_cosine():
    s = LRSchedule("cosine", total_steps=110, warmup_steps=10, warmup_start_factor=0.1, min_lr_factor=0.2)
    assert s.factor(0) == pytest.approx(0.1)
    assert s.factor(5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(60) == pytest.approx(0.2 + 0.8 * 0.5)  # half-way through the decay
    assert s.factor(110) == pytest.approx(0.2)
    assert all(s.factor(i) >= s.factor(i + 1) for i in range(10, 110))


def test_schedule_poly_steps_constant():
    poly = LRSchedule("poly", total_steps=100, poly_power=2.0)
    assert poly.factor(50) == pytest.approx(0.25)
    steps = LRSchedule("steps", total_steps=100, milestones=(30, 60), gamma=0.1)
    assert [steps.factor(i) for i in (0, 29, 30, 59, 60, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert LRSchedule("constant", total_steps=5).factor(4) == 1.0


def test_schedule_from_config_converts_epochs_to_steps():
    s = LRSchedule.from_config(config(schedule="steps", warmup_epochs=0.5, milestones=[2, 3]), 10, 40)
    assert (s.warmup_steps, s.milestones) == (5, (20, 30))


# ----------------------------------------------------------------------------- sampler and sample_rng

def test_sampler_is_deterministic_sharded_and_matches_one_process_batches():
    one = DeterministicBatchSampler(50, 8, seed=5)
    ranks = [DeterministicBatchSampler(50, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    for s in (one, *ranks):
        s.set_epoch(3)
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 6  # drop_last: 48 of 50 samples
    assert list(one) == list(one)
    for full, a, b in zip(one, *ranks):
        assert not set(a) & set(b)
        assert sorted(a + b) == sorted(full)
    one.set_epoch(4)
    epoch4 = list(one)
    one.set_epoch(3)
    assert epoch4 != list(one)
    assert all(0 <= i < 50 for batch in epoch4 for i in batch)


def test_sample_rng_outside_the_trainer_is_refused():
    with pytest.raises(RuntimeError, match="sample_rng"):
        sample_rng(0)


# ----------------------------------------------------------------------------- fit

def test_fit_trains_and_logs(tmp_path):
    data, model = Regression(), linear()
    before = model.weight.detach().clone()
    evaluations = []

    def evaluate(m):
        evaluations.append(m.training)
        return {"mse": float(F.mse_loss(m(data.x).squeeze(1), data.y))}

    cfg = config(epochs=3, schedule="cosine", warmup_epochs=1.0, optimizer="adamw", weight_decay=0.01)
    result = Trainer(cfg, tmp_path).fit(model, MSE(), data, evaluate=evaluate)
    assert not torch.equal(before, model.weight)
    assert result.steps == 12 and result.epochs == 3 and result.checkpoint.is_file()
    assert evaluations == [False, False, False]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history
    train = [r for r in lines if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    schedule = LRSchedule.from_config(cfg, 4, 12)
    assert [r["lr"] for r in train] == pytest.approx([cfg.lr * schedule.factor(s - 1) for s in range(1, 13)])
    evals = [r for r in lines if r["event"] == "eval"]
    assert [(r["step"], r["epoch"]) for r in evals] == [(4, 1), (8, 2), (12, 3)]
    assert result.metrics == {"mse": evals[-1]["mse"]}
    assert evals[-1]["mse"] < evals[0]["mse"]


def test_each_epoch_sees_a_permutation_of_the_data(tmp_path):
    loss = MSE()
    Trainer(config(epochs=2), tmp_path).fit(linear(), loss, Regression(32))
    epochs = [sorted(sum(loss.seen[e * 4:(e + 1) * 4], [])) for e in range(2)]
    assert epochs == [list(range(32))] * 2
    assert loss.seen[:4] != loss.seen[4:]


def test_accumulation_matches_a_larger_batch(tmp_path):
    big, small = linear(), linear()
    Trainer(config(batch_size=8), tmp_path / "a").fit(big, MSE(), Regression())
    Trainer(config(batch_size=4, accumulate_grad_batches=2), tmp_path / "b").fit(small, MSE(), Regression())
    assert torch.allclose(big.weight, small.weight, atol=1e-6)
    assert torch.allclose(big.bias, small.bias, atol=1e-6)


def test_max_steps_stops_inside_an_epoch(tmp_path):
    result = Trainer(config(epochs=5, max_steps=6), tmp_path).fit(linear(), MSE(), Regression())
    state = load_checkpoint(result.checkpoint)
    assert result.steps == 6 and result.epochs == 2
    assert (state["step"], state["epoch"], state["position"]) == (6, 2, 0)


def test_custom_batch_sampler_factory(tmp_path):
    class Fixed:
        def __init__(self, rank, world):
            self.calls = (rank, world)
            self.epoch = None

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __len__(self):
            return 2

        def __iter__(self):
            yield from ([self.epoch, 10], [20, 30, 31])

    made = []

    def factory(rank, world_size):
        made.append(Fixed(rank, world_size))
        return made[-1]

    loss = MSE()
    Trainer(config(epochs=2), tmp_path).fit(linear(), loss, Regression(), batch_sampler=factory)
    assert [m.calls for m in made] == [(0, 1)]
    assert loss.seen == [[0, 10], [20, 30, 31], [1, 10], [20, 30, 31]]


class TeacherLoss(nn.Module):
    """MSE plus distillation from a frozen teacher with dropout and BatchNorm, and a buffer."""

    def __init__(self, with_head: bool = False):
        super().__init__()
        self.teacher = freeze(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 1)))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.head = nn.Parameter(torch.ones(())) if with_head else None
        self.teacher_modes: list[bool] = []

    def trainable_parameters(self):
        return [self.head] if self.head is not None else []

    def forward(self, model, batch):
        _, x, y = batch
        self.teacher_modes.append(self.teacher.training)
        self.steps += 1
        out = model(x).squeeze(1) * (self.head if self.head is not None else 1.0)
        return F.mse_loss(out, y) + F.mse_loss(out, self.teacher(x).squeeze(1)), {}


def test_frozen_teacher_stays_in_eval_mode_untouched_and_out_of_checkpoints(tmp_path):
    loss = TeacherLoss()
    teacher_before = {k: v.clone() for k, v in loss.teacher.state_dict().items()}
    Trainer(config(), tmp_path).fit(linear(), loss, Regression(), evaluate=lambda m: {"x": 0.0})
    assert len(loss.teacher_modes) == 8 and not any(loss.teacher_modes)
    assert states_equal(teacher_before, loss.teacher.state_dict())
    assert all(p.grad is None for p in loss.teacher.parameters())
    state = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert set(state["loss"]) == {"steps"} and int(state["loss"]["steps"]) == 8


def test_frozen_part_of_the_model_keeps_its_statistics(tmp_path):
    seed_everything(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    freeze(model[1])
    stats = model[1].running_mean.clone()
    first = model[0].weight.detach().clone()
    Trainer(config(), tmp_path).fit(model, MSE(), Regression(), evaluate=lambda m: {"x": 0.0})
    assert torch.equal(stats, model[1].running_mean)
    assert not torch.equal(first, model[0].weight)


def test_loss_parameters_train_only_when_declared(tmp_path):
    loss = TeacherLoss(with_head=True)
    Trainer(config(), tmp_path / "a").fit(linear(), loss, Regression())
    assert loss.head.item() != 1.0

    class Undeclared(nn.Module):
        def __init__(self):
            super().__init__()
            self.teacher = nn.Linear(4, 1)  # forgot freeze()

        def forward(self, model, batch):
            return model(batch[1]).mean(), {}

    with pytest.raises(ValueError, match=r"teacher\.weight.*freeze"):
        Trainer(config(), tmp_path / "b").fit(linear(), Undeclared(), Regression())


def test_ema_weights_are_evaluated_and_returned(tmp_path):
    seen = []
    model = linear()
    result = Trainer(config(ema_decay=0.9), tmp_path).fit(
        model, MSE(), Regression(), evaluate=lambda m: seen.append(m.weight.clone()) or {"w0": m.weight[0, 0].item()})
    state = load_checkpoint(result.checkpoint)
    ema, raw = state["ema"]["weights"], state["model"]
    assert state["ema"]["updates"] == 8
    assert not torch.equal(ema["weight"], raw["weight"])
    assert torch.equal(model.weight.detach(), ema["weight"]) and torch.equal(seen[-1], ema["weight"])
    assert not model.training

    model = linear()
    result = Trainer(config(ema_decay=0.0), tmp_path / "zero").fit(model, MSE(), Regression())
    assert torch.equal(model.weight.detach(), load_checkpoint(result.checkpoint)["model"]["weight"])


def test_gradient_clipping_bounds_the_update(tmp_path):
    def update_norm(clip):
        model = linear()
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        Trainer(config(lr=1.0, max_steps=1, clip_grad_norm=clip), tmp_path / str(clip)).fit(model, MSE(), Regression())
        return (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm().item()

    assert update_norm(1e-3) == pytest.approx(1e-3, rel=1e-3)
    assert update_norm(None) > 0.1


def test_16_mixed_on_cpu_falls_back_to_bf16(tmp_path):
    class Recorder(Progress):
        def __init__(self):
            self.messages = []

        def log(self, message):
            self.messages.append(message)

    class DtypeCheckingMSE(MSE):
        def forward(self, model, batch):
            _, x, y = batch
            assert x.dtype == y.dtype == torch.float32  # inputs and labels are not cast ...
            assert model(x).dtype == torch.bfloat16  # ... autocast is active inside the forward
            return super().forward(model, batch)

    progress = Recorder()
    model = linear()
    result = Trainer(config(precision="16-mixed"), tmp_path, progress=progress).fit(model, DtypeCheckingMSE(),
                                                                                    Regression())
    assert result.precision == "bf16-mixed"
    assert any("bf16-mixed" in m for m in progress.messages)
    assert model.weight.dtype == torch.float32 and torch.isfinite(model.weight).all()
    assert all(math.isfinite(r["loss"]) for r in result.history)


def test_progress_gets_one_bar_per_epoch_with_loss_lr_and_rate(tmp_path):
    bars = []

    class Bar(ProgressTask):
        def __init__(self, description, total):
            self.description, self.total, self.advances = description, total, []
            bars.append(self)

        def advance(self, n=1, **info):
            self.advances.append((n, info))

    class Recorder(Progress):
        def task(self, description, total=None, unit=""):
            return Bar(description, total)

    Trainer(config(epochs=2), tmp_path, progress=Recorder()).fit(linear(), MSE(), Regression())
    assert [(b.description, b.total, len(b.advances)) for b in bars] == [("epoch 1/2", 4, 4), ("epoch 2/2", 4, 4)]
    assert set(bars[0].advances[-1][1]) == {"loss", "lr", "img/s"}


def test_channels_last_and_dict_batches(tmp_path):
    class Images(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"image": torch.full((3, 4, 4), float(i) / 16), "target": torch.tensor(float(i % 2))}

    class ImageLoss(nn.Module):
        def forward(self, model, batch):
            assert batch["image"].is_contiguous(memory_format=torch.channels_last)
            return F.mse_loss(model(batch["image"]).squeeze(1), batch["target"]), {}

    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(8, 1))
    result = Trainer(config(channels_last=True, batch_size=4), tmp_path).fit(model, ImageLoss(), Images())
    assert result.steps == 8


def test_diverging_loss_is_reported(tmp_path):
    class NaNLoss(nn.Module):
        def forward(self, model, batch):
            return model(batch[1]).mean() * float("nan"), {}

    with pytest.raises(FacekdError, match="diverged.*step 1"):
        Trainer(config(), tmp_path).fit(linear(), NaNLoss(), Regression())


def test_too_little_data_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        Trainer(config(batch_size=64), tmp_path).fit(linear(), MSE(), Regression(32))


# ----------------------------------------------------------------------------- checkpoints and resume

class Crash(Exception):
    pass


class CrashingMSE(MSE):
    def __init__(self, crash_at: int):
        super().__init__()
        self.crash_at = crash_at

    def forward(self, model, batch):
        if len(self.seen) + 1 == self.crash_at:
            raise Crash()
        return super().forward(model, batch)


def test_resume_after_a_crash_continues_exactly(tmp_path):
    cfg = config(epochs=3, checkpoint_every_steps=3, schedule="cosine", warmup_epochs=1.0, optimizer="adamw",
                 ema_decay=0.5, log_every_steps=2)

    def evaluate(m):
        return {"bias": m.bias.item()}

    reference = linear()
    ref = Trainer(cfg, tmp_path / "ref").fit(reference, MSE(), Regression(), evaluate=evaluate)

    # dies in the forward of step 11: the last checkpoint is step 9, the step-10 log line comes after it
    # and must go; the step-10 line averages steps 9 and 10, so the log window must be restored
    with pytest.raises(Crash):
        Trainer(cfg, tmp_path / "run").fit(linear(), CrashingMSE(crash_at=11), Regression(), evaluate=evaluate)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert (state["step"], state["epoch"], state["position"]) == (9, 2, 1)
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 10

    model, loss = linear(), MSE()
    result = Trainer(cfg, tmp_path / "run").fit(model, loss, Regression(), evaluate=evaluate)
    assert result.resumed_from_step == 9 and len(loss.seen) == 3  # only the remaining steps were trained
    assert states_equal(model.state_dict(), reference.state_dict())
    assert [{k: v for k, v in r.items() if k != "img/s"} for r in result.history] == \
        [{k: v for k, v in r.items() if k != "img/s"} for r in ref.history]
    assert result.metrics == ref.metrics


def test_resume_with_other_settings_is_refused(tmp_path):
    Trainer(config(), tmp_path).fit(linear(), MSE(), Regression())
    with pytest.raises(ConfigError, match=r"last\.ckpt.*lr: 0\.05 -> 0\.1"):
        Trainer(config(lr=0.1), tmp_path).fit(linear(), MSE(), Regression())
    with pytest.raises(ConfigError, match=r"extra\.arch: '<unset>' -> 'b'"):
        Trainer(config(), tmp_path, extra_config={"arch": "b"}).fit(linear(), MSE(), Regression())
    # settings that do not change the result may differ
    Trainer(config(log_every_steps=3, num_workers=0), tmp_path).fit(linear(), MSE(), Regression())
    # resume=False starts over
    result = Trainer(config(lr=0.1), tmp_path).fit(linear(), MSE(), Regression(), resume=False)
    assert result.resumed_from_step is None


def test_resume_true_needs_a_checkpoint(tmp_path):
    with pytest.raises(DataError, match=r"last\.ckpt: resume requested"):
        Trainer(config(), tmp_path).fit(linear(), MSE(), Regression(), resume=True)


def test_checkpoint_for_another_model_is_a_data_error(tmp_path):
    Trainer(config(), tmp_path).fit(linear(), MSE(), Regression())
    wider = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    with pytest.raises(DataError, match=r"last\.ckpt: checkpoint does not fit"):
        Trainer(config(), tmp_path).fit(wider, MSE(), Regression())


def test_completed_run_resumes_to_the_same_result(tmp_path):
    model = linear()
    first = Trainer(config(ema_decay=0.8), tmp_path).fit(model, MSE(), Regression(), evaluate=lambda m: {"b": 1.0})
    again_model = linear()
    again = Trainer(config(ema_decay=0.8), tmp_path).fit(again_model, MSE(), Regression(),
                                                         evaluate=lambda m: {"b": 2.0})
    assert again.resumed_from_step == first.steps and again.metrics == {"b": 1.0}
    assert states_equal(model.state_dict(), again_model.state_dict())
    assert len(again.history) == len(first.history)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign", "empty"])
def test_damaged_checkpoint_is_a_data_error(tmp_path, damage):
    Trainer(config(), tmp_path).fit(linear(), MSE(), Regression())
    path = tmp_path / "checkpoints" / "last.ckpt"
    blob = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(blob)))
    elif damage == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(b"")
    with pytest.raises(DataError, match=r"last\.ckpt: (unreadable|not a facekd)"):
        Trainer(config(), tmp_path).fit(linear(), MSE(), Regression())


def test_ema_averages_tied_weights_once():
    from facekd.engine.ema import ModelEma

    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    model[1].weight = model[0].weight  # tied
    with torch.no_grad():
        model[0].weight.zero_()
    ema = ModelEma(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema.updates = 10**6  # past the warm-up: d = decay
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, torch.full((2, 2), 0.5))
    assert ema.module[1].weight is ema.module[0].weight


def test_non_finite_weights_never_replace_the_last_good_checkpoint(tmp_path):
    class LateNaN(MSE):
        def forward(self, model, batch):
            loss, metrics = super().forward(model, batch)
            return (loss * float("nan") if len(self.seen) > 4 else loss), metrics

    # 4 steps an epoch; the loss turns NaN at step 5, long before the first log step (100)
    with pytest.raises(FacekdError, match="non-finite weights at step 8"):
        Trainer(config(epochs=3, log_every_steps=100), tmp_path).fit(linear(), LateNaN(), Regression())
    from facekd.engine.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_weight_decay_norms_false_leaves_normalisation_layers_undecayed(tmp_path):
    class NoGradient(nn.Module):
        def forward(self, model, batch):
            return (model(batch[1]) * 0.0).sum(), {}

    def trained(**settings) -> nn.Sequential:
        seed_everything(1)
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
        Trainer(config(epochs=1, weight_decay=0.5, **settings), tmp_path / str(settings)).fit(
            model, NoGradient(), Regression())
        return model

    seed_everything(1)
    start = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).state_dict()
    shrink = (1 - 0.05 * 0.5) ** (32 // 8)  # lr 0.05, four steps of pure weight decay
    for settings, norm_shrink in (({}, shrink), ({"weight_decay_norms": False}, 1.0)):
        model = trained(**settings)
        assert torch.allclose(model[0].weight, start["0.weight"] * shrink, atol=1e-6)
        assert torch.allclose(model[1].weight, start["1.weight"] * norm_shrink, atol=1e-6)
