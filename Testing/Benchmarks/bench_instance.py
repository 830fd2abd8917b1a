"""Benchmark: exact max-aggregated instance SmoothGrad (paper 001, eq. 3), batched vs. a loop.

Run from the repository root::

    python Testing/Benchmarks/bench_instance.py [--size 48] [--voxels 10 100 1000]
        [--batches 4 16] [--n-samples 2] [--loop-subset 100] [--device cpu|cuda]
        [--out Testing/Benchmarks/results]

Results go to ``results/instance.{json,md}`` (CPU) or ``results/instance_cuda.{json,md}``.

Model: a MONAI ``UNet(3, 2, 2, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1)``
(the bundled lesion model's architecture) in eval mode with random weights (seed 0), run as one
window covering the ``size^3`` volume (``bench_attribution.build_card``). Input: the smooth random
two-channel cube of ``bench_attribution.build_input`` (seed 0). Instances: digital spheres of
about 10 / 100 / 1000 voxels at the centre of the volume (class 1, an ``InstanceTarget``).

Compared (each timing and memory measurement in a fresh subprocess, on CPU):

* ``ours``: :func:`SegXAILib.instances.instance_smoothgrad` with ``aggregation="max"`` and
  ``batch_size`` = B: one forward per noise sample, then batched vector-Jacobian products of it,
  B one-voxel cotangents per ``torch.func.vmap`` call, with the network's 3-D kernels held
  channels-last during the call on the CPU (oneDNN's channels-last kernels for the batch).
* ``loop``: the per-voxel reference: for every noise sample (the same draws) and every voxel of
  the instance one backward through ``SegmentationForward`` with a ``VoxelTarget``, folded into
  a running max, averaged over the samples. For instances above ``--loop-subset`` voxels the
  loop runs only the first ``--loop-subset`` voxels (raster order) and its time is extrapolated
  linearly to the whole instance (marked in the table); its output is then compared with
  ``ours`` on a region made of the same subset voxels.

Time: the fastest of up to 3 runs in the subprocess (repeated only while under 2 s in all),
after a warm-up with the timed batch shape (on CUDA, synchronised). Peak memory: on the CPU the
growth of the subprocess's maximum resident set size over its value after the model and input
were built (``bench_attribution._max_rss_mb``); on CUDA ``torch.cuda.max_memory_allocated`` over
the allocation before the timed runs. The machine's load average at the start and the end goes
with the results (``machine``): on a shared machine the ratios of one run are what compare.
Threads: PyTorch's default (one per core) unless ``OMP_NUM_THREADS`` says otherwise; a loaded
machine makes multi-threaded timings erratic, ``OMP_NUM_THREADS=1`` keeps them comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
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

from bench_attribution import _max_rss_mb, build_card, build_input, build_network, write_results  # noqa: E402

DEFAULTS = {"size": 48, "voxels": [10, 100, 1000], "batches": [4, 16], "n_samples": 2, "noise_level": 0.1,
            "seed": 0, "loop_subset": 100, "device": "cpu"}


def sphere(size: int, voxels: int) -> torch.Tensor:
    """The digital sphere around the volume's centre whose voxel count is closest to ``voxels``."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    distance = ((grid - (size // 2) + 0.3) ** 2).sum(0).sqrt()  # off-centre: no exact ties
    order = torch.sort(distance.flatten()).values
    radius = float(order[voxels - 1])
    return distance <= radius


def _forward(network, size, target):
    from SegXAILib.attribution.forward import SegmentationForward

    return SegmentationForward(network, build_card(size), (size,) * 3, target, amp=False)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 1024**2
    return _max_rss_mb()


def ours(network, x, mask, spec) -> torch.Tensor:
    from SegXAILib.attribution.targets import InstanceTarget
    from SegXAILib.instances import instance_smoothgrad

    forward = _forward(network, x.shape[-1], InstanceTarget(1, mask, instance_id=1))
    return instance_smoothgrad(forward, x, n_samples=spec["n_samples"], noise_level=spec["noise_level"],
                               aggregation="max", batch_size=spec["batch"], seed=spec["seed"])


