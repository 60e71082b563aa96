"""`facekd report RUN_DIR`: one self-contained static HTML page for a facekd run folder.

Every `report.json` in RUN_DIR and below (at most three folders deep, hidden folders skipped)
becomes one section, chosen by its "pipeline" key:

- "quality": models table, stages, training curves, predicted vs true MOS on the test set and
  a gallery of test images ordered by the student's predicted quality (worst to best);
- "recognition": summary, verification table per evaluation set, training curves, ROC plot;
  several recognition runs also get a comparison table;
- "edc": pAUC table per curve and limit, EDC plot;
- "ijb": IJB-B/C facts, TPR at FPR by both rules (eval_ijbc.py's nearest point, facekd's), ROC plot;
- anything else: a section that says the pipeline is not known.

The page is drawn from the saved results alone (facekd.results: report.json, the quality
stages' predictions.csv, metrics.jsonl, plots); no model is loaded. A file that is missing or in
an older layout becomes a note naming it. The page needs nothing else: CSS is inline, plots are
PNG and thumbnails JPEG data URIs, no URL is loaded and no script runs. Every text taken from a
report is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from facekd.checks import whole_number
from facekd.errors import DataError, FacekdError
from facekd.plots import png_bytes
from facekd.progress import Progress
from facekd.results import (REPORT_FILE, RESULT_TYPES, EdcReport, IjbReport, QualityReport, RecognitionReport,
                            ReportFormatError, TestPredictions, read_report_json, result_from_dict)

PathLike = str | os.PathLike

HTML_FILE = "report.html"
MAX_DEPTH = 3
THUMB_PX = 96
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PIPELINE_ORDER = {"quality": 0, "recognition": 1, "ijb": 2, "edc": 3}
_RECOGNITION_CURVES = ("loss", "margin_loss", "distill")
_NUMBER = re.compile(r"[-+−]?(\d[\d,]*(\.\d*)?|\.\d+)([eE][-+]?\d+)?%?|n/a")


# ----------------------------------------------------------------------------- public API


def find_reports(run_dir: PathLike, max_depth: int = MAX_DEPTH) -> list[Path]:
    """Every `report.json` in `run_dir` and its sub-folders down to `max_depth` levels (hidden
    folders and symlinked folders skipped), each folder's own file before its sub-folders'."""
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            return
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.name == REPORT_FILE and entry.is_file():
                found.append(Path(entry.path))
            elif depth < max_depth and entry.is_dir(follow_symlinks=False):
                subfolders.append(Path(entry.path))
        for subfolder in subfolders:
            walk(subfolder, depth + 1)

    walk(Path(run_dir), 0)
    return found


def render_report(run_dir: PathLike, *, gallery: int = 48, progress: Progress | None = None) -> str:
    """The HTML page of `run_dir` as a string (see the module docstring)."""
    gallery = whole_number(gallery, "gallery:", 0, note=" (0: no thumbnails)")
    progress = progress or Progress()
    root = Path(run_dir)
    if not root.exists():
        raise DataError(root, "run folder not found")
    if not root.is_dir():
        raise DataError(root, "not a folder; give a facekd run folder")
    paths = find_reports(root)
    if not paths:
        raise DataError(root, f"no facekd {REPORT_FILE} found in this folder or up to {MAX_DEPTH} "
                              "folders below it; give a quality, recognition or EDC run folder")
    reports = [(path, read_report_json(path)) for path in paths]
    reports.sort(key=lambda item: _PIPELINE_ORDER.get(str(item[1].get("pipeline")), len(_PIPELINE_ORDER)))

    sections: list[_Section] = []
    recognition: list[tuple[Path, RecognitionReport]] = []
    last_recognition = 0
    titles = {"quality": "Quality run", "recognition": "Recognition run", "edc": "EDC", "ijb": "IJB verification"}
    for path, data in reports:
        pipeline = data.get("pipeline")
        where = _where(root, path)
        progress.log(f"report: {where} ({pipeline})")
        if pipeline not in RESULT_TYPES:
            sections.append(_Section(f"Unknown report — {where}", _unknown_section(path, data)))
            continue
        title = f"{titles[pipeline]} — {where}"
        try:
            result = result_from_dict(data, path)
        except ReportFormatError as error:
            sections.append(_Section(title, _format_note(error)))
            continue
        if isinstance(result, QualityReport):
            sections.append(_guarded(title, lambda: _quality_section(path, result, gallery, progress)))
        elif isinstance(result, RecognitionReport):
            recognition.append((path, result))
            sections.append(_guarded(title, lambda: _recognition_section(path, result)))
            last_recognition = len(sections)
        elif isinstance(result, IjbReport):
            sections.append(_guarded(title, lambda: _ijb_section(path, result)))
        else:
            sections.append(_guarded(title, lambda: _edc_section(path, result)))
    if len(recognition) >= 2:
        sections.insert(last_recognition, _Section("Recognition runs compared", _recognition_comparison(recognition)))
    return _page(root, sections, len(reports))


def write_report(run_dir: PathLike, out: PathLike | None = None, *, gallery: int = 48,
                 progress: Progress | None = None) -> Path:
    """Write the HTML page of `run_dir` to `out` (default RUN_DIR/report.html) atomically and
    return its path. Raises DataError when the folder holds no facekd report.json or one of
    them is not a JSON object; `gallery` (>= 0) is the number of test thumbnails per quality run."""
    from facekd.io.atomic import atomic_write_text

    text = render_report(run_dir, gallery=gallery, progress=progress)
    target = Path(out) if out is not None else Path(run_dir) / HTML_FILE
    atomic_write_text(target, text)
    return target


# ----------------------------------------------------------------------------- reading


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a trainer's metrics.jsonl; lines that do not parse (a run killed while
    writing) are left out."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise ReportFormatError(path, f"cannot be read: {error.strerror or error}") from None
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _series(records: Iterable[Mapping[str, Any]], event: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` in the records of one event kind, finite numbers only."""
    steps, values = [], []
    for record in records:
        if record.get("event") != event:
            continue
        step, value = _as_float(record.get("step")), _as_float(record.get(key))
        if step is not None and value is not None:
            steps.append(step)
            values.append(value)
    return np.asarray(steps), np.asarray(values)


