"""Recognition training (`facekd recognition train`) and distillation (`... distill`), both on
the one training engine: margin softmax on the model's embeddings, plus, when distilling,
`weight` × a distillation loss between its embeddings and a frozen teacher's on the same
images.

A run folder holds `model.safetensors` (with its verification metrics), `report.json`,
`roc.png` (when evaluation sets are given) and `train/` (the engine's checkpoint and
metrics.jsonl: a killed run resumes from there when started again with the same settings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from facekd.config import config_to_dict
from facekd.errors import ConfigError, FacekdError
from facekd.progress import Progress
from facekd.recognition.config import RecognitionConfig
from facekd.recognition.teacher_cache import TeacherCache
from facekd.results import ModelCost, RecognitionReport, ResultFiles, write_result

MODEL_FILE = "model.safetensors"
ROC_FILE = "roc.png"


class RecognitionLoss(nn.Module):
    """margin_softmax(model(x), y) + weight · distill(model(x), teacher(x), y); with
    `margin_rows` the margin softmax takes only the batch's last `margin_rows` images (the
    sampler's random part). The teacher may be a `TeacherCache`: its embeddings of the batch's
    images (`sample`, `flip`) are then read instead of computed."""

    def __init__(self, head: nn.Module, teacher: nn.Module | None = None, distill: nn.Module | None = None,
                 weight: float = 1.0, margin_rows: int = 0):
        super().__init__()
        from facekd.engine import freeze

        if (teacher is None) != (distill is None):
            raise ValueError("a teacher and a distillation loss go together")
        self.head = head
        self.teacher = freeze(teacher) if teacher is not None else None
        self.distill = distill
        self.weight = float(weight)
        self.margin_rows = int(margin_rows)

    def trainable_parameters(self):
        return list(self.head.parameters())

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        images, labels = batch["image"], batch["label"]
        embeddings = model(images)
        rows = slice(-self.margin_rows, None) if self.margin_rows else slice(None)
        loss, metrics = self.head(embeddings[rows], labels[rows])
        metrics = {"margin_loss": loss.detach(), **metrics}
        if self.distill is not None:
            with torch.no_grad():
                target = (self.teacher.lookup(batch["sample"], batch["flip"]) if isinstance(self.teacher, TeacherCache)
                          else self.teacher(images))
            distill_loss, distill_metrics = self.distill(embeddings, target, labels)
            metrics.update(distill=distill_loss.detach(), **distill_metrics)
            loss = loss + self.weight * distill_loss
        return loss, metrics


def _build(choice, role: str):
    from facekd.models import build_model

    try:
        model = build_model(choice.arch, input_size=choice.input_size, **choice.options)
    except FacekdError as error:
        raise ConfigError(f"{role}: {error}") from None
    if model.task != "recognition":
        raise ConfigError(f"{role}.arch: {choice.arch!r} is a {model.task} model; recognition needs one of "
                          "`facekd models` with task recognition")
    return model


class OnnxTeacher(nn.Module):
    """A recognizer on ONNX Runtime (CPU) as the frozen teacher: the student's normalised batch
    is turned back into its uint8 pixels, which the predictor embeds as its graph wants them."""

    def __init__(self, predictor, normalization: dict[str, list[float]]):
        super().__init__()
        self.predictor = predictor
        self.task, self.arch, self.input_size = "recognition", predictor.info["arch"], predictor.input_size
        self.register_buffer("mean", torch.tensor(normalization["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(normalization["std"]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images.float() * self.std + self.mean).round().clamp(0, 255).to(torch.uint8)
        raw = self.predictor.raw(pixels.permute(0, 2, 3, 1).cpu().numpy())
        return torch.from_numpy(raw).to(images.device)


def _margin_rows(config: RecognitionConfig, train_cfg) -> int:
    """Images of each process's batch the margin softmax takes (0: all): with `head.images: random`,
    the random part, random_fraction × batch_size of them, last in the batch."""
    if config.head.images == "all":
        return 0
    share = config.sampler.random_fraction * train_cfg.batch_size
    if not config.sampler.images_per_identity or share < 1 or abs(share - round(share)) > 1e-9:
        raise ConfigError(f"head.images: random needs balanced batches (sampler.images_per_identity) whose random "
                          f"part is a whole number of images: random_fraction × batch_size = {share:g}")
    return int(round(share))


def _load_teacher(path: Path, student, convention=None) -> nn.Module:
    """The frozen teacher: a facekd model file, or an `.onnx` recognizer (ONNX Runtime, CPU)."""
    from facekd.inference.predictors import load

    predictor = load(path, convention=convention)
    onnx = path.suffix.lower() == ".onnx"
    teacher = OnnxTeacher(predictor, student.normalization) if onnx else predictor.model
    if teacher.task != "recognition":
        raise ConfigError(f"{path}: the teacher is a {teacher.task} model, not a recognition model")
    if teacher.input_size != student.input_size:
        raise ConfigError(f"{path}: the teacher takes {teacher.input_size}px images, the student "
                          f"{student.input_size}px; distillation feeds both the same images")
    if not onnx and teacher.normalization != student.normalization:  # an ONNX teacher gets its own pixels
        raise ConfigError(f"{path}: the teacher normalises images {teacher.normalization}, the student "
                          f"{student.normalization}; distillation feeds both the same images")
    return teacher


def _cached_teacher(cache_path: Path, teacher_path, convention, config: RecognitionConfig, source,
                    student) -> tuple[TeacherCache, dict[str, Any]]:
    """The teacher cache at `cache_path`, checked against the training set, the student's input
    size, the augmentation and (when one is given) the teacher file; and the run's teacher info."""
    from facekd.inference.conventions import model_fingerprint

    if config.train_transform not in ("flip", "none"):
        raise ConfigError(f"distill.teacher_cache: train_transform {config.train_transform!r} changes pixels beyond "
                          "a flip, and the cache holds the teacher's embeddings of each image and its mirror only; "
                          "use train_transform flip or none, or distil with the live teacher (--teacher alone)")
    cache = TeacherCache(cache_path)
    digest = None if teacher_path is None else model_fingerprint(teacher_path, convention)
    cache.check(source, student.input_size, digest)
    return cache, {"path": cache.index["teacher"]["path"], "digest": cache.teacher_digest, "arch": cache.arch,
                   "cache": str(cache_path)}


