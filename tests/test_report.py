"""`facekd report`: one self-contained HTML page for real (tiny) quality, recognition and EDC runs;
its tables hold the reports' numbers, its images decode, it loads nothing from elsewhere, and a
headless Chromium draws it without a console message."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from facekd.cli import main
from facekd.config import load_config
from facekd.errors import ConfigError, DataError
from facekd.evaluation.quality_edc import evaluate_edc
from facekd.evaluation.report import find_reports, render_report, write_report
from facekd.models.artifact import load_model
from facekd.quality.config import QualityRunConfig, data_overrides
from facekd.io.decode import load_images
from facekd.quality.data import from_csv
from facekd.quality.pipeline import QualityPipeline
from facekd.quality.pseudo import predict
from facekd.recognition.train import train_recognition
from facekd.synth import generate_identities, generate_quality
from helpers import tiny_recognition_config as shared_config

TINY = """
teacher: {arch: timm/mobilenetv3_small_100, input_size: 64}
student: {arch: timm/mobilenetv3_small_050, input_size: 64}
teacher_train: {epochs: 1, batch_size: 16, accelerator: cpu, clip_grad_norm: 1.0, log_every_steps: 1}
student_train: {epochs: 1, batch_size: 16, accelerator: cpu, clip_grad_norm: 1.0, log_every_steps: 1}
pseudo: {confidence: flip}
"""
TRAIN = {"epochs": 1, "max_steps": 2, "batch_size": 16, "optimizer": "sgd", "lr": 0.05, "accelerator": "cpu",
         "eval_every_epochs": 0, "log_every_steps": 1}
GALLERY = 10


def tiny_recognition_config(data, **changes):
    return shared_config(data, train=TRAIN, **changes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder laid out like `facekd demo` output: quality/, recognition/{teacher,ekd}/, edc/."""
    root = tmp_path_factory.mktemp("report")
    data = root / "data"
    generate_quality(data / "quality", labeled=40, unlabeled=24, test=16, size=64, workers=0)
    (data / "tiny.yaml").write_text(TINY)
    generate_identities(data / "faces" / "train", identities=6, images_per_identity=6, size=32, workers=0)
    generate_identities(data / "faces" / "test", identities=4, images_per_identity=4, size=32, seed=1, workers=0,
                        pairs=20)
    generate_identities(data / "edc_ids", identities=8, images_per_identity=5, size=48, degrade=0.6, workers=0)
    run = root / "demo_run"
    config = load_config(data / "tiny.yaml", QualityRunConfig, overrides=data_overrides(data / "quality"))
    QualityPipeline(config, run / "quality").run()
    teacher = run / "recognition" / "teacher"
    train_recognition(tiny_recognition_config(data / "faces"), teacher, role="teacher")
    train_recognition(tiny_recognition_config(data / "faces", distill={"method": "ekd"}), run / "recognition" / "ekd",
                      role="student", teacher_path=teacher / "model.safetensors")
    evaluate_edc(teacher / "model.safetensors", [run / "quality" / "student" / "model.safetensors"],
                 identities=data / "edc_ids", out=run / "edc", fmr=1e-2, names=["student"])
    return run


@pytest.fixture(scope="module")
def page(runs):
    path = write_report(runs, gallery=GALLERY)
    return path, path.read_text(encoding="utf-8")


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


class _Tables(HTMLParser):
    """Every <table> of a page: caption, header cells and body rows as (text, is_number) cells."""

    def __init__(self):
        super().__init__()
        self.tables: list[dict] = []
        self._cell: list | None = None
        self._in_caption = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"caption": "", "head": [], "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th") and self.tables:
            self._cell = ["", "num" in (attrs.get("class") or "").split(), tag]
        elif tag == "caption":
            self._in_caption = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["rows"][-1].append((self._cell[0], self._cell[1]))
            self._cell = None
        elif tag == "caption":
            self._in_caption = False
        elif tag == "thead":
            self.tables[-1]["head"] = [text for text, _ in self.tables[-1]["rows"].pop()]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data
        elif self._in_caption:
            self.tables[-1]["caption"] += data


