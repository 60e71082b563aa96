"""Typed records of finished runs: what each pipeline writes as `report.json` (and each quality
stage as `predictions.csv`, its test predictions), and what `facekd report` reads back.

Reading checks the layout: a missing file or one not in the layout this facekd version writes
raises `ReportFormatError`, naming the file and the reason. Nothing here loads a model.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from facekd.errors import DataError
from facekd.io.atomic import atomic_write_text
from facekd.io.formats import read_text

REPORT_FILE = "report.json"
PREDICTIONS_FILE = "predictions.csv"
QUALITY_METRICS = ("srcc", "plcc", "plcc_logistic", "krcc", "rmse", "rmse_logistic", "score", "n")
_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


class ReportFormatError(DataError):
    """A result file that is missing or not in the layout this facekd version writes."""


def _layout_error(path: os.PathLike | str, detail: str) -> ReportFormatError:
    return ReportFormatError(path, f"does not have the layout this facekd version expects ({detail})")


def _mapping(value: object, key: str, path: os.PathLike | str) -> dict:
    if not isinstance(value, dict):
        raise _layout_error(path, f"{key!r} is a JSON {_JSON_TYPES.get(type(value), 'value')}, not an object")
    return value


def _record(cls, data: object, path: os.PathLike | str, **built):
    """The dataclass `cls` from the keys of `data` named like its fields (`built`: fields made
    already); unknown keys are ignored, a missing required one is a ReportFormatError."""
    data = _mapping(data, cls.__name__, path)
    names = [f.name for f in fields(cls) if f.name not in built]
    missing = [f.name for f in fields(cls) if f.name in names and f.name not in data
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise _layout_error(path, f"missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    return cls(**{name: data[name] for name in names if name in data}, **built)


@dataclass
class ResultFiles:
    """Where a result's files are, relative to the folder of its report.json (None: not written)."""
    model: str | None = None
    predictions: str | None = None  # a quality model's test predictions (predictions.csv)
    metrics: str | None = None  # the trainer's metrics.jsonl
    plot: str | None = None  # roc.png or edc.png
    embeddings: str | None = None  # an IJB run's image embeddings (embeddings.npz)
    scores: str | None = None  # an IJB run's pair scores (scores.npy)
    errors: str | None = None  # the images a job could not use (errors CSV)

    def to_dict(self) -> dict[str, str]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, data: object, path: os.PathLike | str) -> ResultFiles:
        """The files of a report (none named when the report is older than this record)."""
        return cls() if data is None else _record(cls, data, path)

    def locate(self, name: str, report: Path) -> Path:
        """The file `name` (a field) beside `report`; ReportFormatError when the report names
        none or the file is not there."""
        relative = getattr(self, name)
        if relative is None:
            raise ReportFormatError(report, f"names no {name} file (written by an older facekd)")
        path = report.parent / relative
        if not path.is_file():
            raise ReportFormatError(path, "file not found")
        return path


@dataclass
class ModelCost:
    """Size and speed of a model: parameters, GFLOPs (multiply-adds) and CPU ms per image at batch 1."""
    params: int
    gflops: float
    cpu_ms_per_image: float

    @classmethod
    def measure(cls, model) -> ModelCost:
        from facekd.models.cost import count_flops, count_params, measure_latency

        timing = measure_latency(model, model.input_size, batch=1, warmup=2, min_time_s=0.3, max_time_s=1.5)
        return cls(count_params(model), count_flops(model, model.input_size) / 1e9, timing["median_ms"])


# ----------------------------------------------------------------------------- quality


@dataclass
class QualityModelResult:
    """One model of a quality run: its test metrics (`QUALITY_METRICS`), cost and files."""
    arch: str
    input_size: int
    metrics: dict[str, float]
    cost: ModelCost
    files: ResultFiles

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "input_size": self.input_size, **self.metrics,
                **asdict(self.cost), "files": self.files.to_dict()}

    @classmethod
    def from_dict(cls, data: object, path: os.PathLike | str) -> QualityModelResult:
        data = _mapping(data, "models", path)
        return _record(cls, data, path, metrics={k: data[k] for k in QUALITY_METRICS if k in data},
                       cost=_record(ModelCost, data, path), files=ResultFiles.from_dict(data.get("files"), path))


