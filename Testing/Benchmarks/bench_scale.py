"""Benchmark: attribution cost against volume size and target size, SegXAI vs. Captum over MONAI's sliding window.

Run from the repository root::

    python Testing/Benchmarks/bench_scale.py [--device cpu|cuda] [--threads 1] [--captum-cap-gb 16]
        [--quick] [--out Testing/Benchmarks/results]

Results go to ``results/scale.{json,md}`` (``scale_cuda`` with ``--device cuda``).

Model: a MONAI ``UNet(3, 2, 2, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1)``
(the bundled lesion model's architecture) in eval mode with **random weights** (seed 0), run
through 96^3 sliding windows (MONAI placement, gaussian blend, as the lesion card) at overlap
0.25 or 0.5. Input: a smooth random two-channel volume with a bright blob (seed 0).

Targets (class 1, on the volume's grid):

* ``lesion``: a digital sphere of ~100 voxels centred 20 voxels from the volume's corner, inside
  one window at every size (the cheap case for a windowed engine);
* ``lesion_overlap``: the same sphere centred in the overlap of the first 2 x 2 x 2 windows
  (the dearest small target: 8 windows);
* ``organ``: a sphere of radius 21 voxels (~39,000 voxels) at the volume's centre;
* ``class``: every voxel the model predicts as class 1 (the prediction is made before the
  timed call, as a case holds it).

SegXAI: :func:`SegXAILib.attribution.explain` (the library call every front end makes) with a
``region`` target (the lesion and organ masks: the scalar of an instance target, the sum of the
class logit over the mask) or ``class`` with the case's prediction; batch sizes automatic.
Captum: written as a Captum user would, a wrapper module whose forward is
``monai.inferers.sliding_window_inference`` (same windows, blend and padding) followed by the
sum of the class-1 logits over the target mask, under ``Saliency(abs=False)``,
``NoiseTunnel(Saliency)`` (smoothgrad, ``nt_samples_batch_size=1``) and
``IntegratedGradients(method="riemann_right", internal_batch_size=1)`` (batch 1: its smallest
memory; the graph of the whole volume's windows is held per sample). Grad-CAM++ has no Captum
implementation; MONAI's ``monai.visualize.GradCAMpp`` applies only where the volume is one
window (it hooks the layer during one forward and backpropagates ``logits[:, c].sum()``): it is
compared on a 96^3 volume through a wrapper whose output is ``[0, T]``.

Every measurement runs in a fresh subprocess (``--threads`` torch threads, both sides): build
the network and input, make the prediction when the target needs it, warm up on one 96^3 window,
then time the call (the fastest of up to 3 runs while they take under 3 s in all). Peak memory:
growth of the subprocess's max RSS over its value before the timed call (on CUDA:
``max_memory_allocated`` growth). Captum runs whose estimated peak (its per-window graph memory
measured at 128^3 times the windows) exceeds the cap are not run: reported as "did not fit
(cap)" with the estimate; the others run under ``RLIMIT_AS`` = the cap. Where the default run
measures Captum SmoothGrad / IG with fewer samples or steps than ours (to fit the time budget)
the time is scaled linearly to the full count and marked ``scaled from N``: NoiseTunnel and
IntegratedGradients at batch 1 run one Saliency pass per sample / step. Equality: the maximal
absolute difference of the two maps relative to the reference's largest magnitude, where both
ran the same function (vanilla gradient; IG at the reduced step count).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
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

from bench_attribution import CAM_LAYER, _max_rss_mb, build_network, write_results  # noqa: E402

PATCH = 96
DEFAULTS = {"n_samples": 8, "n_steps": 16, "noise_level": 0.1, "seed": 0, "lesion_voxels": 100, "organ_radius": 21,
            "lesion_offset": 20, "captum_cap_gb": 16.0, "threads": 1, "device": "cpu"}
METHODS = ("vanilla_gradient", "smoothgrad", "integrated_gradients", "gradcam_plusplus")


# ---- setup --------------------------------------------------------------------------------------

def build_card(overlap: float):
    from SegXAILib.models.card import model_card_from_dict

    return model_card_from_dict({
        "name": "bench-unet-96",
        "architecture": {"format": "monai", "name": "UNet", "weights": "none.pt"},
        "input_channels": ["c0", "c1"],
        "classes": [{"name": "background"}, {"name": "thing"}],
        "preprocessing": {"orientation": None, "spacing": None, "intensity": []},
        "inference": {"patch_size": [PATCH] * 3, "overlap": overlap, "blend": "gaussian"},
    })


def build_volume(shape, seed: int = 0) -> torch.Tensor:
    """``(1, 2, D, H, W)``: smoothed noise (a separable 5^3 box) plus a bright Gaussian blob,
    built without volume-sized coordinate grids (512 x 512 x 256 fits in a few GB)."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 2, *shape), generator=generator)
    for axis in range(3):
        kernel, padding = [1, 1, 1], [0, 0, 0]
        kernel[axis], padding[axis] = 5, 2
        x = F.avg_pool3d(x, tuple(kernel), stride=1, padding=tuple(padding), count_include_pad=False)
    x *= 3.0
    sigma = min(shape) / 8
    factors = [torch.exp(-((torch.arange(s, dtype=torch.float32) - s * 0.45) ** 2) / (2 * sigma**2)) for s in shape]
    blob = factors[0].view(-1, 1, 1) * factors[1].view(1, -1, 1) * factors[2].view(1, 1, -1)
    x[0, 0] += 2.0 * blob
    x[0, 1] -= 1.0 * blob
    return x.contiguous()


