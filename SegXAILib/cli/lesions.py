"""``segxai lesions`` and ``segxai lesion-context``: instances of a lesion prediction, their
table and saliency, and the context / transplant experiments (paper 001, METHODS section 3).

Both run the case pipeline (:mod:`SegXAILib.pipeline`): ``lesions`` is ``start_case`` +
``add_instance_maps`` + ``write_case`` (its output folder is the pipeline's layout, with a
``case.json`` manifest); ``lesion-context`` takes the prediction and its instances from
``start_case`` and runs the experiments of :mod:`SegXAILib.instances.experiments`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..image import SegXAIInputError
from .case_settings import fields_named, settings_from_options
from .common import case_card, case_options, load_case_model, progress_bar

__all__ = ["add_commands"]


def _parse_instance_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        ids = []
    if not ids or any(i < 1 for i in ids):
        raise SegXAIInputError(f"--instances {text!r}: expected instance ids >= 1 separated by commas, e.g. 3,5")
    return sorted(set(ids), key=ids.index)


def _parse_click(text: str, option: str = "--click") -> tuple[float, float, float]:
    import math

    try:
        point = tuple(float(v) for v in text.split(","))
    except ValueError:
        point = ()
    if len(point) != 3 or not all(math.isfinite(v) for v in point):
        raise SegXAIInputError(f"{option} {text!r}: expected a RAS point in mm, R,A,S (e.g. -12.5,30,4)")
    return point  # type: ignore[return-value]


def _check_lesions_arguments(args: argparse.Namespace):
    """Everything that can be checked before reading images: returns (card, settings)."""
    from ..instances import AGGREGATIONS
    from ..pipeline import structure_index

    ids = _parse_instance_ids(args.instances) if args.instances is not None else None
    click = _parse_click(args.click) if args.click is not None else None
    aggregations = [a.strip() for a in args.aggregation.split(",") if a.strip()]
    if not aggregations or any(a not in AGGREGATIONS for a in aggregations):
        raise SegXAIInputError(f"--aggregation {args.aggregation!r}: expected mean, max or mean,max")
    aggregations = sorted(set(aggregations), key=aggregations.index)
    if args.reference is not None and not Path(args.reference).exists():
        raise SegXAIInputError(f"--reference {args.reference}: no such file")
    card = case_card(args)
    # without --instances or --click no instance gets maps (ids [] rather than every instance)
    settings = settings_from_options({
        "model": str(args.model), "device": args.device, "trust_code": args.trust_code,
        "class_name": args.class_name,
        "instances": {"ids": ids if ids is not None else (None if click is not None else []), "click_ras": click,
                      "click_radius_mm": args.click_radius, "aggregations": aggregations,
                      "n_samples": args.n_samples, "noise_level": args.noise_level, "batch_size": args.batch_size,
                      "seed": args.seed, "min_voxels": args.min_voxels},
        "precision": {"window_batch": args.window_batch},
    }, _lesions_options(args))
    with fields_named(_lesions_options(args)):
        structure_index(card, settings.class_name)
    return card, settings


def _lesions_options(args: argparse.Namespace) -> dict[str, str]:
    """The options of ``segxai lesions`` / ``lesion-context`` by the settings field they set."""
    options = {"device": "--device", "class_name": "--class", "instances.click_radius_mm": "--click-radius",
               "instances.n_samples": "--n-samples", "instances.noise_level": "--noise-level",
               "instances.batch_size": "--batch-size", "instances.seed": "--seed",
               "instances.min_voxels": "--min-voxels", "precision.window_batch": "--window-batch",
               "reference": "--reference"}
    if getattr(args, "instances", None) is not None:
        options["instances.ids"] = f"--instances {args.instances}"
    if getattr(args, "instance", None) is not None:
        options["instances.ids"] = f"--instance {args.instance}"
    if getattr(args, "click", None) is not None:
        options["instances.click_ras"] = f"--click {args.click}"
    return options


def _cmd_lesions(args: argparse.Namespace) -> int:
    from ..io import check_writable_dir, read_channels, read_image
    from ..pipeline import add_instance_maps, read_manifest, start_case, write_case
    from ..progress import sub_progress

    card, settings = _check_lesions_arguments(args)
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
    model = load_case_model(card, args)
    with progress_bar("lesions", not args.quiet) as progress, fields_named(_lesions_options(args)):
        case = start_case(image, model, settings, reference=reference, progress=sub_progress(progress, 0.0, 0.2))
        add_instance_maps(case, model, progress=sub_progress(progress, 0.2, 1.0))
        progress(1.0, "done")
    manifest = write_case(case, out_dir, inputs=dict(zip(case.card.input_channels, args.images)))

    chosen = list(case.instance_maps)
    print(f"{len(case.instances)} instance(s) of {case.structure!r}" + (f"; saliency of {chosen}" if chosen else ""))
    for entry in read_manifest(out_dir, verify=False)["files"]:
        print(out_dir / entry["path"])
    print(manifest)
    return 0


def _parse_points(option: str, texts: list[str]) -> list[tuple[float, float, float]]:
    return [_parse_click(text, option) for text in texts]


def _check_context_arguments(args: argparse.Namespace):
    """Checks before any image is read: returns (card, settings, class_index, background, margins, targets)."""
    from ..pipeline import structure_index

    chosen = [name for name, value in (("--instance", args.instance), ("--click", args.click),
                                       ("--lesion-mask", args.lesion_mask)) if value is not None]
    if len(chosen) != 1:
        raise SegXAIInputError("lesion-context: give exactly one of --instance ID, --click R,A,S or --lesion-mask FILE")
    click = _parse_click(args.click) if args.click is not None else None
    if args.lesion_mask is not None and not Path(args.lesion_mask).exists():
        raise SegXAIInputError(f"--lesion-mask {args.lesion_mask}: no such file")
    if args.steps < 0:
        raise SegXAIInputError(f"--steps {args.steps}: must be >= 0")
    background: str | float = args.background
    if args.background not in ("zero", "min"):
        try:
            background = float(args.background)
        except ValueError:
            raise SegXAIInputError(f"--background {args.background!r}: expected zero, min or a number") from None
    try:
        margins = [float(value) for value in args.margin.split(",")]
    except ValueError:
        margins = []
    if not margins or any(not m >= 0 for m in margins):
        raise SegXAIInputError(f"--margin {args.margin!r}: expected distances in mm >= 0 separated by commas, e.g. 0,5")
    targets = _parse_points("--transplant", args.transplant)
    card = case_card(args)
    # the prediction and its instances (no instance maps); --instance / --click select one
    settings = settings_from_options({
        "model": str(args.model), "device": args.device, "trust_code": args.trust_code,
        "class_name": args.class_name,
        "instances": {"ids": [args.instance] if args.instance is not None else (None if click is not None else []),
                      "click_ras": click, "click_radius_mm": args.click_radius, "min_voxels": args.min_voxels},
    }, _lesions_options(args))
    with fields_named(_lesions_options(args)):
        class_index = structure_index(card, settings.class_name)
    return card, settings, class_index, background, margins, targets


def _cmd_lesion_context(args: argparse.Namespace) -> int:
    import csv
    import io as _io
    import json

    import numpy as np

    from .. import __version__
    from ..instances import context_experiment, context_figure, transplant_experiment
    from ..io import atomic_path, check_writable_dir, read_channels, read_image, write_image
    from ..pipeline import select_instances, start_case
    from ..progress import sub_progress
    from ..report.figures import save_figure

    card, settings, class_index, background, margins, targets = _check_context_arguments(args)
    out_dir = check_writable_dir(args.out)
    image = read_channels(args.images, card.input_channels)
    model = load_case_model(card, args)
    class_name = card.class_names[class_index]
    steps = 1 + len(targets) * len(margins)
    with progress_bar("lesion-context", not args.quiet) as progress:
        if args.lesion_mask is not None:
            mask_image = read_image(args.lesion_mask)
            if mask_image.num_channels != 1 or not mask_image.same_grid(image):
                raise SegXAIInputError(
                    f"--lesion-mask {args.lesion_mask}: expected a single-channel mask on the input image's grid "
                    f"(shape {image.spatial_shape}); resample it first"
                )
            lesion = mask_image.array[0] != 0
            if not lesion.any():
                raise SegXAIInputError(f"--lesion-mask {args.lesion_mask}: the mask is empty")
            selection = {"lesion_mask": str(Path(args.lesion_mask).resolve())}
            context_share = 1.0
        else:
            with fields_named(_lesions_options(args)):
                case = start_case(image, model, settings, progress=sub_progress(progress, 0.0, 0.1))
                if not case.instances:
                    raise SegXAIInputError(f"the prediction has no instance of {class_name!r}")
                identifier = select_instances(case)[0]
            lesion = case.instance_labels.array[0] == identifier
            selection = {"instance": identifier, "click_ras": None if args.click is None else list(settings.instances.click_ras)}
            progress(0.1, f"instance {identifier}")
            context_share = 0.9
        # transplants first: a target off the grid fails before the longer context experiment
        start = 1.0 - context_share
        share = context_share / steps
        transplants, transplanted_masks = [], []
        for n, (point, margin) in enumerate((p, m) for p in targets for m in margins):
            centre = image.ras_to_ijk_points(np.asarray(point, float))[0]
            try:
                result = transplant_experiment(
                    image, lesion, model, centre, margin_mm=margin, class_index=class_index,
                    progress=sub_progress(progress, start + share * n, start + share * (n + 1)),
                )
            except SegXAIInputError as error:
                raise SegXAIInputError(f"--transplant {','.join(f'{v:g}' for v in point)}: {error}") from None
            transplanted_masks.append(result.pop("transplanted_mask"))
            transplants.append({"target_ras": list(point), **result, "mask_file": f"transplant{n + 1}_lesion.nii.gz"})
        rows = context_experiment(image, lesion, model, background=background, steps=args.steps,
                                  class_index=class_index, progress=sub_progress(progress, start + share * (steps - 1), 1.0))
        progress(1.0, "done")

    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    document = {
        "model": card.name,
        "model_checksum": card.checksum(),
        "class_name": class_name,
        "inputs": {name: str(Path(path).resolve()) for name, path in zip(card.input_channels, args.images)},
        "selection": selection,
        "lesion_voxels": int(lesion.sum()),
        "background": background,
        "context": rows,
        "transplants": transplants,
        "segxai_version": __version__,
    }
    written = []
    for name, text in (("context.json", json.dumps(document, indent=2, default=str) + "\n"),
                       ("context.csv", buffer.getvalue())):
        with atomic_path(out_dir / name) as temporary:
            temporary.write_text(text, encoding="utf-8")
        written.append(out_dir / name)
    written.append(save_figure(context_figure(rows, title=f"Context of the {class_name} ({int(lesion.sum())} voxels)"),
                               out_dir / "context.png"))
    for transplant, mask in zip(transplants, transplanted_masks):
        written.append(write_image(image.with_array(mask.astype(np.uint8)[None], ("lesion",)),
                                   out_dir / transplant["mask_file"]))
    detected = [row["ring_mm"] for row in rows if row["detected"]]
    print(f"lesion of {int(lesion.sum())} voxels: " + (
        f"first detected with {detected[0]:.1f} mm of context" if detected else "not detected at any step"))
    for t in transplants:
        print(f"transplant to {t['target_ras']} (margin {t['margin_mm']:g} mm): probability "
              f"{t['mean_probability']:.3f}, {'detected' if t['detected'] else 'not detected'}")
    for path in written:
        print(path)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``lesions`` and ``lesion-context`` to the ``segxai`` sub-parsers."""
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
    lesions.add_argument("--batch-size", type=int, default=4, metavar="N",
                         help="one-voxel gradients per batched backward (max) or noisy samples per backward (mean)")
    lesions.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    lesions.add_argument("--min-voxels", type=int, default=1, metavar="N", help="drop smaller instances (default 1)")
    lesions.add_argument("--window-batch", type=int, default=1, metavar="N", help="sliding windows per network call")
    lesions.set_defaults(run=_cmd_lesions)

    context = commands.add_parser(
        "lesion-context", help="context experiment (restore a lesion's surroundings ring by ring) and transplants"
    )
    case_options(context)
    which = context.add_mutually_exclusive_group()
    which.add_argument("--instance", type=int, default=None, metavar="ID", help="the predicted instance (1 = largest)")
    which.add_argument("--click", default=None, metavar="R,A,S", help="the predicted instance at this RAS point (mm)")
    which.add_argument("--lesion-mask", default=None, metavar="MASK",
                       help="a lesion mask on the input grid (e.g. a lesion the model missed)")
    context.add_argument("--click-radius", type=float, default=5.0, metavar="MM",
                         help="with --click: nearest instance voxel within this distance (default 5 mm)")
    context.add_argument("--class", dest="class_name", default="", metavar="NAME",
                         help="the class whose instances are found (default: the first foreground class)")
    context.add_argument("--min-voxels", type=int, default=1, metavar="N", help="drop smaller instances (default 1)")
    context.add_argument("--steps", type=int, default=25, metavar="N", help="dilation steps (default 25, as paper 001)")
    context.add_argument("--background", default="zero", metavar="VALUE",
                         help="intensity outside the restored region: zero (default), min (per channel) or a number")
    context.add_argument("--transplant", action="append", default=[], metavar="R,A,S",
                         help="also copy the lesion so that its centroid lands at this RAS point (repeatable)")
    context.add_argument("--margin", default="0", metavar="MM,MM",
                         help="perilesional tissue copied with each transplant, mm (default 0; e.g. 0,5)")
    context.set_defaults(run=_cmd_lesion_context)