@dataclass
class ChallengeLimit:
    """The student's size against the VQualA challenge limit."""
    max_gflops: float
    max_params: int
    gflops: float
    params: int
    within: bool

    @classmethod
    def check(cls, cost: ModelCost, max_gflops: float, max_params: int) -> ChallengeLimit:
        return cls(max_gflops, max_params, cost.gflops, cost.params,
                   cost.gflops <= max_gflops and cost.params <= max_params)


@dataclass
class StageSummary:
    """A pipeline stage: skipped (up to date) or ran, its outputs and what it recorded (`info`:
    train_images, steps, skipped_images, images (pseudo-labels), ...)."""
    skipped: bool
    outputs: dict[str, str]
    info: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "outputs": self.outputs, **self.info}

    @classmethod
    def from_dict(cls, data: object, path: os.PathLike | str) -> StageSummary:
        data = _mapping(data, "stages", path)
        return _record(cls, data, path, info={k: v for k, v in data.items() if k not in ("skipped", "outputs")})


@dataclass
class QualityReport:
    """report.json of a quality pipeline run (or of one model trained alone)."""
    pipeline: ClassVar[str] = "quality"
    run_dir: str
    models: dict[str, QualityModelResult]
    challenge_limit: ChallengeLimit | None
    stages: dict[str, StageSummary]
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "run_dir": self.run_dir,
                "models": {label: row.to_dict() for label, row in self.models.items()},
                "challenge_limit": asdict(self.challenge_limit) if self.challenge_limit else None,
                "stages": {name: stage.to_dict() for name, stage in self.stages.items()}, "config": self.config}

    @classmethod
    def from_dict(cls, data: dict, path: os.PathLike | str) -> QualityReport:
        limit = data.get("challenge_limit")
        return _record(cls, data, path,
                       models={label: QualityModelResult.from_dict(row, path)
                               for label, row in _mapping(data.get("models", {}), "models", path).items()},
                       challenge_limit=None if limit is None else _record(ChallengeLimit, limit, path),
                       stages={name: StageSummary.from_dict(stage, path)
                               for name, stage in _mapping(data.get("stages", {}), "stages", path).items()})


@dataclass
class TestPredictions:
    """A quality model's predictions on the test set, the ones its metrics were computed on."""
    __test__: ClassVar[bool] = False  # not a pytest test class
    paths: list[str]
    mos: np.ndarray
    predicted: np.ndarray

    def write(self, path: Path) -> None:
        """Write `path,mos,prediction` rows atomically."""
        text = io.StringIO(newline="")
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(("path", "mos", "prediction"))
        writer.writerows((name, repr(float(mos)), repr(float(pred)))
                         for name, mos, pred in zip(self.paths, self.mos, self.predicted))
        atomic_write_text(path, text.getvalue())

    @classmethod
    def read(cls, path: Path) -> TestPredictions:
        try:
            header, *body = csv.reader(io.StringIO(read_text(path, "predictions file"), newline=""))
            rows = [(name, float(mos), float(pred)) for name, mos, pred in body]
        except (DataError, csv.Error, ValueError) as error:
            raise ReportFormatError(path, error.reason if isinstance(error, DataError)
                                    else f"not a path,mos,prediction CSV ({error})") from None
        if header != ["path", "mos", "prediction"] or not rows:
            raise ReportFormatError(path, "expected the header path,mos,prediction and at least one row")
        names, mos, predicted = zip(*rows)
        return cls(list(names), np.array(mos), np.array(predicted))

    def finite(self) -> TestPredictions:
        """The rows whose prediction is a number (an image that failed to decode scores NaN)."""
        keep = np.isfinite(self.predicted)
        return TestPredictions([p for p, k in zip(self.paths, keep) if k], self.mos[keep], self.predicted[keep])


# ----------------------------------------------------------------------------- recognition and EDC


@dataclass
class RecognitionReport:
    """report.json of `facekd recognition train/distill`; `eval` and `cost` are written on the
    main process only."""
    pipeline: ClassVar[str] = "recognition"
    role: str
    method: str
    run_dir: str
    train_images: int
    identities: int
    skipped_images: list[dict[str, str]]
    steps: int
    precision: str
    resumed_from_step: int | None
    teacher: dict[str, str] | None
    config: dict[str, Any]
    eval: dict[str, dict[str, Any]] | None = None  # set name -> verification report
    cost: ModelCost | None = None
    files: ResultFiles | None = None

    @property
    def arch(self) -> str:
        return str(((self.config.get(self.role) or {}) if self.role in ("teacher", "student") else {}).get("arch", "?"))

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(cost=asdict(self.cost) if self.cost else None, files=self.files.to_dict() if self.files else {})
        return {"pipeline": self.pipeline, **data}

    @classmethod
    def from_dict(cls, data: dict, path: os.PathLike | str) -> RecognitionReport:
        cost = data.get("cost")
        return _record(cls, data, path, cost=None if cost is None else _record(ModelCost, cost, path),
                       eval=_mapping(data.get("eval") or {}, "eval", path),
                       files=ResultFiles.from_dict(data.get("files"), path))


