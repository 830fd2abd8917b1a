"""The ``segxai`` command.

Exit codes: 0 success, 2 bad input (a clear message names the file or parameter), 130
interrupted, 1 any other failure.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .image import SegXAIInputError
from .progress import Cancelled, ProgressCallback

EXIT_BAD_INPUT = 2


@contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[ProgressCallback]:
    """A tqdm bar driven by a SegXAI progress callback (fractions 0..1)."""
    from tqdm import tqdm

    bar = tqdm(total=1000, desc=description, disable=not enabled, bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def update(fraction: float, message: str = "") -> None:
        target = int(round(fraction * 1000))
        if target > bar.n:
            bar.update(target - bar.n)
        if message:
            bar.set_postfix_str(message, refresh=False)

    try:
        yield update
    finally:
        bar.close()


def _cmd_segment(args: argparse.Namespace) -> int:
    from .io import check_writable_dir
    from .models import load_model
    from .pipeline import resolve_model_card, segment_case, write_segmentation

    check_writable_dir(args.out)
    model = load_model(resolve_model_card(args.model), device=args.device, trust=args.trust_bundle)
    with progress_bar("segment", not args.quiet) as progress:
        _, segmentation = segment_case(args.images, model, progress=progress)
    written = write_segmentation(segmentation, args.out, suffix=args.suffix)
    for role, path in written.items():
        print(f"{role}: {path}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .models import load_model
    from .pipeline import resolve_model_card

    card = resolve_model_card(args.model)
    print(card.summary())
    if args.load:
        model = load_model(card, device="cpu", trust=args.trust_bundle)
        parameters = sum(p.numel() for p in model.network.parameters())
        print(f"  parameters   : {parameters:,}")
    print(f"  checksum     : {card.checksum()}")
    print(f"  card         : {card.path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings.reduced() if args.quick else DemoSettings()
    with progress_bar("demo", not args.quiet) as progress:
        result = run_demo(args.out, seed=args.seed, device=args.device, settings=settings, progress=progress)
    print(f"Dice against the inserted lesions: {result.dice:.3f}")
    if "scene" in result.outputs:
        print(f"Slicer scene: {Path(result.outputs['scene']).resolve()}")
    print(f"Report: {result.report.resolve()}")
    return 0


def _cmd_train_demo(args: argparse.Namespace) -> int:
    from .sample_data import resources_dir
    from .training import train_demo_models

    out = args.out if args.out is not None else resources_dir() / "Models"
    with progress_bar("train-demo", not args.quiet) as progress:
        cards = train_demo_models(out, args.models, args.iterations, progress=progress)
    for name, card in cards.items():
        print(f"{name}: held-out Dice {card.metrics.get('dice_heldout_mean')} -> {card.path}")
    return 0


def _check_explain_arguments(args: argparse.Namespace):
    """Everything that can be checked before any heavy work: method, parameters, target,
    post-processing, model card and channel count. Returns (params, target spec, card)."""
    from .attribution import POSTPROCESSING, TargetSpec, get_method, parse_params

    if get_method(args.method).name == "expected_gradients":
        raise SegXAIInputError(
            "--method expected_gradients needs reference volumes, which the command line cannot pass yet; "
            "use integrated_gradients (baselines=black_white) or the Python API"
        )
    params = parse_params(args.method, list(args.param or []))
    if args.target.startswith("region:"):
        mask_path = Path(args.target.split(":")[1])
        if not mask_path.exists():
            raise SegXAIInputError(f"--target {args.target!r}: mask {mask_path}: no such file")
    spec = TargetSpec.parse(args.target)
    if args.postprocess not in POSTPROCESSING:
        raise SegXAIInputError(f"--postprocess {args.postprocess!r}: expected one of {', '.join(POSTPROCESSING)}")
    if args.window_batch < 1:
        raise SegXAIInputError(f"--window-batch {args.window_batch}: must be >= 1")
    card = case_card(args)
    if spec.class_name:
        spec.class_index(card.class_names)  # an unknown class name fails here, before the work
    return params, spec, card


def _cmd_explain(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from . import __version__
    from .attribution import explain, get_method, postprocess
    from .io import atomic_path, check_writable_dir, read_channels, write_image
    from .models import load_model

    params, spec, card = _check_explain_arguments(args)
    out_dir = check_writable_dir(args.out)
    model = load_model(card, device=args.device, trust=args.trust_bundle)
    image = read_channels(args.images, card.input_channels)
    with progress_bar(f"explain ({args.method})", not args.quiet) as progress:
        result = explain(image, model, args.method, target=spec, params=params, window_batch=args.window_batch,
                         progress=progress)
    maps = result.maps.with_array(postprocess(result.maps.array, args.postprocess), result.maps.channel_names)
    written = {}
    for name in maps.channel_names:
        written[name] = write_image(maps.channel(name), out_dir / f"{args.method}_{name}{args.suffix}")
    metadata = result.metadata()
    sidecar = {
        **metadata,
        "seed": metadata["parameters"].get("seed") if get_method(args.method).stochastic else None,
        "postprocessing": args.postprocess,
        "window_batch": args.window_batch,
        "inputs": {name: str(Path(path).resolve()) for name, path in zip(card.input_channels, args.images)},
        "files": {name: path.name for name, path in written.items()},
        "value_range": {name: [float(np.min(maps.channel(name).array)), float(np.max(maps.channel(name).array))]
                        for name in maps.channel_names},
        "segxai_version": __version__,
    }
    sidecar_path = out_dir / f"{args.method}.json"
    with atomic_path(sidecar_path) as temporary:
        temporary.write_text(json.dumps(sidecar, indent=2, default=str) + "\n", encoding="utf-8")
    for name, path in written.items():
        print(f"{name}: {path}")
    print(f"metadata: {sidecar_path}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    import json

    from .attribution import method_specs

    specs = method_specs()
    if args.json:
        print(json.dumps(specs, indent=2, default=str))
        return 0
    for spec in specs:
        flag = " (stochastic)" if spec["stochastic"] else ""
        print(f"{spec['name']}{flag}: {spec['summary']}")
        for p in spec["parameters"]:
            bounds = []
            if p["choices"]:
                bounds.append("one of " + ", ".join(str(c) for c in p["choices"]))
            if p["minimum"] is not None:
                bounds.append(f">= {p['minimum']}")
            if p["maximum"] is not None:
                bounds.append(f"<= {p['maximum']}")
            extra = f"; {'; '.join(bounds)}" if bounds else ""
            print(f"    {p['name']}={p['default']}  ({p['kind']}{extra}) {p['help']}")
    return 0


def model_help() -> str:
    from .sample_data import BUNDLED_MODELS

    return f"a model card file or folder, or a bundled model: {', '.join(BUNDLED_MODELS)}"


def device_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")


def case_options(command: argparse.ArgumentParser) -> None:
    """The options every command that runs a model on one case takes."""
    command.add_argument("images", nargs="+", metavar="IMAGE", help="one image per model input channel, in the card's order")
    command.add_argument("--model", required=True, help=model_help())
    command.add_argument("--out", required=True, type=Path, help="output folder")
    command.add_argument("--trust-bundle", action="store_true", help="allow MONAI bundles (their configs can run code)")
    device_option(command)


def case_card(args: argparse.Namespace):
    """The model card of ``--model``, checked against the number of IMAGE arguments."""
    from .pipeline import resolve_model_card

    card = resolve_model_card(args.model)
    if len(args.images) != len(card.input_channels):
        raise SegXAIInputError(
            f"model {card.name!r} takes {len(card.input_channels)} image(s) "
            f"({', '.join(card.input_channels)}), got {len(args.images)}"
        )
    return card


# Modules that add their own sub-commands: each defines ``add_commands(commands)``, taking the
# sub-parsers object, and uses the option helpers above.
COMMAND_MODULES: tuple[str, ...] = ("SegXAILib.instances.commands", "SegXAILib.attribution.pattern_commands",
                                     "SegXAILib.evaluation.commands", "SegXAILib.topology.commands")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segxai",
        description="Explainability and quality assurance for 3D medical segmentation models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    segment = commands.add_parser("segment", help="segment an image (one file or DICOM folder per input channel)")
    case_options(segment)
    segment.add_argument("--suffix", default=".nii.gz", choices=[".nii.gz", ".nii", ".nrrd", ".mha"], help="output format")
    segment.set_defaults(run=_cmd_segment)

    explain_cmd = commands.add_parser(
        "explain", help="attribution maps of a model's segmentation (one map per input channel)"
    )
    case_options(explain_cmd)
    explain_cmd.add_argument("--method", required=True, help="an attribution method (see: segxai methods)")
    explain_cmd.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                             help="a method parameter (repeatable), e.g. n_samples=20")
    explain_cmd.add_argument("--target", default="class",
                             help="what to explain: class[:NAME] (default: the first foreground class), "
                                  "class_threshold:NAME:T, instance:ID[:NAME], region:MASKFILE[:NAME], voxel:R,A,S[:NAME]")
    explain_cmd.add_argument("--postprocess", default="signed", metavar="MODE",
                             help="signed (default), absolute, positive or normalised")
    explain_cmd.add_argument("--suffix", default=".nii.gz", choices=[".nii.gz", ".nii", ".nrrd", ".mha"], help="output format")
    explain_cmd.add_argument("--window-batch", type=int, default=1, metavar="N", help="sliding windows per network call")
    explain_cmd.set_defaults(run=_cmd_explain)

    methods = commands.add_parser("methods", help="list the attribution methods and their parameters")
    methods.add_argument("--json", action="store_true", help="print the registry as JSON")
    methods.set_defaults(run=_cmd_methods)

    info = commands.add_parser("info", help="describe a model from its card")
    info.add_argument("model", metavar="MODEL", help=model_help())
    info.add_argument("--load", action="store_true", help="also build the network and count its parameters")
    info.add_argument("--trust-bundle", action="store_true", help="allow MONAI bundles (their configs can run code)")
    info.set_defaults(run=_cmd_info)

    demo = commands.add_parser("demo", help="segment the bundled sample with inserted lesions and write a report")
    demo.add_argument("--out", required=True, type=Path, help="output folder")
    demo.add_argument("--seed", type=int, default=2026, help="seed of the inserted lesions")
    demo.add_argument("--quick", action="store_true",
                      help="a reduced run: a 48x48x32 crop around one lesion, fewer samples (about a minute)")
    device_option(demo)
    demo.set_defaults(run=_cmd_demo)

    train = commands.add_parser("train-demo", help="train the bundled demo models from phantoms (CPU, minutes)")
    train.add_argument("--out", type=Path, default=None, help="models folder (default: Resources/Models)")
    train.add_argument("--models", nargs="+", default=None, help="which: lesions parotid-S2 parotid-S4 parotid-S6")
    train.add_argument("--iterations", type=int, default=None, help="training iterations per model (default per model)")
    train.set_defaults(run=_cmd_train_demo)

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return int(args.run(args))
    except SegXAIInputError as error:
        print(f"segxai {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, Cancelled):
        print(f"segxai {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
