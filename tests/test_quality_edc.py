"""`facekd evaluate edc`: the comparisons, embeddings and qualities it feeds the EDC are those
computed independently with the public API; bad inputs get clear errors."""

import json

import numpy as np
import pytest

import facekd
from facekd.cli import main
from facekd.errors import ConfigError, FacekdError
from facekd.evaluation.edc import edc_report, pair_quality
from facekd.evaluation.quality_edc import comparisons, evaluate_edc
from facekd.models import build_model
from facekd.models.artifact import save_model
from facekd.synth import generate_identities


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("edc")
    generate_identities(root / "ids", identities=8, images_per_identity=5, size=48, degrade=0.6, workers=0,
                        pairs=60)
    torch.manual_seed(0)
    save_model(build_model("mobilefacenet", input_size=32, embedding_size=16, width_mult=0.5), root / "fr.safetensors")
    save_model(build_model("timm/mobilenetv3_small_050", input_size=32), root / "q.safetensors")
    return root


def test_edc_matches_the_public_api_computation(setup, tmp_path):
    root = setup
    report = evaluate_edc(root / "fr.safetensors", [root / "q.safetensors"], identities=root / "ids",
                          out=tmp_path, fmr=1e-2, names=["student"])
    paths, first, second, issame = comparisons(identities=root / "ids")
    assert len(first) == 40 * 39 // 2 and issame.sum() == 8 * 5 * 4 // 2
    embedder = facekd.load(root / "fr.safetensors")
    emb = embedder.embed(paths, flip=True)
    scores = np.einsum("ij,ij->i", emb[first], emb[second])
    q = facekd.load(root / "q.safetensors").score(paths)
    expected = edc_report(scores, issame, {"student": pair_quality(q[first], q[second])}, fmr=1e-2)
    assert report["threshold"] == pytest.approx(expected["threshold"], abs=1e-5)
    assert report["qualities"]["student"]["fnmr"] == pytest.approx(expected["qualities"]["student"]["fnmr"])
    assert set(report["qualities"]) == {"student", "embedding norm"}
    assert (tmp_path / "edc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report.json").read_text())["genuine"] == int(issame.sum())


def test_edc_on_a_pairs_file_skips_unreadable_images(setup, tmp_path):
    root = setup
    from facekd.io.formats import read_pairs

    pairs = read_pairs(root / "ids" / "pairs.txt")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    lines = [f"{broken if p.a == pairs[0].a else p.a}\t{p.b}\t{int(p.same)}" for p in pairs]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    report = evaluate_edc(root / "fr.safetensors", [root / "q.safetensors"], pairs=tmp_path / "pairs.txt",
                          start_fnmr=0.3)
    assert report["skipped_images"][0]["path"] == str(broken)
    assert report["skipped_comparisons"] >= 1
    assert report["comparisons"] == 60 - report["skipped_comparisons"]
    assert report["threshold_rule"] == "start_fnmr"


def test_edc_errors(setup, tmp_path, capsys):
    root = setup
    with pytest.raises(ConfigError, match="exactly one"):
        evaluate_edc(root / "fr.safetensors", [root / "q.safetensors"])
    with pytest.raises(FacekdError, match="not a quality model"):
        evaluate_edc(root / "fr.safetensors", [root / "fr.safetensors"], identities=root / "ids")
    with pytest.raises(FacekdError, match="not a recognition model"):
        evaluate_edc(root / "q.safetensors", [root / "q.safetensors"], identities=root / "ids")
    # 40 images: 640 impostor comparisons cannot support FMR 1e-3
    code = main(["evaluate", "edc", "--recognizer", str(root / "fr.safetensors"), "--quality",
                 str(root / "q.safetensors"), "--identities", str(root / "ids"), "--out", str(tmp_path), "-q"])
    assert code == 2 and "1000 impostor" in capsys.readouterr().err