def _tables(text: str) -> list[dict]:
    parser = _Tables()
    parser.feed(text)
    return parser.tables


def _section(text: str, title: str) -> str:
    """The HTML of the section whose heading is `title`."""
    match = re.search(r'<section id="(section-\d+)"><h2>' + re.escape(title) + r"</h2>(.*?)</section>", text, re.S)
    assert match, f"no section {title!r}"
    assert f'href="#{match.group(1)}"' in text  # listed in the table of contents
    return match.group(2)


def _row(table: dict, first: str) -> dict[str, tuple[str, bool]]:
    rows = [row for row in table["rows"] if row and row[0][0] == first]
    assert len(rows) == 1, f"row {first!r} in {table['head']}"
    return dict(zip(table["head"], rows[0]))


def _table(tables: list[dict], first_header: str) -> dict:
    return next(t for t in tables if t["head"][:1] == [first_header])


def _data_uris(text: str, css: str) -> list[tuple[str, bytes]]:
    found = re.findall(r'<img class="' + css + r'" src="data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)"', text)
    return [(mime, base64.b64decode(data, validate=True)) for mime, data in found]


def _decode(data: bytes) -> np.ndarray | None:
    return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)


# ----------------------------------------------------------------------------- content


def test_page_has_a_section_per_report_and_a_table_of_contents(runs, page):
    path, text = page
    assert path == runs / "report.html"
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert str(runs.resolve()) in text and "<title>facekd report — demo_run</title>" in text
    titles = re.findall(r'<section id="section-\d+"><h2>(.*?)</h2>', text)
    assert titles == ["Quality run — quality", "Recognition run — recognition/ekd",
                      "Recognition run — recognition/teacher", "Recognition runs compared", "EDC — edc"]
    toc = re.findall(r'<li><a href="#section-(\d+)">(.*?)</a></li>', text)
    assert [title for _, title in toc] == titles and [int(i) for i, _ in toc] == [1, 2, 3, 4, 5]
    assert len(find_reports(runs)) == 4


def test_quality_section_tables_hold_the_report_numbers(runs, page):
    report = _report(runs / "quality")
    section = _section(page[1], "Quality run — quality")
    models = _table(_tables(section), "Model")
    assert models["head"][:4] == ["Model", "Arch", "Input", "SRCC"]
    assert [row[0][0] for row in models["rows"]] == ["T0", "T1", "S", "control"]
    student = _row(models, "S")
    expected = report["models"]["S"]
    assert student["SRCC"] == (f"{expected['srcc']:.4f}", True)
    assert student["KRCC"] == (f"{expected['krcc']:.4f}", True)
    assert student["Params M"] == (f"{expected['params'] / 1e6:.3f}", True)
    assert student["Arch"] == ("timm/mobilenetv3_small_050", False)  # text: left-aligned
    stages = _table(_tables(section), "Stage")
    assert _row(stages, "student")["Training images"] == ("64", True)
    assert _row(stages, "pseudo_u1")["Pseudo-labels"] == ("12", True)
    assert "Student within the challenge limit" in section
    plots = _data_uris(section, "plot")
    assert len(plots) == 2  # training curves, predicted vs true MOS
    for mime, data in plots:
        assert mime == "image/png" and data.startswith(b"\x89PNG") and _decode(data) is not None


