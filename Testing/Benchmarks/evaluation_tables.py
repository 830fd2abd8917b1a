"""Evaluation tables of the attribution methods on the bundled models (papers 002 and 003), and
Agg2Exp of the parotid models with the rod as an extra RoI.

Run from the repository root (about 20 minutes on 2 shared CPU cores)::

    nice -n 10 python Testing/Benchmarks/evaluation_tables.py [--cases 2] [--models lesions parotid-S2 ...]
        [--sensitivity-samples 2] [--agg2exp-cases 4] [--out Testing/Benchmarks/results]

Cases are phantoms with seeds 5000, 5001, ..., disjoint from the models' training (0-47 lesions,
0-399 parotid), held-out (1000-1007) and demo (2026) seeds (``SegXAILib/training.py``):

* ``lesions``: a lesion phantom on the bundled T1, cropped to 48 x 48 x 32 voxels (96 mm: one
  sliding window of the model) around its first lesion; reference = the phantom's lesion mask;
* ``parotid-S2/S4/S6``: a 32^3 parotid phantom of the model's variant; reference = the sphere.

Target: the class target of the foreground class (sum of its logits over the predicted
voxels). Every metric of ``SegXAILib.evaluation`` runs with its defaults (fidelity 2.5 % steps
with the normalised target, 100 faithfulness subsets of 1 % of the voxels, SLIC with 200
supervoxels, baseline 0 on the model grid) except the sensitivity, which uses
``--sensitivity-samples`` noisy inputs (paper 003 used 3). It writes
``results/evaluation_tables.{json,md}`` (one table pair per model; the JSON: every row, the
summary, the MiF / LiF and region-Dice curves averaged over cases, the command, the machine)
and ``results/evaluation_agg2exp.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
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

MODELS = ("lesions", "parotid-S2", "parotid-S4", "parotid-S6")
FIRST_SEED = 5000

#: method key -> parameters. Costly settings are cut to fit the time budget (stated in the tables)
METHODS: dict[str, dict[str, Any]] = {
    "vanilla_gradient": {},
    "gradient_x_input": {},
    "smoothgrad": {"n_samples": 10},
    "integrated_gradients": {"n_steps": 16},
    "guided_backprop": {},  # exact per-voxel aggregation (the default; "target" gives all-zero maps here)
    "deconvolution": {},
    "gradcam": {},
    "gradcam_plusplus": {},
    "occlusion": {"window": 8, "stride": 8},
    "supervoxel_occlusion@cubes": {"features": "cubes", "cubes": 4},
    "kernel_shap@cubes": {"features": "cubes", "cubes": 4, "n_samples": 200},
    "kernel_shap@semantic": {"features": "semantic", "connected": True},
    "lrp": {},
    "pattern_attribution": {},
    "random": {},
}


def lesion_case(seed: int):
    from SegXAILib.phantoms import make_lesion_phantom
    from SegXAILib.sample_data import load_sample_head

    phantom = make_lesion_phantom(load_sample_head(), seed=seed)
    centre = np.argwhere(phantom.lesions.array[0] == 1).mean(axis=0).round().astype(int)
    half = np.array([24, 24, 16])
    start = np.clip(centre - half, 0, np.array(phantom.image.spatial_shape) - 2 * half)
    image = phantom.image.crop(start, start + 2 * half)
    lesions = phantom.lesions.crop(start, start + 2 * half)
    return image, lesions.with_array((lesions.array > 0).astype(np.uint8)), None


def parotid_case(variant: str, seed: int):
    from SegXAILib.phantoms import make_parotid_phantom
    from SegXAILib.training import PAROTID_SHAPE, PAROTID_SPACING_MM

    phantom = make_parotid_phantom(variant, seed=seed, shape=PAROTID_SHAPE, spacing=PAROTID_SPACING_MM)
    return phantom.image, phantom.label, phantom.rod


def make_case(model: str, seed: int):
    return lesion_case(seed) if model == "lesions" else parotid_case(model.split("-")[1], seed)


def machine() -> dict[str, Any]:
    import captum
    import monai
    import skimage
    import sklearn

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
                         "captum": captum.__version__, "scikit-image": skimage.__version__,
                         "scikit-learn": sklearn.__version__, "numpy": np.__version__}}


def evaluation(models, n_cases, methods, sensitivity_samples, log) -> dict[str, Any]:
    from SegXAILib.evaluation.runner import EvaluationConfig, evaluate_case, summarise
    from SegXAILib.models import load_model
    from SegXAILib.pipeline import resolve_model_card

    config = EvaluationConfig(sensitivity_samples=sensitivity_samples)
    rows, details, timings, skipped = [], [], {}, {}
    for name in models:
        model = load_model(resolve_model_card(name), device="cpu")
        available = {}
        start = time.perf_counter()
        for key, params in methods.items():
            try:  # a method that cannot run on this model is reported, not silently dropped
                from SegXAILib.attribution import get_method

                get_method(key.split("@")[0])
                available[key] = params
            except Exception as error:  # noqa: BLE001
                skipped[f"{name}:{key}"] = f"{type(error).__name__}: {error}"
        for index in range(n_cases):
            seed = FIRST_SEED + index
            image, reference, _ = make_case(name, seed)
            case_start = time.perf_counter()
            case_rows, case_details = evaluate_case(image, model, available, reference, config, case=f"seed{seed}")
            rows.extend({"model": name, **r} for r in case_rows)
            details.append({"model": name, **case_details})
            log(f"{name} seed {seed}: {time.perf_counter() - case_start:.0f} s")
        timings[name] = round(time.perf_counter() - start, 1)
    return {"config": config.__dict__ | {"variants": list(config.variants), "metrics": list(config.metrics)},
            "methods": methods, "summary": summarise(rows), "rows": rows, "details": details,
            "seconds_per_model": timings, "skipped": skipped}


def condense(results: dict[str, Any]) -> dict[str, Any]:
    """Per-case curves -> their mean per (model, method, variant) (the JSON stays small); the
    per-case efficiency records and targets are kept."""
    curves: dict[tuple, list] = {}
    cases = []
    for detail in results.pop("details"):
        methods = {}
        for method, record in detail["methods"].items():
            methods[method] = {"efficiency": record["efficiency"], "randomisation": record.get("randomisation")}
            for variant in ("signed", "absolute"):
                for kind in ("fidelity", "region_dice"):
                    if kind in record.get(variant, {}):
                        curves.setdefault((detail["model"], method, variant, kind), []).append(record[variant][kind])
        cases.append({k: v for k, v in detail.items() if k != "methods"} | {"methods": methods})
    mean_curves = []
    for (model, method, variant, kind), entries in curves.items():
        keys = ("mif", "lif") if kind == "fidelity" else ("dice",)
        axis = "fractions"
        mean_curves.append({"model": model, "method": method, "variant": variant, "curve": kind,
                            axis: entries[0][axis],
                            **{k: [round(float(v), 5) for v in np.mean([e[k] for e in entries], axis=0)] for k in keys}})
    return results | {"cases_detail": cases, "mean_curves": mean_curves}


def agg2exp(models, n_cases, log) -> dict[str, Any]:
    from SegXAILib.evaluation.agg2exp import OutlierModel, global_matrix, top_k_graph
    from SegXAILib.pipeline import Agg2ExpSettings, CaseSettings, InstanceSettings, agg2exp_case, load_case_model, start_case

    results = {}
    for name in models:
        if not name.startswith("parotid"):
            continue
        settings = CaseSettings(model=name, device="cpu", instances=InstanceSettings(enabled=False),
                                agg2exp=Agg2ExpSettings(enabled=True, method="smoothgrad", params={"n_samples": 10}))
        model = load_case_model(settings)
        cases = []
        start = time.perf_counter()
        for index in range(n_cases):
            image, reference, rod = make_case(name, FIRST_SEED + index)
            rois = {"rod": rod} if bool(rod.array.any()) else {}
            case = start_case(image, model, settings, reference=reference)
            cases.append(agg2exp_case(case, model, rois=rois, variants=("absolute", "positive"),
                                      name=f"seed{FIRST_SEED + index}"))
        matrix = global_matrix([c.matrices["absolute"] for c in cases])
        # the last case scored against the others (needs at least 2 others)
        forest = OutlierModel(100, 0).fit([c.matrices["absolute"] for c in cases[:-1]]) if len(cases) >= 3 else None
        results[name] = {
            "global_absolute": matrix.to_dict(),
            "global_positive": global_matrix([c.matrices["positive"] for c in cases]).to_dict(),
            "context_use": matrix.context_use(),
            "graph": top_k_graph(matrix, 2),
            "dice": {c.case: c.dice for c in cases},
            "outlier_score_of_last_case": forest.score(cases[-1].matrices["absolute"]) if forest else {},
            "seconds": round(time.perf_counter() - start, 1),
        }
        log(f"agg2exp {name}: {results[name]['seconds']} s")
    return results


def _cell(value):
    return "n/a" if value is None else f"{value:.3f}"


def agg2exp_markdown(results: dict[str, Any]) -> str:
    lines = ["# Agg2Exp of the parotid models (SmoothGrad, n = 10; class targets)\n",
             f"Command: `{results['command']}`; {results['cases']} cases per model (seeds {FIRST_SEED}..), "
             f"{results['total_seconds']} s.\n",
             "Global absolute RoI importance `I[c, r]` (rows: explained class; `rod`: the phantom's rod as an extra RoI; "
             "`reference:gland`: the true sphere). Context use = the diagonal.\n"]
    for name, entry in results["models"].items():
        matrix = entry["global_absolute"]
        lines.append(f"## {name}\n")
        lines.append("| explained \\ RoI | " + " | ".join(matrix["columns"]) + " |")
        lines.append("|---|" + "---|" * len(matrix["columns"]))
        for row_name, values in zip(matrix["rows"], matrix["values"]):
            lines.append(f"| {row_name} | " + " | ".join(_cell(v) for v in values) + " |")
        positive = entry["global_positive"]
        gland = dict(zip(positive["columns"], positive["values"][positive["rows"].index("gland")]))
        dice = [d.get("gland") for d in entry["dice"].values()]
        lines.append("")
        lines.append(f"Positive mass of the gland row: gland {_cell(gland.get('gland'))}, rod {_cell(gland.get('rod'))}. "
                     f"Mean Dice {np.mean(dice):.3f}. Outlier score of the last case against the others: "
                     f"{_cell(entry['outlier_score_of_last_case'].get('gland'))}.\n")
    return "\n".join(lines)


def tables_markdown(results: dict[str, Any]) -> str:
    from SegXAILib.evaluation.runner import markdown_tables

    head = [
        "# Evaluation of attribution methods on the bundled models\n",
        f"Command: `{results['command']}` ({results['total_seconds']} s on {results['machine']['cpu_count']} CPU cores "
        f"shared with other jobs, load average at the end {results['load_average_at_end']}).\n",
        f"Cases: {results['cases']} per model (phantom seeds {FIRST_SEED}..; lesions: 48 x 48 x 32 crops around a "
        "lesion). Target: the class target of the foreground class. Cells: mean ± sd over cases. The random "
        "baseline is i.i.d. uniform noise. Sensitivity uses "
        f"{results['config']['sensitivity_samples']} noisy inputs (noise 5 % of the range); randomisation "
        "re-initialises every layer at once.\n",
        "Method settings: " + "; ".join(f"`{k}` {v or 'defaults'}" for k, v in results["methods"].items()) + ".\n",
    ]
    if results["skipped"]:
        head.append("Not run: " + "; ".join(f"{k} ({v})" for k, v in results["skipped"].items()) + ".\n")
    return "\n".join(head) + "\n" + markdown_tables(results["summary"]).replace("# \n", "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--cases", type=int, default=2, help="cases per model")
    parser.add_argument("--methods", nargs="+", default=None, help="method keys (default: all of METHODS)")
    parser.add_argument("--sensitivity-samples", type=int, default=2)
    parser.add_argument("--agg2exp-cases", type=int, default=4, help="cases per parotid model for Agg2Exp (0: skip)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    methods = METHODS if args.methods is None else {k: METHODS.get(k, {}) for k in args.methods}
    command = "nice -n 10 python Testing/Benchmarks/evaluation_tables.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    log = lambda message: print(message, flush=True)  # noqa: E731
    log(f"load average at start: {os.getloadavg()}")
    start = time.perf_counter()
    results = evaluation(args.models, args.cases, methods, args.sensitivity_samples, log)
    results.update({"command": command.strip(), "cases": args.cases, "machine": machine(),
                    "total_seconds": round(time.perf_counter() - start, 1),
                    "load_average_at_end": [round(v, 2) for v in os.getloadavg()]})
    from SegXAILib.evaluation.runner import json_ready

    results = json_ready(condense(results))
    write_results(results, args.out, "evaluation_tables", tables_markdown)
    if args.agg2exp_cases > 0:
        start = time.perf_counter()
        models = agg2exp(args.models, args.agg2exp_cases, log)
        if models:
            document = {"command": command.strip(), "cases": args.agg2exp_cases, "models": models,
                        "total_seconds": round(time.perf_counter() - start, 1)}
            write_results(json_ready(document), args.out, "evaluation_agg2exp", agg2exp_markdown)
    print(tables_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