def _png_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ReportFormatError(path, f"cannot be read: {error.strerror or error}") from None
    if not data.startswith(PNG_SIGNATURE):
        raise ReportFormatError(path, "not a PNG file")
    return data


def _where(root: Path, path: Path) -> str:
    folder = path.parent.relative_to(root).as_posix()
    return (root.resolve().name or str(root)) if folder == "." else folder


# ----------------------------------------------------------------------------- formatting


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _as_float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _fmt(value: object, spec: str = ".4f", scale: float = 1.0) -> str:
    """A number formatted with `spec` (after dividing by `scale`); "n/a" for None or NaN."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    number = float(value)
    if math.isnan(number):
        return "n/a"
    if spec.endswith("d"):
        return format(round(number / scale), spec)
    return format(number / scale, spec)


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], text_columns: int = 1,
           caption: str | None = None) -> str:
    """An HTML table; the first `text_columns` columns are left-aligned text, the rest
    right-aligned numbers."""
    head = "".join(f'<th{" class=num" if i >= text_columns else ""} scope="col">{_e(h)}</th>'
                   for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = "".join(f'<td{" class=num" if i >= text_columns else ""}>{_e(cell)}</td>' for i, cell in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    caption_html = f"<caption>{_e(caption)}</caption>" if caption else ""
    return (f'<div class="scroll"><table>{caption_html}<thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _facts(pairs: Iterable[tuple[str, object]]) -> str:
    """A two-column table of named values; numbers are right-aligned."""
    rows = []
    for name, value in pairs:
        text = str(value)
        css = " class=num" if _NUMBER.fullmatch(text) else ""
        rows.append(f'<tr><th scope="row">{_e(name)}</th><td{css}>{_e(text)}</td></tr>')
    return f'<div class="scroll"><table class="facts"><tbody>{"".join(rows)}</tbody></table></div>'


def _note(text: str, kind: str = "note") -> str:
    return f'<p class="{kind}">{_e(text)}</p>'


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _img(data: bytes, mime: str, alt: str, css: str = "plot", extra: str = "") -> str:
    return f'<img class="{css}" src="{_data_uri(data, mime)}" alt="{_e(alt)}"{extra}>'


def _figure(width: float, height: float):
    from facekd.plots import new_figure

    return new_figure(width, height, layout="constrained")


def _step_axis(axes) -> None:
    """Label the x axis "step", with whole-number ticks."""
    from matplotlib.ticker import MaxNLocator

    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _jpeg_bytes(image_rgb: np.ndarray, max_side: int = THUMB_PX) -> tuple[bytes, int, int]:
    """JPEG of an RGB uint8 image shrunk to at most `max_side` pixels a side: (bytes, w, h)."""
    import cv2

    height, width = image_rgb.shape[:2]
    factor = min(1.0, max_side / max(height, width))
    if factor < 1.0:
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        image_rgb = cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 88])
    if not ok:
        raise FacekdError("could not encode a thumbnail as JPEG")
    return encoded.tobytes(), image_rgb.shape[1], image_rgb.shape[0]


# ----------------------------------------------------------------------------- sections


@dataclass
class _Section:
    title: str
    body: str


def _format_note(error: ReportFormatError, consequence: str = "it is left out") -> str:
    return _note(f"{error}; {consequence}.", "warning")


def _guarded(title: str, render: Callable[[], str]) -> _Section:
    """A section, or one saying which result file it could not use and why (a missing file or
    an older layout): one bad report spoils no other. Any other error is a bug and propagates."""
    try:
        return _Section(title, render())
    except ReportFormatError as error:
        return _Section(title, _format_note(error))


def _part(render: Callable[[], str], consequence: str) -> str:
    """A part of a section, or a note naming the result file it could not use."""
    try:
        return render()
    except ReportFormatError as error:
        return _format_note(error, consequence)


def _unknown_section(path: Path, report: Mapping[str, Any]) -> str:
    pipeline = report.get("pipeline")
    what = ("has no \"pipeline\" key" if pipeline is None
            else f"is from pipeline {pipeline!r}, which this facekd version does not render")
    keys = ", ".join(map(str, report)) or "none"
    return _note(f"{path} {what}.", "warning") + _facts([("Top-level keys", keys)])


# --- quality


def _quality_section(path: Path, report: QualityReport, gallery: int, progress: Progress) -> str:
    parts = [_quality_models_table(report)]
    if report.stages:
        parts.append("<h3>Stages</h3>")
        rows = []
        for name, stage in report.stages.items():
            info = stage.info
            rows.append((name, "skipped (up to date)" if stage.skipped else "ran",
                         *[_fmt(info.get(key), "d") if info.get(key) is not None else ""
                           for key in ("train_images", "images", "steps")],
                         _fmt(len(info.get("skipped_images") or []), "d")))
        parts.append(_table(["Stage", "Status", "Training images", "Pseudo-labels", "Steps", "Unreadable files"],
                            rows, text_columns=2))

    parts.append("<h3>Training curves</h3>")
    curves, notes = {}, []
    for label, row in report.models.items():
        try:
            curves[label] = _read_metrics(row.files.locate("metrics", path))
        except ReportFormatError as error:
            notes.append(_format_note(error, f"no training curves of {label}"))
    parts += notes
    parts.append(_quality_curves(curves))

    parts.append("<h3>Test set: predicted vs true MOS</h3>")
    predictions = {}
    for label, row in report.models.items():
        try:
            predictions[label] = TestPredictions.read(row.files.locate("predictions", path)).finite()
        except ReportFormatError as error:
            parts.append(_format_note(error, f"{label} is left out of the plots"))
    if predictions:
        parts.append(_quality_scatter(predictions, report))
        if gallery > 0:
            parts.append(_quality_gallery(path, report, predictions, gallery, progress))
    return "".join(parts)


def _quality_models_table(report: QualityReport) -> str:
    if not report.models:
        return _note("This quality report lists no model.", "warning")
    rows = [(label, row.arch, _fmt(row.input_size, "d"),
             *[_fmt(row.metrics.get(key)) for key in ("srcc", "plcc", "plcc_logistic", "krcc", "rmse", "score")],
             _fmt(row.cost.params, ".3f", 1e6), _fmt(row.cost.gflops), _fmt(row.cost.cpu_ms_per_image, ".2f"))
            for label, row in report.models.items()]
    table = _table(["Model", "Arch", "Input", "SRCC", "PLCC", "PLCC (logistic)", "KRCC", "RMSE", "(SRCC+PLCC)/2",
                    "Params M", "GFLOPs", "CPU ms/img"], rows, text_columns=2,
                   caption="Test set metrics, size and speed (GFLOPs = multiply-adds, CPU latency at batch 1)")
    limit = report.challenge_limit
    if limit:
        text = (f"Student {'within' if limit.within else 'OUTSIDE'} the challenge limit "
                f"(≤ {_fmt(limit.max_gflops, 'g')} GFLOPs, ≤ {_fmt(limit.max_params, 'g', 1e6)} M params): "
                f"{_fmt(limit.gflops, '.4f')} GFLOPs, {_fmt(limit.params, '.3f', 1e6)} M params.")
        table += _note(text, "ok" if limit.within else "warning")
    return table


def _quality_curves(curves: Mapping[str, list[dict[str, Any]]]) -> str:
    panels = []
    for title, ylabel, event, key in (("Training loss", "loss", "train", "loss"),
                                      ("Test SRCC at evaluation", "SRCC", "eval", "srcc")):
        lines = {label: _series(records, event, key) for label, records in curves.items()}
        lines = {label: line for label, line in lines.items() if len(line[0])}
        if lines:
            panels.append((title, ylabel, lines))
    if not panels:
        return _note("No training metrics were logged.")
    figure = _figure(5.5 * len(panels) + 0.3, 3.6)
    for axes, (title, ylabel, lines) in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels):
        for label, (steps, values) in lines.items():
            axes.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=label)
        axes.set_title(title)
        _step_axis(axes)
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    alt = " and ".join(title.lower() for title, _, _ in panels) + " against step"
    return _img(png_bytes(figure), "image/png", alt)


def _quality_scatter(predictions: Mapping[str, TestPredictions], report: QualityReport) -> str:
    count = len(predictions)
    columns = min(count, 4)
    rows = math.ceil(count / columns)
    figure = _figure(3.0 * columns + 0.4, 2.9 * rows)
    grid = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for axes, (label, result) in zip(grid, predictions.items()):
        axes.scatter(result.mos, result.predicted, s=14, alpha=0.75, edgecolors="none")
        low = float(min(result.mos.min(), result.predicted.min()))
        high = float(max(result.mos.max(), result.predicted.max()))
        axes.plot([low, high], [low, high], color="0.6", linestyle="--", linewidth=1)
        axes.set_title(f"{label}: SRCC {_fmt(report.models[label].metrics.get('srcc'))}, n={len(result.mos)}",
                       fontsize=10)
        axes.set_xlabel("true MOS")
        axes.set_ylabel("predicted")
        axes.grid(alpha=0.3)
    for axes in grid[count:]:
        axes.set_visible(False)
    return _img(png_bytes(figure), "image/png", "predicted against true MOS for each model")


def _spread(count: int, wanted: int) -> np.ndarray:
    """`min(count, wanted)` distinct indices into range(count), evenly spread, first and last included."""
    if wanted >= count:
        return np.arange(count)
    if wanted == 1:
        return np.array([0])
    return np.round(np.linspace(0, count - 1, wanted)).astype(np.int64)


def _quality_gallery(path: Path, report: QualityReport, predictions: Mapping[str, TestPredictions], gallery: int,
                     progress: Progress) -> str:
    """Thumbnails of the test images listed in the student's (else the last model's) predictions,
    evenly spread from the worst predicted to the best."""
    from facekd.io.decode import load_images

    label = "S" if "S" in predictions else list(predictions)[-1]
    result = predictions[label]
    order = np.argsort(result.predicted, kind="stable")  # worst (lowest predicted MOS) first
    ranks = _spread(len(order), gallery)
    picks = order[ranks]
    files = [Path(result.paths[i]) if Path(result.paths[i]).is_absolute() else path.parent / result.paths[i]
             for i in picks]
    images, kept, errors = load_images(files, report.models[label].input_size, progress)
    cells = []
    for image, at in zip(images, kept):
        rank, index = ranks[at], picks[at]
        jpeg, width, height = _jpeg_bytes(image)
        caption = f"{_e(f'pred {result.predicted[index]:.3f}')}<br>{_e(f'MOS {result.mos[index]:.3f}')}"
        alt = f"{files[at].name} ({rank + 1} of {len(order)})"
        cells.append(f'<figure>{_img(jpeg, "image/jpeg", alt, "thumb", f" width={width} height={height}")}'
                     f'<figcaption>{caption}</figcaption></figure>')
    heading = (f"Test images by {label}'s predicted quality, worst to best "
               f"({len(picks)} of {len(order)}{', evenly spread' if len(picks) < len(order) else ''})")
    notes = (_note(f"{len(errors)} of the {len(picks)} test images shown could not be read (e.g. {errors[0][0]}: "
                   f"{errors[0][1]}) and are left out.", "warning") if errors else "")
    return f'<h3>{_e(heading)}</h3>{notes}<div class="gallery">{"".join(cells)}</div>'


# --- recognition


def _recognition_section(path: Path, report: RecognitionReport) -> str:
    cost, teacher = report.cost, report.teacher
    facts = [("Role", report.role), ("Architecture", report.arch), ("Distillation", report.method)]
    if teacher:
        facts.append(("Teacher", f"{teacher.get('arch', '?')} ({teacher.get('path', '?')})"))
    facts += [("Training steps", _fmt(report.steps, "d")), ("Training images", _fmt(report.train_images, "d")),
              ("Identities", _fmt(report.identities, "d")),
              ("Unreadable training images", _fmt(len(report.skipped_images), "d")), ("Precision", report.precision),
              ("Params (M)", _fmt(cost and cost.params, ".3f", 1e6)), ("GFLOPs", _fmt(cost and cost.gflops)),
              ("CPU ms/img", _fmt(cost and cost.cpu_ms_per_image, ".2f"))]
    parts = [_facts(facts)]

    parts.append("<h3>Verification</h3>")
    if not report.eval:
        parts.append(_note("No evaluation set was given to this run."))
    else:
        rows = [(name, _fmt(res.get("pairs"), "d"), _fmt(res.get("positives"), "d"), _fmt(res.get("negatives"), "d"),
                 _fmt(res.get("accuracy")), _fmt(res.get("accuracy_std")), _fmt(res.get("auc")), _fmt(res.get("eer")))
                for name, res in report.eval.items()]
        parts.append(_table(["Set", "Pairs", "Positives", "Negatives", "Accuracy (10-fold)", "± std", "AUC", "EER"],
                            rows))
        tables = []
        for name, res in report.eval.items():
            tpr_rows = [(f"{entry['fpr_level']:.0e}",
                         _fmt(entry.get("tpr") if entry.get("supported") else None),
                         _fmt(entry.get("threshold") if entry.get("supported") else None),
                         _fmt(entry.get("achieved_fpr") if entry.get("supported") else None, ".2e"),
                         _fmt(entry.get("false_accepts"), "d"))
                        for entry in res.get("tpr_at_fpr") or []]
            tables.append(_table(["FPR level", "TPR", "Threshold", "Achieved FPR", "False accepts allowed"], tpr_rows,
                                 caption=f"{name}: TPR at fixed FPR (n/a: too few impostor pairs for the level)"))
        parts.append(f'<div class="side">{"".join(tables)}</div>')

    files = report.files
    parts.append("<h3>Training curves</h3>")
    parts.append(_part(lambda: _recognition_curves(_read_metrics(files.locate("metrics", path))),
                       "no training curves"))
    parts.append("<h3>ROC</h3>")
    parts.append(_part(lambda: _img(_png_file(files.locate("plot", path)), "image/png", "ROC curves", "plot roc"),
                       "no ROC plot"))
    return "".join(parts)


def _recognition_curves(records: list[dict[str, Any]]) -> str:
    series = {key: _series(records, "train", key) for key in _RECOGNITION_CURVES}
    series = {key: value for key, value in series.items() if len(value[0])}
    if not series:
        return _note("No training metrics were logged.")
    figure = _figure(3.7 * len(series) + 0.3, 3.2)
    for axes, (key, (steps, values)) in zip(np.atleast_1d(figure.subplots(1, len(series))), series.items()):
        axes.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3)
        axes.set_title(key.replace("_", " "))
        _step_axis(axes)
        axes.grid(alpha=0.3)
    return _img(png_bytes(figure), "image/png", "training losses against step: " + ", ".join(series))


def _recognition_comparison(runs: Sequence[tuple[Path, RecognitionReport]]) -> str:
    firsts = []
    for path, report in runs:
        name, result = next(iter((report.eval or {}).items()), (None, None))
        firsts.append((path.parent.name, report, name, result or {}))
    levels = sorted({entry["fpr_level"] for *_, result in firsts for entry in result.get("tpr_at_fpr") or []
                     if entry.get("supported")}, reverse=True)
    headers = ["Run", "Role", "Method", "Arch", "Set", *[f"TPR@{level:.0e}" for level in levels], "AUC", "EER",
               "Accuracy", "Params M", "GFLOPs", "CPU ms/img"]
    rows = []
    for label, report, set_name, result in firsts:
        by_level = {entry["fpr_level"]: entry for entry in result.get("tpr_at_fpr") or []}
        tprs = [_fmt(by_level[level].get("tpr")) if level in by_level and by_level[level].get("supported") else "n/a"
                for level in levels]
        cost = report.cost
        rows.append((label, report.role, report.method, report.arch, set_name or "none", *tprs,
                     _fmt(result.get("auc")), _fmt(result.get("eer")), _fmt(result.get("accuracy")),
                     _fmt(cost and cost.params, ".3f", 1e6), _fmt(cost and cost.gflops),
                     _fmt(cost and cost.cpu_ms_per_image, ".2f")))
    return _table(headers, rows, text_columns=5,
                  caption="First evaluation set of each run; TPR columns at the FPR levels some run supports")


# --- EDC


def _ijb_section(path: Path, report: IjbReport) -> str:
    lost = report.templates_without_images
    switches = ", ".join(f"{name} {'on' if on else 'off'}" for name, on in report.options.items())
    facts = [("Set", f"{report.target} ({report.root})"), ("Model", report.model or "?"),
             ("Setting", f"{report.mode}: {switches}"),
             ("Images", _fmt(report.images, "d")), ("Templates", _fmt(report.templates, "d")),
             ("Pairs scored", f"{_fmt(report.scored_pairs, 'd')} of {_fmt(report.pairs, 'd')}"),
             ("Positives / negatives", f"{_fmt(report.positives, 'd')} / {_fmt(report.negatives, 'd')}"),
             ("AUC", _fmt(report.auc)), ("EER", _fmt(report.eer)),
             ("Unusable images", _fmt(len(report.skipped_images), "d")),
             ("Templates without images", _fmt(len(lost), "d") + (f" (e.g. {', '.join(map(str, lost[:5]))})"
                                                                  if lost else ""))]
    rows = [(f"{nearest['fpr_level']:.0e}", _fmt(nearest.get("tpr")), _fmt(nearest.get("fpr"), ".2e"),
             _fmt(strict.get("tpr") if strict.get("supported") else None),
             _fmt(strict.get("achieved_fpr") if strict.get("supported") else None, ".2e"))
            for nearest, strict in zip(report.tpr_at_fpr_nearest, report.tpr_at_fpr)]
    parts = [_facts(facts), "<h3>TPR at FPR</h3>",
             _table(["FPR level", "TPR (nearest point)", "its FPR", "TPR (FPR at most the level)", "achieved FPR"],
                    rows, caption="nearest point: the ROC point nearest the level, as eval_ijbc.py tabulates it; "
                                  "at most the level: facekd's rule (n/a: too few impostor pairs)"),
             "<h3>ROC</h3>",
             _part(lambda: _img(_png_file(report.files.locate("plot", path)), "image/png", "ROC curve", "plot roc"),
                   "no ROC plot")]
    return "".join(parts)


def _edc_section(path: Path, report: EdcReport) -> str:
    rule = report.threshold_rule
    target = (f"FMR {_fmt(report.fmr_target, 'g')}" if rule == "fmr"
              else f"FNMR {_fmt(report.fnmr_target, 'g')}" if rule == "start_fnmr" else str(rule))
    facts = [("Recognizer", report.recognizer),
             *[(f"Quality model “{name}”", model) for name, model in report.quality_models.items()],
             ("Comparisons", _fmt(report.comparisons, "d")), ("Genuine", _fmt(report.genuine, "d")),
             ("Impostor", _fmt(report.impostor, "d")), ("Threshold set at", target),
             ("Threshold", _fmt(report.threshold)), ("Achieved FMR", _fmt(report.fmr, ".2e")),
             ("Starting FNMR", _fmt(report.start_fnmr)),
             ("Unreadable images", _fmt(len(report.skipped_images), "d"))]
    parts = [_facts(facts), "<h3>Partial area under the EDC (lower is better)</h3>"]
    limits = [float(limit) for limit in report.limits]
    headers = ["Curve"]
    for limit in limits:
        headers += [f"pAUC @{limit:g}", f"÷ no discard @{limit:g}", f"− best @{limit:g}"]
    rows = []
    for name, entry in report.curves().items():
        cells: list[str] = [name]
        for limit in limits:
            summary = entry["pauc"][str(float(limit))]
            cells += [_fmt(summary.get("pauc")), _fmt(summary.get("relative_to_start"), ".3f"),
                      _fmt(summary.get("minus_best"))]
        rows.append(cells)
    parts.append(_table(headers, rows, caption="÷ no discard: pAUC over the area without discarding "
                                               "(1: no gain); − best: excess over the theoretical best"))
    parts.append(_part(lambda: _img(_png_file(report.files.locate("plot", path)), "image/png",
                                    "error versus discard characteristic", "plot edc"), "no EDC plot"))
    return "".join(parts)


# ----------------------------------------------------------------------------- page

_CSS = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #d9dee7; --band: #f4f6fa; --accent: #2f5fb3; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background: #1f2a44; color: #fff; padding: 22px 32px 18px; }
header h1 { margin: 0 0 6px; font-size: 26px; font-weight: 600; }
header p { margin: 2px 0; color: #c9d3e6; font-size: 14px; }
header code { color: #fff; background: rgba(255,255,255,.1); padding: 1px 5px; border-radius: 3px; }
main, nav { max-width: 1240px; margin: 0 auto; padding: 0 32px; }
nav { padding-top: 18px; }
nav h2 { font-size: 17px; margin: 0 0 6px; }
nav ol { margin: 0; padding-left: 22px; columns: 2; }
nav a { color: var(--accent); text-decoration: none; }
nav a:hover { text-decoration: underline; }
section { border-top: 1px solid var(--line); margin-top: 26px; padding-top: 6px; }
h2 { font-size: 21px; margin: 14px 0 10px; }
h3 { font-size: 16px; margin: 20px 0 8px; color: #2a3550; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13.5px; }
caption { caption-side: bottom; text-align: left; color: var(--muted); font-size: 12.5px; padding-top: 4px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
thead th { background: var(--band); border-bottom: 2px solid #c3cad8; font-weight: 600; }
tbody tr:nth-child(even) { background: #fafbfd; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
table.facts th { font-weight: 500; color: var(--muted); padding-right: 24px; }
table.facts td { white-space: normal; word-break: break-all; }
img.plot { display: block; max-width: 100%; height: auto; margin: 8px 0; border: 1px solid var(--line); }
.side { display: flex; flex-wrap: wrap; gap: 0 28px; align-items: flex-start; }
.gallery { display: flex; flex-wrap: wrap; gap: 8px; }
.gallery figure { margin: 0; width: 112px; text-align: center; }
.gallery img { display: block; margin: 0 auto; border-radius: 3px; background: var(--band); }
.gallery figcaption { font-size: 11px; color: var(--muted); line-height: 1.3; margin-top: 2px;
                      font-variant-numeric: tabular-nums; }
p.note { color: var(--muted); }
p.warning { background: #fff6e0; border-left: 4px solid #e0a100; padding: 6px 10px; }
p.ok { background: #eaf7ee; border-left: 4px solid #2e9b4f; padding: 6px 10px; }
footer { max-width: 1240px; margin: 30px auto 24px; padding: 0 32px; color: var(--muted); font-size: 12.5px; }
"""


def _page(root: Path, sections: Sequence[_Section], report_count: int) -> str:
    from facekd.version import __version__

    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    location = str(root.resolve())
    toc = "".join(f'<li><a href="#section-{i}">{_e(section.title)}</a></li>'
                  for i, section in enumerate(sections, start=1))
    body = "".join(f'<section id="section-{i}"><h2>{_e(section.title)}</h2>{section.body}</section>'
                   for i, section in enumerate(sections, start=1))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>facekd report — {_e(root.resolve().name or location)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<header><h1>facekd report — {_e(root.resolve().name or location)}</h1>"
        f"<p>Run folder <code>{_e(location)}</code></p>"
        f"<p>Generated {_e(now)} by facekd {_e(__version__)} from {report_count} report.json "
        f"file{'s' if report_count != 1 else ''}</p></header>"
        f'<nav aria-label="Contents"><h2>Contents</h2><ol>{toc}</ol></nav>'
        f"<main>{body}</main>"
        "<footer>Static page: every plot and image is embedded; nothing is loaded from elsewhere.</footer>"
        "</body></html>\n"
    )