def train_recognition(config: RecognitionConfig, out_dir: str | Path, *, role: Literal["teacher", "student"],
                      teacher_path: str | Path | None = None, teacher_convention=None,
                      teacher_cache: str | Path | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Train the config's `role` model; with a teacher (for the student, when the distillation
    method is not `none`) distil it, from the teacher itself or from `teacher_cache` (a cache of
    its embeddings of the training set). Returns the report (also written to out_dir/report.json)."""
    from facekd.engine import Trainer, derive_seed, seed_everything
    from facekd.losses.distill import build_distill_loss
    from facekd.losses.margin import MarginSoftmax
    from facekd.models.artifact import save_model
    from facekd.recognition.data import IdentityBatchSampler, IdentitySource, RecognitionDataset
    from facekd.recognition.evaluation import evaluate_embedder, load_verification_set, summary_metrics

    if config.data is None:
        raise ConfigError("data: missing; give data.train (an identity folder or .rec) and data.eval "
                          "(pairs.txt / .bin / identity folders), e.g. --data DIR --eval DIR2")
    progress = progress or Progress()
    out = Path(out_dir)
    choice = config.teacher if role == "teacher" else config.student
    train_cfg = config.teacher_train if role == "teacher" else config.student_train
    method = config.distill.method if role == "student" else "none"
    seed_everything(derive_seed(train_cfg.seed, 0 if role == "teacher" else 1))
    model = _build(choice, role)

    source = IdentitySource(config.data.train, progress=progress)
    teacher = distill = None
    teacher_info = None
    if method != "none":
        teacher_path = teacher_path or config.distill.teacher
        teacher_cache = teacher_cache or config.distill.teacher_cache
        if teacher_cache is not None:
            teacher, teacher_info = _cached_teacher(Path(teacher_cache), teacher_path, teacher_convention, config,
                                                    source, model)
        elif teacher_path is None:
            raise ConfigError(f"distill.teacher: method {method!r} needs a teacher model (give --teacher MODEL) "
                              "or a cache of its embeddings (--teacher-cache CACHE)")
        else:
            from facekd.inference.conventions import model_fingerprint

            teacher = _load_teacher(Path(teacher_path), model, teacher_convention)
            teacher_info = {"path": str(teacher_path), "digest": model_fingerprint(teacher_path, teacher_convention),
                            "arch": teacher.arch}
        distill = build_distill_loss(method, **config.distill.options)
    elif teacher_cache is not None:
        raise ConfigError("--teacher-cache: the distillation method is none, so no teacher is used")

    cache = {"auto": "auto", "yes": True, "no": False}[config.cache]
    dataset = RecognitionDataset(source, model.input_size, model.normalization, train=True, cache=cache,
                                 progress=progress, transform=config.train_transform)
    head = MarginSoftmax(model.embedding_size, dataset.num_classes, config.head.kind, config.head.scale,
                         config.head.margin)
    loss = RecognitionLoss(head, teacher, distill, config.distill.weight, _margin_rows(config, train_cfg))

    eval_sets = [load_verification_set(path, model.input_size, progress) for path in config.data.eval]

    def evaluate(trained) -> dict[str, float]:
        if not eval_sets:
            return {}
        report, _ = evaluate_embedder(trained, eval_sets[0], config.eval_batch_size, config.eval_flip)
        return summary_metrics(report)

    def balanced_sampler(rank: int, world: int):
        return IdentityBatchSampler(dataset.labels, train_cfg.batch_size, config.sampler.images_per_identity,
                                    random_fraction=config.sampler.random_fraction, seed=train_cfg.seed,
                                    rank=rank, world_size=world, epoch=config.sampler.epoch)

    sampler = balanced_sampler if config.sampler.images_per_identity else None

    settings = {"role": role, "model": config_to_dict(choice), "head": config_to_dict(config.head),
                "sampler": config_to_dict(config.sampler), "train_data": str(config.data.train),
                "train_transform": config.train_transform,
                "distill": {**config_to_dict(config.distill), "method": method, "teacher": teacher_info}}
    trainer = Trainer(train_cfg, out / "train", progress=progress, extra_config=settings)
    result = trainer.fit(model, loss, dataset, evaluate=evaluate, batch_sampler=sampler)
    trainer_metrics = trainer.metrics_path

    from facekd.engine import is_main_process

    report = RecognitionReport(role, method, str(out), len(dataset), dataset.num_classes,
                               [{"path": str(p), "reason": r} for p, r in dataset.errors], result.steps,
                               result.precision, result.resumed_from_step, teacher_info, config_to_dict(config))
    if not is_main_process():
        return report.to_dict()
    report.eval = _final_evaluation(model, eval_sets, config, out, progress)
    report.cost = ModelCost.measure(model.cpu())  # CPU latency, whatever the training device
    report.files = ResultFiles(model=MODEL_FILE, metrics=str(trainer_metrics.relative_to(out)),
                               plot=ROC_FILE if report.eval else None)
    first = next(iter(report.eval.values()), None)
    save_model(model, out / MODEL_FILE, training_config=settings | {"train": config_to_dict(train_cfg)},
               metrics=summary_metrics(first) if first else {})
    return write_result(report, out)


def _final_evaluation(model, eval_sets, config: RecognitionConfig, out: Path, progress: Progress) -> dict:
    from facekd.recognition.evaluation import evaluate_embedder
    from facekd.recognition.metrics import plot_roc, roc_curve

    reports, curves = {}, {}
    for data in eval_sets:
        progress.log(f"evaluating on {data.name} ({data.pairs} pairs)")
        report, (scores, issame) = evaluate_embedder(model, data, config.eval_batch_size, config.eval_flip)
        reports[data.name] = report
        fpr, tpr, _ = roc_curve(scores, issame)
        curves[data.name] = (fpr, tpr)
    if curves:
        plot_roc(curves, out / ROC_FILE, title=f"{model.arch} ROC")
    return reports


def format_recognition_table(rows: dict[str, dict[str, Any]], title: str, levels=(1e-2, 1e-3, 1e-4)):
    """A rich table of recognition results: {label: {"report": verification report, "arch",
    "params", "gflops", "cpu_ms_per_image", "method"}}."""
    from rich.table import Table

    table = Table(title=title)
    columns = ["Model", "Arch", "Method", *[f"TPR@{level:.0e}" for level in levels], "AUC", "EER", "Acc (10-fold)",
               "Params M", "GFLOPs", "CPU ms/img"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("Model", "Arch", "Method") else "right", no_wrap=True)
    for label, row in rows.items():
        report = row["report"]
        by_level = {r["fpr_level"]: r for r in report["tpr_at_fpr"]}
        tprs = [f"{by_level[level]['tpr']:.4f}" if level in by_level and by_level[level]["supported"] else "n/a"
                for level in levels]
        accuracy = "n/a" if report.get("accuracy") is None else f"{report['accuracy']:.4f}"
        table.add_row(label, row["arch"], row.get("method", ""), *tprs, f"{report['auc']:.4f}", f"{report['eer']:.4f}",
                      accuracy, *(f"{row[key] * scale:{spec}}" if row.get(key) is not None else "n/a"
                                  for key, scale, spec in (("params", 1e-6, ".3f"), ("gflops", 1, ".4f"),
                                                           ("cpu_ms_per_image", 1, ".2f"))))
    return table


def report_rows(reports: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Table rows from run reports ({label: report of train_recognition}), first eval set."""
    rows = {}
    for label, report in reports.items():
        evaluation = next(iter(report.get("eval", {}).values()), None)
        if evaluation is None:
            continue
        arch = report["config"]["teacher" if report["role"] == "teacher" else "student"]["arch"]
        rows[label] = {"report": evaluation, "arch": arch, "method": report["method"], **report["cost"]}
    return rows
