"""``segxai lesions`` and ``segxai lesion-context``: instances of a lesion prediction, their
table and saliency, and the context / transplant experiments (paper 001, METHODS section 3)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..image import SegXAIInputError
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


def _class_index(card, class_name: str) -> int:
    """``--class NAME`` -> its index (default: the first foreground class)."""
    if not class_name:
        return 1
    if class_name not in card.class_names[1:]:
        raise SegXAIInputError(f"--class {class_name!r}: the model's foreground classes are {card.class_names[1:]}")
    return card.class_names.index(class_name)


def _check_lesions_arguments(args: argparse.Namespace):
    """Everything that can be checked before reading images: returns (card, ids, click, aggregations)."""
    from ..instances import AGGREGATIONS

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
    card = case_card(args)
    class_index = _class_index(card, args.class_name)
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

    from .. import __version__
    from ..instances import find_instances, instance_at, instance_saliency, lesion_rows
    from ..io import atomic_path, check_writable_dir, read_channels, read_image, write_image
    from ..models.inference import segment
    from ..progress import sub_progress

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
    model = load_case_model(card, args)
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
        maps = instance_saliency(
            image, model, labels, chosen, class_index=class_index, aggregations=aggregations,
            n_samples=args.n_samples, noise_level=args.noise_level, batch_size=args.batch_size, seed=args.seed,
            window_batch=args.window_batch, progress=sub_progress(progress, 0.2, 1.0),
        )
        progress(1.0, "done")

    rows = lesion_rows(instances, labels, image, {i: maps[i] for i in chosen},
                       reference_mask=None if reference is None else reference.array[0] != 0)
    for row in rows:
        if row["id"] in chosen:
            row["files"] = {aggregation: {name: f"instance{row['id']}_{aggregation}_{name}.nii.gz"
                                          for name in image.channel_names} for aggregation in aggregations}
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


def _parse_points(option: str, texts: list[str]) -> list[tuple[float, float, float]]:
    return [_parse_click(text, option) for text in texts]


def _check_context_arguments(args: argparse.Namespace):
    """Checks before any image is read: returns (card, class_index, background, margins, targets)."""
    chosen = [name for name, value in (("--instance", args.instance), ("--click", args.click),
                                       ("--lesion-mask", args.lesion_mask)) if value is not None]
    if len(chosen) != 1:
        raise SegXAIInputError("lesion-context: give exactly one of --instance ID, --click R,A,S or --lesion-mask FILE")
    if args.instance is not None and args.instance < 1:
        raise SegXAIInputError(f"--instance {args.instance}: expected an instance id >= 1 (1 = largest)")
    if args.click is not None:
        _parse_click(args.click)
    if args.lesion_mask is not None and not Path(args.lesion_mask).exists():
        raise SegXAIInputError(f"--lesion-mask {args.lesion_mask}: no such file")
    if args.steps < 0:
        raise SegXAIInputError(f"--steps {args.steps}: must be >= 0")
    if not args.click_radius >= 0:
        raise SegXAIInputError(f"--click-radius {args.click_radius}: must be >= 0")
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
    class_index = _class_index(card, args.class_name)
    return card, class_index, background, margins, targets


def _cmd_lesion_context(args: argparse.Namespace) -> int:
    import csv
    import io as _io
    import json

    import numpy as np

    from .. import __version__
    from ..instances import context_experiment, context_figure, find_instances, instance_at, transplant_experiment
    from ..io import atomic_path, check_writable_dir, read_channels, read_image, write_image
    from ..models.inference import segment
    from ..progress import sub_progress
    from ..report.figures import save_figure

    card, class_index, background, margins, targets = _check_context_arguments(args)
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
            segmentation = segment(image, model, progress=sub_progress(progress, 0.0, 0.1))
            labels, instances = find_instances(segmentation.mask(class_index),
                                               segmentation.probabilities.array[class_index],
                                               min_voxels=args.min_voxels, grid=image)
            if not instances:
                raise SegXAIInputError(f"the prediction has no instance of {class_name!r}")
            if args.instance is not None:
                if args.instance > len(instances):
                    raise SegXAIInputError(f"--instance {args.instance}: the prediction has {len(instances)} "
                                           f"instance(s) of {class_name!r}")
                identifier = args.instance
            else:
                try:
                    identifier = instance_at(labels, image, _parse_click(args.click), radius_mm=args.click_radius)
                except SegXAIInputError as error:
                    raise SegXAIInputError(f"--click {args.click}: {error}") from None
            lesion = labels == identifier
            selection = {"instance": identifier, "click_ras": None if args.click is None else _parse_click(args.click)}
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
