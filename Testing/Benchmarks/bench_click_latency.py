"""Benchmark: click latency of an instance (lesion) map, the library call behind a viewer / Slicer click.

Run from the repository root::

    python Testing/Benchmarks/bench_click_latency.py [--device cpu|cuda] [--size 256] [--voxels 100]
        [--clicks N] [--samples-max N] [--threads 1] [--out Testing/Benchmarks/results]

Results go to ``results/click_latency.{json,md}`` (``click_latency_cuda`` with ``--device cuda``).

A click in the browser viewer or the Slicer panel picks the lesion under the point
(:func:`SegXAILib.instances.instance_at` on the case's instance labels) and computes its
instance map: :func:`SegXAILib.pipeline.add_instance_maps` (``explain_instances`` ->
``instance_saliency``: SmoothGrad of the lesion's logit sum, ``mean`` = eq. 2, or the per-voxel
``max`` = eq. 3 of paper 001) with the case's settings (``instances.n_samples`` 20,
``noise_level`` 0.1, automatic batch size). This script times exactly those two calls on a case
whose prediction is already made and held (``start_case``: the prediction, its instances), as a
click finds it. What a click costs on top today: the engine job of ``CaseSession.instance_map``
is a new process that loads the model and predicts the case again (``run_case``); that
prediction's time is reported too (``prediction_seconds``).

Model: a MONAI ``UNet(3, 2, 2, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1)``
(the bundled lesion model's architecture) with **random weights** (seed 0), 96^3 windows,
overlap 0.25, gaussian blend, plus a pointwise head that adds ``50 (c0 - 6)`` to the lesion
logit, so that the prediction is exactly the ~``--voxels``-voxel bright sphere planted at the
volume's centre (a random network predicts no controlled lesion; the head's cost is nil).
Input: ``bench_scale.build_volume`` (``size^3``, two channels) with the sphere set to 10 in
channel 0.

Each aggregation runs in a fresh subprocess: the case is made (untimed), then one cold click
(the process's first: kernel selection, allocator) and ``--clicks`` warm clicks are timed;
p50 / p95 are over the warm clicks (nearest rank). Peak memory: growth of max RSS (CUDA: of
``max_memory_allocated``) over its value before the first click. On the CPU the per-voxel max
costs a vector-Jacobian product per voxel and noise sample, so by default it runs
``--samples-max 2`` samples and its times are scaled linearly to the settings' 20 (marked
``scaled from 2``); on CUDA both run the settings' 20 samples.
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
from typing import Any, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_attribution import write_results  # noqa: E402
from bench_scale import _peak_mb, build_card, build_network, build_volume, sphere  # noqa: E402

DEFAULTS = {"size": 256, "voxels": 100, "seed": 0, "threads": 1, "device": "cpu"}
#: the settings' instance SmoothGrad samples (InstanceSettings.n_samples)
SETTINGS_SAMPLES = 20


class LesionHead(torch.nn.Module):
    """The UNet plus ``50 (c0 - 6)`` on the class-1 logit: the bright sphere is the prediction."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network(x)
        return torch.cat([logits[:, :1], logits[:, 1:2] + 50.0 * (x[:, :1] - 6.0)], dim=1)


