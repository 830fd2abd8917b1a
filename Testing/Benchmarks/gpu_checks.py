"""CUDA checks: the same results on the GPU as on the CPU, and the demo's timings on the GPU.

Run from the repository root on a machine with CUDA::

    python Testing/Benchmarks/gpu_checks.py [--out Testing/Benchmarks/results] [--no-demo]

* **Segmentation**: the demo case (bundled T1 with inserted lesions) segmented by the bundled
  lesion model on CUDA (mixed precision, the runtime's default there) and on the CPU: Dice
  between the two label maps, max |difference| of the lesion probability.
* **Attribution**: each listed method on a 48x48x32 crop of that case, on CUDA without mixed
  precision and on the CPU: max |difference| relative to the CPU map's max |value|, and the
  seconds on each device.
* **Demo**: :func:`SegXAILib.demo.run_demo` on CUDA (without the Slicer scene when slicer-core
  is not installed), total seconds and its per-step timings.

Writes ``gpu_checks.json`` and ``gpu_checks.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
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

METHODS = (
    ("vanilla_gradient", {}),
    ("smoothgrad", {"n_samples": 4, "seed": 0}),
    ("gradcam_plusplus", {}),
    ("guided_gradcam", {"batch_size": 16}),
    ("lrp", {}),
    ("pattern_attribution", {}),
)


def _timed(function, device: torch.device):
    start = time.perf_counter()
    value = function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - start


def segmentation_check(cuda: torch.device) -> dict[str, Any]:
    from SegXAILib.demo import demo_case
    from SegXAILib.metrics import dice_score
    from SegXAILib.models import load_model, segment
    from SegXAILib.pipeline import resolve_model_card

    image, _ = demo_case()
    card = resolve_model_card("lesions")
    results = {}
    for name in ("cpu", str(cuda)):
        model = load_model(card, device=name)
        segment(image, model)  # warm-up
        segmentation, seconds = _timed(lambda: segment(image, model), torch.device(name))
        results[name] = (segmentation, seconds)
    (cpu, cpu_s), (gpu, gpu_s) = results["cpu"], results[str(cuda)]
    return {
        "dice_cpu_vs_cuda": dice_score(cpu.mask(1), gpu.mask(1)),
        "max_abs_probability_diff": float(np.abs(cpu.probabilities.array[1] - gpu.probabilities.array[1]).max()),
        "cpu_seconds": cpu_s, "cuda_seconds": gpu_s, "cuda_amp": True,
    }


def attribution_checks(cuda: torch.device) -> list[dict[str, Any]]:
    from SegXAILib.attribution import explain
    from SegXAILib.demo import demo_case
    from SegXAILib.models import load_model
    from SegXAILib.pipeline import resolve_model_card

    image, _ = demo_case(crop_half=(24, 24, 16))
    card = resolve_model_card("lesions")
    models = {name: load_model(card, device=name) for name in ("cpu", str(cuda))}
    rows = []
    for method, params in METHODS:
        maps, seconds = {}, {}
        for name, model in models.items():
            explain(image, model, method, params=dict(params), amp=False)  # warm-up
            result, seconds[name] = _timed(lambda: explain(image, model, method, params=dict(params), amp=False),
                                           torch.device(name))
            maps[name] = result.maps.array
        scale = float(np.abs(maps["cpu"]).max())
        difference = float(np.abs(maps["cpu"] - maps[str(cuda)]).max())
        rows.append({"method": method, "params": params, "cpu_seconds": seconds["cpu"],
                     "cuda_seconds": seconds[str(cuda)], "speedup": seconds["cpu"] / seconds[str(cuda)],
                     "max_abs_diff": difference, "relative_diff": difference / scale if scale > 0 else None})
        print(rows[-1], flush=True)
    return rows


def demo_check(cuda: torch.device) -> dict[str, Any]:
    from SegXAILib.demo import DemoSettings, run_demo

    scene = importlib.util.find_spec("slicer") is not None
    with tempfile.TemporaryDirectory() as folder:
        result, seconds = _timed(lambda: run_demo(folder, device=str(cuda), settings=DemoSettings(scene=scene)), cuda)
        return {"seconds": seconds, "dice": result.dice, "scene": scene, "timings": result.timings,
                "qa_band": None if not result.outputs.get("qa") else
                __import__("json").loads(Path(result.outputs["qa"]).read_text(encoding="utf-8"))["band"]}


def markdown(results: dict[str, Any]) -> str:
    s = results["segmentation"]
    lines = [
        "# CUDA checks",
        "",
        f"{results['gpu']}, torch {results['torch']}; CPU side on the same machine ({results['cpu_threads']} threads).",
        "",
        f"Segmentation of the demo case (CUDA with mixed precision vs. CPU): Dice {s['dice_cpu_vs_cuda']:.4f}, "
        f"max |probability difference| {s['max_abs_probability_diff']:.2e}; {s['cpu_seconds']:.2f} s CPU, "
        f"{s['cuda_seconds']:.2f} s CUDA.",
        "",
        "| method | CPU s | CUDA s | speed-up | max abs diff | relative to the CPU max |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["attribution"]:
        relative = f"{r['relative_diff']:.1e}" if r["relative_diff"] is not None else "n/a"
        lines.append(f"| {r['method']} | {r['cpu_seconds']:.2f} | {r['cuda_seconds']:.2f} | {r['speedup']:.1f}x | "
                     f"{r['max_abs_diff']:.2e} | {relative} |")
    demo = results.get("demo")
    if demo:
        lines += ["", f"Demo on CUDA: {demo['seconds']:.1f} s (Dice {demo['dice']:.3f}, QA band {demo['qa_band']}, "
                  f"scene {'written' if demo['scene'] else 'skipped: slicer-core not installed'}).", "",
                  "| step | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in demo["timings"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--no-demo", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("CUDA is not available")
    cuda = torch.device("cuda:0")
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                               "cpu_threads": torch.get_num_threads()}
    results["segmentation"] = segmentation_check(cuda)
    print(results["segmentation"], flush=True)
    results["attribution"] = attribution_checks(cuda)
    if not args.no_demo:
        results["demo"] = demo_check(cuda)
        print({k: v for k, v in results["demo"].items() if k != "timings"}, flush=True)
    json_path, md_path = write_results(results, args.out, "gpu_checks", markdown)
    print(markdown(results))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
