"""The `facekd` command: parses arguments, calls the library, prints results. Nothing else."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from facekd import __version__
from facekd.errors import FacekdError
from facekd.runtime import keep_freed_memory


def _progress(args: argparse.Namespace):
    from facekd.progress import RichProgress

    return RichProgress(disable=args.quiet)


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


# --- demo --------------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from facekd.synth import generate_identities, generate_quality

    out = Path(args.out)
    progress = _progress(args)
    quality = generate_quality(out / "quality", seed=args.seed, workers=args.workers,
                               progress=progress, overwrite=args.overwrite)
    identities = generate_identities(out / "identities", seed=args.seed, workers=args.workers,
                                     formats=("folder", "rec", "bin"), progress=progress,
                                     overwrite=args.overwrite)
    _print_summary(f"Synthetic quality benchmark → {out / 'quality'}", quality)
    _print_summary(f"Synthetic identity benchmark → {out / 'identities'}", identities)
    return 0


# --- models ------------------------------------------------------------------------------------

def cmd_models(args: argparse.Namespace) -> int:
    from facekd.models.cost import cost_report, format_cost_table

    rows = cost_report(archs=args.arch or None, measure=not args.no_measure,
                       progress=None if args.json else _progress(args))
    if args.json:
        _print_json(rows)
    else:
        _console().print(format_cost_table(rows))
    return 0


# --- parser ------------------------------------------------------------------------------------

def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


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

    models = commands.add_parser("models", help="architectures with params, GFLOPs and CPU speed")
    models.add_argument("--arch", action="append", help="only this architecture (repeatable)")
    models.add_argument("--no-measure", action="store_true", help="skip latency/throughput timing")
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
