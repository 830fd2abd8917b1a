"""``segxai evaluate`` and ``segxai agg2exp``: evaluation of attribution methods and Agg2Exp
over a set of cases.

A *case* on the command line (``--images``) is either

* a folder holding one image per model input channel, named after the card's channels
  (``FLAIR.nii.gz``, ``T1.nrrd``, ...), optionally ``reference.<ext>`` (a reference label map /
  mask on the same grid) and ``roi_<NAME>.<ext>`` (extra RoIs for ``agg2exp``); or
* the image files themselves, comma-separated in the card's channel order (one file for a
  one-channel model).

``--reference`` gives one reference mask per case, in the order of ``--images``, overriding
the folders' ``reference`` files. Everything is checked before any model runs.

Each case is predicted once through the case pipeline (:func:`SegXAILib.pipeline.predict`,
:func:`~SegXAILib.pipeline.start_case`) and every attribution reuses that prediction:
``evaluate`` scores the methods with :func:`~SegXAILib.evaluation.evaluate_case`, ``agg2exp``
builds the matrices with :func:`SegXAILib.pipeline.agg2exp_case`.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..image import SegXAIInputError
from ..io import IMAGE_SUFFIXES
from .case_settings import settings_from_options
from .common import device_option, load_case_model, model_help, options_named, progress_bar, trust_option

__all__ = ["add_commands", "CaseFiles", "parse_cases", "parse_method_params", "add_run_options",
           "add_evaluation_options", "evaluation_request", "evaluation_errors_named"]

#: the options of ``segxai evaluate`` by the EvaluationConfig field (or evaluate_case parameter) they set
_EVALUATE_OPTIONS = dict(
    {name: "--" + name.replace("_", "-") for name in (
        "metrics", "variants", "fidelity_score", "fidelity_step", "baseline", "n_subsets", "subset_fraction",
        "sensitivity_samples", "noise_level", "slic_segments", "slic_compactness", "batch_size", "window_batch",
        "seed", "reference")},
    class_name="--class", randomisation_cascading="--cascading",
)


@dataclass
class CaseFiles:
    """One case's files: ``images`` in the card's channel order, optional ``reference`` and
    extra RoIs (name -> file)."""

    name: str
    images: list[Path]
    reference: Optional[Path] = None
    rois: dict[str, Path] = field(default_factory=dict)


def _find(folder: Path, stem: str) -> Optional[Path]:
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def parse_cases(specs: list[str], channels: list[str], references: Optional[list[str]] = None) -> list[CaseFiles]:
    """``--images`` items -> cases (see the module docstring); ``--reference`` files by case."""
    if not specs:
        raise SegXAIInputError("--images: no case given")
    cases: list[CaseFiles] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            images = [_find(path, channel) for channel in channels]
            missing = [c for c, p in zip(channels, images) if p is None]
            if missing:
                raise SegXAIInputError(
                    f"--images {spec}: folder has no image for channel(s) {', '.join(missing)} "
                    f"(expected files named <channel>{IMAGE_SUFFIXES[0]}, e.g. {channels[0]}.nii.gz)")
            rois = {}
            for candidate in sorted(path.iterdir()):
                stem = _stem(candidate)
                if candidate.is_file() and stem.startswith("roi_") and len(stem) > 4:
                    rois[stem[4:]] = candidate
            cases.append(CaseFiles(path.name, [p for p in images if p is not None], _find(path, "reference"), rois))
            continue
        files = [Path(p) for p in spec.split(",") if p]
        if len(files) != len(channels):
            raise SegXAIInputError(
                f"--images {spec}: expected a case folder or {len(channels)} comma-separated file(s) "
                f"({', '.join(channels)}), got {len(files)}")
        for file in files:
            if not file.exists():
                raise SegXAIInputError(f"--images {spec}: {file}: no such file or folder")
        cases.append(CaseFiles(_stem(files[0]), files))
    if references:
        if len(references) != len(cases):
            raise SegXAIInputError(f"--reference: expected one mask per case ({len(cases)}), got {len(references)}")
        for case, reference in zip(cases, references):
            if not Path(reference).exists():
                raise SegXAIInputError(f"--reference {reference}: no such file")
            case.reference = Path(reference)
    names = [c.name for c in cases]
    for index, case in enumerate(cases):
        if names.count(case.name) > 1:
            case.name = f"{case.name}_{index}"
    return cases


def parse_method_params(methods_text: str, pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``--methods a,b@x`` and ``--param a.NAME=VALUE`` / ``b@x.NAME=VALUE`` -> ``{method key: {NAME: value}}``
    (checked against the registry)."""
    from ..attribution import get_method, parse_params

    methods = [m.strip() for m in methods_text.replace(" ", ",").split(",") if m.strip()]
    if not methods:
        raise SegXAIInputError("--methods: no method given (see: segxai methods)")
    for name in methods:
        if "." in name or name.endswith("@"):
            raise SegXAIInputError(f"--methods {name!r}: expected NAME or NAME@LABEL (no dots)")
        get_method(name.split("@", 1)[0])  # an unknown name fails here, naming the available ones
    chosen: dict[str, list[str]] = {m: [] for m in dict.fromkeys(methods)}
    for pair in pairs:
        head, equals, _ = pair.partition("=")
        method, dot, key = head.partition(".")
        if not equals or not dot or not key:
            raise SegXAIInputError(f"--param {pair!r}: expected METHOD.NAME=VALUE, e.g. smoothgrad.n_samples=10")
        if method not in chosen:
            raise SegXAIInputError(f"--param {pair!r}: method {method!r} is not in --methods")
        chosen[method].append(pair[len(method) + 1:])
    params = {method: parse_params(method.split("@", 1)[0], items) for method, items in chosen.items()}
    if any(m.split("@", 1)[0] == "expected_gradients" for m in params):
        raise SegXAIInputError("--methods expected_gradients needs reference volumes, which the command line cannot "
                               "pass; use integrated_gradients (baselines=black_white) or the Python API")
    return params


