"""`facekd report RUN_DIR`: one self-contained static HTML page for a facekd run folder.

Every `report.json` in RUN_DIR and below (at most three folders deep, hidden folders skipped)
becomes one section, chosen by its "pipeline" key:

- "quality": models table, stages, training curves, predicted vs true MOS on the test set and
  a gallery of test images ordered by the student's predicted quality (worst to best);
- "recognition": summary, verification table per evaluation set, training curves, ROC plot;
  several recognition runs also get a comparison table;
- "edc": pAUC table per curve and limit, EDC plot;
- anything else: a section that says the pipeline is not known.

The page needs nothing else: CSS is inline, plots are PNG and thumbnails JPEG data URIs, no
URL is loaded and no script runs. Every text taken from a report is HTML-escaped.
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

from facekd.errors import ConfigError, DataError, FacekdError
from facekd.plots import png_bytes
from facekd.progress import Progress

PathLike = str | os.PathLike

REPORT_FILE = "report.json"
HTML_FILE = "report.html"
MAX_DEPTH = 3
THUMB_PX = 96
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PIPELINE_ORDER = {"quality": 0, "recognition": 1, "edc": 2}
# quality report label -> stage folder (pipeline runs; `train_single` uses "teacher"/"student")
_QUALITY_STAGE = {"T0": "t0", "T1": "t1", "S": "student", "control": "control", "teacher": "teacher",
                  "student": "student"}
_RECOGNITION_CURVES = ("loss", "margin_loss", "distill")
_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
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
    gallery = _check_gallery(gallery)
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
    reports = [(path, _load_report(path)) for path in paths]
    reports.sort(key=lambda item: _PIPELINE_ORDER.get(str(item[1].get("pipeline")), len(_PIPELINE_ORDER)))

    sections: list[_Section] = []
    recognition: list[tuple[Path, dict[str, Any]]] = []
    last_recognition = 0
    for path, report in reports:
        pipeline = report.get("pipeline")
        where = _where(root, path)
        progress.log(f"report: {where} ({pipeline})")
        if pipeline == "quality":
            sections.append(_guarded(path, f"Quality run — {where}",
                                     lambda: _quality_section(path, report, gallery, progress)))
        elif pipeline == "recognition":
            recognition.append((path, report))
            sections.append(_guarded(path, f"Recognition run — {where}", lambda: _recognition_section(path, report)))
            last_recognition = len(sections)
        elif pipeline == "edc":
            sections.append(_guarded(path, f"EDC — {where}", lambda: _edc_section(path, report)))
        else:
            sections.append(_Section(f"Unknown report — {where}", _unknown_section(path, report)))
    if len(recognition) >= 2:
        sections.insert(last_recognition, _guarded(root, "Recognition runs compared",
                                                   lambda: _recognition_comparison(recognition)))
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


def _check_gallery(gallery: object) -> int:
    if isinstance(gallery, bool) or not isinstance(gallery, (int, np.integer)) or int(gallery) < 0:
        raise ConfigError(f"gallery: must be an integer >= 0 (0: no thumbnails), got {gallery!r}")
    return int(gallery)


def _load_report(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(path, "not UTF-8 text; expected a facekd report.json") from None
    except OSError as error:
        raise DataError(path, f"cannot be read: {error.strerror or error}") from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(path, f"not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    if not isinstance(report, dict):
        kind = _JSON_TYPES.get(type(report), type(report).__name__)
        raise DataError(path, f"not a facekd report: a JSON {kind}, expected an object")
    return report


def _read_metrics(path: Path) -> list[dict[str, Any]] | None:
    """The records of a trainer's metrics.jsonl (None when the file is missing); lines that do
    not parse (a run killed while writing) are left out."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
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