def test_gallery_spreads_the_test_set_by_predicted_quality(runs, page):
    section = _section(page[1], "Quality run — quality")
    thumbs = _data_uris(section, "thumb")
    assert len(thumbs) == GALLERY
    for mime, data in thumbs:
        image = _decode(data)
        assert mime == "image/jpeg" and image is not None and max(image.shape[:2]) <= 96
    captions = re.findall(r"<figcaption>pred (-?\d+\.\d{3})<br>MOS (-?\d+\.\d{3})</figcaption>", section)
    assert len(captions) == GALLERY
    # the student's scores, computed here with the public API
    model = load_model(runs / "quality" / "student" / "model.safetensors")
    samples = from_csv(_report(runs / "quality")["config"]["data"]["test"])
    images, kept, _ = load_images([s.path for s in samples], model.input_size, workers=0)
    scores = predict(model, images)
    pairs = {(f"{score:.3f}", f"{samples[i].mos:.3f}") for score, i in zip(scores, kept)}
    assert set(captions) <= pairs and len(set(captions)) == GALLERY
    shown = [float(p) for p, _ in captions]
    assert shown == sorted(shown)  # worst to best
    assert shown[0] == float(f"{scores.min():.3f}") and shown[-1] == float(f"{scores.max():.3f}")


def test_a_quality_run_folder_alone_shows_its_whole_test_set(runs, tmp_path):
    out = write_report(runs / "quality", tmp_path / "page.html")
    text = out.read_text(encoding="utf-8")
    assert not (runs / "quality" / "report.html").exists()
    assert re.findall(r'<section id="section-\d+"><h2>(.*?)</h2>', text) == ["Quality run — quality"]
    captions = re.findall(r"<figcaption>pred (-?\d+\.\d{3})<br>", text)
    assert len(captions) == 16  # gallery 48 > 16 test images: every one, sorted
    assert [float(c) for c in captions] == sorted(float(c) for c in captions)


def test_recognition_sections_and_comparison(runs, page):
    text = page[1]
    for name in ("teacher", "ekd"):
        report = _report(runs / "recognition" / name)
        section = _section(text, f"Recognition run — recognition/{name}")
        tables = _tables(section)
        facts = {row[0][0]: row[1] for row in tables[0]["rows"]}
        assert facts["Distillation"] == (report["method"], False)
        assert facts["Training steps"] == ("2", True)
        assert facts["Params (M)"] == (f"{report['cost']['params'] / 1e6:.3f}", True)
        summary = _table(tables, "Set")
        for set_name, result in report["eval"].items():
            assert _row(summary, set_name)["AUC"] == (f"{result['auc']:.4f}", True)
            levels = next(t for t in tables if t["caption"].startswith(f"{set_name}:"))
            for entry in result["tpr_at_fpr"]:
                cell = _row(levels, f"{entry['fpr_level']:.0e}")["TPR"]
                assert cell == ((f"{entry['tpr']:.4f}" if entry["supported"] else "n/a"), True)
        assert any(not e["supported"] for r in report["eval"].values() for e in r["tpr_at_fpr"])
        plots = _data_uris(section, r"plot(?: roc)?")
        assert len(plots) == 2  # training curves, roc.png
        assert plots[1][1] == (runs / "recognition" / name / "roc.png").read_bytes()
        assert _decode(plots[0][1]) is not None
    compared = _tables(_section(text, "Recognition runs compared"))[0]
    assert [row[0][0] for row in compared["rows"]] == ["ekd", "teacher"]
    ekd = _report(runs / "recognition" / "ekd")
    first = next(iter(ekd["eval"].values()))
    assert _row(compared, "ekd")["Method"] == ("ekd", False)
    assert _row(compared, "ekd")["EER"] == (f"{first['eer']:.4f}", True)
    assert "TPR@1e-01" in compared["head"] and "TPR@1e-06" not in compared["head"]  # unsupported everywhere


def test_edc_section_holds_the_pauc_table_and_plot(runs, page):
    report = _report(runs / "edc")
    section = _section(page[1], "EDC — edc")
    pauc = _table(_tables(section), "Curve")
    assert [row[0][0] for row in pauc["rows"]] == ["student", "embedding norm", "random", "theoretical best"]
    for name, entry in (("student", report["qualities"]["student"]), ("random", report["random"])):
        for limit in report["limits"]:
            summary = entry["pauc"][str(float(limit))]
            row = _row(pauc, name)
            assert row[f"pAUC @{limit:g}"] == (f"{summary['pauc']:.4f}", True)
            assert row[f"÷ no discard @{limit:g}"] == (f"{summary['relative_to_start']:.3f}", True)
    plots = _data_uris(section, r"plot(?: edc)?")
    assert len(plots) == 1 and plots[0][1] == (runs / "edc" / "edc.png").read_bytes()