def _write_text(path: Path, text: str) -> Path:
    from ..io import atomic_path

    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


def _json(data: Any) -> str:
    from ..evaluation.runner import json_ready

    return json.dumps(json_ready(data), indent=2, default=str) + "\n"


def _card_and_cases(args: argparse.Namespace):
    from ..pipeline import resolve_model_card

    card = resolve_model_card(args.model)
    cases = parse_cases(list(args.images), list(card.input_channels), args.reference)
    class_name = getattr(args, "class_name", "")
    if class_name and class_name not in card.class_names:
        raise SegXAIInputError(f"--class {class_name!r}: the model's classes are {card.class_names}")
    return card, cases


def _read_case(case: CaseFiles, card):
    from ..io import read_channels, read_image

    image = read_channels([str(p) for p in case.images], card.input_channels)
    reference = None
    if case.reference is not None:
        reference = read_image(case.reference)
        if reference.num_channels != 1 or not reference.same_grid(image):
            raise SegXAIInputError(f"--reference {case.reference}: expected a one-channel mask on the grid of "
                                   f"{case.images[0]} (shape {image.spatial_shape})")
    return image, reference


def _case_settings(args: argparse.Namespace, **fields: Any):
    """The pipeline settings of a command's cases: the model, the device, the window batch and
    ``fields`` (no instances: neither command needs them)."""
    return settings_from_options(
        {"model": str(args.model), "device": args.device, "trust_code": args.trust_code,
         "instances": {"enabled": False}, "precision": {"window_batch": args.window_batch}, **fields},
        {"device": "--device", "precision.window_batch": "--window-batch", "agg2exp.method": "--method",
         "agg2exp.params": "--param", "agg2exp": "--param"},
    )


def _command_line() -> str:
    return "segxai " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""


