"""QA risk calibration: AUROC per model x attribution method on real calibration cohorts.

Run from the repository root (about 20 minutes on 2 CPU cores)::

    nice -n 10 python Testing/Benchmarks/qa_calibration.py [--lesion-cases 30] [--deepbet-cases 20]
        [--seed 0] [--work DIR] [--out Testing/Benchmarks/results]

Builds two cohorts with :func:`SegXAILib.pipeline.cohort.build_cohort`:

* ``lesions``: the bundled lesion model on lesion phantoms (held-out seeds from 10000 on)
  with graded degradations (``LESION_GRID``: noise, bias field, lesion contrast, resolution,
  blur, motion, combined); reference = the inserted lesions.
* ``deepbet``: deepbet's brain model (first stage) on the bundled real T1 with graded
  degradations (``DEEPBET_GRID``); reference = deepbet's mask on the undegraded T1.

and calibrates a risk model for every attribution method of each cohort
(:func:`SegXAILib.topology.cohort.calibrate_cohort`: 100 thresholds, insufficient = lowest
15 % Dice, sensitivity target 0.85, specificity target 0.9, stratified CV). Writes
``results/qa_auroc.json`` and ``results/qa_auroc.md`` (the table, the command, the seeds,
the degradation grids) through the benchmarks' results writer and the risk models into
``--work``. This is the original calibration (sizes confound it: see its table's volume
column); what ships is chosen by ``segxai qa benchmark`` on the QA cohorts
(``Utilities/ship_risk_model.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_attribution import write_results  # noqa: E402

from SegXAILib.image import SegXAIInputError  # noqa: E402
from SegXAILib.pipeline.cohort import build_cohort  # noqa: E402
from SegXAILib.topology.cohort import calibrate_cohort, read_cohort  # noqa: E402



def _dice_spread(dice: list[float]) -> dict[str, float]:
    d = np.asarray(dice, dtype=float)
    return {"min": float(d.min()), "q15": float(np.quantile(d, 0.15)), "median": float(np.median(d)),
            "max": float(d.max()), "mean": float(d.mean()), "below_0.5": int((d < 0.5).sum())}


def calibrate_all(name: str, cohort_dir: Path, work: Path, seed: int, log=print) -> list[dict[str, Any]]:
    document = read_cohort(cohort_dir)
    cases = document["cases"]
    all_dice = [c["dice"] for c in cases]
    rows = []
    for method, record in document["methods"].items():
        build_seconds = sum(c.get("timings_s", {}).get(method, 0.0) for c in cases)
        start = time.perf_counter()
        row: dict[str, Any] = {
            "model": name, "method": method, "method_parameters": record,
            "cases": len(cases), "usable_cases": sum(c["status"] == "ok" for c in cases),
            "empty_predictions": sum(c["status"] == "empty_prediction" for c in cases),
            "dice_all_cases": _dice_spread(all_dice),
            "saliency_seconds_total": round(build_seconds, 1),
        }
        try:
            model, curves, dice, ids = calibrate_cohort(cohort_dir, method, seed=seed)
        except SegXAIInputError as error:
            row["error"] = str(error)
            rows.append(row)
            log(f"{name} / {method}: {error}")
            continue
        path = model.save(work / f"risk_{name}_{method}.json")
        # baseline: the predicted volume alone (small predictions = risky), on the same cases
        from sklearn.metrics import roc_auc_score

        volume = {c["case_id"]: c["predicted_voxels"] for c in cases}
        volume_auroc = float(roc_auc_score(model.calibration_insufficient(), -np.array([volume[i] for i in ids])))
        volume_direction = "smaller" if volume_auroc >= 0.5 else "larger"
        volume_auroc = max(volume_auroc, 1.0 - volume_auroc)
        row.update({
            "dice_usable_cases": _dice_spread(dice.tolist()),
            "insufficient_dice": model.insufficient_dice, "n_insufficient": model.n_insufficient,
            "auroc_train": model.auroc, "auroc_predicted_volume": volume_auroc,
            "predicted_volume_riskier_when": volume_direction, "auroc_cv_mean": model.auroc_cv_mean, "auroc_cv_std": model.auroc_cv_std,
            "cv_folds": model.cv_folds, "cut_high": None if not np.isfinite(model.cut_high) else model.cut_high,
            "cut_low": None if not np.isfinite(model.cut_low) else model.cut_low,
            "operating_points": model.operating_points, "explained_variance_pc1": float(model.explained_variance_ratio[0]),
            "sigmoid": {"A": model.sigmoid_a, "k": model.sigmoid_k, "lambda0": model.sigmoid_lambda0,
                        "status": model.sigmoid_status},
            "bands_on_calibration": {b: int(sum(model.band(v) == b for v in model.calibration_pc1))
                                     for b in ("low", "moderate", "high")},
            "calibrate_seconds": round(time.perf_counter() - start, 2),
            "risk_model": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        })
        log(f"{name} / {method}: AUROC train {model.auroc:.3f}, CV {model.auroc_cv_mean:.3f} +- {model.auroc_cv_std:.3f}")
        rows.append(row)
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# QA risk calibration: AUROC per model and attribution method",
        "",
        f"Made by `{results['command']}` (on {results['machine']['processor']}, "
        f"{results['machine']['threads']} torch threads, torch {results['machine']['torch']}).",
        "",
        "Insufficient contour = Dice below the cohort's 15 % quantile (of the usable cases). AUROC of -PC1 of the "
        "Euler characteristic curves (100 superlevel thresholds of the saliency inside the predicted mask, paper "
        "000 normalisation) as a detector of insufficient contours; *train* = fitted and evaluated on the whole "
        "cohort, *CV* = stratified k-fold (PCA refitted per fold). Cut points: PC1 <= cut_high is *high*, "
        "<= cut_low *moderate*, above *low* (rule in `SegXAILib/topology/risk.py`).",
        "",
        "| model | method | cases (usable / empty pred.) | Dice min / q15 / median / max | insufficient (n, Dice <) "
        "| AUROC train | AUROC CV (mean +- sd, folds) | AUROC of predicted volume | cut_high / cut_low "
        "| bands low/mod/high | saliency time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        spread = row.get("dice_usable_cases") or row["dice_all_cases"]
        dice = f"{spread['min']:.2f} / {spread['q15']:.2f} / {spread['median']:.2f} / {spread['max']:.2f}"
        if "error" in row:
            lines.append(f"| {row['model']} | {row['method']} | {row['usable_cases']} / {row['empty_predictions']} "
                         f"| {dice} | - | - | - | - | - | - | {row['saliency_seconds_total']} |")
            continue
        cuts = " / ".join("-inf" if row[k] is None else f"{row[k]:.4g}" for k in ("cut_high", "cut_low"))
        bands = "/".join(str(row["bands_on_calibration"][b]) for b in ("low", "moderate", "high"))
        lines.append(
            f"| {row['model']} | {row['method']} | {row['usable_cases']} / {row['empty_predictions']} | {dice} "
            f"| {row['n_insufficient']}, {row['insufficient_dice']:.3f} | {row['auroc_train']:.3f} "
            f"| {row['auroc_cv_mean']:.3f} +- {row['auroc_cv_std']:.3f} ({row['cv_folds']}) "
            f"| {row['auroc_predicted_volume']:.3f} ({row['predicted_volume_riskier_when']}) | {cuts} | {bands} "
            f"| {row['saliency_seconds_total']} |"
        )
    errors = [r for r in results["rows"] if "error" in r]
    if errors:
        lines += ["", "Not calibrated:"] + [f"- {r['model']} / {r['method']}: {r['error']}" for r in errors]
    lines += ["", "## How the cohorts were made", ""]
    for name, info in results["cohorts"].items():
        lines += [
            f"### {name}",
            "",
            f"- model: `{info['model']['card_name']}` {info['model']['card_version']}, checksum `{info['model']['checksum'][:16]}...`",
            f"- source: {info['source']}",
            f"- cases: {info['n_cases']}, cohort seed {info['seed']}, case seeds {info['case_seeds'][0]}..{info['case_seeds'][1]}",
            f"- degradation grid (severity in [0, 1] evenly spaced, shuffled; kinds in turn; `combined` = every "
            f"parameter at {info['grid']['combined_scale']} x severity): clean `{json.dumps(info['grid']['clean'])}`, "
            f"worst `{json.dumps(info['grid']['worst'])}`, kinds {', '.join(info['grid']['kinds'])}",
            f"- methods: " + "; ".join(f"`{m}` {json.dumps(r['params'])}" for m, r in info["methods"].items()),
            f"- saliency: target `{next(iter(info['methods'].values()))['target']}`, per-channel maps summed",
            f"- build time: {info['build_seconds']} s (sum of the per-case timings: making the case, segmenting, "
            "each method)",
            "",
        ]
    lines += [
        "The *AUROC of predicted volume* column is a baseline on the same cases: the predicted mask's voxel "
        "count alone as the detector, in its better direction (smaller or larger = riskier). Degradations shrink "
        "the lesion predictions and inflate deepbet's brain mask, and an "
        "EC curve starts at the mask's own Euler characteristic and counts cells of the mask, so it carries the "
        "mask's size and shape as well as the saliency's topology; an EC AUROC near the volume's says little "
        "about the saliency itself.",
        "",
        "Notes: guided methods use `aggregation=target` (one modified backward of the summed target), not paper "
        "000's exact per-voxel sum (about 130 s per lesion case on this machine, against about 3 s). deepbet is "
        "TorchScript, so Grad-CAM (module hooks) and guided backprop (backward rules) cannot run on it; its "
        "cohort uses the gradient family. Small cohorts: the AUROCs carry wide uncertainty (see the CV sd).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lesion-cases", type=int, default=30)
    parser.add_argument("--deepbet-cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (case seeds and CV folds)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "segxai-qa-cohorts",
                        help="cohort folders and risk models (default: a folder in the temp directory)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--skip-build", action="store_true", help="reuse the cohorts already in --work")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    start_all = time.perf_counter()
    rows, cohorts = [], {}
    for name, n_cases in (("lesions", args.lesion_cases), ("deepbet", args.deepbet_cases)):
        if n_cases <= 0:
            continue
        cohort_dir = args.work / name
        start = time.perf_counter()
        if not args.skip_build:
            last = [-1]

            def progress(fraction, message, name=name, last=last):
                if int(fraction * 20) != last[0]:
                    last[0] = int(fraction * 20)
                    print(f"[{name} {fraction:5.1%}] {message}", flush=True)

            build_cohort(cohort_dir, name, n_cases=n_cases, seed=args.seed, progress=progress)
        document = read_cohort(cohort_dir)
        build_seconds = round(sum(sum(c.get("timings_s", {}).values()) for c in document["cases"]), 1)
        seeds = [c["seed"] for c in document["cases"]]
        cohorts[name] = {k: document[k] for k in ("model", "methods", "grid", "source", "seed", "n_cases")}
        cohorts[name]["case_seeds"] = [min(seeds), max(seeds)]
        cohorts[name]["build_seconds"] = build_seconds
        cohorts[name]["cases"] = [{k: c[k] for k in ("case_id", "seed", "kind", "severity", "dice", "status")}
                                  for c in document["cases"]]
        rows += calibrate_all(name, cohort_dir, args.work, args.seed)
    given = list(argv if argv is not None else sys.argv[1:])
    results = {
        "command": "nice -n 10 python Testing/Benchmarks/qa_calibration.py " + " ".join(a for a in given if a != "--skip-build"),
        "calibrated_with_skip_build": "--skip-build" in given,
        "rows": rows,
        "cohorts": cohorts,
        "calibration": {"n_thresholds": 100, "insufficient_quantile": 0.15, "sensitivity_target": 0.85,
                        "specificity_target": 0.9, "cv_folds": 5, "cv_seed": args.seed},
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "total_seconds": round(time.perf_counter() - start_all, 1),
    }
    json_path, md_path = write_results(results, args.out, "qa_auroc", markdown)
    print(markdown(results))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
