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
    from .pipeline import run_demo

    with progress_bar("demo", not args.quiet) as progress:
        result = run_demo(args.out, seed=args.seed, device=args.device, progress=progress)
    print(f"Dice against the inserted lesions: {result.dice:.3f}")
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
    from .pipeline import resolve_model_card

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
    card = resolve_model_card(args.model)
    if len(args.images) != len(card.input_channels):
        raise SegXAIInputError(
            f"model {card.name!r} takes {len(card.input_channels)} image(s) "
            f"({', '.join(card.input_channels)}), got {len(args.images)}"
        )
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


def _parse_instance_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        ids = []
    if not ids or any(i < 1 for i in ids):
        raise SegXAIInputError(f"--instances {text!r}: expected instance ids >= 1 separated by commas, e.g. 3,5")
    return sorted(set(ids), key=ids.index)


def _parse_click(text: str) -> tuple[float, float, float]:
    import math

    try:
        point = tuple(float(v) for v in text.split(","))
    except ValueError:
        point = ()
    if len(point) != 3 or not all(math.isfinite(v) for v in point):
        raise SegXAIInputError(f"--click {text!r}: expected a RAS point in mm, R,A,S (e.g. -12.5,30,4)")
    return point  # type: ignore[return-value]


def _check_lesions_arguments(args: argparse.Namespace):
    """Everything that can be checked before reading images: returns (card, ids, click, aggregations)."""
    from .instances import AGGREGATIONS
    from .pipeline import resolve_model_card

    ids = _parse_instance_ids(args.instances) if args.instances is not None else None
    click = _parse_click(args.click) if args.click is not None else None
    aggregations = [a.strip() for a in args.aggregation.split(",") if a.strip()]
    if not aggregations or any(a not in AGGREGATIONS for a in aggregations):
        raise SegXAIInputError(f"--aggregation {args.aggregation!r}: expected mean, max or mean,max")
    aggregations = sorted(set(aggregations), key=aggregations.index)
    for name, value, low in (("--n-samples", args.n_samples, 1), ("--batch-size", args.batch_size, 1),
                             ("--min-voxels", args.min_voxels, 0), ("--window-batch", args.window_batch, 1)):
        if value < low:
            raise SegXAIInputError(f"{name} {value}: must be >= {low}")
    if not args.noise_level >= 0:
        raise SegXAIInputError(f"--noise-level {args.noise_level}: must be >= 0")
    if not args.click_radius >= 0:
        raise SegXAIInputError(f"--click-radius {args.click_radius}: must be >= 0")
    if args.reference is not None and not Path(args.reference).exists():
        raise SegXAIInputError(f"--reference {args.reference}: no such file")
    card = resolve_model_card(args.model)
    if len(args.images) != len(card.input_channels):
        raise SegXAIInputError(
            f"model {card.name!r} takes {len(card.input_channels)} image(s) "
            f"({', '.join(card.input_channels)}), got {len(args.images)}"
        )
    class_index = 1
    if args.class_name:
        if args.class_name not in card.class_names[1:]:
            raise SegXAIInputError(f"--class {args.class_name!r}: the model's foreground classes are {card.class_names[1:]}")
        class_index = card.class_names.index(args.class_name)
    return card, ids, click, aggregations, class_index


LESION_CSV_COLUMNS = ("id", "group", "reference_id", "voxels", "volume_mm3", "centroid_r", "centroid_a", "centroid_s",
                      "mean_probability")


def _lesion_csv(rows: list[dict], extra: list[str]) -> str:
    import csv
    import io as _io

    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*LESION_CSV_COLUMNS, *extra])
    for row in rows:
        r, a, s = row["centroid_ras"]
        base = [row.get("id"), row.get("group"), row.get("reference_id"), row["voxels"], row["volume_mm3"], r, a, s,
                row.get("mean_probability")]
        flat = {}
        for aggregation, channels in (row.get("saliency") or {}).items():
            for channel, values in channels.items():
                flat[f"peak_positive_{aggregation}_{channel}"] = values["peak_positive"]
                flat[f"peak_negative_{aggregation}_{channel}"] = values["peak_negative"]
        writer.writerow(["" if v is None else v for v in [*base, *(flat.get(c) for c in extra)]])
    return buffer.getvalue()


