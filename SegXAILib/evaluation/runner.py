"""Evaluating attribution methods on cases: every metric of :mod:`.metrics` for every method,
signed and absolute, with the random baseline always included, and the cohort tables (paper
002's tables 1-3, paper 003's table 1) as Markdown, CSV and JSON.

One case: the image is put on the model grid, the model predicts once, and the target is the
class target of one class (``sum_i f_c(x)_i M_c,i``, the first foreground class by default).
Each method's map is computed once (timed: efficiency), then scored by each metric in each
variant. A reference mask (on the image's grid) enables the pointing AUC and the region Dice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from ..image import Image, SegXAIInputError
from ..progress import CancelToken, ProgressCallback, report, sub_progress
from . import metrics as M

__all__ = ["METRICS", "EvaluationConfig", "evaluate_case", "method_name", "json_ready", "summarise", "markdown_tables", "csv_table", "COLUMNS"]

METRICS = ("fidelity", "pointing", "region_dice", "faithfulness", "sensitivity", "complexity", "efficiency",
           "randomisation")

#: the per-row numeric columns, in table order
COLUMNS = ("fidelity", "pointing_auc", "region_dice_max", "faithfulness", "sensitivity_mean", "sensitivity_max",
           "complexity", "seconds", "randomisation_similarity")


@dataclass
class EvaluationConfig:
    """Settings of an evaluation run (defaults: papers 002 / 003 where they give one).

    ``fidelity_score``: ``target`` (normalised T) or ``dice`` (Dice against the clean
    prediction, every window: slower). ``baseline``: the masking value on the model grid.
    ``subset_fraction``: faithfulness subset size as a share of the voxels.
    ``randomisation_cascading``: Adebayo's full cascade instead of one all-layers step.
    """

    metrics: tuple[str, ...] = METRICS
    variants: tuple[str, ...] = M.VARIANTS
    class_name: str = ""
    fidelity_score: str = "target"
    fidelity_step: float = 0.025
    baseline: float = 0.0
    n_subsets: int = 100
    subset_fraction: float = 0.01
    sensitivity_samples: int = 3
    noise_level: float = 0.05
    slic_segments: int = 200
    slic_compactness: float = 0.1
    randomisation_cascading: bool = False
    batch_size: int = 8
    window_batch: int = 1
    seed: int = 0

    def check(self) -> "EvaluationConfig":
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise SegXAIInputError(f"metrics: unknown {unknown}; choose from {', '.join(METRICS)}")
        bad = [v for v in self.variants if v not in M.VARIANTS]
        if bad or not self.variants:
            raise SegXAIInputError(f"variants: unknown {bad}; choose from {', '.join(M.VARIANTS)}")
        if not 0 < self.fidelity_step <= 0.5:
            raise SegXAIInputError(f"fidelity_step {self.fidelity_step}: must be in (0, 0.5]")
        if self.fidelity_score not in ("target", "dice"):
            raise SegXAIInputError(f"fidelity_score {self.fidelity_score!r}: expected target or dice")
        for name, value, low in (("n_subsets", self.n_subsets, 2), ("sensitivity_samples", self.sensitivity_samples, 1),
                                 ("slic_segments", self.slic_segments, 2), ("batch_size", self.batch_size, 1),
                                 ("window_batch", self.window_batch, 1)):
            if value < low:
                raise SegXAIInputError(f"{name} {value}: must be >= {low}")
        if not 0 < self.subset_fraction < 1:
            raise SegXAIInputError(f"subset_fraction {self.subset_fraction}: must be in (0, 1)")
        if not self.noise_level >= 0:
            raise SegXAIInputError(f"noise_level {self.noise_level}: must be >= 0")
        return self

    @property
    def fractions(self) -> np.ndarray:
        steps = int(round(1.0 / self.fidelity_step))
        return np.round(np.linspace(0.0, 1.0, steps + 1), 6)


def method_name(key: str) -> str:
    """The registry name of a method key (``kernel_shap@cubes`` -> ``kernel_shap``)."""
    return key.split("@", 1)[0]


def _prepare(image: Image, model, class_name: str, window_batch: int, prediction=None):
    """Model-grid input, the class target (from ``prediction`` when given) and its forward."""
    from ..attribution.api import TargetSpec, prepare_target
    from ..attribution.forward import SegmentationForward

    x, _, target = prepare_target(image, model, TargetSpec("class", class_name=class_name), prediction,
                                  window_batch=window_batch)
    forward = SegmentationForward(model.network, model.card, x.shape[2:], target, window_batch=window_batch,
                                  networks=model.networks)
    return x, target, forward


def _method_params(method_class, params: Mapping[str, Any], seed: int) -> dict[str, Any]:
    params = dict(params)
    if method_class.stochastic:
        params.setdefault("seed", seed)
    return params


def evaluate_case(
    image: Image,
    model,
    methods: Mapping[str, Mapping[str, Any]],
    reference: Optional[Image] = None,
    config: Optional[EvaluationConfig] = None,
    case: str = "",
    prediction=None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score ``methods`` (name -> parameters; ``random`` is added when missing) on one case.

    A key may be ``NAME@LABEL`` (e.g. ``kernel_shap@cubes``) to score one method with several
    parameter sets; rows then carry the whole key as the method.

    ``prediction``: the case's :class:`~SegXAILib.models.Segmentation` (the class target is
    resolved from it instead of predicting again). Attributions run in exact float32.

    Returns ``(rows, details)``: one row per (method, variant) with the :data:`COLUMNS`
    (NaN where a metric was not run or needs the reference), and the curves / records per
    method for the JSON.
    """
    from ..models.inference import exact_float32

    with exact_float32(model.device):  # the pipeline's precision policy for attributions
        return _evaluate_case(image, model, methods, reference, config, case, prediction, progress, cancel)