class _FlatRecord:
    """A record whose fields are its report.json keys, with `files` a ResultFiles."""
    pipeline: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"pipeline": self.pipeline, **data, "files": self.files.to_dict() if self.files else {}}

    @classmethod
    def from_dict(cls, data: dict, path: os.PathLike | str):
        return _record(cls, data, path, files=ResultFiles.from_dict(data.get("files"), path))


@dataclass
class EdcReport(_FlatRecord):
    """report.json of `facekd evaluate edc`: an `edc_report` (facekd.evaluation.edc) and where
    its comparisons, models and plot are."""
    pipeline: ClassVar[str] = "edc"
    comparisons: int
    genuine: int
    impostor: int
    threshold: float
    threshold_rule: str
    fmr_target: float | None
    fnmr_target: float | None
    fmr: float | None
    start_fnmr: float
    limits: list[float]
    seed: int
    qualities: dict[str, dict[str, Any]]  # name -> curve entry (discard, fnmr, pauc)
    random: dict[str, Any]
    theoretical_best: dict[str, Any]
    recognizer: str
    quality_models: dict[str, str]
    comparisons_source: str
    skipped_images: list[dict[str, str]]
    skipped_comparisons: int
    files: ResultFiles | None = None

    def curves(self) -> dict[str, dict[str, Any]]:
        """Every curve entry by name: the quality models, then random and theoretical best."""
        return {**self.qualities, "random": self.random, "theoretical best": self.theoretical_best}


@dataclass
class IjbReport(_FlatRecord):
    """report.json of `facekd recognition eval --ijb`: IJB-B/C 1:1 template verification
    (facekd.recognition.ijb); `tpr_at_fpr` by facekd's rule, `tpr_at_fpr_nearest` as eval_ijbc.py."""
    pipeline: ClassVar[str] = "ijb"
    target: str
    root: str
    model: str | None
    mode: str
    options: dict[str, bool]
    images: int
    templates: int
    pairs: int
    scored_pairs: int
    skipped_pairs: int
    templates_without_images: list[int]
    skipped_images: list[dict[str, str]]
    positives: int
    negatives: int
    auc: float
    eer: float
    tpr_at_fpr: list[dict[str, Any]]
    tpr_at_fpr_nearest: list[dict[str, Any]]
    embedding: dict[str, Any]
    files: ResultFiles | None = None


RESULT_TYPES = {record.pipeline: record for record in (QualityReport, RecognitionReport, EdcReport, IjbReport)}
Result = QualityReport | RecognitionReport | EdcReport | IjbReport


def write_result(result: Result, folder: Path) -> dict[str, Any]:
    """Write `result` as folder/report.json atomically; returns what was written."""
    data = json.loads(json.dumps(result.to_dict(), default=str))
    atomic_write_text(folder / REPORT_FILE, json.dumps(data, indent=2) + "\n")
    return data


def read_report_json(path: Path) -> dict[str, Any]:
    """The JSON object of a report.json; DataError when it is not readable JSON or not an object."""
    try:
        report = json.loads(read_text(path, "report.json"))
    except json.JSONDecodeError as error:
        raise DataError(path, f"not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    if not isinstance(report, dict):
        kind = _JSON_TYPES.get(type(report), type(report).__name__)
        raise DataError(path, f"not a facekd report: a JSON {kind}, expected an object")
    return report


def result_from_dict(data: dict[str, Any], path: Path) -> Result:
    """The record of a report.json's object (its "pipeline" one of `RESULT_TYPES`)."""
    kind = RESULT_TYPES.get(data.get("pipeline"))
    if kind is None:
        raise ReportFormatError(path, f"pipeline {data.get('pipeline')!r} is not one of {', '.join(RESULT_TYPES)}")
    return kind.from_dict(data, path)