def evaluation_request(args: argparse.Namespace):
    """``(methods, config)`` of the options :func:`add_evaluation_options` added: method key ->
    parameters (``random`` included) and the checked
    :class:`~SegXAILib.evaluation.EvaluationConfig`; errors name the options."""
    from ..evaluation.runner import METRICS, EvaluationConfig

    params = parse_method_params(args.methods, list(args.param or []))
    params.setdefault("random", {})
    with options_named(**_EVALUATE_OPTIONS):
        config = EvaluationConfig(
            metrics=METRICS if args.metrics.strip() == "all" else tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
            variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
            class_name=args.class_name, fidelity_score=args.fidelity_score, fidelity_step=args.fidelity_step,
            baseline=args.baseline, n_subsets=args.n_subsets, subset_fraction=args.subset_fraction,
            sensitivity_samples=args.sensitivity_samples, noise_level=args.noise_level, slic_segments=args.slic_segments,
            slic_compactness=args.slic_compactness, randomisation_cascading=args.cascading, batch_size=args.batch_size,
            window_batch=args.window_batch, seed=args.seed,
        ).check()
    if not math.isfinite(config.baseline):
        raise SegXAIInputError(f"--baseline {args.baseline}: must be a finite number")
    return params, config


def evaluation_errors_named(**renamed: str):
    """A block whose library errors name ``segxai evaluate``'s options (``--metrics``, ``--class``,
    ...) and ``renamed``'s (parameter -> option)."""
    return options_named(**_EVALUATE_OPTIONS, **renamed)


# ---- segxai evaluate ---------------------------------------------------------------------------
def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .. import __version__
    from ..evaluation.runner import csv_table, evaluate_case, markdown_tables, summarise
    from ..io import check_writable_dir
    from ..pipeline import predict
    from ..progress import sub_progress

    card, cases = _card_and_cases(args)
    params, config = evaluation_request(args)
    settings = _case_settings(args)
    for case in cases:  # every file readable and on its grid before anything is written
        _read_case(case, card)
    out_dir = check_writable_dir(args.out)
    model = load_case_model(card, args)
    rows, details = [], []
    with progress_bar("evaluate", not args.quiet) as progress:
        for index, case in enumerate(cases):
            image, reference = _read_case(case, card)
            step = sub_progress(progress, index / len(cases), (index + 1) / len(cases))
            # the case's one prediction; every method's class target is resolved from it
            segmentation = predict(image, model, settings, progress=sub_progress(step, 0.0, 0.1))
            with options_named(**_EVALUATE_OPTIONS):
                case_rows, case_details = evaluate_case(
                    image, model, params, reference, config, case=case.name, prediction=segmentation,
                    progress=sub_progress(step, 0.1, 1.0))
            rows.extend({"model": card.name, **row} for row in case_rows)
            details.append(case_details)
    summary = summarise(rows)
    title = args.title or f"Evaluation of attribution methods: {card.name}"
    document = {
        "title": title, "model": card.name, "model_checksum": card.checksum(), "device": str(model.device),
        "command": _command_line(), "config": asdict(config), "methods": params,
        "cases": [{"name": c.name, "images": [str(p.resolve()) for p in c.images],
                   "reference": None if c.reference is None else str(c.reference.resolve())} for c in cases],
        "summary": summary, "rows": rows, "details": details, "segxai_version": __version__,
    }
    written = [
        _write_text(out_dir / "evaluation.md", markdown_tables(summary, title)),
        _write_text(out_dir / "evaluation.csv", csv_table(rows)),
        _write_text(out_dir / "evaluation.json", _json(document)),
    ]
    print(markdown_tables(summary, title))
    for path in written:
        print(path)
    return 0


# ---- segxai agg2exp ----------------------------------------------------------------------------
def _parse_rois(pairs: list[str]) -> dict[str, Path]:
    rois = {}
    for pair in pairs:
        name, equals, file = pair.partition("=")
        if not equals or not name or not file:
            raise SegXAIInputError(f"--roi {pair!r}: expected NAME=MASKFILE")
        if not Path(file).exists():
            raise SegXAIInputError(f"--roi {pair!r}: {file}: no such file")
        rois[name] = Path(file)
    return rois