def _png_file(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if data.startswith(PNG_SIGNATURE) else None


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


def _guarded(path: Path, title: str, render: Callable[[], str]) -> _Section:
    """A section, or one saying why it could not be drawn when the report lacks a key or has a
    value of an unexpected type (an older or damaged report): one bad report spoils no other."""
    try:
        return _Section(title, render())
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        detail = f"missing key {error}" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
        return _Section(title, _note(f"{path}: this report.json does not have the layout this facekd version "
                                     f"expects ({detail}); it is left out.", "warning"))


def _unknown_section(path: Path, report: Mapping[str, Any]) -> str:
    pipeline = report.get("pipeline")
    what = ("has no \"pipeline\" key" if pipeline is None
            else f"is from pipeline {pipeline!r}, which this facekd version does not render")
    keys = ", ".join(map(str, report)) or "none"
    return _note(f"{path} {what}.", "warning") + _facts([("Top-level keys", keys)])


# --- quality


def _quality_model_path(run: Path, report: Mapping[str, Any], label: str) -> Path:
    stage = _QUALITY_STAGE.get(label, label.lower())
    stage_info = (report.get("stages") or {}).get(stage) or {}
    relative = (stage_info.get("outputs") or {}).get("model") or f"{stage}/model.safetensors"
    return run / relative


def _quality_section(path: Path, report: Mapping[str, Any], gallery: int, progress: Progress) -> str:
    run = path.parent
    models: Mapping[str, Mapping[str, Any]] = report.get("models") or {}
    parts = [_quality_models_table(report)]
    stages = report.get("stages") or {}
    if stages:
        parts.append("<h3>Stages</h3>")
        rows = []
        for name, stage in stages.items():
            pseudo = stage.get("images")
            rows.append((name, "skipped (up to date)" if stage.get("skipped") else "ran",
                         _fmt(stage.get("train_images"), "d") if stage.get("train_images") is not None else "",
                         _fmt(pseudo, "d") if pseudo is not None else "",
                         _fmt(stage.get("steps"), "d") if stage.get("steps") is not None else "",
                         _fmt(len(stage.get("skipped_images") or []), "d")))
        parts.append(_table(["Stage", "Status", "Training images", "Pseudo-labels", "Steps", "Unreadable files"],
                            rows, text_columns=2))

    parts.append("<h3>Training curves</h3>")
    curves = {label: _read_metrics(_quality_model_path(run, report, label).parent / "train" / "metrics.jsonl")
              for label in models}
    parts.append(_quality_curves(curves))

    parts.append("<h3>Test set: predicted vs true MOS</h3>")
    predictions, notes = _quality_predictions(run, report, progress)
    parts += [_note(text, "warning") for text in notes]
    if predictions:
        parts.append(_quality_scatter(predictions, models))
        if gallery > 0:
            parts.append(_quality_gallery(predictions, gallery))
    return "".join(parts)


def _quality_models_table(report: Mapping[str, Any]) -> str:
    models: Mapping[str, Mapping[str, Any]] = report.get("models") or {}
    if not models:
        return _note("This quality report lists no model.", "warning")
    rows = [(label, row.get("arch", "?"), _fmt(row.get("input_size"), "d"), _fmt(row.get("srcc")),
             _fmt(row.get("plcc")), _fmt(row.get("plcc_logistic")), _fmt(row.get("krcc")), _fmt(row.get("rmse")),
             _fmt(row.get("score")), _fmt(row.get("params"), ".3f", 1e6), _fmt(row.get("gflops")),
             _fmt(row.get("cpu_ms_per_image"), ".2f"))
            for label, row in models.items()]
    table = _table(["Model", "Arch", "Input", "SRCC", "PLCC", "PLCC (logistic)", "KRCC", "RMSE", "(SRCC+PLCC)/2",
                    "Params M", "GFLOPs", "CPU ms/img"], rows, text_columns=2,
                   caption="Test set metrics, size and speed (GFLOPs = multiply-adds, CPU latency at batch 1)")
    limit = report.get("challenge_limit")
    if limit:
        within = bool(limit.get("within"))
        text = (f"Student {'within' if within else 'OUTSIDE'} the challenge limit "
                f"(≤ {_fmt(limit.get('max_gflops'), 'g')} GFLOPs, ≤ {_fmt(limit.get('max_params'), 'g', 1e6)} M params): "
                f"{_fmt(limit.get('gflops'), '.4f')} GFLOPs, {_fmt(limit.get('params'), '.3f', 1e6)} M params.")
        table += _note(text, "ok" if within else "warning")
    return table


def _quality_curves(curves: Mapping[str, list[dict[str, Any]] | None]) -> str:
    missing = [label for label, records in curves.items() if records is None]
    notes = _note(f"No train/metrics.jsonl for: {', '.join(missing)}.", "warning") if missing else ""
    panels = []
    for title, ylabel, event, key in (("Training loss", "loss", "train", "loss"),
                                      ("Test SRCC at evaluation", "SRCC", "eval", "srcc")):
        lines = {label: _series(records or [], event, key) for label, records in curves.items()}
        lines = {label: line for label, line in lines.items() if len(line[0])}
        if lines:
            panels.append((title, ylabel, lines))
    if not panels:
        return notes + _note("No training metrics were logged.")
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
    return notes + _img(png_bytes(figure), "image/png", alt)


@dataclass
class _Predictions:
    predicted: np.ndarray  # (K,) the model's scores of the readable test images
    mos: np.ndarray  # (K,) their true MOS
    images: np.ndarray  # (K, S, S, 3) RGB uint8 at the model's input size
    names: list[str]  # their file names


def _resolve_test_csv(run: Path, value: object) -> Path | None:
    if not value:
        return None
    path = Path(str(value))
    if path.is_file():
        return path
    if not path.is_absolute() and (run / path).is_file():
        return run / path
    return None


def _quality_predictions(run: Path, report: Mapping[str, Any],
                         progress: Progress) -> tuple[dict[str, _Predictions], list[str]]:
    """Each model's predictions on the test set named in the run's config, with notes on what
    could not be done (a missing test set or model file)."""
    from facekd.models.artifact import load_model
    from facekd.io.decode import load_images
    from facekd.quality.data import from_csv
    from facekd.quality.pseudo import predict

    data = (report.get("config") or {}).get("data") or {}
    test = data.get("test") if isinstance(data, Mapping) else None
    csv_path = _resolve_test_csv(run, test)
    if csv_path is None:
        where = f"test set {test} not found" if test else "the run's config names no test set"
        return {}, [f"{where}: no scatter plots or gallery."]
    try:
        samples = from_csv(csv_path)
    except FacekdError as error:
        return {}, [f"test set unusable ({error}): no scatter plots or gallery."]
    if not samples:
        return {}, [f"test set {csv_path} lists no image: no scatter plots or gallery."]
    mos = np.array([sample.mos for sample in samples], dtype=np.float64)
    decoded: dict = {}  # Resize -> load_images result
    predictions: dict[str, _Predictions] = {}
    notes: list[str] = []
    for label in report.get("models") or {}:
        model_path = _quality_model_path(run, report, label)
        try:
            model = load_model(model_path)
        except FacekdError as error:
            notes.append(f"{label}: model file unusable ({error}); it is left out of the plots.")
            continue
        geometry = model.geometry
        if geometry not in decoded:
            decoded[geometry] = load_images([sample.path for sample in samples], geometry, progress)
            if decoded[geometry][2]:
                notes.append(f"{len(decoded[geometry][2])} of {len(samples)} test images could not be read "
                             f"at {geometry.size}px and are left out.")
        images, kept, _ = decoded[geometry]
        if not len(kept):
            notes.append(f"{label}: no readable test image.")
            continue
        predicted = predict(model, images, progress=progress).astype(np.float64)
        predictions[label] = _Predictions(predicted, mos[kept], images,
                                          [Path(samples[i].path).name for i in kept])
    return predictions, notes


def _quality_scatter(predictions: Mapping[str, _Predictions], models: Mapping[str, Mapping[str, Any]]) -> str:
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
        srcc = _fmt((models.get(label) or {}).get("srcc"))
        axes.set_title(f"{label}: SRCC {srcc}, n={len(result.mos)}", fontsize=10)
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


def _quality_gallery(predictions: Mapping[str, _Predictions], gallery: int) -> str:
    label = "S" if "S" in predictions else list(predictions)[-1]
    result = predictions[label]
    order = np.argsort(result.predicted, kind="stable")  # worst (lowest predicted MOS) first
    ranks = _spread(len(order), gallery)
    picks = order[ranks]
    cells = []
    for rank, index in zip(ranks, picks):
        jpeg, width, height = _jpeg_bytes(result.images[index])
        caption = f"{_e(f'pred {result.predicted[index]:.3f}')}<br>{_e(f'MOS {result.mos[index]:.3f}')}"
        alt = f"{result.names[index]} ({rank + 1} of {len(order)})"
        cells.append(f'<figure>{_img(jpeg, "image/jpeg", alt, "thumb", f" width={width} height={height}")}'
                     f'<figcaption>{caption}</figcaption></figure>')
    heading = (f"Test images by {label}'s predicted quality, worst to best "
               f"({len(picks)} of {len(order)}{', evenly spread' if len(picks) < len(order) else ''})")
    return f'<h3>{_e(heading)}</h3><div class="gallery">{"".join(cells)}</div>'


# --- recognition


def _recognition_arch(report: Mapping[str, Any]) -> str:
    role = report.get("role")
    choice = ((report.get("config") or {}).get(role) or {}) if role in ("teacher", "student") else {}
    return str(choice.get("arch", "?"))


def _recognition_section(path: Path, report: Mapping[str, Any]) -> str:
    run = path.parent
    cost = report.get("cost") or {}
    teacher = report.get("teacher") or {}
    facts = [("Role", report.get("role", "?")), ("Architecture", _recognition_arch(report)),
             ("Distillation", report.get("method", "?"))]
    if teacher:
        facts.append(("Teacher", f"{teacher.get('arch', '?')} ({teacher.get('path', '?')})"))
    facts += [("Training steps", _fmt(report.get("steps"), "d")),
              ("Training images", _fmt(report.get("train_images"), "d")), ("Identities", _fmt(report.get("identities"), "d")),
              ("Unreadable training images", _fmt(len(report.get("skipped_images") or []), "d")),
              ("Precision", report.get("precision", "?")),
              ("Params (M)", _fmt(cost.get("params"), ".3f", 1e6)), ("GFLOPs", _fmt(cost.get("gflops"))),
              ("CPU ms/img", _fmt(cost.get("cpu_ms_per_image"), ".2f"))]
    parts = [_facts(facts)]

    evaluation: Mapping[str, Mapping[str, Any]] = report.get("eval") or {}
    parts.append("<h3>Verification</h3>")
    if not evaluation:
        parts.append(_note("No evaluation set was given to this run."))
    else:
        rows = [(name, _fmt(res.get("pairs"), "d"), _fmt(res.get("positives"), "d"), _fmt(res.get("negatives"), "d"),
                 _fmt(res.get("accuracy")), _fmt(res.get("accuracy_std")), _fmt(res.get("auc")), _fmt(res.get("eer")))
                for name, res in evaluation.items()]
        parts.append(_table(["Set", "Pairs", "Positives", "Negatives", "Accuracy (10-fold)", "± std", "AUC", "EER"],
                            rows))
        tables = []
        for name, res in evaluation.items():
            tpr_rows = [(f"{entry['fpr_level']:.0e}",
                         _fmt(entry.get("tpr") if entry.get("supported") else None),
                         _fmt(entry.get("threshold") if entry.get("supported") else None),
                         _fmt(entry.get("achieved_fpr") if entry.get("supported") else None, ".2e"),
                         _fmt(entry.get("false_accepts"), "d"))
                        for entry in res.get("tpr_at_fpr") or []]
            tables.append(_table(["FPR level", "TPR", "Threshold", "Achieved FPR", "False accepts allowed"], tpr_rows,
                                 caption=f"{name}: TPR at fixed FPR (n/a: too few impostor pairs for the level)"))
        parts.append(f'<div class="side">{"".join(tables)}</div>')

    parts.append("<h3>Training curves</h3>")
    records = _read_metrics(run / "train" / "metrics.jsonl")
    parts.append(_note("No train/metrics.jsonl in this run.", "warning") if records is None
                 else _recognition_curves(records))
    parts.append("<h3>ROC</h3>")
    roc = _png_file(run / "roc.png")
    parts.append(_img(roc, "image/png", "ROC curves", "plot roc") if roc
                 else _note("roc.png not found (or not a PNG) in this run.", "warning"))
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


def _recognition_comparison(runs: Sequence[tuple[Path, Mapping[str, Any]]]) -> str:
    firsts = []
    for path, report in runs:
        evaluation = report.get("eval") or {}
        name, result = next(iter(evaluation.items()), (None, None))
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
        cost = report.get("cost") or {}
        rows.append((label, report.get("role", "?"), report.get("method", "?"), _recognition_arch(report),
                     set_name or "none", *tprs, _fmt(result.get("auc")), _fmt(result.get("eer")),
                     _fmt(result.get("accuracy")), _fmt(cost.get("params"), ".3f", 1e6), _fmt(cost.get("gflops")),
                     _fmt(cost.get("cpu_ms_per_image"), ".2f")))
    return _table(headers, rows, text_columns=5,
                  caption="First evaluation set of each run; TPR columns at the FPR levels some run supports")


# --- EDC


def _edc_section(path: Path, report: Mapping[str, Any]) -> str:
    run = path.parent
    rule = report.get("threshold_rule")
    target = (f"FMR {_fmt(report.get('fmr_target'), 'g')}" if rule == "fmr"
              else f"FNMR {_fmt(report.get('fnmr_target'), 'g')}" if rule == "start_fnmr" else str(rule))
    qualities = report.get("quality_models") or {}
    facts = [("Recognizer", report.get("recognizer", "?")),
             *[(f"Quality model “{name}”", model) for name, model in qualities.items()],
             ("Comparisons", _fmt(report.get("comparisons"), "d")), ("Genuine", _fmt(report.get("genuine"), "d")),
             ("Impostor", _fmt(report.get("impostor"), "d")), ("Threshold set at", target),
             ("Threshold", _fmt(report.get("threshold"))), ("Achieved FMR", _fmt(report.get("fmr"), ".2e")),
             ("Starting FNMR", _fmt(report.get("start_fnmr")))]
    if "skipped_images" in report:
        facts.append(("Unreadable images", _fmt(len(report.get("skipped_images") or []), "d")))
    parts = [_facts(facts), "<h3>Partial area under the EDC (lower is better)</h3>"]
    limits = [float(limit) for limit in report["limits"]]
    curves = {**report["qualities"], "random": report["random"], "theoretical best": report["theoretical_best"]}
    headers = ["Curve"]
    for limit in limits:
        headers += [f"pAUC @{limit:g}", f"÷ no discard @{limit:g}", f"− best @{limit:g}"]
    rows = []
    for name, entry in curves.items():
        cells: list[str] = [name]
        for limit in limits:
            summary = entry["pauc"][str(float(limit))]
            cells += [_fmt(summary.get("pauc")), _fmt(summary.get("relative_to_start"), ".3f"),
                      _fmt(summary.get("minus_best"))]
        rows.append(cells)
    parts.append(_table(headers, rows, caption="÷ no discard: pAUC over the area without discarding "
                                               "(1: no gain); − best: excess over the theoretical best"))
    plot = _png_file(run / "edc.png")
    parts.append(_img(plot, "image/png", "error versus discard characteristic", "plot edc") if plot
                 else _note("edc.png not found (or not a PNG) in this folder.", "warning"))
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
    from facekd import __version__

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