def lesion_centre(size: int) -> tuple[int, int, int]:
    return (size // 2,) * 3


def make_case(spec: dict[str, Any], samples: int, aggregation: str):
    """``(case, model, click RAS)``: the case's prediction made and held, as a click finds it."""
    from SegXAILib.image import Image
    from SegXAILib.models.loaders import LoadedModel
    from SegXAILib.pipeline import CaseSettings, start_case

    device = torch.device(spec["device"])
    size = int(spec["size"])
    network = LesionHead(build_network(spec["seed"])).to(device).eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    x = build_volume((size,) * 3, spec["seed"])
    lesion = sphere((size,) * 3, lesion_centre(size), voxels=int(spec["voxels"]))
    x[0, 0][lesion] = 10.0
    image = Image(x[0].numpy(), np.eye(4), ("c0", "c1"))
    model = LoadedModel(network, build_card(0.25), device)
    settings = CaseSettings.from_dict({
        "model": "bench", "device": spec["device"],
        "instances": {"aggregations": [aggregation], "n_samples": samples},
    }, "bench")
    start = time.perf_counter()
    case = start_case(image, model, settings)
    prediction_seconds = time.perf_counter() - start
    return case, model, tuple(float(c) for c in lesion_centre(size)), prediction_seconds, int(lesion.sum())


def click(case, model, ras) -> int:
    """What a click runs: the instance under the point, then its instance map."""
    from SegXAILib.instances import instance_at
    from SegXAILib.pipeline import add_instance_maps

    identifier = instance_at(case.instance_labels.array[0], case.image, ras, radius_mm=5.0)
    add_instance_maps(case, model, [identifier])
    return identifier


def run_measurement(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    aggregation, samples, clicks = spec["aggregation"], int(spec["samples"]), int(spec["clicks"])
    case, model, ras, prediction_seconds, voxels = make_case(spec, samples, aggregation)
    if len(case.instances) != 1:
        raise RuntimeError(f"the prediction has {len(case.instances)} instances, expected the planted one")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = _peak_mb(device)
    times = []
    for _ in range(1 + clicks):
        start = time.perf_counter()
        identifier = click(case, model, ras)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    maps = case.instance_maps[identifier][aggregation]
    if not np.isfinite(maps.array).all() or not np.abs(maps.array).max() > 0:
        raise RuntimeError("the instance map is empty or not finite")
    return {"cold_seconds": times[0], "warm_seconds": times[1:], "peak_mb": round(max(_peak_mb(device) - base, 0.0), 1),
            "prediction_seconds": prediction_seconds, "instance_voxels": voxels,
            "instance_voxels_predicted": int(case.instances[0].voxels) if hasattr(case.instances[0], "voxels") else None,
            "threads": torch.get_num_threads()}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--result", str(result)]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"measurement {spec} failed:\n{completed.stderr[-4000:]}")
        return json.loads(result.read_text(encoding="utf-8"))


def percentile(values: list[float], q: float) -> Optional[float]:
    """Nearest-rank percentile (no interpolation: with few clicks it is one of them)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(np.ceil(q / 100 * len(ordered))) - 1))]


def benchmark(params: dict[str, Any], log=print) -> dict[str, Any]:
    rows = []
    for aggregation in ("mean", "max"):
        samples = params["samples_max"] if aggregation == "max" else SETTINGS_SAMPLES
        clicks = params["clicks_max"] if aggregation == "max" else params["clicks"]
        spec = {k: params[k] for k in ("size", "voxels", "seed", "threads", "device")}
        result = measure({**spec, "aggregation": aggregation, "samples": samples, "clicks": clicks})
        scale = SETTINGS_SAMPLES / samples
        warm = [t * scale for t in result["warm_seconds"]]
        row = {"aggregation": aggregation, "samples_run": samples, "samples_settings": SETTINGS_SAMPLES,
               "scaled_from": samples if samples != SETTINGS_SAMPLES else None, "clicks": clicks,
               "cold_seconds": result["cold_seconds"] * scale, "warm_seconds": warm,
               "p50_seconds": percentile(warm, 50), "p95_seconds": percentile(warm, 95),
               "peak_mb": result["peak_mb"], "prediction_seconds": result["prediction_seconds"],
               "instance_voxels": result["instance_voxels"], "measured": result}
        rows.append(row)
        log(f"{aggregation}: p50 {row['p50_seconds']:.2f} s, p95 {row['p95_seconds']:.2f} s, cold "
            f"{row['cold_seconds']:.2f} s{' (scaled from ' + str(samples) + ' samples)' if row['scaled_from'] else ''}, "
            f"{row['peak_mb']} MB; prediction {row['prediction_seconds']:.1f} s")
    return {
        "benchmark": "instance map click latency (instance_at + add_instance_maps on a held case)",
        "device": params["device"],
        "gpu": torch.cuda.get_device_name(0) if params["device"].startswith("cuda") else None,
        "params": params, "rows": rows,
        "goals_gpu_seconds": {"mean": 1.0, "max": 3.0},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "torch": torch.__version__, "threads": params["threads"]},
    }


def markdown(results: dict[str, Any]) -> str:
    p = results["params"]
    device = f"{results['gpu']} (CUDA)" if results.get("gpu") else f"CPU, {p['threads']} torch thread(s)"
    lines = [
        "# Click latency: one lesion's instance map",
        "",
        f"{device}, torch {results['machine']['torch']}; {p['size']}^3 two-channel case, the lesion model's UNet "
        f"architecture with **random weights** and a pointwise head that makes the planted ~{p['voxels']}-voxel "
        "sphere the prediction; 96^3 windows, overlap 0.25. A click = `instance_at` + `add_instance_maps` on the "
        "case with its prediction held (the library call of the viewer / Slicer click), the settings' instance "
        f"SmoothGrad ({SETTINGS_SAMPLES} samples, noise 0.1, automatic batch). p50 / p95: nearest rank over the "
        "warm clicks; cold = the process's first click. 'scaled from N': N samples run, time scaled linearly to "
        f"{SETTINGS_SAMPLES}. Goals on a GPU: mean < {results['goals_gpu_seconds']['mean']} s, max < "
        f"{results['goals_gpu_seconds']['max']} s. Load average (1 min) at the start / end "
        f"{(results.get('load_average_start') or ['?'])[0]} / {(results.get('load_average_end') or ['?'])[0]}; total "
        f"{results.get('total_seconds', '?')} s.",
        "",
        "| aggregation | lesion voxels | warm clicks | p50 s | p95 s | cold s | peak MB | samples run | prediction s (per engine job today) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        scaled = f" (scaled from {r['scaled_from']})" if r["scaled_from"] else ""
        lines.append(f"| {r['aggregation']} | {r['instance_voxels']} | {r['clicks']} | {r['p50_seconds']:.2f}{scaled} | "
                     f"{r['p95_seconds']:.2f}{scaled} | {r['cold_seconds']:.2f}{scaled} | {r['peak_mb']:.0f} | "
                     f"{r['samples_run']} | {r['prediction_seconds']:.1f} |")
    lines += ["", "The prediction column is not part of the click: the case holds its prediction. The Slicer / "
              "viewer engine job (`CaseSession.instance_map`) currently starts a process that predicts the case "
              "again before the instance map, which adds about that time (plus the process start and the model "
              "load) to every click.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", type=int, default=DEFAULTS["size"], help="cube edge of the case")
    parser.add_argument("--voxels", type=int, default=DEFAULTS["voxels"], help="lesion voxels")
    parser.add_argument("--clicks", type=int, default=None, help="warm clicks per aggregation (default: 3 on the "
                        "CPU, 10 on CUDA)")
    parser.add_argument("--clicks-max", type=int, default=None, help="warm clicks of the max aggregation (default: "
                        "1 on the CPU, 10 on CUDA)")
    parser.add_argument("--samples-max", type=int, default=None, help="noise samples the max aggregation runs "
                        f"(default: 2 on the CPU, scaled to {SETTINGS_SAMPLES}; {SETTINGS_SAMPLES} on CUDA)")
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(run_measurement(json.loads(args.worker))), encoding="utf-8")
        return 0
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    params = {**DEFAULTS, "device": args.device, "size": args.size, "voxels": args.voxels, "threads": args.threads,
              "clicks": args.clicks or (10 if cuda else 3), "clicks_max": args.clicks_max or (10 if cuda else 1),
              "samples_max": args.samples_max or (SETTINGS_SAMPLES if cuda else 2)}
    start, load = time.perf_counter(), list(os.getloadavg())
    results = benchmark(params, log=lambda m: print(m, flush=True))
    results["load_average_start"], results["load_average_end"] = load, list(os.getloadavg())
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    print(markdown(results))
    name = "click_latency" if not cuda else "click_latency_cuda"
    json_path, md_path = write_results(results, args.out, name, markdown)
    print(f"wrote {json_path} and {md_path} ({results['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
