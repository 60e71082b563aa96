"""The FIQA pipeline of "Efficient Face Image Quality Assessment via Self-Training and Knowledge
Distillation" (Sun et al., ICCV 2025 VQualA winner), with a control student beside it.

Stages, each writing into RUN_DIR/<stage>/:
  t0         teacher T0 on the labeled set L
  pseudo_u1  T0 pseudo-labels U1 (raw predictions → MOS by a logistic fitted on L)
  t1         enhanced teacher T1 on L ∪ pseudo_T0(U1)            (self-training)
  pseudo_u2  T1 pseudo-labels U2
  student    student S on L ∪ pseudo_T0(U1) ∪ pseudo_T1(U2)       (distillation)
  control    the same student architecture and schedule on L alone

A stage is skipped when its `stage.json` records the same fingerprint (its settings and the
fingerprints of what it reads); a stage killed while training resumes from its checkpoint;
`force` redoes named stages, and every stage that depends on a redone one follows."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from facekd.config import config_to_dict
from facekd.errors import ConfigError, FacekdError
from facekd.results import (PREDICTIONS_FILE, ChallengeLimit, ModelCost, QualityModelResult, QualityReport,
                            ResultFiles, StageSummary, TestPredictions, write_result)
from facekd.io.atomic import atomic_write_text
from facekd.io.formats import file_digest
from facekd.progress import Progress
from facekd.quality.config import STAGES, ModelChoice, QualityRunConfig

CHALLENGE_MAX_GFLOPS = 0.5
CHALLENGE_MAX_PARAMS = 5_000_000
MODEL_FILE = "model.safetensors"
PSEUDO_FILE = "pseudo_labels.csv"
_DEPENDS = {"t0": (), "pseudo_u1": ("t0",), "t1": ("pseudo_u1",), "pseudo_u2": ("t1",),
            "student": ("pseudo_u1", "pseudo_u2"), "control": ()}


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StageResult:
    name: str
    fingerprint: str  # of what the stage was asked to do
    skipped: bool
    outputs: dict[str, str]
    info: dict[str, Any]
    output_digest: str = ""  # of what it produced: what downstream stages depend on


class QualityPipeline:
    """Runs the stages of one config into one run folder (see the module docstring)."""

    def __init__(self, config: QualityRunConfig, out_dir: str | Path, progress: Progress | None = None):
        if config.data is None:
            raise ConfigError("data: missing; give the labeled/test CSVs and the two unlabeled lists "
                              "(e.g. --data DIR for a `facekd synth quality` folder)")
        self.config = config
        self.out = Path(out_dir)
        self.progress = progress or Progress()
        self.results: dict[str, StageResult] = {}
        self._test_cache: dict[tuple, Any] = {}
        self._last_test: TestPredictions | None = None  # of the latest evaluation

    # ------------------------------------------------------------------ orchestration

    def run(self, force: Sequence[str] = ()) -> dict[str, Any]:
        unknown = sorted(set(force) - set(STAGES))
        if unknown:
            raise ConfigError(f"--force: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
        self.out.mkdir(parents=True, exist_ok=True)
        data = self.config.data
        self._digest_data()
        runners: dict[str, Callable[[], tuple[dict[str, str], dict[str, Any]]]] = {
            "t0": lambda: self._train_stage("t0", self.config.teacher, teacher=True, pseudo=()),
            "pseudo_u1": lambda: self._pseudo_stage("pseudo_u1", "t0", data.unlabeled_1),
            "t1": lambda: self._train_stage("t1", self.config.teacher, teacher=True, pseudo=("pseudo_u1",)),
            "pseudo_u2": lambda: self._pseudo_stage("pseudo_u2", "t1", data.unlabeled_2),
            "student": lambda: self._train_stage("student", self.config.student, teacher=False,
                                                 pseudo=("pseudo_u1", "pseudo_u2")),
            "control": lambda: self._train_stage("control", self.config.student, teacher=False, pseudo=()),
        }
        for name in STAGES:
            if name == "control" and not self.config.control:
                continue
            self._run_stage(name, runners[name], forced=name in force)
        return write_result(self.report(), self.out)

    def train_single(self, which: str = "teacher") -> dict[str, Any]:
        """Train one model (the config's teacher or student) on the labeled set alone, evaluate it
        on the test set, and write `<out>/model.safetensors`, `<out>/predictions.csv` and
        `<out>/report.json`."""
        self._digest_data()
        choice = self.config.teacher if which == "teacher" else self.config.student
        outputs, info = self._train_stage(which, choice, teacher=which == "teacher", pseudo=(), folder=self.out)
        self.results[which] = StageResult(which, "", False, outputs, info)
        return write_result(self.report(), self.out)

    def _digest_data(self) -> None:
        data = self.config.data
        self.data_digest = {key: file_digest(Path(getattr(data, key)))
                            for key in ("labeled", "test", "unlabeled_1", "unlabeled_2")}

    def _fingerprint(self, name: str) -> str:
        cfg = self.config
        model = cfg.student if name in ("student", "control") else cfg.teacher
        train = cfg.student_train if name in ("student", "control") else cfg.teacher_train
        settings: dict[str, Any] = {"stage": name, "data": self.data_digest}
        if name.startswith("pseudo"):
            settings["pseudo"] = config_to_dict(cfg.pseudo)
        else:
            settings.update(model=config_to_dict(model), train=config_to_dict(train), loss=config_to_dict(cfg.loss),
                            eval_batch_size=cfg.eval_batch_size, train_transform=cfg.train_transform)
        settings["upstream"] = {dep: self.results[dep].output_digest for dep in _DEPENDS[name]}
        return _digest(settings)

    def _run_stage(self, name: str, runner, forced: bool) -> None:
        folder = self.out / name
        marker = folder / "stage.json"
        fingerprint = self._fingerprint(name)
        if marker.is_file() and not forced:
            done = json.loads(marker.read_text())
            if done.get("fingerprint") == fingerprint and all((self.out / p).exists() for p in done["outputs"].values()):
                self.results[name] = StageResult(name, fingerprint, True, done["outputs"], done.get("info", {}),
                                                 done.get("output_digest", ""))
                self.progress.log(f"{name}: up to date, skipped")
                return
        started = folder / "started.json"
        if forced or (started.is_file() and json.loads(started.read_text()).get("fingerprint") != fingerprint) \
                or marker.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # stale or forced: start this stage over
        folder.mkdir(parents=True, exist_ok=True)
        if not started.is_file():
            atomic_write_text(started, json.dumps({"fingerprint": fingerprint}) + "\n")
        self.progress.log(f"{name}: running")
        outputs, info = runner()
        digest = _digest({key: file_digest(self.out / path) for key, path in sorted(outputs.items())})
        self.results[name] = StageResult(name, fingerprint, False, outputs, info, digest)
        atomic_write_text(marker, json.dumps({"fingerprint": fingerprint, "output_digest": digest, "outputs": outputs,
                                              "info": info}, indent=2, default=str) + "\n")

    # ------------------------------------------------------------------ stages

    def _samples(self, pseudo: Sequence[str]):
        from facekd.quality.data import from_csv

        samples = list(from_csv(self.config.data.labeled))
        for stage in pseudo:
            samples += from_csv(self.out / self.results[stage].outputs["labels"])
        return samples

    def _test_set(self, model):
        from facekd.quality.data import QualityDataset, from_csv

        key = (model.geometry, json.dumps(model.normalization, sort_keys=True))
        if key not in self._test_cache:  # decoded once per geometry and normalisation, scored every evaluation
            dataset = QualityDataset(from_csv(self.config.data.test), model.geometry, model.normalization,
                                     train=False, cache=True, progress=self.progress)
            mos = np.asarray(dataset.mos, dtype=np.float64)
            self._test_cache[key] = (dataset, mos)
        return self._test_cache[key]

    def _evaluate(self, model) -> dict[str, float]:
        from facekd.quality.metrics import quality_metrics
        from facekd.quality.pseudo import predict

        dataset, mos = self._test_set(model)
        predicted = predict(model, dataset, batch_size=self.config.eval_batch_size)
        self._last_test = TestPredictions([str(path) for path in dataset.paths], mos, predicted)
        return quality_metrics(predicted, mos)

    def _train_stage(self, name: str, choice: ModelChoice, teacher: bool, pseudo: Sequence[str],
                     folder: Path | None = None):
        from facekd.engine import Trainer, derive_seed, seed_everything
        from facekd.losses.quality import QualityLoss
        from facekd.models import build_model
        from facekd.models.artifact import save_model
        from facekd.quality.data import QualityDataset

        train_cfg = self.config.teacher_train if teacher else self.config.student_train
        seed_everything(derive_seed(train_cfg.seed, STAGES.index(name) if name in STAGES else len(STAGES)))
        role = "teacher" if teacher else "student"
        try:  # initial weights: a function of (seed, stage) alone, whatever ran before in this process
            model = build_model(choice.arch, input_size=choice.input_size, **choice.options)
        except FacekdError as error:
            raise ConfigError(f"{role}: {error}") from None
        if choice.init is not None:
            _initialise_from(model, choice.init, role)
        samples = self._samples(pseudo)
        dataset = QualityDataset(samples, model.geometry, model.normalization, train=True,
                                 cache=self.config.train_cache, transform=self.config.train_transform,
                                 progress=self.progress)
        if choice.init is None:
            _start_at(model, float(np.average(dataset.mos, weights=dataset.weights)))
        folder = folder or self.out / name
        init_digest = None if choice.init is None else file_digest(choice.init)
        trainer = Trainer(train_cfg, folder / "train", progress=self.progress,
                          extra_config={"stage": name, "model": config_to_dict(choice), "init": init_digest,
                                        "data": self.data_digest,
                                        "pseudo": [self.results[p].output_digest for p in pseudo],
                                        "train_transform": self.config.train_transform})
        self._last_test = None
        result = trainer.fit(model, QualityLoss(weights=self.config.loss.as_dict(),
                                                plcc_form=self.config.loss.plcc_form), dataset, evaluate=self._evaluate)
        metrics = result.metrics  # the trainer always evaluates the final weights: the last predictions are theirs
        # after training: the header check's rejects, then the images that failed to decode when read
        errors = [{"path": str(p), "reason": r} for p, r in dataset.errors]
        path = folder / MODEL_FILE
        save_model(model, path, training_config={"stage": name, "model": config_to_dict(choice),
                                                 "train": config_to_dict(train_cfg),
                                                 "loss": config_to_dict(self.config.loss),
                                                 "train_transform": self.config.train_transform},
                   metrics=metrics)
        outputs = {"model": str(path.relative_to(self.out))}
        if self._last_test is not None:  # on the main process
            self._last_test.write(folder / PREDICTIONS_FILE)
            outputs["predictions"] = str((folder / PREDICTIONS_FILE).relative_to(self.out))
        info = {"test": metrics, "train_images": len(dataset) - len(dataset.failures()), "skipped_images": errors,
                "precision": result.precision, "steps": result.steps, "resumed_from_step": result.resumed_from_step,
                "metrics_log": str(trainer.metrics_path.relative_to(self.out))}
        return outputs, info

    def _pseudo_stage(self, name: str, teacher_stage: str, unlabeled: Path):
        from facekd.models.artifact import load_model
        from facekd.quality.data import QualityDataset, from_csv
        from facekd.quality.metrics import ScaleMap
        from facekd.quality.pseudo import predict, pseudo_label, write_pseudo_labels

        teacher = load_model(self.out / self.results[teacher_stage].outputs["model"])
        labeled = QualityDataset(from_csv(self.config.data.labeled), teacher.geometry, teacher.normalization,
                                 train=False, cache=True, progress=self.progress)
        labeled_mos = np.asarray(labeled.mos, dtype=np.float64)
        raw = predict(teacher, labeled, batch_size=self.config.pseudo.batch_size)
        scale = ScaleMap.fit(raw, labeled_mos)
        samples, errors = pseudo_label(teacher, [unlabeled], scale, batch_size=self.config.pseudo.batch_size,
                                       confidence=self.config.pseudo.confidence,
                                       mos_range=(float(labeled_mos.min()), float(labeled_mos.max())),
                                       progress=self.progress)
        path = self.out / name / PSEUDO_FILE
        write_pseudo_labels(path, samples)
        mos = np.array([s.mos for s in samples])
        info = {"images": len(samples), "skipped_images": [{"path": str(p), "reason": r} for p, r in errors],
                "scale_map": scale.to_dict(), "mos_mean": float(mos.mean()), "mos_std": float(mos.std())}
        return {"labels": str(path.relative_to(self.out))}, info

    # ------------------------------------------------------------------ report

    def report(self) -> QualityReport:
        from facekd.models.artifact import load_model

        rows = {}
        labels = (("t0", "T0"), ("t1", "T1"), ("student", "S"), ("control", "control"), ("teacher", "teacher"))
        for name, label in labels:
            if name not in self.results:
                continue
            stage = self.results[name]
            model = load_model(self.out / stage.outputs["model"])
            files = ResultFiles(model=stage.outputs["model"], predictions=stage.outputs.get("predictions"),
                                metrics=stage.info.get("metrics_log"))
            rows[label] = QualityModelResult(model.arch, model.input_size, stage.info["test"], ModelCost.measure(model),
                                             files)
        limit = (ChallengeLimit.check(rows["S"].cost, CHALLENGE_MAX_GFLOPS, CHALLENGE_MAX_PARAMS)
                 if "S" in rows else None)
        stages = {name: StageSummary(r.skipped, r.outputs, {k: v for k, v in r.info.items() if k != "test"})
                  for name, r in self.results.items()}
        return QualityReport(str(self.out), rows, limit, stages, config_to_dict(self.config))


def _initialise_from(model, path: Path, role: str) -> None:
    """Start `model` from the weights of the facekd model file `path` (same network)."""
    from facekd.models.artifact import load_model

    source = load_model(path)
    if source.arch != model.arch:
        raise ConfigError(f"{role}.init: {path} holds {source.arch}, not the configured {model.arch}")
    try:
        model.load_state_dict(source.state_dict(), strict=True)
    except RuntimeError as error:
        first = " ".join(str(error).splitlines()[:2])
        raise ConfigError(f"{role}.init: {path} does not fit the configured {model.arch} at {model.input_size} "
                          f"with options {model.options}: {first}") from None


def _start_at(model, mean_mos: float) -> None:
    """Start the score at the training set's mean MOS (output bias): the regression then learns
    the ranking from the first step instead of first climbing to the MOS scale."""
    import torch

    last = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias.fill_(mean_mos)


def format_report_table(report: dict[str, Any]):
    """A rich table of the models of a quality report (metrics, size, speed, limit check)."""
    from rich.table import Table

    table = Table(title="Quality pipeline — test set (GFLOPs = multiply-adds)")
    for column in ("Model", "Arch", "Input", "SRCC", "PLCC", "PLCC(log)", "KRCC", "RMSE", "(SRCC+PLCC)/2",
                   "Params M", "GFLOPs", "CPU ms/img"):
        table.add_column(column, justify="left" if column in ("Model", "Arch") else "right", no_wrap=True)
    for label, row in report["models"].items():
        table.add_row(label, row["arch"], str(row["input_size"]), f"{row['srcc']:.4f}", f"{row['plcc']:.4f}",
                      f"{row['plcc_logistic']:.4f}", f"{row['krcc']:.4f}", f"{row['rmse']:.4f}", f"{row['score']:.4f}",
                      f"{row['params'] / 1e6:.3f}", f"{row['gflops']:.4f}", f"{row['cpu_ms_per_image']:.2f}")
    limit = report.get("challenge_limit")
    if limit:
        verdict = "within" if limit["within"] else "OUTSIDE"
        table.caption = (f"Student {verdict} the challenge limit (≤ {limit['max_gflops']} GFLOPs, "
                         f"≤ {limit['max_params'] / 1e6:g} M params): {limit['gflops']:.3f} G, "
                         f"{limit['params'] / 1e6:.2f} M")
    return table
