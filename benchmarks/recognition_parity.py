"""Parity of the recognizers people already have with their reference code, at full size.

    python benchmarks/recognition_parity.py --out benchmarks/results/recognition_parity.json

- `facekd import insightface`: each arcface_torch network (r18, r34, r50, r100, mbf, mbf_large)
  built in its layout (tests/reference_insightface.py), random weights saved as its
  `backbone.pth`, imported, and embedded by facekd (the model file, its ONNX export) and by the
  reference (arcface_torch's inference: RGB, /255, −0.5, /0.5) on random 112×112 faces;
- the same network exported as a model-zoo graph (float32 NCHW, no metadata) and loaded with
  `--preset insightface`;
- IJB-C aggregation: facekd's template scores against a numpy re-statement of insightface's
  `eval_ijbc.py` (tests/test_ijb.py) on the same embeddings of a random protocol, for every
  switch setting.
Figures: max |difference| of L2-normalised embeddings (targets 1e-5 torch, 1e-4 ONNX) and of
template scores (target 1e-6).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def import_rows(work: Path, faces: np.ndarray, archs) -> list[dict]:
    import torch

    import facekd
    from facekd.export import export_onnx
    from facekd.inference import InputConvention
    from facekd.models.importers import import_checkpoint
    from reference_efficient_fiqa import randomised
    from reference_insightface import reference_embeddings, reference_network

    rows = []
    for arch in archs:
        reference = randomised(reference_network(arch), seed=1)
        torch.save(reference.state_dict(), work / f"{arch}.pth")
        report = import_checkpoint("insightface", work / f"{arch}.pth", work / f"{arch}.safetensors", arch=arch)
        expected = _unit(reference_embeddings(reference, faces))
        export_onnx(report.path, work / f"{arch}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(reference.eval(), (torch.zeros(1, 3, 112, 112),), str(work / f"{arch}_zoo.onnx"),
                              dynamo=False, input_names=["input.1"], output_names=["fc1"],
                              dynamic_axes={"input.1": {0: "N"}, "fc1": {0: "N"}})
        zoo = facekd.load(work / f"{arch}_zoo.onnx", convention=InputConvention.from_options(preset="insightface"))
        diff = {"torch": facekd.load(report.path).embed(faces), "facekd_onnx": facekd.load(work / f"{arch}.onnx")
                .embed(faces), "zoo_onnx_preset_insightface": zoo.embed(faces)}
        rows.append({"arch": arch, "facekd_arch": report.arch, "params": report.params,
                     **{f"max_abs_diff_{k}": float(np.abs(v - expected).max()) for k, v in diff.items()}})
        print(rows[-1], flush=True)
    return rows


def ijb_rows(images: int, templates: int, pairs: int) -> list[dict]:
    from facekd.recognition.ijb import IjbOptions, image_features, pair_scores, template_features
    from test_ijb import reference_scores

    rng = np.random.default_rng(0)
    raw = rng.normal(size=(images, 2 * 512)).astype(np.float32)  # image | mirror embeddings
    detector = rng.uniform(0.3, 1.0, images).astype(np.float32)
    template = rng.integers(0, templates, images)
    media = template * 10 + rng.integers(0, 3, images)
    first, second = rng.integers(0, templates, (2, pairs))
    keep = first != second
    first, second = first[keep], second[keep]
    rows = []
    for flip, norm, det in itertools.product((True, False), repeat=3):
        options = IjbOptions(flip=flip, norm_score=norm, detector_score=det)
        unique, feats = template_features(image_features(raw, detector, options), template, media)
        ours = pair_scores(unique, feats, first, second)
        theirs = reference_scores(raw, detector, template, media, first, second, options)
        rows.append({"options": options.mode, "pairs": int(len(first)),
                     "max_abs_diff_scores": float(np.nanmax(np.abs(ours - theirs)))})
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="r18,r34,r50,r100,mbf,mbf_large")
    parser.add_argument("--faces", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/recognition_parity.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="facekd_recognition_parity_"))
    faces = np.random.default_rng(0).integers(0, 256, (args.faces, 112, 112, 3), dtype=np.uint8)
    result = {"insightface_import": import_rows(work, faces, args.archs.split(",")),
              "ijb_aggregation": ijb_rows(images=4000, templates=400, pairs=20000)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
