"""Benchmark: the cost of one uncertainty sample vs. one plain ``segment`` of the same case.

Run from the repository root::

    OMP_NUM_THREADS=1 python Testing/Benchmarks/bench_uncertainty.py [--device cpu|cuda] [--samples 8]
        [--repeats 3] [--seed 2026] [--out Testing/Benchmarks/results]

Results go to ``results/uncertainty.{json,md}``.

Model: the bundled lesion model (``Resources/Models/lesions``: MONAI UNet, two channels, patch
48 x 32 x 48, its card without mirroring). For MC dropout the same architecture is built with
``dropout=0.1`` (dropout adds no parameters: the bundled weights load unchanged). Case: the
lesion phantom of the bundled sample head (``make_lesion_phantom``, seed ``--seed``), as the
demo uses it.

Timed (after one warm-up of each; interleaved in every repeat so that load on a shared machine
hits all alike; the median of ``--repeats``):

* ``segment``: one plain prediction (preprocessing, sliding windows, map back to the input
  grid). A card without mirroring runs one pass per window, as one flips sample does, so this
  is the fair reference for both sources.
* ``flips``: ``estimate_uncertainty(sources={"flips": {"axes": [0, 1, 2]}}, samples=--samples)``
  with the prediction given (as the pipeline passes it): every sample one flip combination.
* ``mc_dropout``: ``estimate_uncertainty(sources="mc_dropout", samples=--samples)``, prediction
  given, dropout network.

The ratio per sample is ``time(estimate) / samples / time(segment)``; it includes the one-off
preprocessing and the tables (spread over the samples) and every sample's accumulation into
the maps. Target (issue 17): at most 1.05x per sample.
"""

from __future__ import annotations

import argparse
import platform
import statistics
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

TARGET_RATIO = 1.05  # issue 17: one sample at most 1.05x one plain segment


def timed(function: Callable[[], Any]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def dropout_model(model, dropout: float = 0.1):
    """The lesion model's architecture with dropout layers, the bundled weights loaded."""
    from monai.networks.nets import UNet

    from SegXAILib.models import LoadedModel

    network = UNet(**model.card.architecture["kwargs"], dropout=dropout)
    network.load_state_dict(model.network.state_dict())
    network.eval().to(model.device)
    return LoadedModel(network, model.card, model.device)


def run(device: str, samples: int, repeats: int, seed: int) -> dict[str, Any]:
    from SegXAILib.models import load_model, segment
    from SegXAILib.phantoms import make_lesion_phantom
    from SegXAILib.sample_data import bundled_model_card, load_sample_head
    from SegXAILib.uncertainty import estimate_uncertainty

    model = load_model(bundled_model_card("lesions"), device=device)
    dropping = dropout_model(model)
    image = make_lesion_phantom(load_sample_head(), seed=seed).image
    prediction = segment(image, model)
    cases = {
        "segment": lambda: segment(image, model),
        "segment_dropout_model": lambda: segment(image, dropping),
        "flips": lambda: estimate_uncertainty(image, model, {"flips": {"axes": [0, 1, 2]}}, samples=samples,
                                              seed=0, prediction=prediction),
        "mc_dropout": lambda: estimate_uncertainty(image, dropping, "mc_dropout", samples=samples, seed=0,
                                                   prediction=prediction),
    }
    for function in cases.values():  # warm-up: imports, allocator, kernel selection
        function()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, function in cases.items():
            times[name].append(timed(function))
    median = {name: statistics.median(values) for name, values in times.items()}
    result = estimate_uncertainty(image, dropping, "mc_dropout", samples=samples, seed=0, prediction=prediction)
    assert np.all(np.isfinite(result.mutual_information.array))
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "device": device, "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version()},
        "case": {"shape": list(image.spatial_shape), "spacing_mm": [float(s) for s in image.spacing],
                 "seed": seed, "samples": samples, "instances": len(result.instances)},
        "repeats": repeats,
        "times_s": times,
        "median_s": median,
        "ratio_flips": median["flips"] / samples / median["segment"],
        "ratio_mc_dropout": median["mc_dropout"] / samples / median["segment_dropout_model"],
        "target_ratio": TARGET_RATIO,
    }


def markdown(results: dict[str, Any]) -> str:
    m, case, median = results["machine"], results["case"], results["median_s"]
    n = case["samples"]
    where = f"GPU {m['gpu']}" if m["gpu"] else f"CPU ({m['processor']}), {m['torch_threads']} torch thread(s)"
    worst = max(results["ratio_flips"], results["ratio_mc_dropout"])
    verdict = "meets" if worst <= results["target_ratio"] else "misses"
    lines = [
        "# Uncertainty: cost per sample vs. one plain segment",
        "",
        f"{where}, torch {m['torch']}; the bundled lesion model on the lesion phantom (seed {case['seed']}, "
        f"{' x '.join(map(str, case['shape']))} voxels), {n} samples, prediction given; median of "
        f"{results['repeats']} interleaved runs after a warm-up.",
        "",
        "| what | median (s) | per sample (s) | ratio per sample to segment |",
        "|---|---:|---:|---:|",
        f"| segment (one pass per window) | {median['segment']:.3f} | | 1.00x |",
        f"| segment, dropout network (eval) | {median['segment_dropout_model']:.3f} | | 1.00x |",
        f"| estimate_uncertainty, flips (axes 0, 1, 2) | {median['flips']:.3f} | {median['flips'] / n:.3f} "
        f"| {results['ratio_flips']:.2f}x |",
        f"| estimate_uncertainty, mc_dropout | {median['mc_dropout']:.3f} | {median['mc_dropout'] / n:.3f} "
        f"| {results['ratio_mc_dropout']:.2f}x |",
        "",
        f"Target (issue 17): one sample <= {results['target_ratio']}x one plain segment; this run {verdict} it "
        f"(worst {worst:.2f}x). The per-sample time includes the one-off preprocessing and tables spread over "
        "the samples, and each sample's accumulation into the maps.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--samples", type=int, default=8, help="samples per estimate")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median reported)")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the lesion phantom")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    results = run(args.device, args.samples, args.repeats, args.seed)
    write_results(results, args.out, "uncertainty", markdown)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