def test_page_is_self_contained(page):
    text = page[1]
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(?:src|href)\s*=\s*(?!["']?(?:data:|#))""", text)  # only data URIs and anchors
    assert "<script" not in text.lower() and "url(" not in text and "@import" not in text
    assert not re.search(r"<link(?![^>]*href=\"data:)", text)
    assert len(_data_uris(text, "thumb")) == GALLERY
    assert len(_data_uris(text, r"plot(?: roc| edc)?")) == 2 + 2 + 2 + 1


# ----------------------------------------------------------------------------- bad input


def test_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(DataError, match="no facekd report.json found") as error:
        write_report(tmp_path)
    assert error.value.path == str(tmp_path)
    with pytest.raises(DataError, match="run folder not found"):
        write_report(tmp_path / "missing")
    deep = tmp_path / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    (deep / "report.json").write_text(json.dumps({"pipeline": "edc"}))
    with pytest.raises(DataError, match="no facekd report.json"):  # 4 folders down: not searched
        write_report(tmp_path)
    assert find_reports(tmp_path / "a") == [deep / "report.json"]
    broken = tmp_path / "x" / "report.json"
    broken.parent.mkdir()
    broken.write_text('{"pipeline": "quality", ')
    with pytest.raises(DataError, match="not valid JSON") as error:
        write_report(tmp_path)
    assert error.value.path == str(broken)
    broken.write_text("[1, 2]")
    with pytest.raises(DataError, match="a JSON array, expected an object"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()
    with pytest.raises(ConfigError, match="gallery"):
        write_report(tmp_path, gallery=-1)


def test_unknown_or_damaged_reports_get_a_section_and_text_is_escaped(tmp_path):
    odd = tmp_path / "a<b>&c"
    odd.mkdir()
    (odd / "report.json").write_text(json.dumps({"pipeline": "<script>alert(1)</script>", "x": 1}))
    (tmp_path / "edc").mkdir()
    (tmp_path / "edc" / "report.json").write_text(json.dumps({"pipeline": "edc", "genuine": 3}))
    (tmp_path / "nokey").mkdir()
    (tmp_path / "nokey" / "report.json").write_text(json.dumps({"models": {}}))
    text = render_report(tmp_path)
    assert "<script" not in text
    assert "Unknown report — a&lt;b&gt;&amp;c" in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    edc = _section(text, "EDC — edc")
    assert "does not have the layout" in edc and "limits" in edc
    assert "has no &quot;pipeline&quot; key" in _section(text, "Unknown report — nokey")


def test_quality_run_without_its_predictions_or_test_images_says_so(runs, tmp_path):
    report = _report(runs / "quality")
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "report.json").write_text(json.dumps(report))  # its files not copied
    older = json.loads(json.dumps(report))
    for row in older["models"].values():
        del row["files"]  # as written before the report named its files
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "report.json").write_text(json.dumps(older))
    shutil.copytree(runs / "quality", tmp_path / "nocsv")
    predictions = tmp_path / "nocsv" / "student" / "predictions.csv"
    rows = list(csv.reader(predictions.open()))
    predictions.write_text("\n".join(",".join([str(tmp_path / "gone" / Path(p).name), m, q]) if i else "path,mos,prediction"
                                     for i, (p, m, q) in enumerate(rows)) + "\n")
    (tmp_path / "nocsv" / "control" / "predictions.csv").write_text("not,a\npredictions,file\n")
    text = render_report(tmp_path)
    moved = _section(text, "Quality run — moved")
    assert moved.count("predictions.csv: file not found") == 4 and "is left out of the plots" in moved
    assert moved.count("metrics.jsonl: file not found") == 4
    older_section = _section(text, "Quality run — older")
    assert older_section.count("names no predictions file (written by an older facekd)") == 4
    nocsv = _section(text, "Quality run — nocsv")
    assert "16 of the 16 test images shown could not be read" in nocsv and str(tmp_path / "gone") in nocsv
    assert "predictions.csv: not a path,mos,prediction CSV" in nocsv and "control is left out of the plots" in nocsv
    assert len(_data_uris(nocsv, "plot")) == 2  # curves and scatter plots from the saved files
    expected = f"{report['models']['S']['srcc']:.4f}"
    for section in (moved, older_section, nocsv):
        assert _row(_table(_tables(section), "Model"), "S")["SRCC"] == (expected, True)
        assert 'class="thumb"' not in section


