"""Benchmark: the shipped counterfactual generators of the bundled lesion model, as paper 004 checks.

Run from the repository root (after ``Utilities/train_counterfactual_demo.py``)::

    OMP_NUM_THREADS=1 python Testing/Benchmarks/bench_counterfactual.py [--phantoms 20]
        [--generators Resources/Models/lesions/counterfactual/generators.pt] [--update-card]
        [--out Testing/Benchmarks/results]

Data: held-out lesion phantoms of the bundled head (the seeds the card lists under
``held_out_phantom_seeds``, disjoint from the generators' training phantoms and from every other
use of the lesion phantoms). Targets, on the model grid: every reference lesion (its voxel
nearest the centroid, as :func:`~SegXAILib.counterfactual.counterfactual_relevance` centres a
region) and as many lesion-free white-matter centres per phantom (seeded; no lesion voxel in
their patch). The score is the generators' training target: the model's mean lesion logit over
the central region of the patch, the model run on its window around the patch.

Checks (paper 004, section 3.3; :mod:`SegXAILib.counterfactual.evaluation`):

* **activation**: scores of x, G+(x), G-(x); means with 95 % bootstrap CIs, paired two-tailed
  t-test and Wilcoxon signed-rank test, as logits and as ``sigmoid(logit)`` (the paper's score
  is a classifier probability: .470 -> .820 / .289), all targets and per kind;
* **proximity**: L1 (model units) and SSIM (the generators' normalised units) of G(x) to x;
* **locality**: share of ``|R|`` (``R = G+(x) - G-(x)``) inside the lesion dilated by
  ``--radius-mm`` in the patch's slice, beside the share of the patch that neighbourhood covers
  (what a uniform R would give);
* **deletion**: on ``--deletion-per-phantom`` lesions per phantom, MiF / LiF curves of
  the project's fidelity metric (:func:`SegXAILib.evaluation.metrics.fidelity`) for R and the
  gradient-family maps of the same target (vanilla gradient, gradient x input, SmoothGrad,
  integrated gradients, and a random map), every map restricted to the generators' patch;
  the normalised area under MiF (smaller: better) and the fidelity area (LiF - MiF, larger:
  better), paired Wilcoxon of R against each.

Also checked: on one lesion per phantom, :func:`counterfactual_relevance` (the public path,
input grid) gives the same three scores as this benchmark's model-grid path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from SegXAILib.attribution.gradient import GradientXInput, IntegratedGradients, SmoothGrad, VanillaGradient  # noqa: E402
from SegXAILib.counterfactual import (SegmentationScore, counterfactual_relevance, crop_context,  # noqa: E402
                                      load_counterfactual_generators)
from SegXAILib.counterfactual.evaluation import (bootstrap_mean_ci, deletion_area, deletion_curves,  # noqa: E402
                                                 locality, neighbourhood, paired_comparison, proximity)
from SegXAILib.models.card import sha256_of  # noqa: E402
from SegXAILib.models.loaders import load_model  # noqa: E402
from SegXAILib.models.preprocessing import model_input, preprocess_labels  # noqa: E402
from SegXAILib.phantoms import make_lesion_phantom  # noqa: E402
from SegXAILib.sample_data import WHITE_MATTER_LABEL, bundled_model_card, load_sample_head  # noqa: E402

DEFAULT_DIR = ROOT / "Resources" / "Models" / "lesions" / "counterfactual"
#: paper 004, section 3.3: the classifier's mean malignancy probability on the test data (95 % CI)
PAPER = {"x": (0.470, (0.418, 0.522)), "plus": (0.820, (0.788, 0.848)), "minus": (0.289, (0.250, 0.330)),
         "t_plus": 17.9, "t_minus": 14.5, "dof": 233}
MIN_LESION_VOXELS = 4  # model-grid voxels of a lesion to be a target
MAP_NAMES = ("R", "vanilla_gradient", "gradient_x_input", "smoothgrad", "integrated_gradients", "random")


def sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(values, dtype=np.float64)))


def lesion_centres(labels: np.ndarray) -> list[tuple[int, tuple[int, int, int]]]:
    """(instance label, voxel nearest its centroid) of every instance on the model grid."""
    centres = []
    for label in np.unique(labels[labels > 0]):
        voxels = np.argwhere(labels == label)
        if len(voxels) < MIN_LESION_VOXELS:
            continue
        centroid = voxels.mean(0)
        centres.append((int(label), tuple(int(v) for v in voxels[np.argmin(((voxels - centroid) ** 2).sum(1))])))
    return centres


def free_centres(lesions: np.ndarray, white: np.ndarray, patch_shape, count: int, seed: int) -> list[tuple[int, int, int]]:
    """``count`` white-matter centres whose patch holds no lesion voxel (seeded)."""
    from scipy import ndimage

    near = ndimage.maximum_filter((lesions > 0).astype(np.uint8), size=patch_shape, mode="constant") > 0
    candidates = np.argwhere(white & ~near)
    picks = np.random.default_rng(seed).choice(len(candidates), size=min(count, len(candidates)), replace=False)
    return [tuple(int(v) for v in candidates[p]) for p in sorted(picks)]


def gradient_maps(forward, context: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """The gradient-family maps of the target (plus a random map), ``(1, C, *context)`` each."""
    generator = torch.Generator().manual_seed(seed)
    return {"vanilla_gradient": VanillaGradient(forward).attribute(context),
            "gradient_x_input": GradientXInput(forward).attribute(context),
            "smoothgrad": SmoothGrad(forward).attribute(context, n_samples=8, noise_level=0.1, seed=seed),
            "integrated_gradients": IntegratedGradients(forward).attribute(context, "zero", n_steps=16),
            "random": torch.rand(context.shape, generator=generator)}


def summary(values) -> dict[str, Any]:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "ci": list(bootstrap_mean_ci(values)), "n": int(values.size)}


def evaluate(generators_path: Path, seeds: list[int], radius_mm: float, deletion_per_phantom: int,
             log=print) -> dict[str, Any]:
    model = load_model(bundled_model_card("lesions"), "cpu")
    generators = load_counterfactual_generators(generators_path)
    geometry, frame = generators.geometry, generators.frame
    score = SegmentationScore(model, geometry, generators.class_index)
    forward = score.forward
    axis = geometry.slice_axis
    in_plane = [a for a in range(3) if a != axis]
    spacing = np.asarray(model.card.target_spacing, dtype=float)[in_plane] if model.card.target_spacing else np.ones(2)
    support = np.zeros(geometry.context_size, dtype=bool)
    support[geometry.patch_slices] = True
    head = load_sample_head()

    rows: list[dict[str, Any]] = []
    deletion: dict[str, dict[str, list]] = {v: {n: [] for n in MAP_NAMES} for v in ("signed", "absolute")}
    fidelity_area: dict[str, dict[str, list]] = {v: {n: [] for n in MAP_NAMES} for v in ("signed", "absolute")}
    cross_check = []
    began = time.perf_counter()
    for number, seed in enumerate(seeds):
        phantom = make_lesion_phantom(head, seed=seed)
        batch, _ = model_input(phantom.image, model.card, "cpu")
        x = batch[0].float()
        lesions = preprocess_labels(phantom.lesions, model.card).as_tensor()[0].numpy().astype(np.int64)
        white_image = phantom.tissue.with_array(
            ((phantom.tissue.array[0] == WHITE_MATTER_LABEL) & (phantom.brain.array[0] > 0))[None].astype(np.uint8))
        white = preprocess_labels(white_image, model.card).as_tensor()[0].numpy() > 0
        targets = [("lesion", label, centre) for label, centre in lesion_centres(lesions)]
        targets += [("free", 0, centre) for centre in free_centres(lesions, white, geometry.patch_shape,
                                                                     len(targets), seed)]
        contexts = torch.stack([crop_context(x, centre, geometry.context_size) for _, _, centre in targets])
        patches = geometry.to_generator(contexts[(slice(None), slice(None), *geometry.patch_slices)])
        with torch.no_grad():
            plus, minus = generators.plus(patches), generators.minus(patches)
            scores = {name: score(contexts, value).double().numpy()
                      for name, value in (("x", patches), ("plus", plus), ("minus", minus))}
        near_plus, near_minus = proximity(patches, plus, frame), proximity(patches, minus, frame)
        relevance = (plus - minus).numpy()
        deleted = 0
        for b, (kind, label, centre) in enumerate(targets):
            row = {"seed": seed, "kind": kind, "lesion": label, "centre": list(centre),
                   "score_x": float(scores["x"][b]), "score_plus": float(scores["plus"][b]),
                   "score_minus": float(scores["minus"][b]),
                   "l1_plus": float(near_plus["l1"][b]), "l1_minus": float(near_minus["l1"][b]),
                   "ssim_plus": float(near_plus["ssim"][b]), "ssim_minus": float(near_minus["ssim"][b])}
            if kind == "lesion":
                crop = crop_context(torch.as_tensor(lesions == label)[None].float(), centre, geometry.context_size)
                mask = geometry.to_generator(crop[None][(slice(None), slice(None), *geometry.patch_slices)])[0, 0] > 0.5
                inside = neighbourhood(mask.numpy(), radius_mm, spacing)
                share = locality(relevance[b], inside)
                row["locality"] = share if np.isfinite(share) else None  # None: R is zero everywhere
                row["locality_chance"] = float(inside.mean())
                if deleted < deletion_per_phantom:
                    deleted += 1
                    context = contexts[b:b + 1]
                    maps = {"R": geometry.paste(torch.zeros_like(context), plus[b:b + 1] - minus[b:b + 1])}
                    maps.update(gradient_maps(forward, context, seed))
                    for variant in ("signed", "absolute"):
                        curves = deletion_curves(forward, context, maps, support, variant, seed=seed)
                        for name, curve in curves.items():
                            deletion[variant][name].append(deletion_area(curve))
                            fidelity_area[variant][name].append(curve.area / float(curve.fractions[-1]))
                    # the public path (input grid) must give the same scores
                    region = phantom.lesions.with_array((phantom.lesions.array == label).astype(np.uint8))
                    result = counterfactual_relevance(phantom.image, model, generators, region=region)
                    if tuple(result.centre) == tuple(centre):
                        cross_check.append(max(abs(result.scores[k] - row[f"score_{n}"])
                                               for k, n in (("original", "x"), ("plus", "plus"), ("minus", "minus"))))
            rows.append(row)
        log(f"phantom {number + 1}/{len(seeds)} (seed {seed}): {len(targets)} targets, "
            f"{time.perf_counter() - began:.0f} s")

    def activation(selected: list[dict]) -> dict[str, Any]:
        x = np.array([r["score_x"] for r in selected])
        plus = np.array([r["score_plus"] for r in selected])
        minus = np.array([r["score_minus"] for r in selected])
        result = {}
        for unit, transform in (("logit", lambda v: v), ("sigmoid", sigmoid)):
            result[unit] = {"x": summary(transform(x)), "plus": summary(transform(plus)),
                            "minus": summary(transform(minus)),
                            "plus_vs_x": paired_comparison(transform(x), transform(plus)).to_dict(),
                            "minus_vs_x": paired_comparison(transform(x), transform(minus)).to_dict()}
        return result

    lesion_rows = [r for r in rows if r["kind"] == "lesion"]
    results: dict[str, Any] = {
        "activation": {"all": activation(rows), "lesion": activation(lesion_rows),
                       "free": activation([r for r in rows if r["kind"] == "free"])},
        "proximity": {key: summary([r[key] for r in rows]) for key in ("l1_plus", "l1_minus", "ssim_plus", "ssim_minus")},
        "locality": {"share": summary([r["locality"] for r in lesion_rows if r["locality"] is not None]),
                     "chance": summary([r["locality_chance"] for r in lesion_rows]), "radius_mm": radius_mm},
        "deletion": {},
        "cross_check_max_abs_diff": float(max(cross_check)) if cross_check else None,
        "cross_check_n": len(cross_check),
        "seconds": round(time.perf_counter() - began, 1),
        "rows": rows,
    }
    for variant in ("signed", "absolute"):
        results["deletion"][variant] = {
            name: {"mif_area": summary(deletion[variant][name]), "fidelity_area": summary(fidelity_area[variant][name]),
                   **({} if name == "R" else {
                       "R_vs_this_mif_area": paired_comparison(deletion[variant][name], deletion[variant]["R"]).to_dict()})}
            for name in MAP_NAMES}
    return results


def _ci(entry: dict, digits: int = 3) -> str:
    low, high = entry["ci"]
    return f"{entry['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown(results: dict[str, Any]) -> str:
    act = results["activation"]
    lines = [
        "# Counterfactual generators (paper 004) of the bundled lesion model",
        "",
        f"{results['date']}; {results['machine']}; torch {results['torch']}. Generators "
        f"`{results['generators']}` (SHA-256 {results['generators_sha256'][:16]}..., {results['iterations']} "
        f"training iterations); {len(results['seeds'])} held-out lesion phantoms (seeds {results['seeds'][0]}-"
        f"{results['seeds'][-1]}), {act['all']['logit']['x']['n']} targets ({act['lesion']['logit']['x']['n']} "
        f"reference lesions, {act['free']['logit']['x']['n']} lesion-free white-matter centres). Score: the model's "
        "mean lesion logit over the central region of the patch (the paper's is a classifier probability; "
        "sigmoid(logit) below for comparison). Means with 95 % bootstrap CIs; paired two-tailed t-test and "
        "Wilcoxon signed-rank test against x.",
        "",
        "## Activation",
        "",
        "| targets | unit | x | G+(x) | G-(x) | t (G+ vs x) | p Wilcoxon | t (G- vs x) | p Wilcoxon | share G+ > x | share G- < x |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for group in ("all", "lesion", "free"):
        for unit in ("logit", "sigmoid"):
            a = act[group][unit]
            p, m = a["plus_vs_x"], a["minus_vs_x"]
            lines.append(f"| {group} | {unit} | {_ci(a['x'])} | {_ci(a['plus'])} | {_ci(a['minus'])} | "
                         f"{p['t_statistic']:.1f} | {p['wilcoxon_p']:.1e} | {m['t_statistic']:.1f} | "
                         f"{m['wilcoxon_p']:.1e} | {p['share_greater']:.2f} | {1 - m['share_greater']:.2f} |")
    lines.append(f"| paper 004 (classifier, n={PAPER['dof'] + 1}) | probability | {PAPER['x'][0]:.3f} "
                 f"[{PAPER['x'][1][0]:.3f}, {PAPER['x'][1][1]:.3f}] | {PAPER['plus'][0]:.3f} [{PAPER['plus'][1][0]:.3f}, "
                 f"{PAPER['plus'][1][1]:.3f}] | {PAPER['minus'][0]:.3f} [{PAPER['minus'][1][0]:.3f}, "
                 f"{PAPER['minus'][1][1]:.3f}] | {PAPER['t_plus']} | p << 1e-5 (t-test) | -{PAPER['t_minus']} | "
                 "p << 1e-5 (t-test) | | |")
    prox, loc = results["proximity"], results["locality"]
    lines += [
        "",
        "## Proximity and locality",
        "",
        "| | G+(x) | G-(x) |",
        "|---|---|---|",
        f"| L1 to x (model units, mean over the patch) | {_ci(prox['l1_plus'], 4)} | {_ci(prox['l1_minus'], 4)} |",
        f"| SSIM to x (normalised units) | {_ci(prox['ssim_plus'])} | {_ci(prox['ssim_minus'])} |",
        "",
        f"Locality (reference lesions): share of |R| within {loc['radius_mm']:g} mm of the lesion in the patch's "
        f"slice {_ci(loc['share'])}; that neighbourhood covers {_ci(loc['chance'])} of the patch (a uniform R's share).",
        "",
        "## Deletion (fidelity, paper 002), every map restricted to the generators' patch",
        "",
        "Deleted voxels are set to 0 (the mean of the non-zero voxels in the model's z-scores) in both channels, in steps of 1/20 "
        "of the patch. The target is normalised as in `fidelity`: 1 for the clean crop, 0 for the whole crop at "
        "the baseline (deleting inside the patch alone can take it below 0). MiF area: the mean normalised "
        "target while deleting, most relevant first (smaller: better); fidelity: area between LiF and MiF "
        "divided by the patch's share (larger: better); p: paired Wilcoxon of the MiF areas, R against the map.",
        "",
        "| variant | map | MiF area | fidelity | p (R vs map) |",
        "|---|---|---|---|---|",
    ]
    for variant, maps in results["deletion"].items():
        for name, entry in maps.items():
            p = entry.get("R_vs_this_mif_area", {}).get("wilcoxon_p")
            lines.append(f"| {variant} | {name} | {_ci(entry['mif_area'])} | {_ci(entry['fidelity_area'])} | "
                         f"{'' if p is None else f'{p:.1e}'} |")
    lines += ["", f"Cross-check: `counterfactual_relevance` on {results['cross_check_n']} lesions gives the same "
              f"scores (max abs difference {results['cross_check_max_abs_diff']}). Evaluation took "
              f"{results['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def card_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers the card keeps (no per-target rows)."""
    act = results["activation"]
    return {
        "generators_sha256": results["generators_sha256"],
        "held_out_phantom_seeds": results["seeds"],
        "targets": {k: act[k]["logit"]["x"]["n"] for k in ("all", "lesion", "free")},
        "activation": {group: {unit: {k: act[group][unit][k] for k in ("x", "plus", "minus")}
                               | {"t_plus": act[group][unit]["plus_vs_x"]["t_statistic"],
                                  "p_wilcoxon_plus": act[group][unit]["plus_vs_x"]["wilcoxon_p"],
                                  "t_minus": act[group][unit]["minus_vs_x"]["t_statistic"],
                                  "p_wilcoxon_minus": act[group][unit]["minus_vs_x"]["wilcoxon_p"]}
                               for unit in ("logit", "sigmoid")} for group in ("all", "lesion", "free")},
        "paper": PAPER,
        "proximity": results["proximity"],
        "locality": results["locality"],
        "deletion_mif_area": {variant: {name: entry["mif_area"] for name, entry in maps.items()}
                              for variant, maps in results["deletion"].items()},
        "benchmark": "Testing/Benchmarks/bench_counterfactual.py -> Testing/Benchmarks/results/counterfactual.md",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generators", type=Path, default=DEFAULT_DIR / "generators.pt")
    parser.add_argument("--phantoms", type=int, default=20, help="held-out phantoms (the card's first N seeds)")
    parser.add_argument("--radius-mm", type=float, default=4.0, help="lesion neighbourhood for locality")
    parser.add_argument("--deletion-per-phantom", type=int, default=1, help="lesions per phantom in the deletion test")
    parser.add_argument("--update-card", action="store_true", help="write the summary into the card beside the generators")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    card_path = args.generators.parent / "card.json"
    card = json.loads(card_path.read_text())
    digest = sha256_of(args.generators)
    if card.get("generators_sha256") != digest:
        raise SystemExit(f"{args.generators}: its SHA-256 does not match {card_path}")
    seeds = list(card["held_out_phantom_seeds"])[: args.phantoms]
    overlap = set(seeds) & set(card["training_phantoms"]["seeds"])
    if overlap:
        raise SystemExit(f"held-out seeds {sorted(overlap)} were used in training")
    results = evaluate(args.generators, seeds, args.radius_mm, args.deletion_per_phantom)
    try:
        shown = args.generators.resolve().relative_to(ROOT)
    except ValueError:
        shown = args.generators
    results.update({"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
                    f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads",
                    "torch": torch.__version__, "generators": str(shown), "generators_sha256": digest,
                    "iterations": card["iterations"], "seeds": seeds})
    write_results(results, args.out, "counterfactual", markdown)
    if args.update_card:
        card["evaluation"] = card_summary(results)
        card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