def _load_fit_on(path: str, variant: str):
    from ..evaluation.agg2exp import CaseImportance

    file = Path(path)
    if not file.is_file():
        raise SegXAIInputError(f"--fit-on {path}: no such file")
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
        cohort = [CaseImportance.from_dict(c) for c in document["cases"]]
    except (ValueError, KeyError, TypeError) as error:
        raise SegXAIInputError(f"--fit-on {path}: not an agg2exp.json written by segxai agg2exp ({error})") from None
    if any(variant not in case.matrices for case in cohort):
        raise SegXAIInputError(f"--fit-on {path}: has no {variant!r} matrices")
    return cohort


def _cmd_agg2exp(args: argparse.Namespace) -> int:
    from .. import __version__
    from ..attribution import parse_params
    from ..evaluation.agg2exp import IMPORTANCE_VARIANTS, cohort_outliers, draw_graph, global_matrix, top_k_graph
    from ..io import check_writable_dir, read_image, write_image
    from ..pipeline import agg2exp_case, start_case
    from ..progress import sub_progress

    card, cases = _card_and_cases(args)
    parse_method_params(args.method, [])  # the method exists and is usable from the command line
    params = parse_params(args.method, list(args.param or []))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in IMPORTANCE_VARIANTS for v in variants):
        raise SegXAIInputError(f"--variants {args.variants!r}: expected any of {', '.join(IMPORTANCE_VARIANTS)}")
    if args.graph_variant not in variants:
        raise SegXAIInputError(f"--graph-variant {args.graph_variant!r}: must be one of --variants ({', '.join(variants)})")
    classes = None
    if args.classes:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        unknown = [c for c in classes if c not in card.class_names]
        if unknown:
            raise SegXAIInputError(f"--classes: {unknown} are not among the model's classes {card.class_names}")
    if args.top_k < 1:
        raise SegXAIInputError(f"--top-k {args.top_k}: must be >= 1")
    if args.n_estimators < 1:
        raise SegXAIInputError(f"--n-estimators {args.n_estimators}: must be >= 1")
    shared_rois = _parse_rois(list(args.roi or []))
    settings = _case_settings(args, agg2exp={"enabled": True, "method": args.method, "params": params})
    reference_cohort = _load_fit_on(args.fit_on, args.graph_variant) if args.fit_on else None

    def read(case):
        image, reference = _read_case(case, card)
        rois = {}
        for name, file in {**case.rois, **shared_rois}.items():
            mask = read_image(file)
            if mask.num_channels != 1 or not mask.same_grid(image):
                raise SegXAIInputError(f"--roi {name}={file}: expected a one-channel mask on the grid of "
                                       f"{case.images[0]} (shape {image.spatial_shape})")
            rois[name] = mask
        return image, reference, rois

    for case in cases:  # every file readable and on its grid before anything is written
        read(case)
    out_dir = check_writable_dir(args.out)
    model = load_case_model(card, args)

    results = []
    with progress_bar("agg2exp", not args.quiet) as progress:
        for index, case in enumerate(cases):
            image, reference, rois = read(case)
            step = sub_progress(progress, index / len(cases), (index + 1) / len(cases))
            # the case's one prediction, then every class explained with it
            pipeline_case = start_case(image, model, settings, reference=reference, progress=sub_progress(step, 0.0, 0.1))
            result = agg2exp_case(pipeline_case, model, classes=classes, rois=rois, variants=variants, name=case.name,
                                  keep_maps=args.save_maps, progress=sub_progress(step, 0.1, 1.0))
            results.append(result)
            if args.save_maps:
                folder = check_writable_dir(out_dir / "maps" / case.name)
                for class_name, maps in result.maps.items():
                    for channel in maps.channel_names:
                        write_image(maps.channel(channel), folder / f"{class_name}_{channel}.nii.gz")

    written = []
    globals_ = {}
    for variant in variants:
        matrix = global_matrix([r.matrices[variant] for r in results])
        globals_[variant] = matrix
        written.append(_write_text(out_dir / f"global_{variant}.csv", matrix.csv()))
        written.append(_write_text(out_dir / f"global_{variant}.md",
                                   f"# Agg2Exp global RoI importance ({variant}, {len(results)} cases, {args.method})\n\n"
                                   + matrix.markdown()))
    graph = top_k_graph(globals_[args.graph_variant], args.top_k, include_self=args.include_self)
    written.append(_write_text(out_dir / "graph.json", _json(graph)))
    written.append(draw_graph(graph, out_dir / "graph.png",
                              f"{card.name}: top-{args.top_k} incoming edges ({args.graph_variant}, {args.method})"))

    outliers: dict[str, Any] = {"fitted_on": args.fit_on or "this run's cases (in-sample scores)",
                                "reference_cases": len(reference_cohort if reference_cohort is not None else results),
                                "variant": args.graph_variant, "n_estimators": args.n_estimators, "seed": args.seed}
    with options_named(reference="--fit-on"):
        outliers.update(cohort_outliers(results, args.graph_variant, card.class_names[1:], reference_cohort,
                                        n_estimators=args.n_estimators, seed=args.seed))
    if "scores" in outliers:
        lines = ["case," + ",".join(card.class_names if classes is None else classes)]
        for case_name, per_class in outliers["scores"].items():
            lines.append(case_name + "," + ",".join("" if not math.isfinite(v) else repr(v) for v in per_class.values()))
        written.append(_write_text(out_dir / "outliers.csv", "\n".join(lines) + "\n"))
    for result in results:
        for variant, matrix in result.matrices.items():
            written.append(_write_text(check_writable_dir(out_dir / "cases") / f"{result.case}_{variant}.csv", matrix.csv()))
    document = {
        "model": card.name, "model_checksum": card.checksum(), "method": args.method, "parameters": params,
        "command": _command_line(), "variants": variants,
        "global": {v: m.to_dict() for v, m in globals_.items()},
        "context_use": {v: m.context_use() for v, m in globals_.items()},
        "graph": graph, "outliers": outliers, "cases": [r.to_dict() for r in results], "segxai_version": __version__,
    }
    written.append(_write_text(out_dir / "agg2exp.json", _json(document)))
    print(globals_[args.graph_variant].markdown())
    for path in written:
        print(path)
    return 0


