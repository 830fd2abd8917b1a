"""``segxai demo`` (the end-to-end demo on the bundled sample) and ``segxai train-demo`` (the
bundled demo models, trained from phantoms)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import device_option, options_named, progress_bar

__all__ = ["add_commands"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import DemoSettings, run_demo

    settings = DemoSettings.reduced() if args.quick else DemoSettings()
    with progress_bar("demo", not args.quiet) as progress, options_named("device", "seed", "dicom"):
        result = run_demo(args.out, seed=args.seed, device=args.device, settings=settings, progress=progress,
                          dicom=args.dicom)
    print(f"Dice against the inserted lesions: {result.dice:.3f}")
    if args.dicom:
        print(f"DICOM (series, SEG, RTSTRUCT, parametric maps): {(Path(args.out) / 'dicom').resolve()}")
    if "scene" in result.outputs:
        print(f"Slicer scene: {Path(result.outputs['scene']).resolve()}")
    print(f"Report: {result.report.resolve()}")
    return 0


def _cmd_train_demo(args: argparse.Namespace) -> int:
    from ..sample_data import resources_dir
    from ..training import train_demo_models

    out = args.out if args.out is not None else resources_dir() / "Models"
    with progress_bar("train-demo", not args.quiet) as progress, options_named(names="--models"):
        cards = train_demo_models(out, args.models, args.iterations, progress=progress, seeds=args.seeds)
    for name, card in cards.items():
        print(f"{name}: held-out Dice {card.metrics.get('dice_heldout_mean')} -> {card.path}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``demo`` and ``train-demo`` to the ``segxai`` sub-parsers."""
    demo = commands.add_parser("demo", help="segment the bundled sample with inserted lesions and write a report")
    demo.add_argument("--out", required=True, type=Path, help="output folder")
    demo.add_argument("--seed", type=int, default=2026, help="seed of the inserted lesions")
    demo.add_argument("--quick", action="store_true",
                      help="a reduced run: a 48x48x32 crop around one lesion, fewer samples (about a minute)")
    demo.add_argument("--dicom", action="store_true",
                      help="also write the results as DICOM into OUT/dicom: the input as MR series, SEG, RTSTRUCT and "
                           "parametric maps referencing it")
    device_option(demo)
    demo.set_defaults(run=_cmd_demo)

    train = commands.add_parser("train-demo", help="train the bundled demo models from phantoms (CPU, minutes)")
    train.add_argument("--out", type=Path, default=None, help="models folder (default: Resources/Models)")
    train.add_argument("--models", nargs="+", default=None, help="which: lesions parotid-S2 parotid-S4 parotid-S6")
    train.add_argument("--iterations", type=int, default=None, help="training iterations per model (default per model)")
    train.add_argument("--seeds", type=int, nargs="+", default=None,
                       help="train a seed ensemble of each model (one member per seed, at least two) into "
                            "<folder>_seeds: its card averages the members, for uncertainty")
    train.set_defaults(run=_cmd_train_demo)