def window_starts(size: int, overlap: float) -> list[int]:
    """MONAI's window starts along one axis of ``size`` voxels (96-voxel windows)."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    padded = max(size, PATCH)
    interval = _get_scan_interval((padded,) * 3, (PATCH,) * 3, 3, [overlap] * 3)
    return sorted({w[0].start for w in dense_patch_slices((padded,) * 3, (PATCH,) * 3, interval, return_slice=True)})


def sphere(shape, centre, voxels: Optional[int] = None, radius: Optional[float] = None) -> torch.Tensor:
    """A digital sphere around ``centre`` (offset 0.3 voxel: no ties) of ``voxels`` voxels (the
    closest count) or of ``radius``; computed in a box around the centre."""
    reach = int(math.ceil(radius if radius is not None else (3 * voxels / (4 * math.pi)) ** (1 / 3) * 2)) + 2
    lo = [max(0, int(c) - reach) for c in centre]
    hi = [min(s, int(c) + reach + 1) for c, s in zip(centre, shape)]
    axes = [torch.arange(a, b, dtype=torch.float32) - c + 0.3 for a, b, c in zip(lo, hi, centre)]
    distance = (axes[0].view(-1, 1, 1) ** 2 + axes[1].view(1, -1, 1) ** 2 + axes[2].view(1, 1, -1) ** 2).sqrt()
    if radius is None:
        radius = float(torch.sort(distance.flatten()).values[voxels - 1])
    mask = torch.zeros(tuple(shape), dtype=torch.bool)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = distance <= radius
    return mask


def target_mask(kind: str, shape, overlap: float, p: dict) -> torch.Tensor:
    if kind == "lesion":
        return sphere(shape, (p["lesion_offset"],) * 3, voxels=p["lesion_voxels"])
    if kind == "lesion_overlap":
        # the middle of the overlap of the first two windows on every axis: 2^3 windows
        centre = [(window_starts(s, overlap)[1] + PATCH) // 2 for s in shape]
        return sphere(shape, centre, voxels=p["lesion_voxels"])
    if kind == "organ":
        return sphere(shape, [s // 2 for s in shape], radius=p["organ_radius"])
    raise ValueError(kind)


def make_model(network, overlap: float, device: torch.device):
    from SegXAILib.models.loaders import LoadedModel

    return LoadedModel(network, build_card(overlap), device)


def as_image(x: torch.Tensor):
    from SegXAILib.image import Image

    return Image(x[0].cpu().numpy(), np.eye(4), ("c0", "c1"))


# ---- implementations ----------------------------------------------------------------------------

class SlidingWindowScalar(torch.nn.Module):
    """What a Captum user wraps: ``sliding_window_inference`` then the target's scalar ``(B,)``."""

    def __init__(self, network, mask: torch.Tensor, overlap: float) -> None:
        super().__init__()
        self.network, self.mask, self.overlap = network, mask, overlap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        logits = sliding_window_inference(x, roi_size=(PATCH,) * 3, sw_batch_size=1, predictor=self.network,
                                          overlap=self.overlap, mode="gaussian", padding_mode="replicate")
        return logits[:, 1][:, self.mask.to(x.device)].sum(dim=1)


def monai_prediction_mask(network, x: torch.Tensor, overlap: float) -> torch.Tensor:
    """Class 1 of the argmax of MONAI's sliding-window prediction (the Captum side's class mask)."""
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        logits = sliding_window_inference(x, roi_size=(PATCH,) * 3, sw_batch_size=1, predictor=network,
                                          overlap=overlap, mode="gaussian", padding_mode="replicate")
    return (logits[0].argmax(0) == 1).cpu()


