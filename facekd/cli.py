"""The `facekd` command: parses arguments, calls the library, prints results. Nothing else."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from facekd.version import __version__
from facekd.errors import FacekdError
from facekd.runtime import keep_freed_memory


def _progress(args: argparse.Namespace):
    """-q: silent; a terminal: bars; a file or pipe: timestamped lines every 15 s."""
    from facekd.progress import PlainProgress, Progress, RichProgress

    if getattr(args, "quiet", False):
        return Progress()
    return RichProgress() if sys.stderr.isatty() else PlainProgress(sys.stderr, interval=15.0)


def _console():
    from rich.console import Console

    # Piped output (files, CI logs) gets a wide console so tables are never truncated.
    return Console() if sys.stdout.isatty() else Console(width=200)


def _print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _print_summary(title: str, summary: dict) -> None:
    from rich.table import Table

    def shown(value: object) -> str:
        if isinstance(value, (list, tuple)) and len(value) > 8:
            return ", ".join(map(str, value[:6])) + f", … ({len(value)} in all)"
        return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    table = Table(title=title, show_header=False)
    for key, value in summary.items():
        table.add_row(str(key), shown(value))
    _console().print(table)


# --- synth -------------------------------------------------------------------------------------

def _given(**options: object) -> dict:
    """The options the user set (None = leave the library's default)."""
    return {key: value for key, value in options.items() if value is not None}


def cmd_synth_identities(args: argparse.Namespace) -> int:
    from facekd.synth import generate_identities

    summary = generate_identities(
        args.out, size=args.size, seed=args.seed, formats=tuple(args.format or ("folder",)),
        degrade=args.degrade, workers=args.workers, progress=_progress(args), overwrite=args.overwrite,
        **_given(identities=args.identities, images_per_identity=args.images_per_identity,
                 difficulty=args.difficulty, identity_spread=args.identity_spread, nuisance=args.nuisance,
                 pairs=args.pairs),
    )
    _print_summary(f"Synthetic identities → {args.out}", summary)
    return 0


def cmd_synth_quality(args: argparse.Namespace) -> int:
    from facekd.synth import generate_quality

    summary = generate_quality(
        args.out, seed=args.seed, workers=args.workers, progress=_progress(args), overwrite=args.overwrite,
        **_given(labeled=args.labeled, unlabeled=args.unlabeled, test=args.test, size=args.size),
    )
    _print_summary(f"Synthetic quality set → {args.out}", summary)
    return 0


def cmd_synth_ijb(args: argparse.Namespace) -> int:
    from facekd.synth import generate_ijb

    summary = generate_ijb(
        args.out, target=args.target, seed=args.seed, workers=args.workers, progress=_progress(args),
        overwrite=args.overwrite,
        **_given(identities=args.identities, templates_per_identity=args.templates_per_identity,
                 media_per_template=args.media_per_template, images_per_media=args.images_per_media,
                 crop=args.crop, impostors=args.impostors),
    )
    _print_summary(f"Synthetic {args.target} set → {args.out}", summary)
    return 0


# --- demo --------------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from facekd.demo import gap_closed, run_edc_demo, run_quality_demo, run_recognition_demo
    from facekd.evaluation.quality_edc import format_edc_table
    from facekd.quality.pipeline import format_report_table
    from facekd.recognition.train import format_recognition_table, report_rows

    out = Path(args.out)
    progress = _progress(args)
    console = _console()
    common = dict(seed=args.seed, workers=args.workers, overwrite=args.overwrite, progress=progress)
    console.print(format_report_table(run_quality_demo(out, **common)))
    console.print(f"quality run: {out / 'quality'} (report.json, models, pseudo-labels)")
    reports = run_recognition_demo(out, **common)
    console.print(format_recognition_table(report_rows(reports), "Recognition distillation — every pair of "
                                           "60 unseen synthetic identities (GFLOPs = multiply-adds)"))
    closed = gap_closed(reports)
    if closed:
        console.print("share of the teacher − student-alone TPR@1e-3 gap closed: "
                      + ", ".join(f"{label} {share:.0%}" for label, share in closed.items()))
    console.print(f"recognition runs: {out / 'recognition'} (teacher, student, ekd, rkd: model, report.json, roc.png)")
    edc = run_edc_demo(out, **common)
    console.print(format_edc_table(edc))
    console.print(f"EDC of T0, T1 and S with the EKD student as recognizer: {edc['plot']}")
    from facekd.evaluation.report import write_report

    console.print(f"HTML report of every run: {write_report(out, progress=progress)}")
    return 0


# --- quality -----------------------------------------------------------------------------------

def _quality_config(args: argparse.Namespace):
    from facekd.config import load_config
    from facekd.quality.config import QualityRunConfig, data_overrides

    overrides = (data_overrides(args.data) if args.data else []) + list(args.set or [])
    return load_config(args.config, QualityRunConfig, overrides=overrides)


def cmd_quality_run(args: argparse.Namespace) -> int:
    from facekd.quality.pipeline import QualityPipeline, format_report_table

    report = QualityPipeline(_quality_config(args), args.out, progress=_progress(args)).run(force=args.force or ())
    _console().print(format_report_table(report))
    _console().print(f"report: {Path(args.out) / 'report.json'}")
    return 0


def cmd_quality_train(args: argparse.Namespace) -> int:
    from facekd.quality.pipeline import QualityPipeline, format_report_table

    report = QualityPipeline(_quality_config(args), args.out, progress=_progress(args)).train_single(args.model)
    _console().print(format_report_table(report))
    return 0


def cmd_quality_eval(args: argparse.Namespace) -> int:
    from facekd.quality.evaluate import evaluate_model

    report = evaluate_model(args.model, args.test, out=args.out, batch_size=args.batch_size, progress=_progress(args))
    if args.json:
        _print_json(report)
    else:
        _print_summary(f"{args.model} on {args.test}", report["metrics"])
    return 0


def cmd_quality_pseudo_label(args: argparse.Namespace) -> int:
    from facekd.quality.evaluate import pseudo_label_files

    summary = pseudo_label_files(args.model, args.images, args.out, labeled=args.labeled,
                                 confidence=args.confidence, batch_size=args.batch_size, progress=_progress(args))
    _print_summary(f"pseudo-labels → {args.out}", summary)
    return 0


def _inference_job(args: argparse.Namespace, job) -> int:
    """Shared body of `quality score` and `recognition embed`: open the model on the chosen
    backend, run the job on this shard, print the summary."""
    from facekd.errors import ConfigError
    from facekd.inference import open_model, parse_shard
    from facekd.inference.conventions import model_fingerprint
    from facekd.inference.shards import shard_output
    from facekd.io.formats import resolve_inputs

    shard = parse_shard(args.shard)
    if args.shard == "auto" and shard.count > 1 and "{shard}" not in args.out:
        raise ConfigError("--shard auto starts one job per process: put {shard} in --out so each writes its own file")
    out = shard_output(args.out, shard)
    progress = _progress(args)
    files = resolve_inputs(args.paths, check_files=False)
    convention = _convention(args)
    model, choice = open_model(args.model, backend=args.backend, device=args.device, threads=args.threads,
                               batch_size=args.batch_size, decode_sample=files[:: max(1, len(files) // 16)][:16],
                               progress=progress, convention=convention)
    threads = f"{choice.threads} thread" + ("s" if choice.threads > 1 else "")
    progress.log(f"{choice.backend} on {choice.device}, {threads}, batches of {choice.batch_size}: {choice.reason}")
    summary = job(model, args.paths, out, batch_size=choice.batch_size, strict=args.strict, resume=args.resume,
                  overwrite=args.overwrite, workers=args.workers, shard=shard,
                  fingerprint=model_fingerprint(args.model, convention),
                  backend=choice.to_dict(), progress=progress, files=files)
    table = summary.to_dict()
    table["backend"] = f"{choice.backend} ({choice.reason})"
    _print_summary(f"{summary.kind} → {out}", table)
    return 0


def cmd_quality_score(args: argparse.Namespace) -> int:
    from facekd.inference import score_files

    return _inference_job(args, score_files)


def cmd_merge(args: argparse.Namespace) -> int:
    from facekd.inference import merge_outputs

    summary = merge_outputs(args.parts, args.out, partial=args.partial, overwrite=args.overwrite)
    _print_summary(f"merged → {args.out}", summary)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from facekd.export import export_onnx

    report = export_onnx(args.model, args.out, opset=args.opset)
    _print_summary(f"ONNX export → {args.out}", vars(report))
    _console().print(f"ONNX Runtime matches torch: max abs difference {report.max_abs_diff:.2e} (< 1e-4)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from facekd.models.importers import import_checkpoint

    report = import_checkpoint(args.format, args.checkpoint, args.out, arch=args.arch, input_size=args.input_size)
    _print_summary(f"{args.format} checkpoint → {report.path}", vars(report))
    return 0


# --- recognition -------------------------------------------------------------------------------

def _recognition_config(args: argparse.Namespace):
    from facekd.config import load_config
    from facekd.recognition.config import RecognitionConfig

    overrides = []
    if args.data:
        overrides.append(f"data.train={args.data}")
    if args.eval:
        overrides.append("data.eval=" + json.dumps([str(p) for p in args.eval]))
    return load_config(args.config, RecognitionConfig, overrides=overrides + list(args.set or []))


def _print_recognition(report: dict, label: str) -> None:
    from facekd.recognition.train import format_recognition_table, report_rows

    rows = report_rows({label: report})
    if rows:
        _console().print(format_recognition_table(rows, f"Recognition — {next(iter(report['eval']))}"))
    _console().print(f"run: {report['run_dir']} (model.safetensors, report.json, roc.png)")


def cmd_recognition_train(args: argparse.Namespace) -> int:
    from facekd.recognition.train import train_recognition

    config = _recognition_config(args)
    if args.model == "student":
        config.distill.method = "none"
    report = train_recognition(config, args.out, role=args.model, progress=_progress(args))
    _print_recognition(report, args.model)
    return 0


def cmd_recognition_distill(args: argparse.Namespace) -> int:
    from facekd.recognition.train import train_recognition

    config = _recognition_config(args)
    if args.method:
        config.distill.method = args.method
    report = train_recognition(config, args.out, role="student", teacher_path=args.teacher,
                               teacher_convention=_convention(args), teacher_cache=args.teacher_cache,
                               progress=_progress(args))
    _print_recognition(report, f"student ({config.distill.method})")
    return 0


def cmd_recognition_eval(args: argparse.Namespace) -> int:
    from facekd.recognition.evaluation import evaluate_model

    if args.ijb:
        return _recognition_eval_ijb(args)
    from facekd.recognition.train import format_recognition_table
    from facekd.models.artifact import load_model
    from facekd.models.cost import count_flops, count_params

    sets = (args.pairs or []) + (args.bin or []) + (args.identities or [])
    result = evaluate_model(args.model, sets, args.out, batch_size=args.batch_size, flip=not args.no_flip,
                            convention=_convention(args), progress=_progress(args))
    if args.json:
        _print_json(result)
        return 0
    cost = {"arch": result["arch"], "params": None, "gflops": None, "cpu_ms_per_image": None}
    if Path(args.model).suffix.lower() != ".onnx":
        model = load_model(args.model)
        cost.update(params=count_params(model), gflops=count_flops(model, model.input_size) / 1e9)
    rows = {Path(name).name: {"report": report, **cost} for name, report in result["sets"].items()}
    _console().print(format_recognition_table(rows, f"Verification — {args.model}"))
    for name, report in result["sets"].items():
        unsupported = [f"{r['fpr_level']:.0e}" for r in report["tpr_at_fpr"] if not r["supported"]]
        if unsupported:
            _console().print(f"{Path(name).name}: {report['negatives']} negative pairs cannot support FPR "
                             f"{', '.join(unsupported)}")
        if report["skipped_images"]:
            _console().print(f"{Path(name).name}: skipped {len(report['skipped_images'])} unreadable images, e.g. "
                             f"{report['skipped_images'][0]['path']}: {report['skipped_images'][0]['reason']}")
    if args.out:
        _console().print(f"report: {Path(args.out) / 'report.json'}, ROC: {result['roc']}")
    return 0


def _recognition_eval_ijb(args: argparse.Namespace) -> int:
    from facekd.errors import ConfigError
    from facekd.inference import open_model
    from facekd.io.ijb import ijb_files
    from facekd.recognition.ijb import IjbOptions, evaluate_ijb

    if args.pairs or args.bin or args.identities:
        raise ConfigError("--ijb is evaluated on its own: drop --pairs, --bin and --identities")
    if not args.out:
        raise ConfigError("--ijb needs --out DIR (embeddings, scores, report.json and roc.png go there)")
    ijb_files(args.ijb, args.target)  # an unknown --target fails before the model is opened
    progress = _progress(args)
    model, choice = open_model(args.model, backend=args.backend, device=args.device, threads=args.threads,
                               batch_size=args.batch_size, progress=progress, convention=_convention(args))
    progress.log(f"{choice.backend} on {choice.device}, batches of {choice.batch_size}: {choice.reason}")
    options = IjbOptions(flip=not args.no_flip, norm_score=not args.no_norm_score,
                         detector_score=not args.no_detector_score)
    result = evaluate_ijb(model, args.ijb, args.out, target=args.target, options=options,
                          batch_size=choice.batch_size, workers=args.workers, resume=args.resume,
                          overwrite=args.overwrite, model_file=args.model, backend=choice.to_dict(),
                          progress=progress)
    if args.json:
        _print_json(result)
        return 0
    from rich.table import Table

    table = Table(title=f"{args.target} 1:1 verification ({result['mode']}) — {args.model}")
    table.add_column("TPR (%) at FPR")
    for row in result["tpr_at_fpr_nearest"]:
        table.add_column(f"{row['fpr_level']:.0e}", justify="right")
    table.add_row("nearest ROC point (eval_ijbc.py)", *(f"{100 * r['tpr']:.2f}" for r in result["tpr_at_fpr_nearest"]))
    table.add_row("at most that FPR (facekd)", *("—" if r["tpr"] is None else f"{100 * r['tpr']:.2f}"
                                                   for r in result["tpr_at_fpr"]))
    _console().print(table)
    _console().print(f"{result['scored_pairs']} of {result['pairs']} pairs scored, AUC {result['auc']:.4f}")
    if result["skipped_images"]:
        first = result["skipped_images"][0]
        _console().print(f"skipped {len(result['skipped_images'])} images, e.g. {first['path']}: {first['reason']}")
    if result["templates_without_images"]:
        lost = result["templates_without_images"]
        _console().print(f"{len(lost)} templates lost every image ({result['skipped_pairs']} pairs skipped), e.g. "
                         f"{', '.join(map(str, lost[:5]))}")
    _console().print(f"report: {Path(args.out) / 'report.json'}")
    return 0


def cmd_recognition_teacher_cache(args: argparse.Namespace) -> int:
    from facekd.inference import parse_shard
    from facekd.recognition.teacher_cache import build_teacher_cache

    summary = build_teacher_cache(args.teacher, args.data, args.out, convention=_convention(args),
                                  backend=args.backend, device=args.device, threads=args.threads,
                                  batch_size=args.batch_size, workers=args.workers, part_images=args.part_images,
                                  shard=parse_shard(args.shard), overwrite=args.overwrite, progress=_progress(args))
    _print_summary(f"teacher cache → {args.out}", summary.to_dict())
    if not summary.complete:
        _console().print("other shards' parts are still to do: the cache is usable once every part is done")
    return 0


def cmd_recognition_embed(args: argparse.Namespace) -> int:
    from functools import partial

    from facekd.inference import embed_files

    return _inference_job(args, partial(embed_files, flip=args.flip))


# --- evaluate ----------------------------------------------------------------------------------

def cmd_evaluate_edc(args: argparse.Namespace) -> int:
    from facekd.evaluation.quality_edc import evaluate_edc, format_edc_table

    report = evaluate_edc(args.recognizer, args.quality, pairs=args.pairs, identities=args.identities, out=args.out,
                          fmr=args.fmr, start_fnmr=args.start_fnmr, limits=args.limit or (0.2, 0.3),
                          batch_size=args.batch_size, names=args.name, convention=_convention(args),
                          progress=_progress(args))
    _console().print(format_edc_table(report))
    if report["skipped_images"]:
        first = report["skipped_images"][0]
        _console().print(f"skipped {len(report['skipped_images'])} unreadable images "
                         f"({report['skipped_comparisons']} comparisons), e.g. {first['path']}: {first['reason']}")
    _console().print(f"report: {Path(args.out) / 'report.json'}, plot: {report['plot']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from facekd.evaluation.report import write_report

    path = write_report(args.run_dir, args.out, gallery=args.gallery, progress=_progress(args))
    _console().print(f"report: {path}")
    return 0


# --- models ------------------------------------------------------------------------------------

def cmd_models(args: argparse.Namespace) -> int:
    from facekd.models.cost import cost_report, format_cost_table

    if args.family:
        import fnmatch

        from facekd.models import available_families

        families = {family.prefix: family for family in available_families()}
        if args.family not in families:
            from facekd.errors import ConfigError

            raise ConfigError(f"unknown family {args.family!r}; choose from {', '.join(families)}")
        names = [n for n in families[args.family].names() if fnmatch.fnmatch(n, args.filter or "*")]
        print("\n".join(f"{args.family}/{name}" for name in names))
        return 0
    rows = cost_report(archs=args.arch or None, measure=not args.no_measure,
                       progress=None if args.json else _progress(args))
    if args.json:
        _print_json(rows)
    else:
        _console().print(format_cost_table(rows))
    return 0


# --- parser ------------------------------------------------------------------------------------

def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="only results and errors: no progress, no log lines")


def _add_config(parser: argparse.ArgumentParser, task: str, data_help: str) -> None:
    """Arguments of the commands that run a config: config, --out, --data, --set, -q."""
    parser.add_argument("config", help=f"YAML config (see configs/{task}/)")
    parser.add_argument("--out", required=True, help="run folder (resumes a killed run)")
    parser.add_argument("--data", help=data_help)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    _add_common(parser)


def _add_convention(parser: argparse.ArgumentParser, what: str = "MODEL") -> None:
    """Options giving the input convention of an .onnx recognizer from elsewhere."""
    group = parser.add_argument_group(f"{what} as an .onnx recognizer from elsewhere (no facekd metadata)")
    group.add_argument("--preset", choices=("insightface",),
                       help="insightface: RGB, (x - 127.5) / 127.5 (0 / 1 when the graph normalises inside)")
    group.add_argument("--input-mean", type=float, nargs="+", metavar="M", help="1 or 3 (R G B) values")
    group.add_argument("--input-std", type=float, nargs="+", metavar="S", help="1 or 3 (R G B) values")
    group.add_argument("--bgr", action="store_true", help="the graph takes BGR images")


def _convention(args: argparse.Namespace):
    from facekd.inference import InputConvention

    one = (lambda v: v[0] if v and len(v) == 1 else v)
    return InputConvention.from_options(getattr(args, "preset", None), one(getattr(args, "input_mean", None)),
                                        one(getattr(args, "input_std", None)), getattr(args, "bgr", False))


def _add_backend(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """Where and how a command runs a model over many images: backend, device, threads, batches."""
    parser.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                        help="auto: time PyTorch and ONNX Runtime on this machine and keep the faster (default)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, or auto (GPU of LOCAL_RANK)")
    parser.add_argument("--threads", type=int, help="inference threads (default: every core)")
    parser.add_argument("--workers", type=int, help="decoding threads (default: CPU count, at most 8)")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"largest batch (default: {batch_size}); auto may pick 8 where that is faster")


def _add_inference(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """Options of the batch inference commands (score, embed)."""
    _add_backend(parser, batch_size)
    parser.add_argument("--shard", metavar="I/N",
                        help="only shard I of N (stable by path); auto: from torchrun/Slurm; {shard} in --out")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad image instead of skipping it")
    parser.add_argument("--resume", action="store_true", help="complete an interrupted run")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_common(parser)


def _add_generation(parser: argparse.ArgumentParser) -> None:
    """Options of every command that writes a synthetic dataset."""
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default: 0)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_common(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facekd",
        description="Knowledge distillation for face image quality assessment and face recognition.",
    )
    parser.add_argument("--version", action="version", version=f"facekd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser("demo", help="run the main job on built-in synthetic data")
    demo.add_argument("--out", default="demo_run", help="output folder (default: demo_run)")
    _add_generation(demo)
    demo.set_defaults(func=cmd_demo)

    synth = commands.add_parser("synth", help="generate deterministic synthetic face datasets")
    synth_commands = synth.add_subparsers(dest="synth_command", metavar="KIND", required=True)

    ids = synth_commands.add_parser("identities", help="faces of many identities (recognition)")
    ids.add_argument("out", help="output folder")
    ids.add_argument("--identities", type=int, default=None, help="number of identities (default: 100)")
    ids.add_argument("--images-per-identity", type=int, default=None, help="(default: 20)")
    ids.add_argument("--size", type=int, default=112, help="image side in pixels (default: 112)")
    ids.add_argument("--difficulty", type=float, default=None,
                     help="0 (easy) … 1 (hard): sets both knobs below; see README 'Synthetic data' (default: 0.5)")
    ids.add_argument("--identity-spread", type=float, default=None,
                     help="0…1, how different identities are from each other (overrides --difficulty)")
    ids.add_argument("--nuisance", type=float, default=None,
                     help="0…1, strength of pose/illumination/occlusion variation (overrides --difficulty)")
    ids.add_argument("--format", action="append", choices=("folder", "rec", "bin"),
                     help="output format, repeatable: folder (<id>/<n>.png + pairs.txt), "
                          "rec (insightface train.rec/.idx), bin (insightface pairs.bin); default folder")
    ids.add_argument("--pairs", type=int, default=None, help="number of verification pairs (balanced)")
    ids.add_argument("--degrade", type=float, default=0.0,
                     help="probability that an image carries quality degradations (default: 0)")
    _add_generation(ids)
    ids.set_defaults(func=cmd_synth_identities)

    qual = synth_commands.add_parser("quality", help="degraded faces with MOS labels (quality)")
    qual.add_argument("out", help="output folder")
    qual.add_argument("--labeled", type=int, default=None, help="labeled images (default: 1000)")
    qual.add_argument("--unlabeled", type=int, default=None,
                      help="unlabeled images, split into two lists (default: 2000)")
    qual.add_argument("--test", type=int, default=None, help="test images (default: 500)")
    qual.add_argument("--size", type=int, default=None, help="image side in pixels (default: 128)")
    _add_generation(qual)
    qual.set_defaults(func=cmd_synth_quality)

    ijb = synth_commands.add_parser("ijb", help="IJB-B/C-style templates: loose crops, 5 landmarks, pair list")
    ijb.add_argument("out", help="output folder (meta/, loose_crop/)")
    ijb.add_argument("--target", choices=("IJBC", "IJBB"), default="IJBC", help="names of the meta files")
    ijb.add_argument("--identities", type=int, default=None, help="(default: 20)")
    ijb.add_argument("--templates-per-identity", type=int, default=None, help="(default: 2)")
    ijb.add_argument("--media-per-template", type=int, default=None, help="(default: 2)")
    ijb.add_argument("--images-per-media", type=int, default=None, help="(default: 2)")
    ijb.add_argument("--crop", type=int, default=None, help="side of the loose crops in pixels (default: 160)")
    ijb.add_argument("--impostors", type=int, default=None, help="impostor template pairs (default: 5 per genuine)")
    _add_generation(ijb)
    ijb.set_defaults(func=cmd_synth_ijb)

    quality = commands.add_parser("quality", help="face image quality: pipeline, training, scoring")
    quality_commands = quality.add_subparsers(dest="quality_command", metavar="STEP", required=True)

    def config_args(parser: argparse.ArgumentParser) -> None:
        _add_config(parser, "quality", "folder with labeled.csv, test.csv, unlabeled_1.txt, unlabeled_2.txt")

    run = quality_commands.add_parser("run", help="T0 → pseudo(U1) → T1 → pseudo(U2) → student, plus control")
    config_args(run)
    run.add_argument("--force", action="append", metavar="STAGE",
                     help="redo this stage (and what depends on it): t0, pseudo_u1, t1, pseudo_u2, student, control")
    run.set_defaults(func=cmd_quality_run)

    train = quality_commands.add_parser("train", help="train one model of a config on the labeled set")
    config_args(train)
    train.add_argument("--model", choices=("teacher", "student"), default="teacher")
    train.set_defaults(func=cmd_quality_train)

    pseudo = quality_commands.add_parser("pseudo-label", help="label images with a model's MOS predictions")
    pseudo.add_argument("model", help="model file")
    pseudo.add_argument("images", nargs="+", help="images, folders or list files")
    pseudo.add_argument("--out", required=True, help="CSV to write (path,mos,weight)")
    pseudo.add_argument("--labeled", help="MOS CSV to fit the 4-parameter logistic that maps scores to MOS")
    pseudo.add_argument("--confidence", choices=("none", "flip"), default="none")
    pseudo.add_argument("--batch-size", type=int, default=64)
    _add_common(pseudo)
    pseudo.set_defaults(func=cmd_quality_pseudo_label)

    evaluate = quality_commands.add_parser("eval", help="SRCC/PLCC/KRCC/RMSE of a model on a MOS CSV")
    evaluate.add_argument("model", help="model file (.safetensors or .onnx)")
    evaluate.add_argument("test", help="MOS CSV (path,mos)")
    evaluate.add_argument("--out", help="also write this report.json")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    _add_common(evaluate)
    evaluate.set_defaults(func=cmd_quality_eval)

    score = quality_commands.add_parser("score", help="score images, folders or list files into a CSV")
    score.add_argument("model", help="model file (.safetensors, or .onnx for ONNX Runtime)")
    score.add_argument("paths", nargs="+", help="images, folders (recursive) or list files")
    score.add_argument("--out", required=True, help="scores CSV (path,score); bad images go to <stem>.errors.csv")
    _add_inference(score, batch_size=64)
    score.set_defaults(func=cmd_quality_score)

    recognition = commands.add_parser("recognition", help="face recognition: training, distillation, evaluation")
    recognition_commands = recognition.add_subparsers(dest="recognition_command", metavar="STEP", required=True)

    def recognition_config_args(parser: argparse.ArgumentParser) -> None:
        _add_config(parser, "recognition", "training data: an identity folder or an insightface .rec")
        parser.add_argument("--eval", action="append", metavar="SET",
                            help="verification set (pairs.txt, .bin or identity folder), repeatable")

    rtrain = recognition_commands.add_parser("train", help="train a model alone with the margin softmax")
    recognition_config_args(rtrain)
    rtrain.add_argument("--model", choices=("teacher", "student"), default="teacher",
                        help="which model of the config (default: teacher)")
    rtrain.set_defaults(func=cmd_recognition_train)

    distill = recognition_commands.add_parser("distill", help="train the student with a frozen teacher")
    recognition_config_args(distill)
    distill.add_argument("--teacher", help="teacher model file (default: distill.teacher of the config)")
    distill.add_argument("--method", choices=("none", "feature", "rkd", "similarity", "ekd", "ekd+feature"),
                         help="distillation method (default: distill.method of the config)")
    distill.add_argument("--teacher-cache", metavar="CACHE",
                         help="read the teacher's embeddings from this cache (`recognition teacher-cache`) "
                              "instead of running it (default: distill.teacher_cache of the config)")
    _add_convention(distill, "--teacher")
    distill.set_defaults(func=cmd_recognition_distill)

    tcache = recognition_commands.add_parser(
        "teacher-cache", help="embed every training image and its mirror with the teacher, once, for distill")
    tcache.add_argument("teacher", help="teacher model file (.safetensors, or an .onnx recognizer)")
    tcache.add_argument("--data", required=True, help="training data: an identity folder or an insightface .rec")
    tcache.add_argument("--out", required=True, help="cache folder (an interrupted build is completed)")
    _add_backend(tcache, batch_size=128)
    tcache.add_argument("--part-images", type=int, default=16384,
                        help="images per part, the unit of resuming and sharding (default: 16384)")
    tcache.add_argument("--shard", metavar="I/N", help="only parts p with p %% N == I (processes sharing one cache)")
    tcache.add_argument("--overwrite", action="store_true", help="replace a cache of another teacher or data")
    _add_convention(tcache, "TEACHER")
    _add_common(tcache)
    tcache.set_defaults(func=cmd_recognition_teacher_cache)

    reval = recognition_commands.add_parser("eval", help="verification accuracy, TPR@FPR and ROC of a model")
    reval.add_argument("model", help="recognition model file")
    reval.add_argument("--pairs", action="append", help="pairs file (path_a path_b same), repeatable")
    reval.add_argument("--bin", action="append", help="insightface verification .bin, repeatable")
    reval.add_argument("--identities", action="append", help="identity folder: every pair of its images")
    reval.add_argument("--out", help="folder for report.json and roc.png")
    reval.add_argument("--batch-size", type=int, default=128)
    reval.add_argument("--no-flip", action="store_true", help="embed without the flipped image")
    reval.add_argument("--ijb", metavar="ROOT", help="IJB-B/C 1:1 verification on ROOT (meta/, loose_crop/)")
    reval.add_argument("--target", default="IJBC", help="with --ijb: IJBC (default) or IJBB")
    reval.add_argument("--no-norm-score", action="store_true", help="with --ijb: L2-normalise each image first")
    reval.add_argument("--no-detector-score", action="store_true", help="with --ijb: no detector-score weights")
    reval.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                       help="with --ijb: auto times PyTorch and ONNX Runtime and keeps the faster (default)")
    reval.add_argument("--device", default="cpu", help="with --ijb: cpu (default), cuda, cuda:N or auto")
    reval.add_argument("--threads", type=int, help="with --ijb: inference threads (default: every core)")
    reval.add_argument("--workers", type=int, help="with --ijb: decoding threads (default: CPU count, at most 8)")
    reval.add_argument("--resume", action="store_true", help="with --ijb: complete or reuse the embeddings in --out")
    reval.add_argument("--overwrite", action="store_true", help="with --ijb: embed again over existing embeddings")
    reval.add_argument("--json", action="store_true", help="print JSON")
    _add_convention(reval)
    _add_common(reval)
    reval.set_defaults(func=cmd_recognition_eval)

    embed = recognition_commands.add_parser("embed", help="embed images, folders or list files into an .npz")
    embed.add_argument("model", help="recognition model file")
    embed.add_argument("paths", nargs="+", help="images, folders (recursive) or list files")
    embed.add_argument("--out", required=True, help=".npz to write (paths, embeddings); bad files → <stem>.errors.csv")
    embed.add_argument("--flip", action="store_true", help="add the flipped image's embedding (as in eval)")
    _add_inference(embed, batch_size=128)
    _add_convention(embed)
    embed.set_defaults(func=cmd_recognition_embed)

    evaluate_cmd = commands.add_parser("evaluate", help="quality judged by recognition (EDC)")
    evaluate_commands = evaluate_cmd.add_subparsers(dest="evaluate_command", metavar="KIND", required=True)
    edc = evaluate_commands.add_parser("edc", help="Error-versus-Discard Characteristic of quality models")
    edc.add_argument("--recognizer", required=True, help="recognition model file")
    edc.add_argument("--quality", action="append", required=True, help="quality model file, repeatable")
    edc.add_argument("--name", action="append", help="label of each --quality model in order (default: its folder)")
    source = edc.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", help="pairs file (path_a path_b same)")
    source.add_argument("--identities", help="identity folder: every pair of its images")
    edc.add_argument("--out", required=True, help="folder for report.json and edc.png")
    edc.add_argument("--fmr", type=float, default=1e-3, help="FMR at which the threshold is fixed (default 1e-3)")
    edc.add_argument("--start-fnmr", type=float, help="fix the threshold at this starting FNMR instead")
    edc.add_argument("--limit", type=float, action="append", help="pAUC discard limit, repeatable (default 0.2, 0.3)")
    edc.add_argument("--batch-size", type=int, default=64)
    _add_convention(edc, "--recognizer")
    _add_common(edc)
    edc.set_defaults(func=cmd_evaluate_edc)

    report = commands.add_parser("report", help="a self-contained HTML page of any facekd run folder")
    report.add_argument("run_dir", help="a run folder (quality, recognition, EDC) or a folder holding several")
    report.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html)")
    report.add_argument("--gallery", type=int, default=48, help="test images in the quality gallery (default 48)")
    _add_common(report)
    report.set_defaults(func=cmd_report)

    imp = commands.add_parser("import", help="convert another tool's checkpoint into a facekd model file",
                              description="Formats: efficient-fiqa (Efficient-FIQA's released EdgeNeXt-XXS / "
                                          "Swin-B .pt, recognised from its keys), insightface (arcface_torch's "
                                          "backbone.pth; needs --arch r18|r34|r50|r100|mbf|mbf_large), timm (a "
                                          "timm backbone state dict as the trunk of a quality model; needs --arch "
                                          "timm/<name>).")
    imp.add_argument("format", choices=["efficient-fiqa", "insightface", "timm"])
    imp.add_argument("checkpoint", help=".pt/.pth (read with torch.load(weights_only=True)) or .safetensors")
    imp.add_argument("--out", required=True, help="the facekd model file to write (.safetensors)")
    imp.add_argument("--arch", help="insightface: r18, r34, r50, r100, mbf or mbf_large; timm: the timm model, "
                                    "e.g. timm/edgenext_xx_small")
    imp.add_argument("--input-size", type=int, help="input side (default: the checkpoint's own, 352 / 448)")
    _add_common(imp)
    imp.set_defaults(func=cmd_import)

    export = commands.add_parser("export", help="export a model file to ONNX (checked against torch)")
    export.add_argument("model", help="model file (.safetensors)")
    export.add_argument("--out", required=True, help="ONNX file to write")
    export.add_argument("--opset", type=int, default=17)
    _add_common(export)
    export.set_defaults(func=cmd_export)

    merge = commands.add_parser("merge", help="join the outputs of a sharded score or embed job")
    merge.add_argument("parts", nargs="+", help="the shards' scores CSVs or embedding .npz files")
    merge.add_argument("--out", required=True, help="merged .csv or .npz (errors merged into <stem>.errors.csv)")
    merge.add_argument("--partial", action="store_true", help="merge even when some shards are missing")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output")
    merge.set_defaults(func=cmd_merge)

    models = commands.add_parser("models", help="architectures with params, GFLOPs and CPU speed")
    models.add_argument("--arch", action="append", help="only this architecture (repeatable)")
    models.add_argument("--no-measure", action="store_true", help="skip latency/throughput timing")
    models.add_argument("--family", help="list the members of a backbone family (timm, torchvision) instead")
    models.add_argument("--filter", help="with --family: only names matching this pattern, e.g. 'edgenext*'")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_common(models)
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except FacekdError as error:
        print(f"facekd: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # disk full, permission denied, ... on a path the library did not name
        where = f"{error.filename}: " if error.filename else ""
        print(f"facekd: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("facekd: interrupted", file=sys.stderr)
        return 130