# ---- parsers -----------------------------------------------------------------------------------
def add_run_options(command: argparse.ArgumentParser) -> None:
    """``--seed`` and ``--window-batch``."""
    command.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    command.add_argument("--window-batch", type=int, default=1, metavar="N", help="sliding windows per network call")


def add_evaluation_options(command: argparse.ArgumentParser,
                           class_help: str = "class to explain (default: the first foreground class)") -> None:
    """The methods (``--methods``, ``--param``) and the EvaluationConfig options of ``segxai
    evaluate`` (read by :func:`evaluation_request`, with :func:`add_run_options`' ``--seed`` and
    ``--window-batch``)."""
    command.add_argument("--methods", required=True, metavar="M,M",
                         help="attribution methods, comma-separated (see: segxai methods); NAME@LABEL scores one "
                              "method under several settings (kernel_shap@cubes); random is always added")
    command.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE",
                         help="a method parameter (repeatable), e.g. smoothgrad.n_samples=10, kernel_shap@cubes.features=cubes")
    command.add_argument("--metrics", default="all", metavar="M,M",
                         help="all (default) or any of fidelity, pointing, region_dice, faithfulness, sensitivity, "
                              "complexity, efficiency, randomisation")
    command.add_argument("--class", dest="class_name", default="", metavar="NAME", help=class_help)
    command.add_argument("--variants", default="signed,absolute", metavar="V,V", help="signed, absolute (default both)")
    command.add_argument("--fidelity-score", default="target", metavar="S",
                         help="target (normalised class target, default) or dice (Dice against the clean prediction)")
    command.add_argument("--fidelity-step", type=float, default=0.025, metavar="F", help="share per step (default 0.025)")
    command.add_argument("--baseline", type=float, default=0.0, metavar="V",
                         help="masking value on the model grid (preprocessed intensities; default 0)")
    command.add_argument("--n-subsets", type=int, default=100, metavar="N", help="faithfulness subsets (default 100)")
    command.add_argument("--subset-fraction", type=float, default=0.01, metavar="F",
                         help="faithfulness subset size as a share of the voxels (default 0.01)")
    command.add_argument("--sensitivity-samples", type=int, default=3, metavar="N", help="noisy inputs (default 3)")
    command.add_argument("--noise-level", type=float, default=0.05, metavar="F",
                         help="sensitivity noise sigma as a share of the input range (default 0.05)")
    command.add_argument("--slic-segments", type=int, default=200, metavar="N", help="SLIC supervoxels (default 200)")
    command.add_argument("--slic-compactness", type=float, default=0.1, metavar="F", help="SLIC compactness (default 0.1)")
    command.add_argument("--cascading", action="store_true",
                         help="randomisation: Adebayo's layer-by-layer cascade (one map per layer) instead of one step")
    command.add_argument("--batch-size", type=int, default=8, metavar="N", help="perturbed volumes per forward")
    command.add_argument("--title", default="", help="title of the tables")


