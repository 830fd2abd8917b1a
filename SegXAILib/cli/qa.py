"""``segxai qa``: QA risk scores from the topology of saliency maps (METHODS.md section 6).

* ``segxai qa cohort --model lesions|deepbet --out DIR [--cases N] [--method NAME[:k=v,...]]``
  builds a calibration cohort (:func:`SegXAILib.pipeline.cohort.build_cohort`);
* ``segxai qa cohort --benchmark NAME --out DIR [--workers K]`` builds (or resumes) a QA
  benchmark cohort (:func:`SegXAILib.pipeline.qa_cohort.build_qa_cohort`), and
  ``segxai qa cohort --model ANY --images IMG... --references REF... --method M --out DIR`` one
  of your own cases with any model (:func:`~SegXAILib.pipeline.qa_cohort.build_user_cohort`);
* ``segxai qa benchmark --cohort DIR... --out DIR`` judges every detector on the same cases
  (:func:`SegXAILib.report.qa_benchmark.write_benchmark`);
* ``segxai qa calibrate --cohort DIR --method NAME --out RISK.json`` fits a risk model and
  writes its plots beside it (ROC with the cut points, Dice vs PC1, the cohort's EC band);
* ``segxai qa score IMAGE... --model M --risk RISK.json [--out DIR]`` scores one case: PC1,
  band, estimated Dice; with ``--out`` a JSON result, the mask, the saliency map and plots.
* ``segxai qa score IMAGE... --model M --contour FILE --structure NAME[=CLASS]... [--risk RISK.json]
  [--method M] [--out DIR]`` scores contours the model did not draw (an RTSTRUCT or SEG on a
  DICOM series given as IMAGE, or a NIfTI mask / label map on the image's grid) against the
  model's own prediction, and prints the review list, most suspicious first
  (:func:`SegXAILib.pipeline.add_contour_qa`); ``--out`` writes the case with ``contour_qa.json``.

A risk model applied to another model (card checksum) or attribution method is refused
(exit 2) before any heavy work.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..image import SegXAIInputError
from .common import case_settings, cost_options, device_option, load_case_model, model_help, options_named, progress_bar, trust_option

__all__ = ["add_commands"]

#: Methods that need an eager network (module hooks or backward rules): not on TorchScript
_EAGER_ONLY = ("gradcam", "gradcam_plusplus", "guided_gradcam", "guided_gradcam_plusplus", "guided_backprop",
               "deconvolution")


def _positive_int(name: str, value: int, minimum: int = 1) -> int:
    if value < minimum:
        raise SegXAIInputError(f"{name} {value}: must be an integer >= {minimum}")
    return value


def _fraction(name: str, value: float, closed_right: bool = False) -> float:
    ok = 0.0 < value <= 1.0 if closed_right else 0.0 < value < 1.0
    if not (math.isfinite(value) and ok):
        raise SegXAIInputError(f"{name} {value}: must be in (0, 1{']' if closed_right else ')'}")
    return value


def _cmd_cohort(args: argparse.Namespace) -> int:
    if args.benchmark is not None or args.images:
        return _cmd_benchmark_cohort(args)
    from ..pipeline import MethodSettings
    from ..pipeline.cohort import build_cohort, default_methods
    from ..topology.cohort import COHORT_MODELS

    if args.model is None:
        raise SegXAIInputError("give --model (lesions or deepbet), --benchmark NAME, or --model with --images and "
                               "--references (your own cases)")
    if args.model not in COHORT_MODELS:
        raise SegXAIInputError(f"--model {args.model!r}: the built-in calibration cohorts are {', '.join(COHORT_MODELS)}; "
                               "for any other model give your own cases with --images and --references")
    if args.references or args.workers != 1:
        raise SegXAIInputError("--references / --workers: only with --images or --benchmark")
    args.cases = 40 if args.cases is None else args.cases
    _positive_int("--cases", args.cases)
    _positive_int("--seed", args.seed, 0)
    from ..models import resolve_device

    with options_named("device"):
        resolve_device(args.device)
    with options_named("method"):
        methods = [MethodSettings.parse(text) for text in args.method] if args.method else default_methods(args.model)
    if args.model == "deepbet":
        refused = [m.method for m in methods if m.method in _EAGER_ONLY]
        if refused:
            raise SegXAIInputError(
                f"--method {refused[0]}: deepbet is a TorchScript network; module hooks (Grad-CAM) and backward "
                "rules (guided backprop, deconvolution) cannot run on it; use the gradient family"
            )
    with progress_bar(f"qa cohort ({args.model})", not args.quiet) as progress, \
            options_named("device", "seed", n_cases="--cases", methods="--method"):
        path = build_cohort(args.out, args.model, n_cases=args.cases, methods=methods, seed=args.seed,
                            device=args.device, progress=progress)
    return _print_cohort(path, "empty prediction(s)")


def _print_cohort(path: Path, empty_text: str) -> int:
    from ..topology.cohort import read_cohort

    document = read_cohort(path.parent)
    dice = [c["dice"] for c in document["cases"]]
    empty = sum(c["status"] != "ok" for c in document["cases"])
    print(f"{len(dice)} case(s), Dice {min(dice):.3f} .. {max(dice):.3f}, {empty} {empty_text}")
    print(f"methods: {', '.join(document['methods'])}")
    print(f"cohort: {path}")
    return 0


def _cmd_benchmark_cohort(args: argparse.Namespace) -> int:
    """``--benchmark NAME`` (a built-in QA benchmark cohort) or ``--images ... --references ...``
    (the user's cases, any model)."""
    from ..models import resolve_device
    from ..pipeline import MethodSettings
    from ..pipeline.qa_cohort import QA_COHORTS, build_qa_cohort, build_user_cohort

    _positive_int("--workers", args.workers)
    _positive_int("--seed", args.seed, 0)
    with options_named("device"):
        resolve_device(args.device)
    with options_named("method"):
        methods = [MethodSettings.parse(text) for text in args.method] if args.method else None
    if args.benchmark is not None:
        if args.images or args.references:
            raise SegXAIInputError("--benchmark builds its own cases: give either --benchmark or --images/--references")
        if args.benchmark not in QA_COHORTS:
            raise SegXAIInputError(f"--benchmark {args.benchmark!r}: expected one of {', '.join(QA_COHORTS)}")
        if args.cases is not None:
            _positive_int("--cases", args.cases)
        with progress_bar(f"qa cohort ({args.benchmark})", not args.quiet) as progress, \
                options_named("device", "seed", "workers", n_cases="--cases", methods="--method"):
            path = build_qa_cohort(args.benchmark, args.out, n_cases=args.cases,
                                   seed=args.seed, methods=methods, device=args.device, workers=args.workers,
                                   progress=progress)
    else:
        if args.model is None:
            raise SegXAIInputError("--images: give the model that segments them with --model")
        if args.cases is not None:
            raise SegXAIInputError("--cases: your cohort has one case per --images entry")
        if len(args.images) != len(args.references):
            raise SegXAIInputError(f"--references: {len(args.references)} given for {len(args.images)} case(s) in "
                                   "--images; give one reference label map per case")
        if not methods:
            raise SegXAIInputError("--method: name at least one attribution method for your cohort "
                                   "(e.g. --method gradcam --method vanilla_gradient)")
        images = [text.split(",") for text in args.images]
        with progress_bar("qa cohort (your cases)", not args.quiet) as progress, \
                options_named("device", "workers", methods="--method", images="--images", references="--references",
                              model="--model", trust_code="--trust-code"):
            path = build_user_cohort(args.out, args.model, images, args.references, methods, device=args.device,
                                     trust_code=args.trust_code, workers=args.workers, progress=progress)
    return _print_cohort(path, "without a contour")


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from ..report.qa_benchmark import write_benchmark

    _positive_int("--folds", args.folds, 2)
    _positive_int("--repeats", args.repeats)
    _positive_int("--resamples", args.resamples, 100)
    with progress_bar("qa benchmark", not args.quiet) as progress, \
            options_named(cohort_dirs="--cohort", cohort_dir="--cohort", n_splits="--folds", n_repeats="--repeats",
                          n_resamples="--resamples", out_dir="--out"):
        paths = write_benchmark(args.cohort, args.out, n_splits=args.folds, n_repeats=args.repeats,
                                n_resamples=args.resamples, progress=progress)
    for path in paths:
        print(path)
    return 0


def _check_out_file(name: str, path: Path, suffix: str) -> Path:
    if path.suffix.lower() != suffix:
        raise SegXAIInputError(f"{name} {path}: must end in {suffix}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SegXAIInputError(f"{name} {path}: folder {parent} does not exist")
    return path


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from ..topology.cohort import calibrate_cohort, read_cohort
    from ..report.risk_plots import write_risk_plots

    out = _check_out_file("--out", args.out, ".json")
    _positive_int("--thresholds", args.thresholds, 2)
    _positive_int("--cv-folds", args.cv_folds, 2)
    _positive_int("--seed", args.seed, 0)
    _fraction("--insufficient-quantile", args.insufficient_quantile)
    _fraction("--sensitivity", args.sensitivity, closed_right=True)
    _fraction("--specificity", args.specificity, closed_right=True)
    with options_named(cohort_dir="--cohort"):
        document = read_cohort(args.cohort)
    if args.method not in document["methods"] and not args.method.startswith("feature:"):
        raise SegXAIInputError(f"--method {args.method!r}: the cohort {args.cohort} has maps for "
                               f"{sorted(document['methods'])} (or give feature:<score> of a QA cohort)")
    with progress_bar("qa calibrate", not args.quiet) as progress, \
            options_named("method", "seed", "cv_folds", "insufficient_quantile", cohort_dir="--cohort",
                          n_thresholds="--thresholds", sensitivity_target="--sensitivity",
                          specificity_target="--specificity"):
        model, _, _, _ = calibrate_cohort(
            args.cohort, args.method, n_thresholds=args.thresholds, progress=progress,
            insufficient_quantile=args.insufficient_quantile, sensitivity_target=args.sensitivity,
            specificity_target=args.specificity, cv_folds=args.cv_folds, seed=args.seed,
        )
    model.save(out)
    plots = write_risk_plots(out.parent if str(out.parent) else Path("."), model, prefix=f"{out.stem}_")
    skipped = sum(c["status"] != "ok" for c in document["cases"])
    cut = lambda v: "-inf" if not math.isfinite(v) else f"{v:.6g}"  # noqa: E731
    print(f"{model.n_cases} case(s) ({skipped} without a prediction skipped), {model.n_insufficient} insufficient "
          f"(Dice < {model.insufficient_dice:.4f})")
    print(f"AUROC {model.auroc:.3f} (training), {model.auroc_cv_mean:.3f} +- {model.auroc_cv_std:.3f} "
          f"({model.cv_folds}-fold cross-validated)")
    print(f"cut points: high if PC1 <= {cut(model.cut_high)}, moderate if PC1 <= {cut(model.cut_low)}, else low")
    print(f"held-out AURC {model.aurc_cv:.4f}, estimated Dice error (MAE) {model.estimated_dice_mae_cv:.3f}; "
          f"calibration domain: {', '.join(sorted(model.feature_ranges))}")
    print(f"risk model: {out}")
    for path in plots.values():
        print(f"plot: {path}")
    return 0


def _structures(texts: list[str]) -> dict[str, str]:
    """``--structure NAME`` or ``NAME=CLASS`` -> {name: class} (the class is the name when not given)."""
    found: dict[str, str] = {}
    for text in texts:
        name, _, target = text.partition("=")
        name, target = name.strip(), target.strip()
        if not name or ("=" in text and not target):
            raise SegXAIInputError(f"--structure {text!r}: expected NAME or NAME=CLASS")
        if name in found:
            raise SegXAIInputError(f"--structure {name!r}: given twice")
        found[name] = target or name
    return found


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(132)[128:132] == b"DICM"


def _read_contours(args: argparse.Namespace, structures: dict[str, str], card, image) -> dict:
    """The masks of ``--structure`` names from ``--contour`` on the image's grid: an RTSTRUCT or
    SEG read on the DICOM series of the first IMAGE, or an image file (a binary mask for one
    structure; else a label map whose values are the model's class indices)."""
    import numpy as np

    from ..io import read_image

    path = Path(args.contour)
    if not path.is_file():
        raise SegXAIInputError(f"--contour {path}: no such file")
    if _is_dicom(path):
        import pydicom

        from ..dicom import read_dicom_series, read_rtstruct, read_seg

        if not Path(args.images[0]).is_dir():
            raise SegXAIInputError(f"--contour {path}: a DICOM object is read on its image series; give the series "
                                   f"folder as the first IMAGE (got {args.images[0]})")
        header = pydicom.dcmread(path, stop_before_pixels=True)
        modality = str(getattr(header, "Modality", ""))
        if modality not in ("RTSTRUCT", "SEG"):
            raise SegXAIInputError(f"--contour {path}: modality {modality!r}, expected an RTSTRUCT or a SEG")
        series = read_dicom_series(args.images[0])
        if not series.image.same_grid(image):
            raise SegXAIInputError(f"--contour {path}: the series {args.images[0]} is not on the input image's grid")
        reader = read_rtstruct if modality == "RTSTRUCT" else read_seg
        with options_named(path="--contour"):
            found = reader(path, series)
        missing = [name for name in structures if name not in found]
        if missing:
            raise SegXAIInputError(f"--structure {missing[0]!r}: not in {path} (its structures: {sorted(found)})")
        return {name: found[name] for name in structures}
    with options_named(path="--contour"):
        labels = read_image(path, "contour")
    if labels.num_channels != 1 or not labels.same_grid(image):
        raise SegXAIInputError(f"--contour {path}: not one label map on the input image's grid")
    values = np.rint(labels.array[0]).astype(np.int64)
    if len(structures) == 1 and set(np.unique(values)) <= {0, 1}:
        return {name: values == 1 for name in structures}  # a binary mask: the one structure
    return {name: values == card.class_names.index(target) for name, target in structures.items()}


def _print_review(contour_qa) -> None:
    """The review list, most suspicious first, one line per structure."""
    def number(value, digits: int = 3) -> str:
        return "n/a" if value is None or not math.isfinite(float(value)) else f"{float(value):.{digits}f}"

    print("contour review, most suspicious first (suspicion: P(insufficient) from the risk model, else 1 - Dice "
          "with the model's prediction)")
    for rank, row in enumerate(contour_qa.rows, start=1):
        scores = row["scores"]
        band = f", risk band {row['risk']['band']}" if row.get("risk") else ""
        print(f"{rank}. {row['structure']} ({row['class_name']}): suspicion {number(row['suspicion'])} "
              f"[{row['sort_key']}], Dice with prediction {number(scores['dice_with_prediction'])}, volume ratio "
              f"{number(scores['volume_ratio'])}, surface distance mean "
              f"{number(scores['mean_surface_distance_mm'], 2)} mm / 95% {number(scores['hd95_mm'], 2)} mm, mean probability inside "
              f"{number(scores.get('mean_probability_inside'))}{band}")
    for note in contour_qa.notes:
        print(f"note: {note}")


def _cmd_score_contours(args: argparse.Namespace) -> int:
    """``qa score --contour FILE --structure NAME...``: the QA of given contours (nothing written
    before every option, the images and the contours are checked)."""
    from ..io import check_writable_dir
    from ..pipeline import (MethodSettings, add_contour_qa, add_maps, read_case_images, resolve_model_card,
                            start_case, write_case)
    from ..pipeline.steps import contour_classes

    if not args.structure:
        raise SegXAIInputError("--structure: name the structure(s) of --contour to score (NAME or NAME=CLASS)")
    structures = _structures(args.structure)
    card = resolve_model_card(args.model)
    mapping = {name: target for name, target in structures.items() if target != name}
    try:
        indices = contour_classes(card, list(structures), mapping)
    except SegXAIInputError:
        unknown = next(name for name, target in structures.items() if target not in card.class_names[1:])
        raise SegXAIInputError(f"--structure {unknown!r}: {structures[unknown]!r} is not one of the model's foreground "
                               f"classes {card.class_names[1:]}; give NAME=CLASS to compare it with one") from None
    qa: dict = {}
    methods: list = []
    class_name = card.class_names[next(iter(indices.values()))]
    if args.risk is not None:
        from ..topology.risk import RiskModel

        risk = RiskModel.load(args.risk)
        if card.checksum() != risk.model_checksum:
            raise SegXAIInputError(
                f"--risk {args.risk}: calibrated for model checksum {risk.model_checksum[:16]}..., but --model "
                f"{args.model} ({card.name}) has checksum {card.checksum()[:16]}...; calibrate a risk model for this "
                "model")
        if args.method is not None and args.method != risk.method:
            raise SegXAIInputError(f"--method {args.method!r}: the risk model {args.risk} was calibrated with "
                                   f"{risk.method!r} saliency maps")
        qa["risk_model"] = str(Path(args.risk).resolve())
    elif args.method is not None:
        with options_named("method"):
            method = MethodSettings.parse(args.method)
        methods = [method.model_dump(mode="json")]
        qa["method"] = method.name
    settings = case_settings(args, class_name=class_name, instances={"enabled": False}, methods=methods, qa=qa)
    image = read_case_images(args.images, card)
    contours = _read_contours(args, structures, card, image)
    out_dir = check_writable_dir(args.out) if args.out is not None else None
    model = load_case_model(card, args)
    with progress_bar("qa score (contours)", not args.quiet) as progress:
        case = start_case(image, model, settings, progress=progress)
        if methods:
            add_maps(case, model)
        with options_named(contours="--structure", classes="--structure"):
            add_contour_qa(case, model, contours, mapping, progress=progress)
    _print_review(case.contour_qa)
    if out_dir is None:
        return 0
    manifest = write_case(case, out_dir, inputs=dict(zip(card.input_channels, args.images)))
    print(out_dir / "contour_qa.json")
    print(manifest)
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from ..io import check_writable_dir

    if args.contour is not None:
        return _cmd_score_contours(args)
    if args.structure:
        raise SegXAIInputError("--structure: only with --contour (the contour file the structures are read from)")
    if args.risk is None:
        raise SegXAIInputError("--risk: give a risk model (segxai qa calibrate), or --contour and --structure to "
                               "score given contours")
    from ..pipeline import read_case_images, resolve_model_card, run_case, write_case
    from ..report.risk_plots import write_risk_plots
    from ..topology.risk import RiskModel

    risk = RiskModel.load(args.risk)
    if args.method is not None and args.method != risk.method:
        raise SegXAIInputError(
            f"--method {args.method!r}: the risk model {args.risk} was calibrated with {risk.method!r} saliency maps"
        )
    card = resolve_model_card(args.model)
    if card.checksum() != risk.model_checksum:
        raise SegXAIInputError(
            f"--risk {args.risk}: calibrated for model checksum {risk.model_checksum[:16]}..., but --model "
            f"{args.model} ({card.name}) has checksum {card.checksum()[:16]}...; calibrate a risk model for this model"
        )
    structure = str(risk.method_parameters.get("target", "")).partition(":")[2]
    settings = case_settings(args, class_name=structure, instances={"enabled": False},
                             qa={"risk_model": str(Path(args.risk).resolve())})
    out_dir = check_writable_dir(args.out) if args.out is not None else None
    image = read_case_images(args.images, card)
    model = load_case_model(card, args)
    with progress_bar(f"qa score ({risk.method})", not args.quiet) as progress:
        case = run_case(image, model, settings, progress=progress)
    result = case.qa.risk
    print(f"PC1 score: {result['pc1']:.6g}")
    print(f"risk band: {result['band']}")
    print(f"estimated Dice: {result['estimated_dice']:.3f}")
    print(f"P(insufficient): {result['insufficient_probability']:.3f}")
    print(f"QA: {case.qa.summary_text()}")
    if out_dir is None:
        return 0
    plots = write_risk_plots(out_dir, risk, case.qa.curve, result, prefix="qa_")
    manifest = write_case(case, out_dir, extra_files={f"plot:{k}": v for k, v in plots.items()},
                          inputs=dict(zip(card.input_channels, args.images)))
    print(out_dir / "qa.json")
    print(manifest)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``segxai qa {cohort,calibrate,score}`` to the ``segxai`` sub-parsers."""
    qa = commands.add_parser("qa", help="QA risk scores from the topology of saliency maps (cohort, calibrate, score)")
    qa_commands = qa.add_subparsers(dest="qa_command", required=True, metavar="QA_COMMAND")

    cohort = qa_commands.add_parser(
        "cohort", help="build a cohort: a calibration cohort (--model lesions|deepbet), a QA benchmark cohort "
                       "(--benchmark NAME) or your own cases (--model ANY --images ... --references ...)")
    cohort.add_argument("--model", default=None,
                        help="lesions (lesion phantoms) or deepbet (the degraded sample T1); with --images: any model "
                             "(" + model_help() + ")")
    cohort.add_argument("--benchmark", default=None, metavar="NAME",
                        help="a built-in QA benchmark cohort: c1_parotid_S2, c1_parotid_S4, c1_parotid_S6, c2_lesions, "
                             "c3_deepbet, c4_contours (resumable)")
    cohort.add_argument("--images", nargs="+", default=[], metavar="IMAGE[,IMAGE...]",
                        help="your cases: one per case (channels joined by commas, in the card's order)")
    cohort.add_argument("--references", nargs="+", default=[], metavar="LABELS",
                        help="one reference label map per case (on its image's grid)")
    cohort.add_argument("--workers", type=int, default=1, help="processes for --benchmark / --images (default 1)")
    cohort.add_argument("--out", required=True, type=Path, help="cohort folder")
    cohort.add_argument("--cases", type=int, default=None, metavar="N",
                        help="number of cases (default 40; --benchmark: the cohort's size)")
    cohort.add_argument("--method", action="append", default=[], metavar="NAME[:k=v,...]",
                        help="attribution method (repeatable), e.g. guided_gradcam:aggregation=target; "
                             "default: guided_gradcam, gradcam_plusplus, guided_backprop, smoothgrad (lesions), "
                             "vanilla_gradient, gradient_x_input (deepbet)")
    cohort.add_argument("--seed", type=int, default=0, help="cohort seed (case seeds, severity order)")
    trust_option(cohort)
    device_option(cohort)
    cohort.set_defaults(run=_cmd_cohort)

    benchmark = qa_commands.add_parser(
        "benchmark", help="every QA detector on the same cases of one or more cohorts: tables, CIs, paired tests")
    benchmark.add_argument("--cohort", required=True, nargs="+", type=Path, metavar="DIR",
                           help="cohort folders (segxai qa cohort --benchmark / --images)")
    benchmark.add_argument("--out", required=True, type=Path, help="folder for qa_benchmark.json / .md and plots")
    benchmark.add_argument("--folds", type=int, default=5, help="grouped cross-validation folds (default 5)")
    benchmark.add_argument("--repeats", type=int, default=10, help="repeats of the cross-validation (default 10)")
    benchmark.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    benchmark.set_defaults(run=_cmd_benchmark)

    calibrate = qa_commands.add_parser("calibrate", help="fit a risk model on a cohort")
    calibrate.add_argument("--cohort", required=True, type=Path, help="cohort folder (segxai qa cohort)")
    calibrate.add_argument("--method", required=True,
                           help="the attribution method whose maps to use, or feature:<score> (a QA cohort's stored "
                                "reference-free score, e.g. feature:tta_pairwise_dice)")
    calibrate.add_argument("--out", required=True, type=Path, help="risk model JSON file; plots are written beside it")
    calibrate.add_argument("--thresholds", type=int, default=100, metavar="N", help="EC thresholds on [0, 1] (default 100)")
    calibrate.add_argument("--insufficient-quantile", type=float, default=0.15, metavar="Q",
                           help="insufficient = Dice below this quantile (default 0.15)")
    calibrate.add_argument("--sensitivity", type=float, default=0.85, help="sensitivity target (default 0.85)")
    calibrate.add_argument("--specificity", type=float, default=0.9, help="specificity target (default 0.9)")
    calibrate.add_argument("--cv-folds", type=int, default=5, metavar="K", help="cross-validation folds (default 5)")
    calibrate.add_argument("--seed", type=int, default=0, help="seed of the cross-validation folds")
    calibrate.set_defaults(run=_cmd_calibrate)

    score = qa_commands.add_parser("score", help="risk band of one case's contour, or QA of given contours (--contour) "
                                                 "against the model's own prediction (no reference needed)")
    score.add_argument("images", nargs="+", metavar="IMAGE",
                       help="one image per model input channel, in the card's order (a DICOM series folder as the "
                            "first when --contour is DICOM)")
    score.add_argument("--model", required=True, help=model_help() + ", or deepbet")
    score.add_argument("--risk", default=None, type=Path,
                       help="risk model JSON (segxai qa calibrate); required without --contour")
    score.add_argument("--contour", default=None, type=Path, metavar="FILE",
                       help="contours to score: an RTSTRUCT or SEG file on the DICOM series of the first IMAGE, or an "
                            "image file on the input's grid (a binary mask for one --structure, else a label map of "
                            "the model's class indices)")
    score.add_argument("--structure", action="append", default=[], metavar="NAME[=CLASS]",
                       help="a structure of --contour to score (repeatable); =CLASS names the model class it is "
                            "compared with when NAME is not one")
    score.add_argument("--method", default=None,
                       help="optional: must be the risk model's attribution method; with --contour and no --risk, the "
                            "method (NAME[:k=v,...]) whose map gives each contour's EC curve")
    score.add_argument("--out", type=Path, default=None, help="case folder: qa.json, the segmentation, the map, the plots and case.json")
    trust_option(score)
    device_option(score)
    cost_options(score)
    # one case: a refused run removes the --out folder it made (app.main)
    score.set_defaults(run=_cmd_score, one_case_output=True)