def loop(network, x, mask, spec) -> torch.Tensor:
    """One backward per (noise sample, voxel), running max; the reference of eq. 3."""
    from SegXAILib.attribution.gradient import noise_sigma
    from SegXAILib.attribution.targets import VoxelTarget
    from SegXAILib.instances.aggregation import _noisy

    size = x.shape[-1]
    sigma = noise_sigma(x, spec["noise_level"])
    voxels = torch.nonzero(mask).tolist()
    total = torch.zeros_like(x)
    for k in range(spec["n_samples"]):
        noisy = _noisy(x, k, sigma, spec["seed"])[None]
        running = None
        for index in voxels:
            gradient = _forward(network, size, VoxelTarget(1, index, (size,) * 3)).gradient(noisy)
            running = gradient if running is None else torch.maximum(running, gradient)
        total += running
    return total / spec["n_samples"]


def subset_mask(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` voxels of ``mask`` in raster order."""
    voxels = torch.nonzero(mask)[:count]
    subset = torch.zeros_like(mask)
    subset[tuple(voxels.T)] = True
    return subset


def run_measurement(spec: dict[str, Any], save: str | None = None) -> dict[str, Any]:
    torch.manual_seed(0)
    device = torch.device(spec.get("device", "cpu"))
    network = build_network(spec["seed"]).to(device)
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    x = build_input(spec["size"], spec["seed"]).to(device)
    mask = sphere(spec["size"], spec["voxels"])
    if spec.get("subset"):
        mask = subset_mask(mask, spec["subset"])
    function = ours if spec["impl"] == "ours" else loop
    # warm-up (imports, allocator, kernel selection for the timed batch shape): one sample
    function(network, x, subset_mask(mask, max(2, spec["batch"])), {**spec, "n_samples": 1})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = _peak_mb(device)
    # the fastest of up to 3 runs (until 2 s are spent): one-off stalls of the machine do not count
    times, value = [], None
    while len(times) < 3 and (not times or sum(times) < 2.0):
        start = time.perf_counter()
        value = function(network, x, mask, spec)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = min(times)
    peak = _peak_mb(device) - base
    if save:
        np.save(save, value.detach().cpu().numpy())
    return {**spec, "instance_voxels": int(mask.sum()), "seconds": seconds, "runs": times, "peak_mb": round(max(peak, 0.0), 1),
            "threads": torch.get_num_threads()}


def measure(spec: dict[str, Any], save: Path | None = None) -> dict[str, Any]:
    """:func:`run_measurement` in a fresh Python process."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--result", str(result)]
        if save is not None:
            command += ["--save", str(save)]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"measurement {spec} failed:\n{completed.stderr[-4000:]}")
        return json.loads(result.read_text(encoding="utf-8"))


def _load() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (a shared machine skews every timing), if known."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):  # not on Windows
        return None


def benchmark(params: dict[str, Any], log=print) -> dict[str, Any]:
    rows = []
    load_start = _load()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for voxels in params["voxels"]:
            base = {k: params[k] for k in ("size", "n_samples", "noise_level", "seed", "device")} | {"voxels": voxels}
            actual = int(sphere(params["size"], voxels).sum())
            subset = params["loop_subset"] if actual > params["loop_subset"] else 0
            reference = measure({**base, "impl": "loop", "batch": 1, "subset": subset}, folder / "loop.npy")
            reference_map = np.load(folder / "loop.npy")
            loop_seconds = reference["seconds"] * (actual / subset if subset else 1.0)
            log(f"{actual} voxels: loop {reference['seconds']:.1f} s over {reference['instance_voxels']} voxel(s)"
                f" -> {loop_seconds:.1f} s")
            check = None
            if subset:  # equality on the subset region (the loop did not run the whole instance)
                measure({**base, "impl": "ours", "batch": params["batches"][-1], "subset": subset}, folder / "check.npy")
                check = float(np.abs(np.load(folder / "check.npy") - reference_map).max())
            for batch in params["batches"]:
                result = measure({**base, "impl": "ours", "batch": batch, "subset": 0}, folder / "ours.npy")
                difference = check if subset else float(np.abs(np.load(folder / "ours.npy") - reference_map).max())
                row = {
                    "instance_voxels": actual, "batch_size": batch, "n_samples": params["n_samples"],
                    "ours_seconds": round(result["seconds"], 3), "ours_peak_mb": result["peak_mb"],
                    "loop_seconds": round(loop_seconds, 3), "loop_peak_mb": reference["peak_mb"],
                    "loop_extrapolated_from_voxels": reference["instance_voxels"] if subset else None,
                    "speedup": round(loop_seconds / result["seconds"], 2),
                    "max_abs_diff": difference,
                    "max_abs_reference": float(np.abs(reference_map).max()),
                    "diff_on": f"first {subset} voxels" if subset else "whole instance",
                }
                rows.append(row)
                log(f"  batch {batch}: ours {result['seconds']:.1f} s ({result['peak_mb']} MB), speedup "
                    f"{row['speedup']}x, max |diff| {difference:.2e}")
    return {
        "benchmark": "instance_smoothgrad max aggregation vs per-voxel loop",
        "device": params["device"],
        "gpu": torch.cuda.get_device_name(0) if params["device"].startswith("cuda") else None,
        "params": params,
        "rows": rows,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "load_average_start": load_start, "load_average_end": _load()},
    }


def _load_note(machine: dict[str, Any]) -> str:
    start, end = machine.get("load_average_start"), machine.get("load_average_end")
    if not start or not end:
        return ""
    return (f" Load average (1 min) {start[0]} at the start, {end[0]} at the end, on {machine.get('cpus')} CPUs: "
            "the machine's other work slows every timing; the ratios of one run are what compare.")


def markdown(results: dict[str, Any]) -> str:
    p = results["params"]
    lines = [
        "# Instance saliency, max aggregation: batched vs. per-voxel loop",
        "",
        (f"{results['gpu']} (CUDA)" if results.get("gpu") else f"CPU, {results['machine']['threads']} threads")
        + f", torch {results['machine']['torch']}; UNet (lesion model "
        f"architecture, random weights) on a {p['size']}^3 two-channel volume, one window; "
        f"n_samples = {p['n_samples']}, noise_level = {p['noise_level']}, seed = {p['seed']}. "
        + ("Peak = CUDA max allocated during the timed runs, in a fresh process." if results.get("gpu") else
         "Peak = growth of max RSS in a fresh process.")
        + _load_note(results["machine"]),
        "",
        "| instance voxels | batch | ours (s) | loop (s) | speedup | ours peak (MB) | loop peak (MB) | max abs diff | compared on |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["rows"]:
        loop_time = f"{r['loop_seconds']:.1f}"
        if r["loop_extrapolated_from_voxels"]:
            loop_time += f" (extrapolated from {r['loop_extrapolated_from_voxels']} voxels)"
        lines.append(
            f"| {r['instance_voxels']} | {r['batch_size']} | {r['ours_seconds']:.1f} | {loop_time} | {r['speedup']:.2f}x | "
            f"{r['ours_peak_mb']} | {r['loop_peak_mb']} | {r['max_abs_diff']:.1e} (of {r['max_abs_reference']:.1e}) | "
            f"{r['diff_on']} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=DEFAULTS["size"], help="cube edge (a multiple of 8)")
    parser.add_argument("--voxels", type=int, nargs="+", default=DEFAULTS["voxels"], help="instance sizes")
    parser.add_argument("--batches", type=int, nargs="+", default=DEFAULTS["batches"], help="our batch sizes")
    parser.add_argument("--n-samples", type=int, default=DEFAULTS["n_samples"])
    parser.add_argument("--loop-subset", type=int, default=DEFAULTS["loop_subset"],
                        help="larger instances: the loop runs this many voxels, time extrapolated")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(run_measurement(json.loads(args.worker), args.save)), encoding="utf-8")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.size % 8:
        parser.error("--size must be a multiple of 8")
    params = {**DEFAULTS, "size": args.size, "voxels": args.voxels, "batches": args.batches,
              "n_samples": args.n_samples, "loop_subset": args.loop_subset, "device": args.device}
    start = time.perf_counter()
    results = benchmark(params, log=lambda m: print(m, flush=True))
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    name = "instance" if args.device == "cpu" else "instance_cuda"
    json_path, md_path = write_results(results, args.out, name, markdown)
    print(markdown(results))
    print(f"wrote {json_path} and {md_path} ({results['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