def _common(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", required=True, help=model_help())
    command.add_argument("--images", nargs="+", required=True, metavar="CASE",
                         help="cases: a folder with one <channel>.nii.gz per model input channel (optional "
                              "reference.nii.gz, roi_<NAME>.nii.gz), or comma-separated files in the card's channel order")
    command.add_argument("--reference", nargs="+", default=None, metavar="MASK",
                         help="one reference mask per case, in the order of --images (overrides reference.* in folders)")
    command.add_argument("--out", required=True, type=Path, help="output folder")
    add_run_options(command)
    trust_option(command)
    device_option(command)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``evaluate`` and ``agg2exp`` to the ``segxai`` sub-parsers."""
    evaluate = commands.add_parser(
        "evaluate", help="score attribution methods (fidelity, pointing, region Dice, faithfulness, sensitivity, "
                         "complexity, efficiency, randomisation) over cases; random baseline included")
    _common(evaluate)
    add_evaluation_options(evaluate)
    evaluate.set_defaults(run=_cmd_evaluate)

    agg = commands.add_parser(
        "agg2exp", help="Agg2Exp: RoI importance matrices per class and case, the global matrix, its top-k graph "
                        "and Isolation-Forest outliers")
    _common(agg)
    agg.add_argument("--method", default="smoothgrad", help="attribution method (default smoothgrad, paper 003's choice)")
    agg.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a method parameter (repeatable)")
    agg.add_argument("--classes", default="", metavar="C,C", help="classes to explain (default: all, background included)")
    agg.add_argument("--roi", action="append", default=[], metavar="NAME=MASK",
                     help="an extra RoI column for every case (a mask on the cases' grid; repeatable)")
    agg.add_argument("--variants", default="absolute,positive,negative", metavar="V,V",
                     help="absolute, positive, negative (default all)")
    agg.add_argument("--graph-variant", default="absolute", metavar="V",
                     help="variant of the graph and the outlier model (default absolute)")
    agg.add_argument("--top-k", type=int, default=3, metavar="K", help="incoming edges per class in the graph (default 3)")
    agg.add_argument("--include-self", action="store_true", help="allow self-edges (context use) in the graph")
    agg.add_argument("--fit-on", default=None, metavar="AGG2EXP_JSON",
                     help="reference cohort of the outlier model: an agg2exp.json from an earlier run "
                          "(default: this run's cases, in-sample)")
    agg.add_argument("--n-estimators", type=int, default=100, metavar="N", help="Isolation Forest trees (default 100)")
    agg.add_argument("--save-maps", action="store_true", help="also write each class's attribution maps")
    agg.set_defaults(run=_cmd_agg2exp)
