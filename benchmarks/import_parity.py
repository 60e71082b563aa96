"""Parity of `facekd import efficient-fiqa` with the reference code, at the released models' own
sizes: the EdgeNeXt-XXS student at 352 and the Swin-B teacher at 448, through PyTorch and
ONNX Runtime.

    python benchmarks/import_parity.py --out benchmarks/results/import_parity.json

Each network is built as Efficient-FIQA builds it (tests/reference_efficient_fiqa.py), given
random weights, saved as its `.pt`, imported, and scored by facekd (`facekd.load` on the model
file and on its ONNX export) and by the reference (torchvision transforms on PIL images) on
non-square PNG and JPEG images. Target: max |difference| ≤ 1e-4. The JPEG row shows how far
two JPEG decoders (OpenCV's for facekd, Pillow's for the reference) take the scores apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def images(folder: Path, count: int, ext: str) -> list[Path]:
    from facekd.io.images import write_image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        h, w = int(rng.integers(300, 640)), int(rng.integers(300, 640))
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = np.stack([(xx * (c + 1) + yy * (3 - c)) % 256 for c in range(3)], axis=-1)
        image = np.clip(smooth * 0.75 + rng.integers(0, 64, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"image{i}{ext}"
        write_image(path, image)
        paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/import_parity.json")
    args = parser.parse_args()

    import torch

    import facekd
    from facekd.export import export_onnx
    from facekd.models.importers import import_checkpoint
    from reference_efficient_fiqa import ReferenceEdgeNeXt, ReferenceFIQASwin, randomised, reference_scores

    work = Path(tempfile.mkdtemp(prefix="facekd_import_parity_"))
    sets = {"png": images(work, args.images, ".png"), "jpeg": images(work, args.images, ".jpg")}
    rows = []
    for name, make, size, seed in (("EdgeNeXt_XXS_checkpoint.pt", ReferenceEdgeNeXt, 352, 1),
                                   ("Swin_B_checkpoint.pt", ReferenceFIQASwin, 448, 2)):
        torch.manual_seed(0)
        reference = randomised(make(), seed=seed)
        checkpoint = work / name
        torch.save(reference.state_dict(), checkpoint)
        model_file = work / f"{checkpoint.stem}.safetensors"
        started = time.perf_counter()
        report = import_checkpoint("efficient-fiqa", checkpoint, model_file)
        import_s = time.perf_counter() - started
        started = time.perf_counter()
        onnx_file = work / f"{checkpoint.stem}.onnx"
        export_onnx(model_file, onnx_file)
        export_s = time.perf_counter() - started
        scorers = {"torch": facekd.load(model_file), "onnx": facekd.load(onnx_file)}
        for kind, paths in sets.items():
            expected = reference_scores(reference, paths, size)
            for backend, scorer in scorers.items():
                diff = float(np.abs(scorer.score(paths) - expected).max())
                rows.append({"checkpoint": name, "arch": report.arch, "input_size": size, "images": kind,
                             "backend": backend, "max_abs_diff": diff, "score_std": float(expected.std())})
                print(f"{name} {kind} {backend}: max |diff| {diff:.2e}", file=sys.stderr)
        rows.append({"checkpoint": name, "import_seconds": round(import_s, 2), "export_seconds": round(export_s, 2),
                     "params": report.params})
        del scorers, reference
    png = [r for r in rows if r.get("images") == "png"]
    result = {"benchmark": "import_parity", "torch": torch.__version__, "rows": rows,
              "max_abs_diff_png": max(r["max_abs_diff"] for r in png),
              "target_met_png": all(r["max_abs_diff"] <= 1e-4 for r in png)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