def test_report_on_a_finished_run_loads_no_model(runs, tmp_path, monkeypatch):
    import onnxruntime
    import torch

    import facekd
    import facekd.models
    import facekd.models.artifact
    import facekd.inference.predictors
    import facekd.models.registry
    import facekd.quality.pseudo

    def refuse(*args, **kwargs):
        raise AssertionError("facekd report tried to load or run a model")

    for owner, name in ((facekd, "load"), (facekd.inference.predictors, "load"), (facekd.models.artifact, "load_model"),
                        (facekd.models.artifact, "_open"), (facekd.models, "build_model"),
                        (facekd.models.registry, "build_model"), (facekd.inference.predictors, "load_onnx"),
                        (facekd.quality.pseudo, "predict"), (onnxruntime, "InferenceSession"),
                        (torch.nn.Module, "__call__")):
        monkeypatch.setattr(owner, name, refuse)
    out = tmp_path / "page.html"
    assert main(["report", str(runs), "--out", str(out), "--gallery", "4"]) == 0
    section = _section(out.read_text(encoding="utf-8"), "Quality run — quality")
    assert len(_data_uris(section, "plot")) == 2 and len(_data_uris(section, "thumb")) == 4
    assert "warning" not in section


# ----------------------------------------------------------------------------- browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _screenshot(browser: str, page_path: Path, png: Path, profile: Path) -> list[str]:
    """Draw `page_path` in headless Chromium into `png`; returns the console messages it logged
    (Chromium logs every console message, whatever its level, as `INFO:CONSOLE...` on stderr)."""
    completed = None
    for headless in ("--headless", "--headless=new"):
        png.unlink(missing_ok=True)
        completed = subprocess.run(
            [browser, headless, "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,2000",
             f"--user-data-dir={profile}", f"--screenshot={png}", "--enable-logging=stderr", "--v=0",
             page_path.resolve().as_uri()],
            capture_output=True, text=True, timeout=60)
        if completed.returncode == 0 and png.is_file():
            break
    assert png.is_file(), f"no screenshot; chromium said: {completed.stderr[-2000:]}"
    return [line for line in completed.stderr.splitlines() if ":CONSOLE" in line]


def test_chromium_draws_the_page_without_console_messages(page, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium not installed (Debian package chromium): the rendering test needs it")
    # the check sees console messages: a page that logs an error is caught
    broken = tmp_path / "broken.html"
    broken.write_text('<!DOCTYPE html><html><body><p>x</p><script>console.error("x")</script></body></html>')
    messages = _screenshot(browser, broken, tmp_path / "broken.png", tmp_path / "profile")
    assert len(messages) == 1 and '"x"' in messages[0]

    messages = _screenshot(browser, page[0], tmp_path / "page.png", tmp_path / "profile")
    assert messages == []
    shot = cv2.imread(str(tmp_path / "page.png"), cv2.IMREAD_COLOR)
    assert shot is not None and shot.shape[:2] == (2000, 1280)
    assert shot.std() > 20  # not blank
    colours = np.unique(shot.reshape(-1, 3), axis=0)
    assert len(colours) > 200  # text, tables, plots and photos, not a flat page