def _evaluate_case(image, model, methods, reference, config, case, prediction, progress, cancel):
    from ..attribution.api import _model_grid_mask
    from ..attribution.registry import get_method

    config = (config or EvaluationConfig()).check()
    methods = dict(methods)
    methods.setdefault("random", {})
    # a key is a method name, or NAME@LABEL to score one method under several settings
    classes = {name: get_method(method_name(name)) for name in methods}
    x, target, forward = _prepare(image, model, config.class_name, config.window_batch, prediction)
    truth = None
    if reference is not None:
        if not reference.same_grid(image):
            raise SegXAIInputError("reference: the mask must be on the input image's grid")
        if not bool((reference.array[0] > 0).any()):
            raise SegXAIInputError("reference: the mask is empty")
        truth = _model_grid_mask(reference.array[0] > 0, image, model.card).numpy()
        if not truth.any() or truth.all():
            truth = None  # vanished or fills the model grid after resampling: no pointing
    regions = None
    wanted = set(config.metrics)
    if "region_dice" in wanted and truth is not None:
        regions = M.slic_regions(x[0].cpu(), config.slic_segments, config.slic_compactness)
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {"case": case, "target": target.describe(), "model_grid_shape": list(x.shape[2:]),
                               "reference_voxels": None if truth is None else int(truth.sum()),
                               "slic_regions": None if regions is None else int(regions.max() + 1), "methods": {}}
    for position, (name, method_class) in enumerate(classes.items()):
        step = sub_progress(progress, position / len(classes), (position + 1) / len(classes))
        params = _method_params(method_class, methods[name], config.seed)
        method = method_class(forward)
        attribution, efficiency = M.timed(lambda: method.attribute(x, cancel=cancel, **params).detach(), model.device)
        report(step, 0.3, name)
        record: dict[str, Any] = {"parameters": {k: v for k, v in params.items() if not isinstance(v, torch.Tensor)},
                                  "efficiency": efficiency}
        randomisation = None
        if "randomisation" in wanted:
            randomisation = M.randomisation_similarity(
                model.network, model.card, x, target, method_name(name), params, attribution=attribution, seed=config.seed,
                cascading=config.randomisation_cascading, window_batch=config.window_batch, cancel=cancel)
            record["randomisation"] = randomisation
        noisy = None
        if "sensitivity" in wanted:  # the noisy maps serve every variant
            noisy = M.noisy_attributions(lambda inputs: method.attribute(inputs, cancel=cancel, **params).detach(), x,
                                         config.sensitivity_samples, config.noise_level, config.seed, cancel=cancel)
        # a map without negative values ranks, thresholds and sums the same in both variants
        same = bool((attribution >= 0).all()) and all(bool((n >= 0).all()) for n in (noisy or []))
        first_row: Optional[dict[str, Any]] = None
        for variant in config.variants:
            if same and first_row is not None:
                rows.append({**first_row, "variant": variant})
                record[variant] = record[first_row["variant"]]
                continue
            row: dict[str, Any] = {"case": case, "method": name, "variant": variant, **{c: float("nan") for c in COLUMNS}}
            per: dict[str, Any] = {}
            if "fidelity" in wanted:
                curves = M.fidelity(forward, x, attribution, variant, config.baseline, config.fidelity_score,
                                    config.fractions, config.batch_size, config.seed, cancel=cancel)
                row["fidelity"] = curves.area
                per["fidelity"] = curves.to_dict()
            if "pointing" in wanted and truth is not None:
                row["pointing_auc"] = M.pointing_auc(attribution, truth, variant)
            if "region_dice" in wanted and regions is not None:
                overlap = M.region_dice(attribution, truth, regions, variant)
                row["region_dice_max"] = overlap.maximum
                per["region_dice"] = overlap.to_dict()
            if "faithfulness" in wanted:
                row["faithfulness"] = M.faithfulness_correlation(
                    forward, x, attribution, variant, config.n_subsets, config.subset_fraction, config.baseline,
                    config.batch_size, config.seed, cancel=cancel)
            if noisy is not None:
                result = M.sensitivity_of(attribution, noisy, variant)
                row["sensitivity_mean"], row["sensitivity_max"] = result["mean"], result["max"]
            if "complexity" in wanted:
                row["complexity"] = M.complexity(attribution, variant)
            if "efficiency" in wanted:
                row["seconds"] = efficiency["seconds"]
            if randomisation is not None:
                row["randomisation_similarity"] = randomisation["spearman_abs" if variant == "absolute" else "spearman"]
                if same:  # |a| = a: one similarity for both variants
                    row["randomisation_similarity"] = randomisation["spearman_abs"]
            record[variant] = per
            rows.append(row)
            first_row = first_row or row
        details["methods"][name] = record
        report(step, 1.0, name)
    return rows, details


