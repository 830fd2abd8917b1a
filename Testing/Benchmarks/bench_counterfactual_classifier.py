"""Benchmark: counterfactual relevance for a classifier, paper 004's quantitative check in its own setting.

Run from the repository root (a few minutes on one CPU thread)::

    OMP_NUM_THREADS=1 python Testing/Benchmarks/bench_counterfactual_classifier.py [--iterations 600]
        [--train 1500] [--test 200] [--seed 0] [--out Testing/Benchmarks/results]

Results go to ``results/counterfactual_classifier.{json,md}``.

Setting (issue 20, "a small phantom classifier as the classification test case"): the shape
phantoms of :mod:`SegXAILib.phantoms.shapes` (32 x 32 tissue texture with one blob; class 1
iff the blob is elongated, aspect ratio >= 1.75; area, contrast, orientation and position
carry no information) and the tiny CNN of :mod:`SegXAILib.phantoms.shape_classifier`,
trained on ``--train`` patches. The generators are trained without labels on the same
patches, split into the classifier's own two domains
(:func:`~SegXAILib.counterfactual.classifier_domains`), against
:class:`~SegXAILib.counterfactual.ClassifierScore` (class 1). Everything is evaluated on
``--test`` fresh patches (another seed) that neither network saw.

Reported, beside the paper's numbers (LIDC malignancy, 234 test lesions: mean malignancy
probability .470 [.418, .522] for x, .820 [.788, .848] for G+(x), .289 [.250, .330] for
G-(x); paired two-tailed t-tests t(233) = 17.9 and 14.5):

* **domain transfer**: the mean class-1 probability of x, G+(x) and G-(x) with 95 % percentile
  bootstrap CIs (2000 resamples of the patches), the paired Wilcoxon signed-rank test
  (two-sided, SciPy) of G+(x) vs. x and G-(x) vs. x, and the paired t-test the paper used;
  per class: G+ on class-0 patches, G- on class-1 patches, and the share of the correctly
  classified ones whose decision flips;
* **proximity**: mean ``|G(x) - x|`` (intensity units; the tissue texture has a standard
  deviation of about 0.16, the blob's contrast is 0.6-1.0) and the SSIM of ``(x, G(x))`` (in
  the generators' normalised units, data range 2, the training's SSIM window);
* **locality**: the share of ``sum |R|`` (``R = G+(x) - G-(x)``) on the blob and its rim (the
  blob's half-occupancy mask dilated by ``RIM`` pixels: a shape change happens at the blob's
  edge, also just outside it) beside that region's share of the patch's area; an enrichment
  of 1 is no locality at all;
* **shape**: the blob's aspect ratio measured from its second moments before and after the
  generators (the blob layer ``G(x) - texture`` thresholded at half the contrast, its
  connected component at the blob's centre): does G+ elongate round blobs and G- round off
  elongated ones, i.e. do the counterfactuals follow the phantoms' rule rather than an
  adversarial shortcut?
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_attribution import write_results  # noqa: E402

#: paper 004, section 4 (LIDC test set, n = 234): mean malignancy probability [95 % CI]
PAPER = {"original": [0.470, 0.418, 0.522], "plus": [0.820, 0.788, 0.848], "minus": [0.289, 0.250, 0.330],
         "t_plus": 17.9, "t_minus": 14.5, "n": 234}
#: pixels around the blob's half-occupancy mask that count as "on the blob" for locality
RIM = 2
DEFAULTS = {"iterations": 600, "train": 1500, "test": 200, "epochs": 12, "batch": 8, "learning_rate": 5e-4,
            "generator_features": [16, 32, 64, 128], "generator_strides": [2, 2, 2],
            "discriminator_features": [16, 32, 64], "seed": 0}


def bootstrap_ci(values: np.ndarray, rng: np.random.Generator, resamples: int = 2000) -> list[float]:
    """95 % percentile bootstrap CI of the mean of ``values`` ``(N,)``."""
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def blob_aspect(layer: np.ndarray, seed_mask: np.ndarray, threshold: float) -> float:
    """Aspect ratio (sqrt of the covariance eigenvalue ratio) of the connected component of
    ``layer >= threshold`` that overlaps ``seed_mask`` most; NaN when there is none."""
    from scipy import ndimage

    labels, count = ndimage.label(layer >= threshold)
    if count == 0:
        return float("nan")
    overlap = np.bincount(labels[seed_mask], minlength=count + 1)[1:]
    if overlap.max() == 0:
        return float("nan")
    points = np.argwhere(labels == 1 + int(np.argmax(overlap))).astype(np.float64)
    if len(points) < 3:
        return float("nan")
    eig = np.linalg.eigvalsh(np.cov(points.T, bias=True))
    # a one-pixel-wide line has a zero minor moment: add a pixel's own variance (1/12) to both
    return float(np.sqrt((eig[1] + 1 / 12) / (eig[0] + 1 / 12)))


def run(params: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    from scipy import ndimage, stats

    from SegXAILib.counterfactual import ClassifierScore, CounterfactualConfig, classifier_domains, train_counterfactual
    from SegXAILib.counterfactual.losses import dssim
    from SegXAILib.phantoms.shape_classifier import predict_probability, train_shape_classifier
    from SegXAILib.phantoms.shapes import ASPECT_THRESHOLD, SHAPE_RULE, make_shape_patches

    seed = int(params["seed"])
    train = make_shape_patches(int(params["train"]), seed=seed)
    test = make_shape_patches(int(params["test"]), seed=seed + 10_000)
    began = time.perf_counter()
    fitted = train_shape_classifier(train, epochs=int(params["epochs"]), seed=seed)
    classifier_s = time.perf_counter() - began
    classifier = fitted.network
    p_test = predict_probability(classifier, test.images)
    correct = (p_test >= 0.5) == test.labels.astype(bool)
    rng = np.random.default_rng(seed)
    log(f"classifier: {classifier_s:.1f} s, held-out accuracy {correct.mean():.3f}")

    domains = classifier_domains(train.images, classifier, class_index=1)
    config = CounterfactualConfig(iterations=int(params["iterations"]), batch_size=int(params["batch"]),
                                  learning_rate=float(params["learning_rate"]),
                                  generator_features=tuple(params["generator_features"]),
                                  generator_strides=tuple(params["generator_strides"]),
                                  discriminator_features=tuple(params["discriminator_features"]), seed=seed,
                                  checkpoint_every=int(params["iterations"]))
    step = max(1, config.iterations // 10)

    def progress(fraction: float, message: str) -> None:
        if round(fraction * config.iterations) % step == 0:
            log(message)

    trained = train_counterfactual(domains, ClassifierScore(classifier, 1), config, progress=progress)
    generators = trained.generators
    log(f"generators: {trained.seconds:.1f} s for {config.iterations} iterations")

    x = torch.from_numpy(test.images)
    with torch.no_grad():
        plus, minus = generators.plus(x), generators.minus(x)
        normalise = generators.plus.normalise
        ssim = {name: (1 - 2 * dssim(normalise(x), normalise(g), config.ssim_window)).numpy().astype(np.float64)
                for name, g in (("plus", plus), ("minus", minus))}
    probability = {"original": p_test, "plus": predict_probability(classifier, plus),
                   "minus": predict_probability(classifier, minus)}
    transfer = {name: {"mean": float(v.mean()), "ci95": bootstrap_ci(v, rng)} for name, v in probability.items()}
    tests = {}
    for name in ("plus", "minus"):
        difference = probability[name] - probability["original"]
        wilcoxon = stats.wilcoxon(probability[name], probability["original"], alternative="two-sided")
        ttest = stats.ttest_rel(probability[name], probability["original"])
        tests[name] = {"mean_difference": float(difference.mean()), "difference_ci95": bootstrap_ci(difference, rng),
                       "wilcoxon_statistic": float(wilcoxon.statistic), "wilcoxon_p": float(wilcoxon.pvalue),
                       "t": float(ttest.statistic), "t_df": int(len(difference) - 1), "t_p": float(ttest.pvalue),
                       "share_moved_right_way": float((difference > 0).mean() if name == "plus"
                                                      else (difference < 0).mean())}
    round_, elongated = test.labels == 0, test.labels == 1
    # flips among the correctly classified patches of the class (the paper's user study showed those)
    right0, right1 = round_ & (p_test < 0.5), elongated & (p_test >= 0.5)
    per_class = {
        "class0_plus": {"n": int(round_.sum()), "original": float(p_test[round_].mean()),
                        "generated": float(probability["plus"][round_].mean()), "n_correct": int(right0.sum()),
                        "flipped": float((probability["plus"][right0] >= 0.5).mean())},
        "class1_minus": {"n": int(elongated.sum()), "original": float(p_test[elongated].mean()),
                         "generated": float(probability["minus"][elongated].mean()), "n_correct": int(right1.sum()),
                         "flipped": float((probability["minus"][right1] < 0.5).mean())},
    }

    x_np, plus_np, minus_np = x.numpy()[:, 0], plus.numpy()[:, 0], minus.numpy()[:, 0]
    proximity = {name: {"mean_abs_change": float(np.abs(g - x_np).mean()),
                        "mean_abs_change_ci95": bootstrap_ci(np.abs(g - x_np).mean((1, 2)), rng),
                        "ssim": float(ssim[name].mean()), "ssim_ci95": bootstrap_ci(ssim[name], rng)}
                 for name, g in (("plus", plus_np), ("minus", minus_np))}
    relevance = np.abs(plus_np - minus_np)
    region = np.stack([ndimage.binary_dilation(b >= 0.5, iterations=RIM) for b in test.blobs])
    locality = {}
    for name, magnitude in (("relevance", relevance), ("plus", np.abs(plus_np - x_np)),
                            ("minus", np.abs(minus_np - x_np))):
        share = (magnitude * region).sum((1, 2)) / np.maximum(magnitude.sum((1, 2)), 1e-12)
        locality[name] = {"share_on_blob": float(share.mean()), "share_on_blob_ci95": bootstrap_ci(share, rng)}
    area_share = region.mean((1, 2))
    locality["area_share_of_blob_region"] = float(area_share.mean())
    locality["enrichment"] = locality["relevance"]["share_on_blob"] / locality["area_share_of_blob_region"]

    texture = x_np - test.contrast[:, None, None] * test.blobs  # tissue + noise, without the blob
    half = test.contrast / 2
    aspects = {name: np.array([blob_aspect(g[n] - texture[n], test.blobs[n] >= 0.5, half[n])
                               for n in range(len(test))])
               for name, g in (("original", x_np), ("plus", plus_np), ("minus", minus_np))}
    shape = {
        "class0_original_median": float(np.nanmedian(aspects["original"][round_])),
        "class0_plus_median": float(np.nanmedian(aspects["plus"][round_])),
        "class0_plus_share_elongated": float(np.nanmean(aspects["plus"][round_] >= ASPECT_THRESHOLD)),
        "class1_original_median": float(np.nanmedian(aspects["original"][elongated])),
        "class1_minus_median": float(np.nanmedian(aspects["minus"][elongated])),
        "class1_minus_share_round": float(np.nanmean(aspects["minus"][elongated] < ASPECT_THRESHOLD)),
        "measured_original_agrees_with_rule": float(np.mean((aspects["original"] >= ASPECT_THRESHOLD)
                                                            == test.labels.astype(bool))),
    }
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version()},
        "params": params,
        "rule": SHAPE_RULE,
        "paper": PAPER,
        "classifier": {"train_accuracy": fitted.train_accuracy, "held_out_accuracy": float(correct.mean()),
                       "held_out_accuracy_ci95": bootstrap_ci(correct.astype(np.float64), rng),
                       "seconds": classifier_s, "epochs": int(params["epochs"])},
        "domains": {"class1": len(domains.lesion), "class0": len(domains.free)},
        "generators": {"seconds": trained.seconds, "iterations": config.iterations,
                       "final_losses": dict(zip(trained.columns, trained.history[-1].tolist()))},
        "n_test": len(test), "transfer": transfer, "tests": tests, "per_class": per_class,
        "proximity": proximity, "locality": locality, "shape": shape,
    }


def markdown(results: dict[str, Any]) -> str:
    m, t, paper, c = results["machine"], results["transfer"], results["paper"], results["classifier"]
    p = results["params"]

    def ci(values: list[float]) -> str:
        return f"[{values[0]:.3f}, {values[1]:.3f}]"

    lines = [
        "# Counterfactual relevance for a classifier (paper 004's check, shape phantoms)",
        "",
        f"CPU ({m['processor']}), {m['torch_threads']} torch thread(s), torch {m['torch']}. Rule: {results['rule']}.",
        "",
        f"Classifier: {p['train']} training patches, {c['epochs']} epochs, {c['seconds']:.0f} s; held-out accuracy "
        f"{c['held_out_accuracy']:.3f} {ci(c['held_out_accuracy_ci95'])} (train {c['train_accuracy']:.3f}). "
        f"Generators: {results['generators']['iterations']} iterations, batch {p['batch']}, features "
        f"{p['generator_features']}, learning rate {p['learning_rate']}, {results['generators']['seconds']:.0f} s; "
        f"domains from the classifier's predictions: {results['domains']['class1']} class 1, "
        f"{results['domains']['class0']} class 0.",
        "",
        f"## Domain transfer: mean P(class 1), {results['n_test']} held-out patches (95 % bootstrap CI)",
        "",
        "| | x | G+(x) | G-(x) |",
        "|---|---|---|---|",
        f"| this run | {t['original']['mean']:.3f} {ci(t['original']['ci95'])} | {t['plus']['mean']:.3f} "
        f"{ci(t['plus']['ci95'])} | {t['minus']['mean']:.3f} {ci(t['minus']['ci95'])} |",
        f"| paper 004 (LIDC, n = {paper['n']}) | {paper['original'][0]:.3f} {ci(paper['original'][1:])} | "
        f"{paper['plus'][0]:.3f} {ci(paper['plus'][1:])} | {paper['minus'][0]:.3f} {ci(paper['minus'][1:])} |",
        "",
        "| paired test | mean difference | Wilcoxon p (two-sided) | t (df) | share moved the right way |",
        "|---|---|---|---|---|",
    ]
    for name, label, paper_t in (("plus", "G+(x) vs x", paper["t_plus"]), ("minus", "G-(x) vs x", paper["t_minus"])):
        s = results["tests"][name]
        lines.append(f"| {label} | {s['mean_difference']:+.3f} {ci(s['difference_ci95'])} | {s['wilcoxon_p']:.2g} | "
                     f"{s['t']:.1f} ({s['t_df']}); paper {'+' if name == 'plus' else '-'}{paper_t} (233) | "
                     f"{s['share_moved_right_way']:.3f} |")
    k0, k1 = results["per_class"]["class0_plus"], results["per_class"]["class1_minus"]
    lines += [
        "",
        f"Per class: on the {k0['n']} class-0 patches G+ moves P(1) from {k0['original']:.3f} to "
        f"{k0['generated']:.3f} ({k0['flipped']:.1%} of the {k0['n_correct']} classified 0 now classified 1); on the "
        f"{k1['n']} class-1 patches G- moves it from {k1['original']:.3f} to {k1['generated']:.3f} "
        f"({k1['flipped']:.1%} of the {k1['n_correct']} classified 1 now classified 0).",
        "",
        "## Proximity and locality",
        "",
        "| | mean abs(G(x) - x) | SSIM(x, G(x)) | share of abs change on the blob |",
        "|---|---|---|---|",
    ]
    for name, label in (("plus", "G+"), ("minus", "G-")):
        q, loc = results["proximity"][name], results["locality"][name]
        lines.append(f"| {label} | {q['mean_abs_change']:.4f} {ci(q['mean_abs_change_ci95'])} | {q['ssim']:.4f} "
                     f"{ci(q['ssim_ci95'])} | {loc['share_on_blob']:.3f} {ci(loc['share_on_blob_ci95'])} |")
    loc = results["locality"]
    sh = results["shape"]
    lines += [
        "",
        f"Relevance R = G+(x) - G-(x): {loc['relevance']['share_on_blob']:.3f} "
        f"{ci(loc['relevance']['share_on_blob_ci95'])} of sum abs(R) lies on the blob and its {RIM}-pixel rim, which "
        f"cover {loc['area_share_of_blob_region']:.3f} of the patch (enrichment {loc['enrichment']:.2f}x; 1x would be "
        "no locality).",
        "",
        "## Do the counterfactuals follow the rule? (blob aspect ratio from second moments)",
        "",
        f"Measured on x, the aspect ratio reproduces the rule's labels for {sh['measured_original_agrees_with_rule']:.1%}"
        f" of the patches. Class 0 (round): median aspect {sh['class0_original_median']:.2f} -> "
        f"{sh['class0_plus_median']:.2f} after G+ ({sh['class0_plus_share_elongated']:.1%} now elongated by the rule). "
        f"Class 1 (elongated): median {sh['class1_original_median']:.2f} -> {sh['class1_minus_median']:.2f} after G- "
        f"({sh['class1_minus_share_round']:.1%} now round by the rule).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=DEFAULTS["iterations"], help="generator training iterations")
    parser.add_argument("--train", type=int, default=DEFAULTS["train"], help="training patches")
    parser.add_argument("--test", type=int, default=DEFAULTS["test"], help="held-out patches")
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="classifier epochs")
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="generator batch size")
    parser.add_argument("--learning-rate", type=float, default=DEFAULTS["learning_rate"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = {**DEFAULTS, "iterations": args.iterations, "train": args.train, "test": args.test,
              "epochs": args.epochs, "batch": args.batch, "learning_rate": args.learning_rate, "seed": args.seed}
    start = time.perf_counter()
    results = run(params, log=lambda message: print(message, flush=True))
    results["total_seconds"] = time.perf_counter() - start
    json_path, md_path = write_results(results, args.out, "counterfactual_classifier", markdown)
    print(markdown(results))
    print(f"wrote {json_path} and {md_path} in {results['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
