import json
import subprocess
import sys

import pytest

from facekd import __version__
from facekd.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "synth", "models"):
        assert command in out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out


def test_models_json_without_timing(capsys):
    assert main(["models", "--no-measure", "--json", "--arch", "mobilefacenet", "--arch",
                 "timm/edgenext_xx_small"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["arch"] for row in rows] == ["mobilefacenet", "timm/edgenext_xx_small"]
    assert 0.18e9 < rows[0]["gflops"] * 1e9 < 0.26e9
    assert rows[1]["params"] < 1.5e6 and rows[1]["latency_ms_b1"] is None


def test_models_lists_a_family(capsys):
    assert main(["models", "--family", "timm", "--filter", "edgenext_*"]) == 0
    names = capsys.readouterr().out.split()
    assert "timm/edgenext_xx_small" in names and all(n.startswith("timm/edgenext_") for n in names)
    assert main(["models", "--family", "torchvision"]) == 0
    assert capsys.readouterr().out.split() == ["torchvision/swin_t", "torchvision/swin_s", "torchvision/swin_b"]
    assert main(["models", "--family", "keras"]) == 2


def test_user_errors_are_one_line_and_exit_2(capsys):
    assert main(["models", "--no-measure", "--arch", "mobilefacenett"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("facekd: error:") and "mobilefacenet" in err and "\n" not in err


def test_console_script_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "facekd", "--version"], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == f"facekd {__version__}"


def test_importing_facekd_is_light():
    code = "import sys, facekd; print(sorted(m for m in ('torch', 'cv2', 'rich') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_synth_identities_writes_readable_formats(tmp_path):
    from facekd.io.formats import read_identity_folder, read_pairs
    from facekd.io.images import decode_image, read_image
    from facekd.io.recordio import read_insightface_dataset
    from facekd.io.verification import read_verification_bin

    out = tmp_path / "ids"
    args = ["synth", "identities", str(out), "--identities", "6", "--images-per-identity", "3",
            "--format", "folder", "--format", "rec", "--format", "bin", "--pairs", "20", "--workers", "0", "-q"]
    assert main(args) == 0
    folder = read_identity_folder(out)
    assert folder.num_classes == 6 and len(folder) == 18
    pairs = read_pairs(out / "pairs.txt")
    assert len(pairs) == 20 and sum(p.same for p in pairs) == 10
    rec = read_insightface_dataset(out / "train.rec")
    assert rec.num_classes == 6 and len(rec) == 18
    assert sorted(rec.labels.tolist()) == sorted(folder.labels.tolist())
    # the record holds the same pixels as the PNG of the same identity and index
    assert (decode_image(rec.image_bytes(0)) == read_image(folder.paths[0])).all()
    verification = read_verification_bin(out / "pairs.bin")
    assert len(verification) == 20 and int(verification.issame.sum()) == 10
    # an existing output is never silently replaced
    assert main(args) == 2


def test_synth_quality_writes_labels_and_lists(tmp_path):
    from facekd.io.formats import read_image_list, read_mos_csv

    out = tmp_path / "q"
    assert main(["synth", "quality", str(out), "--labeled", "8", "--unlabeled", "6", "--test", "4",
                 "--size", "64", "--workers", "0", "-q"]) == 0
    labeled = read_mos_csv(out / "labeled.csv")
    test = read_mos_csv(out / "test.csv")
    assert len(labeled) == 8 and len(test) == 4
    assert all(1.0 <= row.mos <= 5.0 for row in labeled + test)
    unlabeled = read_image_list(out / "unlabeled_1.txt") + read_image_list(out / "unlabeled_2.txt")
    assert len(unlabeled) == 6 and len(set(unlabeled)) == 6


def test_synth_rejects_bad_arguments_with_one_line(tmp_path, capsys):
    assert main(["synth", "quality", str(tmp_path / "q"), "--labeled", "0", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("facekd: error:") and "labeled" in err and "\n" not in err
    assert not (tmp_path / "q").exists()
