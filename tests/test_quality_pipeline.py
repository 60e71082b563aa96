import csv
import json

import numpy as np
import pytest

from facekd.cli import main
from facekd.config import load_config
from facekd.errors import ConfigError
from facekd.io.formats import read_mos_csv
from facekd.quality.config import QualityRunConfig, data_overrides
from facekd.quality.metrics import quality_metrics
from facekd.quality.pipeline import QualityPipeline
from facekd.synth import generate_quality

TINY = """
teacher: {arch: timm/mobilenetv3_small_100, input_size: 64}
student: {arch: timm/mobilenetv3_small_050, input_size: 64}
teacher_train: {epochs: 1, batch_size: 16, accelerator: cpu, clip_grad_norm: 1.0}
student_train: {epochs: 1, batch_size: 16, accelerator: cpu, clip_grad_norm: 1.0}
pseudo: {confidence: flip}
"""


@pytest.fixture(scope="module")
def quality_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    generate_quality(root / "data", labeled=40, unlabeled=24, test=16, size=64, workers=0)
    (root / "tiny.yaml").write_text(TINY)
    return root


def _config(root):
    return load_config(root / "tiny.yaml", QualityRunConfig, overrides=data_overrides(root / "data"))


@pytest.fixture(scope="module")
def finished(quality_data, tmp_path_factory):
    """(run folder, report) of one finished pipeline run on the tiny config; copy it to change it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    return out, QualityPipeline(_config(quality_data), out).run()


def _copy(run, tmp_path):
    import shutil

    return shutil.copytree(run, tmp_path / "run")


def test_pipeline_runs_every_stage_and_reports(quality_data, finished, tmp_path):
    run, report = finished
    tmp_path = run.parent
    assert set(report["models"]) == {"T0", "T1", "S", "control"}
    for row in report["models"].values():
        assert -1 <= row["srcc"] <= 1 and row["params"] > 0 and row["gflops"] > 0 and row["cpu_ms_per_image"] > 0
    assert report["models"]["S"]["arch"] == report["models"]["control"]["arch"]
    assert report["challenge_limit"]["within"] is True
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["models"]["S"]["srcc"] == report["models"]["S"]["srcc"]
    labeled = [row.mos for row in read_mos_csv(quality_data / "data" / "labeled.csv")]
    for stage, count in (("pseudo_u1", 12), ("pseudo_u2", 12)):
        rows = read_mos_csv(tmp_path / "run" / stage / "pseudo_labels.csv")
        assert len(rows) == count
        assert all(min(labeled) <= r.mos <= max(labeled) and 0 < r.weight <= 1 for r in rows)
    # the student learned from labeled + both pseudo-labeled sets, the control from labeled alone
    assert report["stages"]["student"]["train_images"] == 40 + 24
    assert report["stages"]["control"]["train_images"] == 40
    # every model's test predictions are saved, and its metrics are theirs; the report names its files
    for row in report["models"].values():
        files = {key: tmp_path / "run" / value for key, value in row["files"].items()}
        assert set(files) == {"model", "predictions", "metrics"} and all(path.is_file() for path in files.values())
        with files["predictions"].open() as handle:
            saved = list(csv.DictReader(handle))
        assert len(saved) == 16 and list(saved[0]) == ["path", "mos", "prediction"]
        metrics = quality_metrics([float(r["prediction"]) for r in saved], [float(r["mos"]) for r in saved])
        assert metrics["srcc"] == pytest.approx(row["srcc"]) and metrics["rmse"] == pytest.approx(row["rmse"])


def test_rerun_skips_and_force_redoes_what_depends(quality_data, finished, tmp_path):
    out = _copy(finished[0], tmp_path)
    stamp = (out / "t1" / "model.safetensors").stat().st_mtime_ns
    report = QualityPipeline(_config(quality_data), out).run()
    assert all(stage["skipped"] for stage in report["stages"].values())
    report = QualityPipeline(_config(quality_data), out).run(force=["t1"])
    assert not report["stages"]["t1"]["skipped"]
    assert (out / "t1" / "model.safetensors").stat().st_mtime_ns != stamp
    assert report["stages"]["t0"]["skipped"] and report["stages"]["control"]["skipped"]
    with pytest.raises(ConfigError, match="unknown stage"):
        QualityPipeline(_config(quality_data), out).run(force=["t2"])


def test_a_changed_setting_reruns_the_stages_it_reaches(quality_data, finished, tmp_path):
    out = _copy(finished[0], tmp_path)
    changed = load_config(quality_data / "tiny.yaml", QualityRunConfig,
                          overrides=data_overrides(quality_data / "data") + ["student_train.lr=0.002"])
    report = QualityPipeline(changed, out).run()
    skipped = {name for name, stage in report["stages"].items() if stage["skipped"]}
    assert skipped == {"t0", "pseudo_u1", "t1", "pseudo_u2"}


def test_missing_data_is_a_config_error(quality_data, tmp_path):
    config = load_config(quality_data / "tiny.yaml", QualityRunConfig)
    with pytest.raises(ConfigError, match="data: missing"):
        QualityPipeline(config, tmp_path / "run")


def test_cli_single_steps(quality_data, tmp_path, capsys):
    data = quality_data / "data"
    out = tmp_path / "teacher"
    assert main(["quality", "train", str(quality_data / "tiny.yaml"), "--data", str(data), "--out", str(out),
                 "-q"]) == 0
    model = out / "model.safetensors"
    capsys.readouterr()
    assert main(["quality", "eval", str(model), str(data / "test.csv"), "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["n"] == 16
    assert main(["quality", "eval", str(model), str(data / "test.csv"), "--out", str(tmp_path / "eval.json"),
                 "-q"]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert set(metrics) >= {"srcc", "plcc", "plcc_logistic", "krcc", "rmse", "score"} and metrics["n"] == 16
    labels = tmp_path / "pseudo.csv"
    assert main(["quality", "pseudo-label", str(model), str(data / "unlabeled_1.txt"), "--labeled",
                 str(data / "labeled.csv"), "--out", str(labels), "-q"]) == 0
    assert len(read_mos_csv(labels)) == 12
    # batch scoring: a corrupt image is reported and skipped; ONNX Runtime gives the same scores
    images = sorted((data / "images" / "test").glob("*.png"))[:5]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    scores = tmp_path / "scores.csv"
    assert main(["quality", "score", str(model), *map(str, images), str(bad), "--out", str(scores),
                 "--backend", "torch", "-q"]) == 0
    with open(scores) as handle:
        torch_scores = {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}
    assert len(torch_scores) == 5
    with open(tmp_path / "scores.errors.csv") as handle:
        errors = list(csv.DictReader(handle))
    assert len(errors) == 1 and errors[0]["path"].endswith("bad.png")
    assert main(["quality", "score", str(model), *map(str, images), "--out", str(tmp_path / "onnx.csv"),
                 "--backend", "onnx", "-q"]) == 0
    assert json.loads((tmp_path / "onnx.run.json").read_text())["backend"]["backend"] == "onnx"
    with open(tmp_path / "onnx.csv") as handle:
        onnx_scores = {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}
    assert onnx_scores.keys() == torch_scores.keys()
    np.testing.assert_allclose([onnx_scores[k] for k in torch_scores], list(torch_scores.values()), atol=1e-4)
    assert main(["quality", "score", str(model), *map(str, images), str(bad), "--out", str(tmp_path / "s.csv"),
                 "--strict", "--backend", "torch", "-q"]) == 2
    assert not (tmp_path / "s.csv").exists()


def test_results_do_not_depend_on_what_ran_before(quality_data, tmp_path):
    import torch

    first = QualityPipeline(_config(quality_data), tmp_path / "a").run()
    torch.rand(1000)  # disturb the global generators
    second = QualityPipeline(_config(quality_data), tmp_path / "b").run()
    for model in ("T0", "T1", "S", "control"):
        assert first["models"][model]["srcc"] == second["models"][model]["srcc"]


def test_a_stage_killed_mid_training_resumes_to_the_same_result(quality_data, tmp_path, monkeypatch):
    from facekd.losses.quality import QualityLoss

    overrides = data_overrides(quality_data / "data") + ["student_train.epochs=2",
                                                         "student_train.checkpoint_every_steps=1"]
    config = lambda: load_config(quality_data / "tiny.yaml", QualityRunConfig, overrides=overrides)  # noqa: E731
    reference = QualityPipeline(config(), tmp_path / "reference").run()

    original = QualityLoss.forward
    calls = {"n": 0}

    class Killed(Exception):
        pass

    def dies_in_the_student_stage(self, model, batch):
        if model.arch == "timm/mobilenetv3_small_050":
            calls["n"] += 1
            if calls["n"] == 6:  # second epoch of the student (4 steps an epoch)
                raise Killed()
        return original(self, model, batch)

    monkeypatch.setattr(QualityLoss, "forward", dies_in_the_student_stage)
    with pytest.raises(Killed):
        QualityPipeline(config(), tmp_path / "run").run()
    assert (tmp_path / "run" / "student" / "train" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "run" / "student" / "stage.json").exists()
    monkeypatch.setattr(QualityLoss, "forward", original)
    resumed = QualityPipeline(config(), tmp_path / "run").run()
    assert not resumed["stages"]["student"]["skipped"] and resumed["stages"]["t1"]["skipped"]
    assert resumed["stages"]["student"]["resumed_from_step"] == 5  # not started over
    for model in ("T0", "T1", "S", "control"):
        assert resumed["models"][model]["srcc"] == reference["models"][model]["srcc"]
        assert resumed["models"][model]["rmse"] == reference["models"][model]["rmse"]


def test_train_transform_and_cache_settings(quality_data, tmp_path):
    overrides = data_overrides(quality_data / "data")
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY + "train_transform: random_crop\n")
    with pytest.raises(ConfigError) as error:
        load_config(bad, QualityRunConfig, overrides=overrides)
    assert str(error.value) == (f"{bad}: train_transform: expected one of 'flip_shift', 'resize_random_crop', "
                                "got 'random_crop' (did you mean 'resize_random_crop'?)")
    bad.write_text(TINY + "train_cache: sometimes\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train_cache: expected bool"):
        load_config(bad, QualityRunConfig, overrides=overrides)
    # Efficient-FIQA's transform trains, and a streamed training set trains exactly as the cached one
    reports = {}
    for cache in ("false", "true"):
        config = load_config(quality_data / "tiny.yaml", QualityRunConfig, overrides=overrides + [
            "train_transform=resize_random_crop", f"train_cache={cache}", "teacher_train.num_workers=2"])
        assert config.train_transform == "resize_random_crop" and config.train_cache == (cache == "true")
        reports[cache] = QualityPipeline(config, tmp_path / cache).train_single("teacher")
    assert reports["false"]["models"]["teacher"]["srcc"] == reports["true"]["models"]["teacher"]["srcc"]
    assert reports["false"]["models"]["teacher"]["rmse"] == reports["true"]["models"]["teacher"]["rmse"]
    assert reports["false"]["stages"]["teacher"]["train_images"] == 40
    default = _config(quality_data)
    assert (default.train_transform, default.train_cache) == ("flip_shift", False)


def test_a_stage_can_start_from_a_model_file(quality_data, tmp_path):
    """`student.init`: the weights of a facekd model file (e.g. from `facekd import`) to start from."""
    import torch

    from facekd.models import build_model
    from facekd.models.artifact import load_model, save_model

    torch.manual_seed(42)
    start = build_model("timm/mobilenetv3_small_100", 64)
    save_model(start, tmp_path / "start.safetensors")
    overrides = data_overrides(quality_data / "data") + [
        f"teacher.init={tmp_path / 'start.safetensors'}", "teacher_train.lr=1e-9", "teacher_train.weight_decay=0"]
    config = load_config(quality_data / "tiny.yaml", QualityRunConfig, overrides=overrides)
    QualityPipeline(config, tmp_path / "run").train_single("teacher")
    trained = load_model(tmp_path / "run" / "model.safetensors")
    first = "backbone.model.conv_stem.weight"
    assert torch.allclose(trained.state_dict()[first], start.state_dict()[first], atol=1e-6)
    assert torch.equal(trained.state_dict()["head.mlp.3.bias"].round(decimals=5),
                       start.state_dict()["head.mlp.3.bias"].round(decimals=5))  # not reset to the mean MOS
    save_model(build_model("timm/mobilenetv3_small_050", 64), tmp_path / "other.safetensors")
    wrong = load_config(quality_data / "tiny.yaml", QualityRunConfig, overrides=data_overrides(quality_data / "data")
                        + [f"teacher.init={tmp_path / 'other.safetensors'}"])
    with pytest.raises(ConfigError, match=r"teacher\.init: .*other\.safetensors holds timm/mobilenetv3_small_050, "
                                          r"not the configured timm/mobilenetv3_small_100"):
        QualityPipeline(wrong, tmp_path / "wrong").train_single("teacher")
    missing = tmp_path / "bad.yaml"
    missing.write_text(TINY.replace("input_size: 64}", "input_size: 64, init: absent.safetensors}", 1))
    with pytest.raises(ConfigError, match=r"bad\.yaml: teacher\.init: file not found"):
        load_config(missing, QualityRunConfig, overrides=data_overrides(quality_data / "data"))
