"""``segxai counterfactual train`` and ``segxai counterfactual explain``: counterfactual relevance
by CycleGAN activation maximisation (paper 004, METHODS section 7).

``train`` segments the training images with the frozen model, takes lesion and lesion-free
patches from its predictions (:func:`~SegXAILib.counterfactual.build_domains`) and trains the
generator pair (:func:`~SegXAILib.counterfactual.train_counterfactual`) into ``--out``:
``counterfactual_checkpoint.pt`` every ``--checkpoint-every`` iterations (rerunning the same
command after a kill continues from it and ends bit for bit where an uninterrupted run ends),
then ``generators.pt``, ``training.json`` and ``history.csv``.

``explain`` runs the case pipeline (``start_case`` + ``add_counterfactual`` + ``write_case``):
the case folder holds the prediction, the instances and ``counterfactual/`` (G+(x), G-(x) and
R per chosen instance) with ``counterfactual.json``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..image import SegXAIInputError
from .case_settings import fields_named, settings_from_options
from .common import (case_card, case_options, device_option, load_case_model, model_help, options_named,
                     progress_bar, trust_option)
from .lesions import _parse_click

__all__ = ["add_commands", "training_cases"]

#: the defaults of ``train``: a 2D patch of 32 x 32 voxels (capped by the card's patch) and a
#: scored central box of a quarter of its sizes
DEFAULT_PATCH = 32
HISTORY_FILE = "history.csv"
TRAINING_FILE = "training.json"


def _integers(text: str, option: str, count: tuple[int, ...] = ()) -> tuple[int, ...]:
    """``"a,b,c"`` -> ``(a, b, c)`` of positive integers (``count``: the allowed lengths)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values) or (count and len(values) not in count):
        sizes = " or ".join(map(str, count)) if count else "one or more"
        raise SegXAIInputError(f"{option} {text!r}: expected {sizes} positive integers separated by commas")
    return values


def _instance_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        ids = []
    if not ids or any(i < 1 for i in ids) or len(set(ids)) != len(ids):
        raise SegXAIInputError(f"--instance {text!r}: expected distinct instance ids >= 1 separated by commas, e.g. 1 "
                               "or 2,3")
    return ids


def training_cases(arguments: list[str], channels: list[str]) -> list[tuple[str, list[Path]]]:
    """``(name, one path per channel)`` of each ``--images`` argument: a folder of cases (the
    layout of ``segxai patterns fit``: one sub-folder per case or ``<case>_<channel>`` files)
    or one case given as its channel files joined by commas (a single file for a one-channel model)."""
    from .patterns import find_cases

    cases: list[tuple[str, list[Path]]] = []
    for text in arguments:
        path = Path(text)
        if path.is_dir():
            cases.extend(find_cases(path, channels))
            continue
        paths = [Path(p) for p in text.split(",")]
        if len(paths) != len(channels):
            raise SegXAIInputError(f"--images {text}: {len(paths)} file(s), the model takes {len(channels)} channel(s) "
                                   f"{channels}; give a case as its files joined by commas, in the card's order")
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise SegXAIInputError(f"--images {text}: no such file {', '.join(missing)}")
        cases.append((paths[0].name, paths))
    return cases