def _cmd_lesions(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from . import __version__
    from .attribution.api import _model_grid_mask
    from .attribution.forward import SegmentationForward
    from .attribution.targets import InstanceTarget
    from .instances import classify_instances, find_instances, instance_at, instance_smoothgrad, lesion_table
    from .io import atomic_path, check_writable_dir, read_channels, read_image
    from .io import write_image
    from .models import load_model
    from .models.inference import segment
    from .models.preprocessing import model_input, to_input_grid
    from .progress import sub_progress

    card, ids, click, aggregations, class_index = _check_lesions_arguments(args)
    out_dir = check_writable_dir(args.out)
    image = read_channels(args.images, card.input_channels)
    reference = None
    if args.reference is not None:
        reference = read_image(args.reference)
        if reference.num_channels != 1:
            raise SegXAIInputError(f"--reference {args.reference}: expected a single-channel label map")
        if not reference.same_grid(image):
            raise SegXAIInputError(
                f"--reference {args.reference}: not on the input image's grid (shape {reference.spatial_shape} vs "
                f"{image.spatial_shape}, or a different position / spacing / orientation); resample it first"
            )
    model = load_model(card, device=args.device, trust=args.trust_bundle)
    class_name = card.class_names[class_index]
    with progress_bar("lesions", not args.quiet) as progress:
        segmentation = segment(image, model, progress=sub_progress(progress, 0.0, 0.2))
        probabilities = segmentation.probabilities.array[class_index]
        labels, instances = find_instances(segmentation.mask(class_index), probabilities, min_voxels=args.min_voxels,
                                           grid=image)
        chosen: list[int] = []
        if ids is not None:
            unknown = [i for i in ids if i > len(instances)]
            if unknown:
                raise SegXAIInputError(
                    f"--instances: no instance {', '.join(map(str, unknown))}; the prediction has {len(instances)} "
                    f"instance(s) of {class_name!r} (ids 1.. by decreasing size, at least {args.min_voxels} voxels)"
                )
            chosen = ids
        elif click is not None:
            if not instances:
                raise SegXAIInputError(f"--click: the prediction has no instance of {class_name!r}")
            try:
                chosen = [instance_at(labels, image, click, radius_mm=args.click_radius)]
            except SegXAIInputError as error:
                raise SegXAIInputError(f"--click {args.click}: {error}") from None
        groups: dict[int, str] = {}
        false_negatives: list[dict] = []
        if reference is not None:
            classes = classify_instances(labels, reference.array[0] != 0, image, n_tn=0)
            groups = {i: "TP" for i in classes["TP"]["ids"]} | {i: "FP" for i in classes["FP"]["ids"]}
            _, reference_instances = find_instances(reference.array[0] != 0, grid=image)
            for component in reference_instances:
                if component.id in classes["FN"]["ids"]:
                    entry = component.to_dict()
                    false_negatives.append({"id": None, "group": "FN", "reference_id": entry.pop("id"), **entry,
                                            "mean_probability": None})

        maps: dict[int, dict[str, object]] = {}
        if chosen:
            x, model_affine = model_input(image, card, model.device)
            network = model.network
            steps = len(chosen) * len(aggregations)
            step = 0
            for identifier in chosen:
                mask = _model_grid_mask(labels == identifier, image, card)
                if not bool(mask.any()):
                    raise SegXAIInputError(f"instance {identifier} has no voxel on the model's grid (too small)")
                forward = SegmentationForward(network, card, x.shape[2:], InstanceTarget(class_index, mask,
                                              instance_id=identifier), window_batch=args.window_batch)
                for aggregation in aggregations:
                    saliency = instance_smoothgrad(
                        forward, x, n_samples=args.n_samples, noise_level=args.noise_level, aggregation=aggregation,
                        batch_size=args.batch_size, seed=args.seed,
                        progress=sub_progress(progress, 0.2 + 0.8 * step / steps, 0.2 + 0.8 * (step + 1) / steps),
                    )
                    values = saliency[0].detach().float().cpu().numpy()
                    maps.setdefault(identifier, {})[aggregation] = to_input_grid(
                        values, model_affine, image, tuple(image.channel_names))
                    step += 1
        progress(1.0, "done")

    rows = []
    by_id = {instance.id: instance for instance in instances}
    tables = {}
    for aggregation in aggregations:
        selected = [by_id[i] for i in chosen]
        if selected:
            table = lesion_table(selected, labels, {i: maps[i][aggregation] for i in chosen}, image)
            tables[aggregation] = {row["id"]: row for row in table}
    for instance in instances:
        row = instance.to_dict()
        row.pop("bbox_start"), row.pop("bbox_stop")
        row = {"id": row.pop("id"), "group": groups.get(instance.id), "reference_id": None, **row}
        if instance.id in chosen:
            row["saliency"] = {aggregation: {name: {"peak_positive": values["peak_positive"],
                                                    "peak_negative": values["peak_negative"],
                                                    "peak_positive_local": values["peak_positive_local"],
                                                    "peak_negative_local": values["peak_negative_local"]}
                                             for name, values in tables[aggregation][instance.id]["channels"].items()}
                               for aggregation in aggregations}
            row["files"] = {aggregation: {name: f"instance{instance.id}_{aggregation}_{name}.nii.gz"
                                          for name in image.channel_names} for aggregation in aggregations}
        rows.append(row)
    rows.extend(false_negatives)
    extra = [f"peak_{sign}_{aggregation}_{name}" for aggregation in aggregations for name in image.channel_names
             for sign in ("positive", "negative")] if chosen else []

    written = [write_image(image.with_array(labels.astype(np.uint16)[None], ("instances",)), out_dir / "instances.nii.gz")]
    for identifier in chosen:
        for aggregation in aggregations:
            saliency_image = maps[identifier][aggregation]
            for name in image.channel_names:
                written.append(write_image(saliency_image.channel(name),
                                           out_dir / f"instance{identifier}_{aggregation}_{name}.nii.gz"))
    document = {
        "model": card.name,
        "model_checksum": card.checksum(),
        "class_name": class_name,
        "inputs": {name: str(Path(path).resolve()) for name, path in zip(card.input_channels, args.images)},
        "reference": None if args.reference is None else str(Path(args.reference).resolve()),
        "min_voxels": args.min_voxels,
        "selected": chosen,
        "selection": "instances" if ids is not None else ("click" if click is not None else None),
        "click_ras": None if click is None else list(click),
        "saliency": None if not chosen else {
            "method": "instance_smoothgrad", "aggregations": aggregations, "n_samples": args.n_samples,
            "noise_level": args.noise_level, "batch_size": args.batch_size, "seed": args.seed,
            "grid": "model grid, mapped onto the input grid",
        },
        "instances": rows,
        "segxai_version": __version__,
    }
    for name, text in (("lesions.json", json.dumps(document, indent=2, default=str) + "\n"),
                       ("lesions.csv", _lesion_csv(rows, extra))):
        with atomic_path(out_dir / name) as temporary:
            temporary.write_text(text, encoding="utf-8")
        written.append(out_dir / name)
    print(f"{len(instances)} instance(s) of {class_name!r}" + (f"; saliency of {chosen}" if chosen else ""))
    for path in written:
        print(path)
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


# Modules that add their own sub-commands: each defines ``add_commands(commands)``, taking the
# sub-parsers object, and uses the option helpers above.
COMMAND_MODULES: tuple[str, ...] = ()


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

    lesions = commands.add_parser(
        "lesions", help="instances of a lesion prediction: label map, lesion table, instance saliency"
    )
    case_options(lesions)
    lesions.add_argument("--reference", default=None, metavar="REF",
                         help="reference lesion mask on the input grid: adds the TP / FP / FN group")
    chooser = lesions.add_mutually_exclusive_group()
    chooser.add_argument("--instances", default=None, metavar="ID,ID", help="instance ids to explain (1 = largest), e.g. 3,5")
    chooser.add_argument("--click", default=None, metavar="R,A,S", help="explain the instance at this RAS point (mm); write --click=R,A,S when R is negative")
    lesions.add_argument("--click-radius", type=float, default=5.0, metavar="MM",
                         help="with --click: nearest instance voxel within this distance (default 5 mm)")
    lesions.add_argument("--class", dest="class_name", default="", metavar="NAME",
                         help="the class whose instances are found (default: the first foreground class)")
    lesions.add_argument("--aggregation", default="max", metavar="AGG", help="mean, max or mean,max (default max)")
    lesions.add_argument("--n-samples", type=int, default=20, metavar="N", help="SmoothGrad noise samples (default 20)")
    lesions.add_argument("--noise-level", type=float, default=0.1, metavar="F", help="noise sigma / input range (default 0.1)")
    lesions.add_argument("--batch-size", type=int, default=8, metavar="N",
                         help="replicas per backward (max) or noisy samples per backward (mean)")
    lesions.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    lesions.add_argument("--min-voxels", type=int, default=1, metavar="N", help="drop smaller instances (default 1)")
    lesions.add_argument("--window-batch", type=int, default=1, metavar="N", help="sliding windows per network call")
    lesions.set_defaults(run=_cmd_lesions)

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
