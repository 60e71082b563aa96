from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated, Literal, Optional

import pytest
from pydantic import Field, field_validator, model_validator

from facekd.config import (
    ConfigModel,
    ExistingPath,
    OutputPath,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)
from facekd.errors import ConfigError


class Device(enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


class Data(ConfigModel):
    labeled: ExistingPath
    image_size: Annotated[tuple[int, int], Field(strict=False)] = (112, 112)
    unlabeled: list[ExistingPath] = []
    cache: Optional[OutputPath] = None


class Train(ConfigModel):
    lr: float = 0.1
    epochs: int = 1
    loss: Literal["mse", "plcc"] = "mse"
    milestones: Annotated[tuple[int, ...], Field(strict=False)] = ()
    weights: dict[str, float] = {}
    amp: bool = False
    device: Annotated[Device, Field(strict=False)] = Device.CPU

    @field_validator("lr")
    @classmethod
    def _positive(cls, lr: float) -> float:
        if lr <= 0:
            raise ValueError("must be > 0")
        return lr

    @model_validator(mode="after")
    def _not_too_long(self) -> "Train":
        if self.epochs > 1000:
            raise ValueError("too many epochs for one run")
        return self


class Demo(ConfigModel):
    data: Data
    train: Train = Train()
    out: OutputPath = Path("runs/demo")
    name: str | None = None


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder holding labels.csv, used as the current folder so file names stay short."""
    (tmp_path / "labels.csv").write_text("path,mos\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def load_error(text: str, overrides=()) -> str:
    write(Path("demo.yaml"), text)
    with pytest.raises(ConfigError) as info:
        load_config("demo.yaml", Demo, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_full_config_converts_every_type(workdir):
    sub = workdir / "cfg"
    sub.mkdir()
    (sub / "u1.txt").write_text("")
    write(
        sub / "demo.yaml",
        "data:\n"
        "  labeled: ../labels.csv\n"
        "  image_size: [288, 320]\n"
        "  unlabeled: [u1.txt]\n"
        "train:\n"
        "  lr: 1e-3\n"
        "  epochs: 3\n"
        "  loss: plcc\n"
        "  milestones: [2, 4]\n"
        "  weights: {kd: 1, mse: 0.5}\n"
        "  amp: true\n"
        "  device: cuda\n"
        "name: null\n",
    )
    cfg = load_config(sub / "demo.yaml", Demo)
    assert cfg.data.labeled == workdir / "labels.csv"
    assert cfg.data.image_size == (288, 320)
    assert cfg.data.unlabeled == [sub / "u1.txt"]
    assert cfg.data.cache is None
    assert cfg.train.lr == pytest.approx(0.001) and type(cfg.train.lr) is float
    assert cfg.train.weights == {"kd": 1.0, "mse": 0.5} and type(cfg.train.weights["kd"]) is float
    assert (cfg.train.epochs, cfg.train.loss, cfg.train.milestones) == (3, "plcc", (2, 4))
    assert cfg.train.amp is True and cfg.train.device is Device.CUDA
    assert cfg.out == Path("runs/demo")  # defaults are used as written


def test_exact_error_messages(workdir):
    assert load_error("data: {labeled: labels.csv}\ntrain: {lr: fast}\n") == (
        "demo.yaml: train.lr: expected float, got 'fast'"
    )
    assert load_error("data: {labeled: labels.csv}\ntrain: {lrr: 0.1}\n") == (
        "demo.yaml: train.lrr: unknown key (did you mean 'lr'?)"
    )
    assert load_error("data: {image_size: [1, 2]}\n") == "demo.yaml: data.labeled: missing required key"
    assert load_error("data: {labeled: nope.csv}\n") == (
        f"demo.yaml: data.labeled: file not found: {workdir / 'nope.csv'}"
    )
    assert load_error("- 1\n- 2\n") == "demo.yaml: expected a mapping at the top level"
    assert load_error("data: {labeled: labels.csv}\nbogus: 1\n") == "demo.yaml: bogus: unknown key"
    with pytest.raises(ConfigError, match=r"^missing\.yaml: file not found$"):
        load_config("missing.yaml", Demo)


def test_invalid_yaml_names_the_line(workdir):
    message = load_error("data:\n  labeled: labels.csv\ntrain: lr: 0.1\n")
    assert message.startswith("demo.yaml: line 3: invalid YAML (") and message.endswith(")")
    message = load_error("data: {labeled: labels.csv\n")
    assert message.startswith("demo.yaml: line ") and "invalid YAML" in message


def test_duplicate_keys_are_refused(workdir):
    text = "data: {labeled: labels.csv}\ntrain:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n"
    assert load_error(text) == "demo.yaml: line 5: duplicate key 'lr'"
    # the same key in different mappings is fine, and so is a YAML merge key
    base = "defaults: &d {lr: 0.5, epochs: 4}\ndata: {labeled: labels.csv}\ntrain: {<<: *d, lr: 0.2}\n"
    write(Path("demo.yaml"), base)
    with pytest.raises(ConfigError, match="defaults: unknown key"):
        load_config("demo.yaml", Demo)  # merge parsed fine; only the extra top key is refused


def test_bool_and_number_strictness(workdir):
    head = "data: {labeled: labels.csv}\n"
    assert load_error(head + "train: {epochs: true}\n") == "demo.yaml: train.epochs: expected int, got True"
    assert load_error(head + "train: {lr: false}\n") == "demo.yaml: train.lr: expected float, got False"
    assert load_error(head + "train: {epochs: 2.5}\n") == "demo.yaml: train.epochs: expected int, got 2.5"
    assert load_error(head + "train: {amp: 1}\n") == (
        "demo.yaml: train.amp: expected bool (true or false), got 1"
    )
    assert load_error(head + "train: {amp: 'yes'}\n").endswith("expected bool (true or false), got 'yes'")
    assert load_error(head + "name: 12\n") == "demo.yaml: name: expected str, got 12"
    cfg = config_from_dict({"data": {"labeled": "labels.csv"}, "train": {"lr": 2, "amp": True}}, Demo)
    assert cfg.train.lr == 2.0 and type(cfg.train.lr) is float and cfg.train.amp is True


def test_container_errors_name_the_item(workdir):
    head = "data: {labeled: labels.csv}\n"
    assert load_error(head + "train: {loss: msee}\n") == (
        "demo.yaml: train.loss: expected one of 'mse', 'plcc', got 'msee' (did you mean 'mse'?)"
    )
    assert load_error(head + "train: {milestones: [1, x]}\n") == (
        "demo.yaml: train.milestones[1]: expected int, got 'x'"
    )
    assert load_error("data: {labeled: labels.csv, image_size: [1, 2, 3]}\n") == (
        "demo.yaml: data.image_size: expected a list of 2 items, got a list with 3 items"
    )
    assert load_error(head + "train: {weights: {kd: high}}\n") == (
        "demo.yaml: train.weights.kd: expected float, got 'high'"
    )
    assert load_error(head + "train: {weights: [1]}\n") == "demo.yaml: train.weights: expected a mapping, got a list"
    assert load_error("data: labels.csv\n") == "demo.yaml: data: expected a mapping, got 'labels.csv'"
    assert load_error(head + "train: {device: tpu}\n") == (
        "demo.yaml: train.device: expected one of 'cpu', 'cuda', got 'tpu'"
    )
    assert load_error("data: {labeled: labels.csv, unlabeled: [labels.csv, gone.txt]}\n") == (
        f"demo.yaml: data.unlabeled[1]: file not found: {Path.cwd() / 'gone.txt'}"
    )


def test_validate_hook_points_at_field_or_dataclass(workdir):
    head = "data: {labeled: labels.csv}\n"
    assert load_error(head + "train: {lr: 0}\n") == "demo.yaml: train.lr: must be > 0"
    assert load_error(head + "train: {epochs: 5000}\n") == "demo.yaml: train: too many epochs for one run"


def test_overrides(workdir):
    write(workdir / "demo.yaml", "data: {labeled: labels.csv}\ntrain: {lr: 0.1}\n")
    cfg = load_config(
        "demo.yaml", Demo, ["train.lr=0.5", "train.milestones=[3, 6]", "name=run one", "train.loss=plcc"]
    )
    assert (cfg.train.lr, cfg.train.milestones, cfg.name, cfg.train.loss) == (0.5, (3, 6), "run one", "plcc")
    # an override may create a missing section, and later overrides win
    assert load_config("demo.yaml", Demo, ["train.epochs=2", "train.epochs=7"]).train.epochs == 7

    assert load_error("data: {labeled: labels.csv}\n", ["train.lrr=0.1"]) == (
        "demo.yaml (--set train.lrr=0.1): train.lrr: unknown key (did you mean 'lr'?)"
    )
    assert load_error("data: {labeled: labels.csv}\n", ["train.lr=fast"]) == (
        "demo.yaml (--set train.lr=fast): train.lr: expected float, got 'fast'"
    )
    # an error elsewhere in the file is not blamed on the override
    assert load_error("data: {labeled: labels.csv}\ntrain: {epochs: x}\n", ["train.lr=1"]) == (
        "demo.yaml: train.epochs: expected int, got 'x'"
    )
    assert load_error("data: {labeled: labels.csv}\n", ["data.labeled.x=1"]) == (
        "demo.yaml (--set data.labeled.x=1): data.labeled: expected a mapping, got 'labels.csv'"
    )
    with pytest.raises(ConfigError, match=r"^--set 'train\.lr': expected KEY=VALUE"):
        load_config("demo.yaml", Demo, ["train.lr"])
    with pytest.raises(ConfigError, match=r"^--set train\.lr: line 1: invalid YAML"):
        load_config("demo.yaml", Demo, ["train.lr=[1,"])


def test_override_paths_are_relative_to_current_folder(workdir):
    cfg_dir = workdir / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "local.csv").write_text("path,mos\n")
    write(cfg_dir / "demo.yaml", "data: {labeled: local.csv}\nout: runs\n")
    cfg = load_config(cfg_dir / "demo.yaml", Demo)
    assert cfg.data.labeled == cfg_dir / "local.csv" and cfg.out == cfg_dir / "runs"
    cfg = load_config(cfg_dir / "demo.yaml", Demo, ["data.labeled=labels.csv", "out=elsewhere"])
    assert cfg.data.labeled == workdir / "labels.csv" and cfg.out == workdir / "elsewhere"


def test_round_trip_dict_object_dict(workdir):
    cfg = config_from_dict(
        {
            "data": {"labeled": "labels.csv", "image_size": [96, 128]},
            "train": {"lr": 0.25, "milestones": [1, 2], "weights": {"a": 2.0}, "device": "cuda"},
            "out": "runs/x",
        },
        Demo,
        base_dir=workdir,
    )
    plain = config_to_dict(cfg)
    assert plain["data"]["labeled"] == str(workdir / "labels.csv")
    assert plain["data"]["image_size"] == [96, 128] and plain["train"]["milestones"] == [1, 2]
    assert plain["train"]["device"] == "cuda" and plain["out"] == str(workdir / "runs" / "x")
    assert json.loads(json.dumps(plain)) == plain
    assert config_from_dict(plain, Demo) == cfg
    assert config_to_dict(config_from_dict(plain, Demo)) == plain

    dump_config(cfg, workdir / "saved" / "config.yaml")
    assert load_config(workdir / "saved" / "config.yaml", Demo) == cfg
    assert sorted(p.name for p in (workdir / "saved").iterdir()) == ["config.yaml"]


def test_config_from_dict_source_and_base_dir(tmp_path):
    (tmp_path / "labels.csv").write_text("")
    cfg = config_from_dict({"data": {"labeled": "labels.csv"}}, Demo, base_dir=tmp_path)
    assert cfg.data.labeled == tmp_path / "labels.csv"
    with pytest.raises(ConfigError) as info:
        data = {"data": {"labeled": "labels.csv"}, "train": {"lr": "x"}}
        config_from_dict(data, Demo, source="job", base_dir=tmp_path)
    assert str(info.value) == "job: train.lr: expected float, got 'x'"


def test_models_built_in_python_raise_the_same_errors(workdir):
    with pytest.raises(ConfigError, match=r"^lr: must be > 0$"):
        Train(lr=0)
    train = Train()
    with pytest.raises(ConfigError, match=r"^epochs: expected int, got 'x'$"):
        train.epochs = "x"
    assert train.epochs == 1