def _geometry(args: argparse.Namespace, card):
    """The :class:`~SegXAILib.counterfactual.PatchGeometry` of the options (defaults: the card's
    patch as the context, a ``DEFAULT_PATCH`` patch capped by it, a quarter of it scored)."""
    from ..counterfactual import PatchGeometry

    dims = args.dims
    context = _integers(args.context_size, "--context-size", (3,)) if args.context_size else card.patch_size
    axes = [a for a in range(3) if dims == 3 or a != args.slice_axis]
    if args.patch_size:
        patch = _integers(args.patch_size, "--patch-size", (dims,))
    else:
        patch = tuple(min(DEFAULT_PATCH, context[a]) for a in axes)
    region = (_integers(args.region_size, "--region-size", (dims,)) if args.region_size
              else tuple(max(1, p // 4) for p in patch))
    with options_named("patch_size", "context_size", "region_size", "slice_axis", spatial_dims="--dims"):
        return PatchGeometry(dims, patch, context, region, args.slice_axis)


def _config(args: argparse.Namespace):
    from ..counterfactual import CounterfactualConfig

    with options_named("iterations", "checkpoint_every", "seed", "batch_size", "learning_rate", "ssim_window",
                       generator_features="--features", generator_strides="--strides",
                       generator_res_units="--res-units", discriminator_features="--discriminator-features"):
        return CounterfactualConfig(
            iterations=args.iterations, batch_size=args.batch_size, learning_rate=args.learning_rate,
            generator_features=_integers(args.features, "--features"),
            generator_strides=_integers(args.strides, "--strides"), generator_res_units=args.res_units,
            discriminator_features=_integers(args.discriminator_features, "--discriminator-features"),
            ssim_window=args.ssim_window, checkpoint_every=args.checkpoint_every, seed=args.seed)


def _cmd_train(args: argparse.Namespace) -> int:
    from ..counterfactual import SegmentationScore, build_domains, train_counterfactual
    from ..io import atomic_path, read_channels, read_image
    from ..pipeline import resolve_model_card, structure_index
    from ..pipeline.steps import GENERATORS_FILE
    from ..pipeline.write import write_json
    from ..progress import sub_progress

    # everything checkable before the work; the output folder is made only by the training
    if args.free_per_lesion <= 0 or not math.isfinite(args.free_per_lesion):
        raise SegXAIInputError(f"--free-per-lesion {args.free_per_lesion}: expected a number > 0")
    if args.min_lesion_voxels < 1:
        raise SegXAIInputError(f"--min-lesion-voxels {args.min_lesion_voxels}: expected an integer >= 1")
    card = resolve_model_card(args.model)
    with options_named(class_name="--class"):
        class_index = structure_index(card, args.class_name)
    geometry = _geometry(args, card)
    config = _config(args)
    cases = training_cases(args.images, list(card.input_channels))
    masks = [Path(p) for p in args.tissue_mask or []]
    if masks and len(masks) != len(cases):
        raise SegXAIInputError(f"--tissue-mask: {len(masks)} mask(s) for {len(cases)} training case(s) (one per case, "
                               "in the order of --images)")
    for mask in masks:
        if not mask.exists():
            raise SegXAIInputError(f"--tissue-mask {mask}: no such file")
    if args.out.exists() and not args.out.is_dir():
        raise SegXAIInputError(f"--out {args.out}: not a folder")
    model = load_case_model(card, args)
    images = [read_channels(paths, card.input_channels) for _, paths in cases]
    tissue = [read_image(mask) for mask in masks] or None

    with progress_bar("counterfactual train", not args.quiet) as progress, \
            options_named("free_per_lesion", "min_lesion_voxels", "patch_size", "ssim_window", "class_index",
                          tissue_masks="--tissue-mask", images="--images", domains="--images",
                          checkpoint_dir="--out"):
        domains = build_domains(images, model, geometry, class_index, tissue, args.free_per_lesion,
                                args.min_lesion_voxels, args.seed, progress=sub_progress(progress, 0.0, 0.1))
        score = SegmentationScore(model, geometry, class_index)
        trained = train_counterfactual(domains, score, config, args.out, model.device, card.name,
                                       progress=sub_progress(progress, 0.1, 1.0))
    out_dir = Path(args.out)
    path = trained.generators.save(out_dir / GENERATORS_FILE)
    lines = [",".join(("iteration", *trained.columns))]
    lines += [",".join([str(n + 1), *(repr(float(v)) for v in row)]) for n, row in enumerate(trained.history)]
    with atomic_path(out_dir / HISTORY_FILE) as temporary:
        temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    last = dict(zip(trained.columns, trained.history[-1].tolist()))
    write_json({"model": {"name": card.name, "checksum": card.checksum(), "class": card.class_names[class_index]},
                "cases": [{"name": name, "images": [str(p.resolve()) for p in paths]} for name, paths in cases],
                "tissue_masks": [str(p.resolve()) for p in masks],
                "domains": {"lesion_patches": len(domains.lesion), "lesion_free_patches": len(domains.free)},
                "geometry": geometry.describe(), "config": config.to_dict(),
                "free_per_lesion": args.free_per_lesion, "min_lesion_voxels": args.min_lesion_voxels,
                "resumed_from": trained.resumed_from, "seconds": trained.seconds, "last_iteration": last,
                "generators": path.name}, out_dir / TRAINING_FILE)
    print(f"{len(domains.lesion)} lesion and {len(domains.free)} lesion-free patches from {len(cases)} case(s)")
    if trained.resumed_from:
        print(f"resumed from iteration {trained.resumed_from}")
    print(f"iteration {len(trained.history)}: mean score G+(x) {last['score_plus']:.3f}, G-(x) "
          f"{last['score_minus']:.3f}")
    print(path)
    return 0


def _explain_options(args: argparse.Namespace) -> dict[str, str]:
    """The options of ``explain`` by the settings field they set."""
    options = {"device": "--device", "class_name": "--class", "instances.min_voxels": "--min-voxels",
               "counterfactual.generators": "--generators", "counterfactual.click_radius_mm": "--click-radius",
               "counterfactual.max_instances": "--max-instances"}
    if args.instance is not None:
        options["counterfactual.ids"] = f"--instance {args.instance}"
    if args.click is not None:
        options["counterfactual.click_ras"] = f"--click {args.click}"
    return options


def _cmd_explain(args: argparse.Namespace) -> int:
    from ..io import read_channels
    from ..pipeline import add_counterfactual, start_case, structure_index, write_case
    from ..pipeline.steps import resolve_generators_path
    from ..progress import sub_progress

    ids = _instance_ids(args.instance) if args.instance is not None else None
    click = _parse_click(args.click, "--click") if args.click is not None else None
    options = _explain_options(args)
    card = case_card(args)
    # the instances come from the prediction (no instance maps); the counterfactual section chooses
    settings = settings_from_options({
        "model": str(args.model), "device": args.device, "trust_code": args.trust_code,
        "class_name": args.class_name, "instances": {"ids": [], "min_voxels": args.min_voxels},
        "counterfactual": {"enabled": True, "generators": str(args.generators), "ids": ids, "click_ras": click,
                           "click_radius_mm": args.click_radius, "max_instances": args.max_instances},
    }, options)
    with fields_named(options):
        structure_index(card, settings.class_name)
        resolve_generators_path(settings.counterfactual.generators)
    if args.out.exists() and not args.out.is_dir():
        raise SegXAIInputError(f"--out {args.out}: not a folder")
    model = load_case_model(card, args)
    image = read_channels(args.images, card.input_channels)
    with progress_bar("counterfactual", not args.quiet) as progress, fields_named(options):
        case = start_case(image, model, settings, progress=sub_progress(progress, 0.0, 0.5))
        add_counterfactual(case, model, progress=sub_progress(progress, 0.5, 1.0))
        progress(1.0, "done")
    manifest = write_case(case, args.out, suffix=args.suffix, inputs=dict(zip(card.input_channels, args.images)))
    print(f"{len(case.instances)} instance(s) of {case.structure!r}")
    for identifier, result in case.counterfactuals.items():
        scores = result.scores
        print(f"  instance {identifier}: score of x {scores['original']:.3f}, G+(x) {scores['plus']:.3f}, "
              f"G-(x) {scores['minus']:.3f}")
    for note in case.notes:
        print(note)
    print(f"manifest: {manifest}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``segxai counterfactual train`` and ``segxai counterfactual explain``."""
    group = commands.add_parser(
        "counterfactual", help="counterfactual relevance (CycleGAN activation maximisation): train a generator pair, "
                               "explain lesions with it")
    actions = group.add_subparsers(dest="counterfactual_command", required=True, metavar="ACTION")

    train = actions.add_parser(
        "train", help="train G+ / G- against a model on its own predictions (checkpointed; rerun to resume)")
    train.add_argument("--model", required=True, help=model_help())
    train.add_argument("--images", required=True, nargs="+", metavar="PATH",
                       help="training cases: folders of cases (one sub-folder per case with files named after the "
                            "card's channels, or <case>_<channel> files), or one case as its channel files joined "
                            "by commas")
    train.add_argument("--out", required=True, type=Path, metavar="CF_DIR",
                       help="folder of the checkpoint, generators.pt, training.json and history.csv")
    train.add_argument("--iterations", type=int, default=2000, help="training iterations (default 2000)")
    train.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                       help="write the checkpoint every N iterations (default 100)")
    train.add_argument("--seed", type=int, default=0, help="seed of the patches, initialisation and batches")
    train.add_argument("--dims", type=int, default=2, choices=[2, 3],
                       help="2: slices orthogonal to --slice-axis (default); 3: 3D patches")
    train.add_argument("--patch-size", default="", metavar="A,B[,C]",
                       help=f"generator patch, one size per patch axis (default {DEFAULT_PATCH} each, capped by the "
                            "context)")
    train.add_argument("--context-size", default="", metavar="D,H,W",
                       help="crop the frozen model runs on around a patch (default: the card's patch size)")
    train.add_argument("--region-size", default="", metavar="A,B[,C]",
                       help="central box whose mean logit is pushed up / down (default: a quarter of the patch)")
    train.add_argument("--slice-axis", type=int, default=2, choices=[0, 1, 2],
                       help="model-grid axis orthogonal to 2D patches (default 2, axial on a RAS grid)")
    train.add_argument("--tissue-mask", nargs="+", metavar="MASK",
                       help="one tissue mask per training case (lesion-free patches are centred in it; default: "
                            "non-zero voxels)")
    train.add_argument("--class", dest="class_name", default="", help="the lesion class (default: the first)")
    train.add_argument("--free-per-lesion", type=float, default=1.0,
                       help="lesion-free patches per lesion patch (default 1)")
    train.add_argument("--min-lesion-voxels", type=int, default=3, help="smaller predicted lesions are skipped")
    train.add_argument("--batch-size", type=int, default=4, help="patches per iteration (default 4)")
    train.add_argument("--learning-rate", type=float, default=2e-4, help="Adam's learning rate (default 2e-4)")
    train.add_argument("--features", default="32,64,128,256", metavar="N,N,...",
                       help="generator U-Net channels per stage (default 32,64,128,256)")
    train.add_argument("--strides", default="2,2,2", metavar="N,...",
                       help="generator U-Net strides, one fewer than --features (default 2,2,2)")
    train.add_argument("--res-units", type=int, default=1, help="residual units per generator stage (default 1)")
    train.add_argument("--discriminator-features", default="32,64,128", metavar="N,N,...",
                       help="discriminator channels per layer (default 32,64,128)")
    train.add_argument("--ssim-window", type=int, default=7, help="SSIM window of the cycle and similarity losses")
    trust_option(train)
    device_option(train)
    train.set_defaults(run=_cmd_train)

    explain = actions.add_parser(
        "explain", help="G+(x), G-(x) and R = G+(x) - G-(x) of lesions of one case, as a case folder")
    case_options(explain)
    explain.add_argument("--generators", required=True, type=Path, metavar="CF_DIR",
                         help="the folder 'counterfactual train' wrote, or a generators file")
    chosen = explain.add_mutually_exclusive_group()
    chosen.add_argument("--instance", default=None, metavar="ID[,ID...]",
                        help="instance id(s) (1 = the largest predicted lesion); default: every instance")
    chosen.add_argument("--click", default=None, metavar="R,A,S",
                        help="the instance at (or near) this RAS point in mm (write --click=R,A,S for a negative R)")
    explain.add_argument("--click-radius", type=float, default=5.0, help="how far from --click an instance may be (mm)")
    explain.add_argument("--max-instances", type=int, default=None, help="without --instance / --click: at most N")
    explain.add_argument("--class", dest="class_name", default="", help="the structure (default: the first class)")
    explain.add_argument("--min-voxels", type=int, default=1, help="smaller components are not instances")
    explain.add_argument("--suffix", default=".nii.gz", choices=[".nii.gz", ".nii", ".nrrd", ".mha"],
                         help="output format")
    explain.set_defaults(run=_cmd_explain)