# ---- cohort tables -----------------------------------------------------------------------------
def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean, standard deviation and count over cases per (model, method, variant) and column."""
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row.get("model", ""), row["method"], row["variant"]), []).append(row)
    summary = []
    for (model, method, variant), members in groups.items():
        entry: dict[str, Any] = {"model": model, "method": method, "variant": variant, "cases": len(members)}
        for column in COLUMNS:
            values = np.array([m[column] for m in members], float)
            values = values[np.isfinite(values)]
            entry[column] = {"mean": float(values.mean()) if values.size else None,
                             "sd": float(values.std(ddof=1)) if values.size > 1 else (0.0 if values.size else None),
                             "n": int(values.size)}
        summary.append(entry)
    return summary


def json_ready(value: Any) -> Any:
    """``value`` with non-finite floats as None (strict JSON), numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _cell(stat: Optional[Mapping[str, Any]], scale: float = 1.0, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    mean, sd = stat["mean"] * scale, (stat["sd"] or 0.0) * scale
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if stat["n"] > 1 else f"{mean:.{digits}f}"


def markdown_tables(summary: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """Paper 002's tables 1-3 (fidelity x 10, pointing AUC, max region Dice; signed and
    absolute) and paper 003's table 1 (faithfulness, sensitivity, complexity, efficiency; plus
    the randomisation similarity), one block per model. Cells: mean ± sd over cases."""
    lines = [f"# {title}\n" if title else ""]
    models = list(dict.fromkeys(s["model"] for s in summary))
    for model in models:
        entries = [s for s in summary if s["model"] == model]
        methods = list(dict.fromkeys(s["method"] for s in entries))
        get = {(s["method"], s["variant"]): s for s in entries}
        cases = max(s["cases"] for s in entries)
        if model:
            lines.append(f"## {model} ({cases} case{'s' if cases != 1 else ''})\n")
        lines.append("Paper 002 style (tables 1-3): fidelity F x 10 (area between LiF and MiF), pointing ROC-AUC "
                     "against the reference mask, max Dice of the top-ranked SLIC supervoxels.\n")
        lines.append("| method | F x 10 (signed) | F x 10 (absolute) | AUC (signed) | AUC (absolute) | "
                     "max DSC (signed) | max DSC (absolute) |")
        lines.append("|---|---|---|---|---|---|---|")
        for method in methods:
            cells = []
            for column, scale in (("fidelity", 10.0), ("pointing_auc", 1.0), ("region_dice_max", 1.0)):
                for variant in ("signed", "absolute"):
                    entry = get.get((method, variant))
                    cells.append(_cell(entry[column] if entry else None, scale, 2))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Paper 003 style (table 1): faithfulness correlation ↑ (signed maps), sensitivity ↓ (mean over "
                     "noisy inputs, signed min-max normalised), complexity ↓ (share of voxels above 0.1 max |a|), "
                     "efficiency [s] ↓; randomisation ↓: Spearman of |a| with the map of the fully randomised model.\n")
        lines.append("| method | faithfulness ↑ | sensitivity ↓ | complexity ↓ | efficiency [s] ↓ | randomisation ↓ |")
        lines.append("|---|---|---|---|---|---|")
        for method in methods:
            signed, absolute = get.get((method, "signed")), get.get((method, "absolute"))
            first = signed or absolute
            cells = [
                _cell((signed or first)["faithfulness"]),
                _cell((signed or first)["sensitivity_mean"]),
                _cell((absolute or first)["complexity"], digits=4),
                _cell(first["seconds"], digits=2),
                _cell((absolute or first)["randomisation_similarity"]),
            ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).lstrip("\n") + "\n"


def csv_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per (model, case, method, variant) with every column."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["model", "case", "method", "variant", *COLUMNS]
    writer.writerow(header)
    for row in rows:
        values = [row.get(h, "") for h in header]
        writer.writerow(["" if isinstance(v, float) and not math.isfinite(v) else v for v in values])
    return buffer.getvalue()
