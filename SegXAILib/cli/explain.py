"""``segxai explain`` (attribution maps of one case) and ``segxai methods`` (the registry)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..image import SegXAIInputError
from ..progress import sub_progress
from .common import case_card, case_options, case_settings, load_case_model, options_named, progress_bar

__all__ = ["add_commands"]

#: library parameters that ``segxai explain`` passes from the option of the same name
_OPTIONS = ("method", "param", "target", "window_batch")


def _check_explain_arguments(args: argparse.Namespace):
    """Everything that can be checked before any heavy work: method, parameters, target,
    post-processing, model card and channel count. Returns (params, target spec, card)."""
    from ..attribution import POSTPROCESSING, TargetSpec, get_method, parse_params

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
    from ..io import check_writable_dir
    from ..pipeline import MethodSettings, add_maps, read_case_images, start_case, write_case

    with options_named(*_OPTIONS):
        params, spec, card = _check_explain_arguments(args)
    method = MethodSettings(method=args.method, params=params, target=args.target)
    settings = case_settings(args, methods=[method],
                             instances={"enabled": False}, precision={"window_batch": args.window_batch})
    out_dir = check_writable_dir(args.out)
    model = load_case_model(card, args)
    image = read_case_images(args.images, card)
    with progress_bar(f"explain ({args.method})", not args.quiet) as progress, options_named(*_OPTIONS):
        case = start_case(image, model, settings, progress=sub_progress(progress, 0.0, 0.1))
        add_maps(case, model, progress=sub_progress(progress, 0.1, 1.0))
    name = settings.methods[0].name
    case.maps[name] = case.maps[name].postprocessed(args.postprocess)
    manifest = write_case(case, out_dir, suffix=args.suffix, inputs=dict(zip(card.input_channels, args.images)))
    for channel in image.channel_names:
        print(f"{channel}: {out_dir / 'maps' / f'{name}_{channel}{args.suffix}'}")
    print(f"metadata: {out_dir / 'maps' / f'{name}.json'}")
    print(f"manifest: {manifest}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    import json

    from ..attribution import method_specs

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


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``explain`` and ``methods`` to the ``segxai`` sub-parsers."""
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
