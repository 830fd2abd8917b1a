"""``segxai patterns``: fit PatternNet / PatternAttribution patterns for a model.

``segxai patterns fit --model M --images DIR [--estimator linear|two_component|both]
[--max-volumes N] [--max-windows N] [--seed S] [--window-batch N] [--device D] [--out FOLDER]``

``DIR`` holds one case per sub-folder or per file set:

* one sub-folder per case with one file per input channel named after the card's channel
  (``DIR/case01/FLAIR.nii.gz``, ``DIR/case01/T1.nii.gz``; any of .nii.gz, .nii, .nrrd, .nhdr,
  .mha, .mhd; names compared case-insensitively); a single-channel model also takes a
  sub-folder holding exactly one image file;
* or files directly in ``DIR`` named ``<case>_<channel><suffix>`` (``case01_FLAIR.nii.gz``,
  ``case01_T1.nii.gz``); a single-channel model also takes ``<case><suffix>``.

Each case is preprocessed exactly as inference does (orientation, spacing, intensities) and
the statistics are collected over its sliding windows. The patterns files
(``patterns_<estimator>.pt``) are written atomically into the model card's folder, or into
``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..image import SegXAIInputError
from .common import device_option, load_case_model, model_help, options_named, progress_bar, trust_option

__all__ = ["add_commands", "find_cases"]


def _image_suffix(name: str) -> str:
    from ..io import IMAGE_SUFFIXES

    lower = name.lower()
    return next((s for s in IMAGE_SUFFIXES if lower.endswith(s)), "")


def find_cases(folder: Path, channels: list[str]) -> list[tuple[str, list[Path]]]:
    """``(case name, one path per channel in the card's order)`` for every case in ``folder``,
    sorted by name (see the module docstring for the two layouts)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SegXAIInputError(f"--images {folder}: no such folder")
    lowered = [c.lower() for c in channels]
    cases: dict[str, dict[str, Path]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            images = [p for p in sorted(entry.iterdir()) if p.is_file() and _image_suffix(p.name)]
            found: dict[str, Path] = {}
            for path in images:
                stem = path.name[: -len(_image_suffix(path.name))].lower()
                if stem in lowered:
                    found[channels[lowered.index(stem)]] = path
            if len(channels) == 1 and not found and len(images) == 1:
                found[channels[0]] = images[0]
            missing = [c for c in channels if c not in found]
            if missing:
                raise SegXAIInputError(
                    f"--images: case folder {entry} has no image for channel(s) {missing}; expected files named "
                    f"{', '.join(c + '.nii.gz' for c in channels)} (or another image suffix)"
                )
            cases[entry.name] = found
            continue
        suffix = _image_suffix(entry.name)
        if not suffix:
            continue
        stem = entry.name[: -len(suffix)]
        matched = [c for c in channels if stem.lower().endswith("_" + c.lower())]
        if matched:
            channel = max(matched, key=len)
            case = stem[: -(len(channel) + 1)]
        elif len(channels) == 1:
            channel, case = channels[0], stem
        else:
            raise SegXAIInputError(
                f"--images: file {entry.name} does not end with _<channel> for any of the model's channels {channels}"
            )
        group = cases.setdefault(case, {})
        if channel in group:
            raise SegXAIInputError(f"--images: case {case!r} has two images for channel {channel!r}")
        group[channel] = entry
    if not cases:
        raise SegXAIInputError(
            f"--images {folder}: no cases found; expected one sub-folder per case, or files named "
            f"<case>_<channel>.nii.gz with channels {channels}"
        )
    result = []
    for case, group in sorted(cases.items()):
        missing = [c for c in channels if c not in group]
        if missing:
            raise SegXAIInputError(f"--images: case {case!r} has no image for channel(s) {missing}")
        result.append((case, [group[c] for c in channels]))
    return result


def _estimators(text: str) -> tuple[str, ...]:
    from ..attribution.patterns import ESTIMATORS

    if text == "both":
        return ESTIMATORS
    if text not in ESTIMATORS:
        raise SegXAIInputError(f"--estimator {text!r}: expected linear, two_component or both")
    return (text,)


def _cmd_patterns_fit(args: argparse.Namespace) -> int:
    from ..attribution.patterns import fit_patterns
    from ..io import check_writable_dir, read_channels
    from ..pipeline import resolve_model_card

    # everything checkable before the work, so that bad input writes nothing
    estimators = _estimators(args.estimator)
    for option, value in (("--max-volumes", args.max_volumes), ("--max-windows", args.max_windows)):
        if value is not None and value < 1:
            raise SegXAIInputError(f"{option} {value}: must be >= 1")
    if args.window_batch < 1:
        raise SegXAIInputError(f"--window-batch {args.window_batch}: must be >= 1")
    card = resolve_model_card(args.model)
    cases = find_cases(args.images, list(card.input_channels))
    if args.out is not None:
        out_dir = check_writable_dir(args.out)
    else:
        out_dir = check_writable_dir(card.path.parent, create=False)
    model = load_case_model(card, args)

    def reader(paths):
        return lambda: read_channels(paths, card.input_channels)

    with progress_bar("patterns fit", not args.quiet) as progress, \
            options_named("max_volumes", "max_windows", "window_batch", "seed", "estimator", estimators="--estimator"):
        sets = fit_patterns(model, [reader(paths) for _, paths in cases], estimators, max_volumes=args.max_volumes,
                            max_windows=args.max_windows, window_batch=args.window_batch, seed=args.seed,
                            progress=progress)
    for estimator, pattern_set in sets.items():
        path = pattern_set.save(Path(out_dir) / f"patterns_{estimator}.pt")
        print(f"{estimator}: {path} ({path.stat().st_size / 1e6:.2f} MB; {pattern_set.volumes} volumes, "
              f"{pattern_set.windows} windows, {pattern_set.voxels} voxels, {len(pattern_set.patterns)} layers)")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``segxai patterns fit`` to the sub-parsers ``commands``."""
    patterns = commands.add_parser("patterns", help="PatternNet / PatternAttribution patterns of a model")
    actions = patterns.add_subparsers(dest="patterns_command", required=True, metavar="ACTION")
    fit = actions.add_parser(
        "fit", help="fit the patterns from a folder of cases and write patterns_<estimator>.pt beside the model card"
    )
    fit.add_argument("--model", required=True, help=model_help())
    fit.add_argument("--images", required=True, type=Path, metavar="DIR",
                     help="one sub-folder per case (files named after the card's channels, e.g. FLAIR.nii.gz), "
                          "or files named <case>_<channel>.nii.gz")
    fit.add_argument("--estimator", default="both", metavar="NAME", help="linear, two_component or both (default)")
    fit.add_argument("--max-volumes", type=int, default=None, metavar="N",
                     help="use a seeded random subset of N cases (default: all)")
    fit.add_argument("--max-windows", type=int, default=None, metavar="N",
                     help="at most N sliding windows per case, a seeded random subset (default: all)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the case and window subsets (default 0)")
    fit.add_argument("--window-batch", type=int, default=1, metavar="N", help="sliding windows per network call")
    fit.add_argument("--out", type=Path, default=None, metavar="FOLDER",
                     help="where to write patterns_<estimator>.pt (default: the model card's folder)")
    trust_option(fit)
    device_option(fit)
    fit.set_defaults(run=_cmd_patterns_fit)