def run_ours(network, x, target: str, mask, method: str, p: dict, prediction, overlap: float) -> torch.Tensor:
    from SegXAILib.attribution import TargetSpec, explain

    model = make_model(network, overlap, x.device)
    image = as_image(x)
    if target == "class":
        spec: Any = TargetSpec("class", class_name="thing")
    else:
        spec = TargetSpec("region", mask=image.with_array(mask.numpy().astype(np.uint8)[None], ("mask",)))
    params = {
        "vanilla_gradient": {},
        "smoothgrad": {"n_samples": p["n_samples"], "noise_level": p["noise_level"], "seed": p["seed"]},
        "integrated_gradients": {"n_steps": p["n_steps"], "baselines": "zero"},
        "gradcam_plusplus": {"layer": CAM_LAYER},
    }[method]
    result = explain(image, model, method, spec, params=params, amp=False, prediction=prediction)
    return torch.from_numpy(result.maps.array)[None]


def run_captum(network, x, target: str, mask, method: str, p: dict, prediction, overlap: float) -> torch.Tensor:
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    from SegXAILib.attribution.gradient import noise_sigma

    wrapper = SlidingWindowScalar(network, mask, overlap)
    if method == "vanilla_gradient":
        return Saliency(wrapper).attribute(x, abs=False)
    if method == "smoothgrad":
        return NoiseTunnel(Saliency(wrapper)).attribute(
            x, nt_type="smoothgrad", nt_samples=p["n_samples"], nt_samples_batch_size=1,
            stdevs=noise_sigma(x, p["noise_level"]), abs=False)
    if method == "integrated_gradients":
        return IntegratedGradients(wrapper).attribute(x, baselines=torch.zeros_like(x), n_steps=p["n_steps"],
                                                      method="riemann_right", internal_batch_size=1)
    raise ValueError(f"captum: no {method}")


class _ScalarHead(torch.nn.Module):
    """``[0, T]`` per sample: MONAI's CAM backpropagates ``logits[:, 1]`` (one window)."""

    def __init__(self, network, mask: torch.Tensor) -> None:
        super().__init__()
        self.network, self.mask = network, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = self.network(x)[:, 1][:, self.mask.to(x.device)].sum(dim=1)
        return torch.stack([torch.zeros_like(value), value], dim=1)


def run_monai_cam(network, x, target: str, mask, method: str, p: dict, prediction, overlap: float) -> torch.Tensor:
    from monai.visualize import GradCAMpp

    if tuple(x.shape[2:]) != (PATCH,) * 3:
        raise ValueError("monai GradCAMpp: one window only")
    cam = GradCAMpp(_ScalarHead(network, mask), target_layers=f"network.{CAM_LAYER}", postprocessing=lambda m: m)
    with torch.enable_grad():
        # the weights are frozen (as for every implementation here): the input carries the graph
        value = cam(x.detach().requires_grad_(True), class_idx=1)
    return value.detach().expand(-1, x.shape[1], -1, -1, -1)


IMPLEMENTATIONS = {"ours": run_ours, "captum": run_captum, "monai_cam": run_monai_cam}


# ---- one measurement (in a fresh process) -------------------------------------------------------

def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 1024**2
    return _max_rss_mb()


def run_measurement(spec: dict[str, Any], save: Optional[str] = None) -> dict[str, Any]:
    p = {**DEFAULTS, **spec.get("params", {})}
    torch.set_num_threads(int(p["threads"]))
    device = torch.device(p["device"])
    shape, overlap, target, method = tuple(spec["shape"]), float(spec["overlap"]), spec["target"], spec["method"]
    function = IMPLEMENTATIONS[spec["impl"]]
    network = build_network(p["seed"]).to(device)
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    x = build_volume(shape, p["seed"]).to(device)
    prediction = None
    if target == "class":
        if spec["impl"] == "ours":  # the case's prediction, as the pipeline holds it
            from SegXAILib.models import segment

            prediction = segment(as_image(x), make_model(network, overlap, device), amp=False)
            mask = torch.from_numpy(prediction.mask(1))
        else:
            mask = monai_prediction_mask(network, x, overlap)
    else:
        mask = target_mask(target, shape, overlap, p)
    from SegXAILib.models.windows import WindowedForward

    windowed = WindowedForward(network, build_card(overlap), shape)
    windows_run = len(windowed.windows_for(mask)) if spec["impl"] == "ours" else len(windowed.windows)
    # warm-up on one window (imports, allocator, kernels): the lesion target, fewest samples
    warm_x = build_volume((PATCH,) * 3, p["seed"]).to(device)
    warm_p = {**p, "n_samples": 1, "n_steps": 2}  # Captum IG with internal batching needs 2 steps
    function(network, warm_x, "lesion", target_mask("lesion", (PATCH,) * 3, overlap, p), method, warm_p, None, overlap)
    del warm_x
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = _peak_mb(device)
    if spec.get("cap_gb") and device.type == "cpu":
        cap = int(float(spec["cap_gb"]) * 1024**3)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    times, value, status = [], None, "ok"
    try:
        while len(times) < 3 and (not times or sum(times) < 3.0):
            start = time.perf_counter()
            value = function(network, x, target, mask, method, p, prediction, overlap)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    except (MemoryError, RuntimeError) as error:
        if "memory" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        status, value = "did not fit (cap)", None
    peak = _peak_mb(device) - base
    if save and value is not None:
        np.save(save, value.detach().float().cpu().numpy())
    return {"status": status, "seconds": min(times) if times and status == "ok" else None, "runs": times,
            "peak_mb": round(max(peak, 0.0), 1), "target_voxels": int(mask.sum()), "windows_total": len(windowed.windows),
            "windows_run": windows_run, "threads": torch.get_num_threads()}


def measure(spec: dict[str, Any], save: Optional[Path] = None) -> dict[str, Any]:
    """:func:`run_measurement` in a fresh Python process."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--result", str(result)]
        if save is not None:
            command += ["--save", str(save)]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            if spec.get("cap_gb") and ("memory" in completed.stderr.lower() or completed.returncode < 0):
                return {"status": "did not fit (cap)", "seconds": None, "runs": [], "peak_mb": None}
            raise RuntimeError(f"measurement {spec} failed:\n{completed.stderr[-4000:]}")
        return json.loads(result.read_text(encoding="utf-8"))


# ---- the run matrix -----------------------------------------------------------------------------

def plan(quick: bool) -> dict[str, Any]:
    """The default run (about 20 minutes on a quiet 2-core machine, 35 with other jobs on it) or ``--quick``
    (a smoke test of every code path on small volumes)."""
    if quick:
        return {"matrix_shape": [96, 96, 112], "goal_shape": [112, 112, 112], "sweep": [[96, 96, 112], [112, 112, 128]],
                "captum_samples": 1, "captum_steps": 2, "goal_captum_samples": 1, "overlaps": [0.25, 0.5],
                "n_samples": 2, "n_steps": 2, "cam_shape": [96, 96, 96]}
    return {"matrix_shape": [128, 128, 128], "goal_shape": [256, 256, 256],
            "sweep": [[128, 128, 128], [256, 256, 256], [512, 512, 256]],
            "captum_samples": 2, "captum_steps": 2, "goal_captum_samples": 1, "overlaps": [0.25, 0.5],
            "n_samples": 8, "n_steps": 16, "cam_shape": [96, 96, 96]}


def benchmark(params: dict[str, Any], quick: bool = False, full_matrix: bool = False, log=print) -> dict[str, Any]:
    layout = plan(quick)
    p = {**params, "n_samples": layout["n_samples"], "n_steps": layout["n_steps"]}
    rows: list[dict[str, Any]] = []
    cap = float(p["captum_cap_gb"])
    per_window: dict[str, float] = {}  # Captum: MB of graph and seconds per window pass (from 128^3)

    def run(section, impl, shape, overlap, target, method, reduced: Optional[dict] = None, save=None, capped=False):
        run_params = {**p, **(reduced or {})}
        spec = {"impl": impl, "shape": list(shape), "overlap": overlap, "target": target, "method": method,
                "params": run_params, "cap_gb": cap if capped else None}
        result = measure(spec, save)
        row = {"section": section, "impl": impl, "shape": list(shape), "overlap": overlap, "target": target,
               "method": method, **result}
        full = {"smoothgrad": p["n_samples"], "integrated_gradients": p["n_steps"]}.get(method)
        ran = {"smoothgrad": run_params["n_samples"], "integrated_gradients": run_params["n_steps"]}.get(method)
        row["scaled_from"] = ran if full and ran != full else None
        row["seconds_full"] = (result["seconds"] * full / ran if row["scaled_from"] else result["seconds"]) \
            if result.get("seconds") is not None else None
        rows.append(row)
        log(f"{section}: {impl} {method} {target} {tuple(shape)} ov {overlap}: "
            f"{row['seconds_full'] if row['seconds_full'] is None else round(row['seconds_full'], 2)} s"
            f"{' (scaled from ' + str(ran) + ')' if row['scaled_from'] else ''}, {result.get('peak_mb')} MB, "
            f"{result.get('status')}")
        return row

    def captum(section, shape, overlap, target, method, save=None):
        """A Captum run, or (estimated over the cap) a row saying it did not fit."""
        windows = len(dense_windows(shape, overlap))
        reduced = {"n_samples": layout["captum_samples"] if section == "matrix" else layout["goal_captum_samples"],
                   "n_steps": layout["captum_steps"]}
        if "mb" in per_window:
            estimate_mb = per_window["mb"] * windows
            if estimate_mb > 0.8 * cap * 1024:
                full = {"smoothgrad": p["n_samples"], "integrated_gradients": p["n_steps"]}.get(method, 1)
                row = {"section": section, "impl": "captum", "shape": list(shape), "overlap": overlap, "target": target,
                       "method": method, "status": "did not fit (cap)", "seconds": None, "seconds_full": None,
                       "peak_mb": None, "estimated_peak_mb": round(estimate_mb), "windows_total": windows,
                       "estimated_seconds": round(per_window["seconds"] * windows * full, 1), "scaled_from": None}
                rows.append(row)
                log(f"{section}: captum {method} {target} {tuple(shape)} ov {overlap}: not run, estimated "
                    f"{estimate_mb / 1024:.1f} GB > cap")
                return row
        return run(section, "captum", shape, overlap, target, method, reduced, save, capped=True)

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        comparisons: list[dict[str, Any]] = []

        def compare(a: Path, b: Path, what: dict) -> None:
            if a.exists() and b.exists():
                ours, reference = np.load(a), np.load(b)
                scale = float(np.abs(reference).max())
                diff = float(np.abs(ours - reference).max())
                comparisons.append({**what, "max_abs_diff": diff, "max_abs_reference": scale,
                                    "relative": diff / scale if scale else None})
                log(f"  equality {what}: max |diff| {diff:.2e} of {scale:.2e}")
            for path in (a, b):
                path.unlink(missing_ok=True)

        # 1. the full method x target matrix
        shape, overlap = layout["matrix_shape"], 0.25
        for target in ("lesion", "organ", "class"):
            for method in METHODS:
                if target == "organ" and method in ("smoothgrad", "integrated_gradients") and not full_matrix:
                    # at 128^3 the organ touches every window, like the class: the same cost
                    continue
                run("matrix", "ours", shape, overlap, target, method, save=folder / "ours.npy")
                if method == "gradcam_plusplus" or (target == "organ" and method != "vanilla_gradient"):
                    # no Captum Grad-CAM++; Captum's SmoothGrad / IG cost does not depend on the
                    # target (every window, every sample): measured on the lesion and the class
                    (folder / "ours.npy").unlink(missing_ok=True)
                    continue
                row = captum("matrix", shape, overlap, target, method, save=folder / "captum.npy")
                if method == "vanilla_gradient" and row.get("seconds"):
                    per_window["mb"] = max(per_window.get("mb", 0.0), row["peak_mb"] / row["windows_total"])
                    per_window["seconds"] = row["seconds"] / row["windows_total"]
                what = {"shape": shape, "overlap": overlap, "target": target, "method": method}
                if method == "vanilla_gradient":
                    compare(folder / "ours.npy", folder / "captum.npy", what)
                elif method == "integrated_gradients" and target == "lesion":
                    # the same function: ours at the steps Captum ran
                    (folder / "ours.npy").unlink(missing_ok=True)
                    measure({"impl": "ours", "shape": shape, "overlap": overlap, "target": target, "method": method,
                             "params": {**p, "n_steps": layout["captum_steps"]}}, folder / "ours.npy")
                    compare(folder / "ours.npy", folder / "captum.npy",
                            {**what, "n_steps": layout["captum_steps"]})
                for name in ("ours.npy", "captum.npy"):
                    (folder / name).unlink(missing_ok=True)

        # 2. Grad-CAM++ where MONAI's applies: one window
        cam_shape = layout["cam_shape"]
        run("cam", "ours", cam_shape, 0.25, "lesion", "gradcam_plusplus", save=folder / "ours.npy")
        run("cam", "monai_cam", cam_shape, 0.25, "lesion", "gradcam_plusplus", save=folder / "monai.npy")
        if (folder / "ours.npy").exists() and (folder / "monai.npy").exists():
            # MONAI's map is scaled by exp(T) (its weights use exp(score) * grad): compare normalised
            for name in ("ours.npy", "monai.npy"):
                value = np.load(folder / name)
                np.save(folder / name, value / max(float(np.abs(value).max()), 1e-30))
        compare(folder / "ours.npy", folder / "monai.npy",
                {"shape": cam_shape, "overlap": 0.25, "target": "lesion", "method": "gradcam_plusplus",
                 "note": "both normalised to max 1"})

        # 3. goal rows and small-to-organ targets at 256^3 (the whole class: the matrix; Captum's
        # cost does not depend on the target, it is measured on the lesion)
        shape = layout["goal_shape"]
        for overlap in layout["overlaps"]:
            for target in ("lesion", "lesion_overlap", "organ") if overlap == 0.25 else ("lesion",):
                run("goal", "ours", shape, overlap, target, "vanilla_gradient",
                    save=folder / "ours.npy" if target == "lesion" else None)
                if target in ("lesion", "lesion_overlap"):
                    run("goal", "ours", shape, overlap, target, "smoothgrad")
                if target == "lesion":
                    captum("goal", shape, overlap, target, "vanilla_gradient", save=folder / "captum.npy")
                    compare(folder / "ours.npy", folder / "captum.npy",
                            {"shape": shape, "overlap": overlap, "target": target, "method": "vanilla_gradient"})
                    captum("goal", shape, overlap, target, "smoothgrad")
                (folder / "ours.npy").unlink(missing_ok=True)

        # 4. volume sweep, fixed small target, ours (Captum: the matrix and goal rows)
        for shape in layout["sweep"]:
            if shape in (layout["matrix_shape"], layout["goal_shape"]):
                continue  # measured above (the sweep table reads those rows)
            for overlap in layout["overlaps"] if shape == layout["sweep"][-1] else [0.25]:
                for method in ("vanilla_gradient", "smoothgrad") if overlap == 0.25 else ("vanilla_gradient",):
                    run("sweep", "ours", shape, overlap, "lesion", method)
                captum("sweep", shape, overlap, "lesion", "vanilla_gradient")

    return {
        "benchmark": "attribution cost against volume and target size: SegXAI explain vs Captum over "
                     "monai sliding_window_inference",
        "device": p["device"],
        "gpu": torch.cuda.get_device_name(0) if p["device"].startswith("cuda") else None,
        "params": p, "layout": layout, "rows": rows, "comparisons": comparisons,
        "captum_per_window": per_window, "full_matrix": full_matrix,
        "load_average_end": list(os.getloadavg()),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "torch": torch.__version__, "threads": p["threads"]},
    }


def dense_windows(shape, overlap: float) -> list:
    return [(a, b, c) for a in window_starts(shape[0], overlap) for b in window_starts(shape[1], overlap)
            for c in window_starts(shape[2], overlap)]


# ---- report -------------------------------------------------------------------------------------

def _shape(shape) -> str:
    return "x".join(map(str, shape)) if len(set(shape)) > 1 else f"{shape[0]}^3"


def _seconds(row: Optional[dict]) -> str:
    if row is None:
        return "-"
    if row.get("seconds_full") is None:
        estimate = row.get("estimated_seconds")
        return f"{row['status']}" + (f" (est. {estimate:.0f} s)" if estimate else "")
    text = f"{row['seconds_full']:.1f}"
    return text + (f" (scaled from {row['scaled_from']})" if row.get("scaled_from") else "")


def _memory(row: Optional[dict]) -> str:
    if row is None:
        return "-"
    if row.get("peak_mb") is None:
        estimate = row.get("estimated_peak_mb")
        return f"est. {estimate / 1024:.1f} GB" if estimate else "-"
    return f"{row['peak_mb']:.0f}"


def _find(rows, impl, shape, overlap, target, method, section=None) -> Optional[dict]:
    for row in rows:
        if (row["impl"], row["shape"], row["overlap"], row["target"], row["method"]) == (impl, list(shape), overlap,
                                                                                         target, method):
            if section is None or row["section"] == section:
                return row
    return None


def _ratio(numerator, denominator) -> str:
    if not numerator or not denominator:
        return "-"
    return f"{numerator / denominator:.2f}"


def _equality(results, shape, overlap, target, method) -> str:
    for c in results["comparisons"]:
        if (c["shape"], c["overlap"], c["target"], c["method"]) == (list(shape), overlap, target, method):
            note = f" (n_steps {c['n_steps']})" if "n_steps" in c else ""
            return f"{c['relative']:.1e}{note}" if c["relative"] is not None else "-"
    return "-"


def markdown(results: dict[str, Any]) -> str:
    p, layout, rows = results["params"], results["layout"], results["rows"]
    device = f"{results['gpu']} (CUDA)" if results.get("gpu") else f"CPU, {p['threads']} torch thread(s)"
    lines = [
        "# Attribution at scale: SegXAI vs. Captum over MONAI's sliding window",
        "",
        f"{device}, torch {results['machine']['torch']}; the lesion model's UNet architecture (channels 8-64) with "
        f"**random weights**, 96^3 windows (gaussian blend). SmoothGrad n_samples = {p['n_samples']}, IG n_steps = "
        f"{p['n_steps']} (zero baseline). Ours: `SegXAILib.attribution.explain` (region target for lesion / organ, "
        "class target with the case's prediction). Captum: `Saliency` / `NoiseTunnel` / `IntegratedGradients` on a "
        "wrapper of `sliding_window_inference` + the masked logit sum, batch 1. Time in s (fastest of up to 3 runs "
        "under 3 s in all, else one run), peak = max RSS growth in MB in a fresh process. 'scaled from N': Captum "
        "ran N samples / steps, time scaled linearly. Equality: max |ours - reference| / max |reference|. "
        f"Total run: {results.get('total_seconds', '?')} s; load average (1 min) at the start / end "
        f"{(results.get('load_average_start') or ['?'])[0]} / {(results.get('load_average_end') or ['?'])[0]} "
        "(other jobs shared the machine: compare ratios of the same run).",
        "",
        "## Ratios (time: Captum / ours, higher = ours faster; memory: ours / Captum, lower = ours smaller)",
        "",
        "| volume | overlap | target | method | ours s | Captum s | speed-up | ours MB | Captum MB | memory ratio | equality |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    seen = set()
    pairs = []
    for row in rows:
        if row["impl"] != "captum":
            continue
        key = (tuple(row["shape"]), row["overlap"], row["target"], row["method"])
        if key in seen:
            continue
        seen.add(key)
        for target in (row["target"], "lesion_overlap", "organ") if row["section"] == "goal" else (row["target"],):
            # Captum runs every window whatever the target: its lesion run is the reference of
            # the other targets of the goal rows (marked)
            ours = _find(rows, "ours", key[0], key[1], target, key[3])
            if ours is not None and (target == row["target"] or _find(rows, "captum", key[0], key[1], target,
                                                                     key[3]) is None):
                pairs.append((row, ours, target))
    for row, ours, target in pairs:
        key = (tuple(row["shape"]), row["overlap"], target, row["method"])
        via = "" if target == row["target"] else f" (Captum: its {row['target']} run)"
        speed = _ratio(row.get("seconds_full"), ours.get("seconds_full"))
        if speed == "-" and row.get("estimated_seconds"):
            speed = f"~{row['estimated_seconds'] / ours['seconds_full']:.0f} (est.)"
        memory = _ratio(ours.get("peak_mb"), row.get("peak_mb"))
        if memory == "-" and row.get("estimated_peak_mb"):
            memory = f"~{ours['peak_mb'] / row['estimated_peak_mb']:.3f} (est.)"
        lines.append(f"| {_shape(key[0])} | {key[1]} | {key[2]}{via} | {key[3]} | {_seconds(ours)} | {_seconds(row)} | "
                     f"{speed} | {_memory(ours)} | {_memory(row)} | {memory} | {_equality(results, *key)} |")

    lines += ["", f"## Method x target at {_shape(layout['matrix_shape'])}, overlap 0.25", "",
              "| target | voxels | windows run / all | method | ours s | ours MB | Captum s | Captum MB | reference |",
              "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for row in rows:
        if row["section"] != "matrix" or row["impl"] != "ours":
            continue
        key = (row["shape"], row["overlap"], row["target"], row["method"])
        reference = _find(rows, "captum", *key, section="matrix")
        note = "Captum" if reference else ("none in Captum; monai.visualize.GradCAMpp needs one forward of the hooked "
                                           "layer (one window), see below")
        lines.append(f"| {row['target']} | {row['target_voxels']} | {row['windows_run']} / {row['windows_total']} | "
                     f"{row['method']} | {_seconds(row)} | {_memory(row)} | {_seconds(reference)} | "
                     f"{_memory(reference)} | {note} |")

    cam_ours = [r for r in rows if r["section"] == "cam" and r["impl"] == "ours"]
    cam_monai = [r for r in rows if r["section"] == "cam" and r["impl"] == "monai_cam"]
    if cam_ours and cam_monai:
        shape = cam_ours[0]["shape"]
        lines += ["", f"## Grad-CAM++ where MONAI's applies: {_shape(shape)} (one window), lesion target", "",
                  "| implementation | s | MB | equality (both normalised to max 1) |", "|---|---:|---:|---:|",
                  f"| ours (`explain`, layer `{CAM_LAYER}`) | {_seconds(cam_ours[0])} | {_memory(cam_ours[0])} | "
                  f"{_equality(results, shape, 0.25, 'lesion', 'gradcam_plusplus')} |",
                  f"| monai.visualize.GradCAMpp (wrapper output [0, T]) | {_seconds(cam_monai[0])} | "
                  f"{_memory(cam_monai[0])} | |",
                  "",
                  "MONAI's GradCAMpp calls the module once and reads the hooked layer's activations and "
                  "gradients of that call; over `sliding_window_inference` the layer runs once per window and the "
                  "hooks keep only the last window's, so it does not apply to volumes larger than one window. It "
                  "also scales the map by exp(T) (its weights use `exp(score) * grad`; T = the sum of the logits "
                  "over the target overflows float32 above ~88) and min-max normalises by default "
                  "(postprocessing turned off here)."]

    lines += ["", "## Cost against volume size (fixed ~100-voxel lesion, one window)", "",
              "| volume | overlap | windows run / all | vanilla s | vanilla MB | SmoothGrad s | SmoothGrad MB | "
              "Captum vanilla s | Captum vanilla MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for shape in layout["sweep"]:
        for overlap in layout["overlaps"]:
            vanilla = _find(rows, "ours", shape, overlap, "lesion", "vanilla_gradient")
            smooth = _find(rows, "ours", shape, overlap, "lesion", "smoothgrad")
            reference = _find(rows, "captum", shape, overlap, "lesion", "vanilla_gradient")
            if vanilla is None:
                continue
            lines.append(f"| {_shape(shape)} | {overlap} | {vanilla['windows_run']} / {vanilla['windows_total']} | "
                         f"{_seconds(vanilla)} | {_memory(vanilla)} | {_seconds(smooth)} | {_memory(smooth)} | "
                         f"{_seconds(reference)} | {_memory(reference)} |")

    shape = layout["goal_shape"]
    lines += ["", f"## Cost against target size at {_shape(shape)}, overlap 0.25 (vanilla gradient; Captum: "
              "measured on the lesion, its cost does not depend on the target)", "",
              "| target | voxels | windows run / all | ours s | ours MB | Captum s | Captum MB |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    captum_any = _find(rows, "captum", shape, 0.25, "lesion", "vanilla_gradient")
    for target in ("lesion", "lesion_overlap", "organ", "class"):
        row = _find(rows, "ours", shape, 0.25, target, "vanilla_gradient")
        if row is None:
            continue
        # Captum runs every window whatever the target: its lesion run stands for every target
        reference = _find(rows, "captum", shape, 0.25, target, "vanilla_gradient") or captum_any
        lines.append(f"| {target} | {row['target_voxels']} | {row['windows_run']} / {row['windows_total']} | "
                     f"{_seconds(row)} | {_memory(row)} | {_seconds(reference)} | {_memory(reference)} |")
    per_window = results.get("captum_per_window") or {}
    if per_window:
        lines += ["", f"Captum estimates (rows 'did not fit (cap)' / 'est.'): {per_window['mb']:.0f} MB of graph and "
                  f"{per_window['seconds']:.2f} s per window pass (its vanilla gradient at "
                  f"{_shape(layout['matrix_shape'])}), times the windows; cap {p['captum_cap_gb']} GB (RLIMIT_AS)."]
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch threads (both sides)")
    parser.add_argument("--captum-cap-gb", type=float, default=DEFAULTS["captum_cap_gb"],
                        help="address-space cap of the Captum runs; larger estimated runs are not run")
    parser.add_argument("--quick", action="store_true", help="a smoke test on small volumes (results not written "
                        "unless --out is given)")
    parser.add_argument("--full-matrix", action="store_true", help="also SmoothGrad and IG of the organ target at "
                        "128^3 (it touches every window there, like the class target)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(run_measurement(json.loads(args.worker), args.save)), encoding="utf-8")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    params = {**DEFAULTS, "device": args.device, "threads": args.threads, "captum_cap_gb": args.captum_cap_gb}
    start, load = time.perf_counter(), list(os.getloadavg())
    results = benchmark(params, quick=args.quick, full_matrix=args.full_matrix, log=lambda m: print(m, flush=True))
    results["load_average_start"] = load
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    print(markdown(results))
    out = args.out if args.out is not None or args.quick else HERE / "results"
    if out is not None:
        name = "scale" if args.device == "cpu" else "scale_cuda"
        json_path, md_path = write_results(results, out, name, markdown)
        print(f"wrote {json_path} and {md_path} ({results['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
