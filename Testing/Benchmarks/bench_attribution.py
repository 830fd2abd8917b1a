"""Benchmark: SegXAI's attribution engine against Captum on the same model and input.

Run from the repository root::

    python Testing/Benchmarks/bench_attribution.py [--sizes 64 128] [--device cpu|cuda]
        [--repeats N] [--n-samples 8] [--n-steps 8] [--batch 4] [--out Testing/Benchmarks/results]

Model: a MONAI ``UNet(3, 2, 2, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1)``
(the bundled lesion model's architecture) in eval mode with random weights (seed 0). Input: a
smooth random two-channel cube of ``size^3`` voxels (seed 0). Target: the sum of the class-1
logits over a fixed central sphere (a :class:`~SegXAILib.attribution.targets.ClassTarget`).
The model runs as one window covering the whole volume (patch = volume, constant blend), so the
reference can call the network directly.

Compared (each timing and memory measurement in a fresh subprocess):

* ``smoothgrad``: ours (``SegmentationForward`` + ``SmoothGrad``) vs. Captum
  ``NoiseTunnel(Saliency(abs=False))`` smoothgrad with the same ``n_samples``, the same noise
  standard deviation and ``nt_samples_batch_size`` = our ``batch_size``. The noise draws differ
  (Captum draws with the global RNG), so equality is checked separately: ours against Captum
  ``Saliency`` averaged over *our* noise samples.
* ``integrated_gradients``: ours (zero baseline, right Riemann sum) vs. Captum
  ``IntegratedGradients(method="riemann_right")`` with the same ``n_steps`` and
  ``internal_batch_size`` = our ``batch_size``; the outputs must agree to ~1e-5 relative.
* ``gradcam_plusplus`` when ``SegXAILib/attribution/cam.py`` has a ``GradCAMPlusPlus`` class: vs.
  an independent reference written here from the Grad-CAM++ formulas (pytorch-grad-cam needs
  torchvision, which is not installed in this environment).
* ``lrp_zplus`` (our default composite, z+ on every layer with weights, paper 000) and
  ``lrp_epsilon`` (epsilon everywhere): ours (``LRP`` on the canonical copy of the network) vs.
  zennit's ``Gradient`` attributor with its ``EpsilonPlus`` composite (z+ on every convolution)
  and an all-``Epsilon`` composite. Timing and memory side by side; the outputs are *not*
  expected to agree: zennit has no rule for MONAI's InstanceNorm (its plain gradient is applied
  to the relevance) nor for ``ResidualUnit``'s functional ``cx + res`` (the relevance is copied
  to both branches). Both sides' **relevance sum ratio** ``sum(R_input) / T`` is reported.
* ``pattern_attribution`` and ``pattern_net`` (two-component patterns fitted in the untimed
  warm-up on a 16^3 cube): ours only, timed side by side
  with Captum ``Saliency(abs=False)`` on the same target, the plain gradient, i.e. the cost floor
  of any modified backward; the outputs are not expected to agree.
* The **bundled lesion model** on the lesion phantom (seed 2026) of the bundled head: our LRP
  with every composite, class target (the predicted lesion voxels), through the sliding windows
  of its card: time and relevance sum ratio (in-process, not a fresh process per run).

Peak memory: on CPU the growth of the process's maximum resident set size (``getrusage``) over
its value after the model and input were built (so imports and the model do not count); on
CUDA ``torch.cuda.max_memory_allocated`` over the allocation before the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: the default run: small enough for ~8 minutes on 2 CPU cores
DEFAULTS = {"n_samples": 8, "n_steps": 8, "batch": 4, "noise_level": 0.1, "seed": 0}
METHODS = ("smoothgrad", "integrated_gradients", "lrp_zplus", "lrp_epsilon", "pattern_attribution", "pattern_net")
#: method -> the implementation it is compared with
REFERENCES = {
    "smoothgrad": ("captum", "captum NoiseTunnel(Saliency) smoothgrad"),
    "integrated_gradients": ("captum", "captum IntegratedGradients riemann_right"),
    "gradcam_plusplus": ("reference", "independent Grad-CAM++ (this file)"),
    "lrp_zplus": ("zennit", "zennit Gradient + EpsilonPlus (z+ on every convolution)"),
    "lrp_epsilon": ("zennit", "zennit Gradient + Epsilon on every convolution"),
    "pattern_attribution": ("gradient", "captum Saliency (the plain gradient: cost floor, outputs differ)"),
    "pattern_net": ("gradient", "captum Saliency (the plain gradient: cost floor, outputs differ)"),
}
CAM_LAYER = "model.1.submodule.1.submodule.1.submodule"  # the UNet's bottom (deepest) block


# ---- the shared setup ---------------------------------------------------------------------------

def build_network(seed: int = 0) -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    network = UNet(3, 2, 2, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1)
    return network.eval()


def build_input(size: int, seed: int = 0) -> torch.Tensor:
    """A smooth random two-channel volume ``(1, 2, size, size, size)`` with a bright blob."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 2, size, size, size), generator=generator)
    x = torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=False) * 3.0
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    blob = torch.exp(-((grid - size * 0.45) ** 2).sum(0) / (2 * (size / 8) ** 2))
    x[0, 0] += 2.0 * blob
    x[0, 1] -= 1.0 * blob
    return x.contiguous()


def build_mask(size: int) -> torch.Tensor:
    """The fixed target region: a sphere of radius size/6 around the centre."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    return ((grid - (size - 1) / 2) ** 2).sum(0) <= (size / 6) ** 2


def build_card(size: int):
    from SegXAILib.models.card import model_card_from_dict

    return model_card_from_dict({
        "name": "bench-unet",
        "architecture": {"format": "monai", "name": "UNet", "weights": "none.pt"},
        "input_channels": ["c0", "c1"],
        "classes": [{"name": "background"}, {"name": "thing"}],
        "preprocessing": {"orientation": None, "spacing": None, "intensity": []},
        "inference": {"patch_size": [size] * 3, "overlap": 0.25, "blend": "constant"},
    })


def reference_target(network: torch.nn.Module, mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same scalar as our ClassTarget, straight from the network: ``(B, C, ...) -> (B,)``."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return network(x)[:, 1][:, mask.to(x.device)].sum(dim=1)

    return forward


# ---- implementations ----------------------------------------------------------------------------

def _ours_forward(network, x, mask):
    from SegXAILib.attribution.forward import SegmentationForward
    from SegXAILib.attribution.targets import ClassTarget

    return SegmentationForward(network, build_card(x.shape[-1]), x.shape[2:], ClassTarget(1, mask), amp=False)


def ours_smoothgrad(network, x, mask, p):
    from SegXAILib.attribution.gradient import SmoothGrad

    return SmoothGrad(_ours_forward(network, x, mask)).attribute(
        x, n_samples=p["n_samples"], noise_level=p["noise_level"], batch_size=p["batch"], seed=p["seed"]
    )


def captum_smoothgrad(network, x, mask, p):
    from captum.attr import NoiseTunnel, Saliency

    from SegXAILib.attribution.gradient import noise_sigma

    tunnel = NoiseTunnel(Saliency(reference_target(network, mask)))
    return tunnel.attribute(x, nt_type="smoothgrad", nt_samples=p["n_samples"], nt_samples_batch_size=p["batch"],
                            stdevs=noise_sigma(x, p["noise_level"]), abs=False)


def captum_saliency_our_noise(network, x, mask, p):
    """Captum Saliency averaged over the noisy samples our SmoothGrad draws (the equality check)."""
    from captum.attr import Saliency

    from SegXAILib.attribution.gradient import _noise, noise_sigma

    saliency = Saliency(reference_target(network, mask))
    sigma = noise_sigma(x, p["noise_level"])
    total = torch.zeros_like(x)
    for start in range(0, p["n_samples"], p["batch"]):
        chunk = range(start, min(p["n_samples"], start + p["batch"]))
        samples = x + _noise(x, chunk, sigma, p["seed"])
        total += saliency.attribute(samples, abs=False).sum(dim=0, keepdim=True)
    return total / p["n_samples"]


def ours_integrated_gradients(network, x, mask, p):
    from SegXAILib.attribution.gradient import IntegratedGradients

    return IntegratedGradients(_ours_forward(network, x, mask)).attribute(
        x, baselines="zero", n_steps=p["n_steps"], batch_size=p["batch"]
    )


def captum_integrated_gradients(network, x, mask, p):
    from captum.attr import IntegratedGradients

    return IntegratedGradients(reference_target(network, mask)).attribute(
        x, baselines=torch.zeros_like(x), n_steps=p["n_steps"], method="riemann_right", internal_batch_size=p["batch"]
    )


def cam_available() -> bool:
    try:
        from SegXAILib.attribution import cam  # noqa: F401
    except Exception:
        return False
    return hasattr(cam, "GradCAMPlusPlus")


def ours_gradcam_plusplus(network, x, mask, p):  # pragma: no cover - only when cam.py exists
    from SegXAILib.attribution.cam import GradCAMPlusPlus

    method = GradCAMPlusPlus(_ours_forward(network, x, mask))
    return method.attribute(x, layer=CAM_LAYER)


def reference_gradcam_plusplus(network, x, mask, p):  # pragma: no cover - only when cam.py exists
    """Grad-CAM++ (Chattopadhay et al. 2018) with the exponential-free closed form used by
    pytorch-grad-cam: ``alpha = g^2 / (2 g^2 + sum(A) g^3)``, weights ``sum(alpha relu(g))``,
    map ``relu(sum_k w_k A_k)`` upsampled (trilinear) to the input, one copy per input channel."""
    layer = dict(network.named_modules())[CAM_LAYER]
    stored: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda m, i, o: stored.__setitem__("a", o))
    try:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            value = reference_target(network, mask)(x).sum()
            (gradient,) = torch.autograd.grad(value, stored["a"])
    finally:
        handle.remove()
    activations = stored["a"].detach()
    g2, g3 = gradient**2, gradient**3
    denominator = 2 * g2 + activations.sum(dim=(2, 3, 4), keepdim=True) * g3
    alpha = g2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    weights = (alpha * torch.relu(gradient)).sum(dim=(2, 3, 4), keepdim=True)
    cam = torch.relu((weights * activations).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[2:], mode="trilinear", align_corners=False)
    return cam.expand(-1, x.shape[1], -1, -1, -1)


def ours_lrp(composite: str) -> Callable:
    def run(network, x, mask, p):
        from SegXAILib.attribution.lrp import LRP

        return LRP(_ours_forward(network, x, mask)).attribute(x, composite=composite)

    return run


_PATTERNS: dict[tuple, Any] = {}


def ours_patterns(method: str) -> Callable:
    """PatternAttribution / PatternNet with two-component patterns fitted once per network, in
    :func:`run_measurement`'s untimed warm-up call on a 16^3 cube (patterns have the layers'
    weight shapes, whatever the input size), so neither the fit's time nor its memory counts."""

    def run(network, x, mask, p):
        from SegXAILib.attribution.patterns import PatternAttribution, PatternNet, fit_patterns_on_tensors

        forward = _ours_forward(network, x, mask)
        key = id(network)
        if key not in _PATTERNS:
            _PATTERNS[key] = fit_patterns_on_tensors(network, forward.card, [x], ("two_component",))["two_component"]
        cls = PatternAttribution if method == "pattern_attribution" else PatternNet
        return cls(forward).attribute(x, estimator="two_component", patterns=_PATTERNS[key])

    return run


def captum_gradient(network, x, mask, p):
    from captum.attr import Saliency

    return Saliency(reference_target(network, mask)).attribute(x, abs=False)


def import_zennit():
    """zennit without torchvision (``Testing/conftest.py``'s stand-in; zennit is a test oracle)."""
    testing = str(ROOT / "Testing")
    if testing not in sys.path:
        sys.path.insert(0, testing)
    from conftest import import_zennit as load

    return load()


def zennit_lrp(rule: str) -> Callable:
    """zennit's ``Gradient`` attributor; the output relevance is the target's logits (as ours)."""

    def run(network, x, mask, p):
        zennit = import_zennit()
        from zennit.attribution import Gradient
        from zennit.core import Composite
        from zennit.rules import Epsilon, Pass
        from zennit.types import Activation, Convolution

        if rule == "zplus":
            composite = zennit.composites.EpsilonPlus()
        else:
            composite = Composite(module_map=lambda ctx, name, module: (
                Epsilon() if isinstance(module, Convolution) else Pass() if isinstance(module, Activation) else None))
        weights = torch.zeros((1, 2, *x.shape[2:]), device=x.device, dtype=x.dtype)
        weights[0, 1][mask.to(x.device)] = 1.0
        with Gradient(model=network, composite=composite) as attributor:
            _, relevance = attributor(x, lambda output: output * weights)
        return relevance

    return run


IMPLEMENTATIONS: dict[str, Callable] = {
    "ours:smoothgrad": ours_smoothgrad,
    "captum:smoothgrad": captum_smoothgrad,
    "captum_our_noise:smoothgrad": captum_saliency_our_noise,
    "ours:integrated_gradients": ours_integrated_gradients,
    "captum:integrated_gradients": captum_integrated_gradients,
    "ours:gradcam_plusplus": ours_gradcam_plusplus,
    "reference:gradcam_plusplus": reference_gradcam_plusplus,
    "ours:lrp_zplus": ours_lrp("zplus"),
    "zennit:lrp_zplus": zennit_lrp("zplus"),
    "ours:lrp_epsilon": ours_lrp("epsilon"),
    "zennit:lrp_epsilon": zennit_lrp("epsilon"),
    "ours:pattern_attribution": ours_patterns("pattern_attribution"),
    "ours:pattern_net": ours_patterns("pattern_net"),
    "gradient:pattern_attribution": captum_gradient,
    "gradient:pattern_net": captum_gradient,
}


# ---- one measurement ----------------------------------------------------------------------------

def _max_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024**2
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_measurement(spec: dict[str, Any], output: Optional[str | Path] = None) -> dict[str, Any]:
    """Time ``spec["impl"]`` (``"ours:smoothgrad"``, ...) ``spec["repeats"]`` times on a
    ``spec["size"]^3`` cube on ``spec["device"]``, in this process; optionally save the first
    output (``.npy``). Memory is this process's peak growth, so call it in a fresh process
    (:func:`measure`) for a clean number."""
    params = {**DEFAULTS, **spec.get("params", {})}
    device = torch.device(spec.get("device", "cpu"))
    size = int(spec["size"])
    function = IMPLEMENTATIONS[spec["impl"]]
    network = build_network(params["seed"]).to(device)
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    x = build_input(size, params["seed"]).to(device)
    mask = build_mask(size).to(device)
    # warm-up on a 16^3 cube: imports, kernel selection and allocator start-up are not timed
    warm = {**params, "n_samples": 2, "n_steps": 2, "batch": 2}
    function(network, build_input(16, params["seed"]).to(device), build_mask(16).to(device), warm)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 1024**2
    else:
        base = _max_rss_mb()
    torch.manual_seed(params["seed"])  # Captum's NoiseTunnel draws with the global RNG
    times, result = [], None
    for repeat in range(max(1, int(spec.get("repeats", 1)))):
        _synchronize(device)
        start = time.perf_counter()
        value = function(network, x, mask, params)
        _synchronize(device)
        times.append(time.perf_counter() - start)
        if result is None:
            result = value.detach().float().cpu().numpy()
        del value
    peak = (torch.cuda.max_memory_allocated(device) / 1024**2 if device.type == "cuda" else _max_rss_mb()) - base
    if output is not None:
        np.save(output, result)
    return {
        "impl": spec["impl"],
        "size": size,
        "device": str(device),
        "seconds": times,
        "seconds_median": statistics.median(times),
        "peak_mb": round(max(peak, 0.0), 1),
        "baseline_mb": round(base, 1),
        "threads": torch.get_num_threads(),
        "params": params,
    }


def measure(spec: dict[str, Any], output: Optional[str | Path] = None) -> dict[str, Any]:
    """:func:`run_measurement` in a fresh Python process (clean peak memory)."""
    with tempfile.TemporaryDirectory() as folder:
        result_file = Path(folder) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--result",
                   str(result_file)]
        if output is not None:
            command += ["--save", str(output)]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"measurement {spec} failed:\n{completed.stderr[-4000:]}")
        return json.loads(result_file.read_text(encoding="utf-8"))


def target_value(size: int, seed: int = 0) -> float:
    """``T(x)``: the benchmark's target on its input (the denominator of the relevance sum ratio)."""
    network = build_network(seed)
    with torch.no_grad():
        return float(reference_target(network, build_mask(size))(build_input(size, seed)).sum())


def lesion_model_relevance(composites=None, log=print) -> dict[str, Any]:
    """Our LRP on the bundled lesion model (lesion phantom seed 2026, class target = predicted
    lesion voxels, the card's sliding windows): time and ``sum(R_input) / T`` per composite."""
    from SegXAILib.attribution.forward import SegmentationForward
    from SegXAILib.attribution.lrp import COMPOSITES, LRP, relevance_sum_ratio
    from SegXAILib.attribution.targets import ClassTarget
    from SegXAILib.models import load_model
    from SegXAILib.models.preprocessing import model_input
    from SegXAILib.models.windows import WindowedForward
    from SegXAILib.phantoms import make_lesion_phantom
    from SegXAILib.pipeline import resolve_model_card
    from SegXAILib.sample_data import load_sample_head

    model = load_model(resolve_model_card("lesions"), "cpu")
    image = make_lesion_phantom(load_sample_head(), seed=2026).image
    x, _ = model_input(image, model.card, model.device)
    with torch.no_grad():
        labels = WindowedForward(model.network, model.card, x.shape[2:])(x)[0].argmax(0)
    target = ClassTarget(1, labels == 1)
    forward = SegmentationForward(model.network, model.card, x.shape[2:], target)
    with torch.no_grad():
        value = float(forward(x).sum())
    rows = []
    for composite in composites or list(COMPOSITES):
        start = time.perf_counter()
        relevance = LRP(forward).attribute(x, composite=composite)
        seconds = time.perf_counter() - start
        ratio = relevance_sum_ratio(forward, x, relevance)
        positive = float(relevance.clamp(min=0).sum()) / value
        log(f"    lesion model lrp {composite}: {seconds:.2f} s, relevance sum ratio {ratio:.4f}")
        rows.append({"composite": composite, "seconds": seconds, "relevance_sum_ratio": ratio,
                     "positive_relevance_ratio": positive, "finite": bool(torch.isfinite(relevance).all())})
    return {
        "model": model.card.name,
        "case": "lesion phantom seed 2026 on the bundled head, whole volume",
        "model_grid": list(x.shape[2:]),
        "windows": len(forward.windowed.windows_for(target.support)),
        "target": "class lesion: sum of class-1 logits over the predicted lesion voxels",
        "target_value": value,
        "target_voxels": int(target.support.sum()),
        "rows": rows,
    }


def compare(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    difference = float(np.max(np.abs(ours - reference)))
    scale = float(np.max(np.abs(reference)))
    return {"max_abs_diff": difference, "max_abs_reference": scale,
            "relative_diff": difference / scale if scale > 0 else difference}


# ---- the whole benchmark ------------------------------------------------------------------------

def benchmark(sizes, device: str, repeats: int, params: dict[str, Any], log=print, methods=None,
              lesion_model: bool = True) -> dict[str, Any]:
    log(f"load average at start: {os.getloadavg()}")
    methods = list(methods or (list(METHODS) + (["gradcam_plusplus"] if cam_available() else [])))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in sizes:
            for method in methods:
                reference_name = REFERENCES[method][0]
                files = {name: Path(folder) / f"{name}_{method}_{size}.npy" for name in ("ours", "ref", "check")}
                common = {"size": size, "device": device, "repeats": repeats, "params": params}
                log(f"{method} {size}^3 {device}: ours ...")
                ours = measure({**common, "impl": f"ours:{method}"}, files["ours"])
                log(f"    {ours['seconds_median']:.2f} s, {ours['peak_mb']:.0f} MB; {reference_name} ...")
                ref = measure({**common, "impl": f"{reference_name}:{method}"}, files["ref"])
                log(f"    {ref['seconds_median']:.2f} s, {ref['peak_mb']:.0f} MB")
                row = {
                    "method": method,
                    "size": size,
                    "device": device,
                    "reference": REFERENCES[method][1],
                    "ours_s": ours["seconds_median"],
                    "reference_s": ref["seconds_median"],
                    "time_ratio": ours["seconds_median"] / ref["seconds_median"],
                    "ours_peak_mb": ours["peak_mb"],
                    "reference_peak_mb": ref["peak_mb"],
                    "memory_ratio": ours["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] > 0 else None,
                    "ours_runs_s": ours["seconds"],
                    "reference_runs_s": ref["seconds"],
                    "threads": ours["threads"],
                }
                if method == "smoothgrad":
                    log("    equality: captum Saliency over our noise ...")
                    run_measurement_spec = {**common, "repeats": 1, "impl": "captum_our_noise:smoothgrad"}
                    measure(run_measurement_spec, files["check"])
                    row["equality"] = compare(np.load(files["ours"]), np.load(files["check"]))
                    row["equality_against"] = "captum Saliency averaged over our noise samples"
                else:
                    row["equality"] = compare(np.load(files["ours"]), np.load(files["ref"]))
                    row["equality_against"] = "the reference's output"
                if method.startswith("pattern"):
                    row["equality_against"] = "the plain gradient (not expected to agree)"
                if method.startswith("lrp"):
                    target = target_value(size, params["seed"])
                    row["target_value"] = target
                    row["relevance_sum_ratio"] = float(np.load(files["ours"]).astype(np.float64).sum()) / target
                    row["reference_relevance_sum_ratio"] = float(np.load(files["ref"]).astype(np.float64).sum()) / target
                    row["equality_against"] = ("zennit's output (no rule for InstanceNorm nor for ResidualUnit's "
                                               "cx + res: not expected to agree)")
                    log(f"    relevance sum ratio: ours {row['relevance_sum_ratio']:.4f}, "
                        f"zennit {row['reference_relevance_sum_ratio']:.4f}")
                log(f"    max abs diff {row['equality']['max_abs_diff']:.3g} "
                    f"(relative {row['equality']['relative_diff']:.3g})")
                rows.append(row)
    import captum
    import monai

    lesion = None
    if lesion_model:
        log("lrp on the bundled lesion model ...")
        lesion = lesion_model_relevance(log=log)
    return {
        "benchmark": "attribution",
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if device.startswith("cuda") else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "captum": captum.__version__,
                     "monai": monai.__version__, "zennit": _zennit_version()},
        "model": "monai UNet(3, 2, 2, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1), eval, seed 0",
        "target": "sum of class-1 logits over a central sphere of radius size/6 (ClassTarget)",
        "params": params,
        "repeats": repeats,
        "gradcam_plusplus": "included" if cam_available() else "not included: SegXAILib/attribution/cam.py has no GradCAMPlusPlus",
        "rows": rows,
        "lrp_lesion_model": lesion,
    }


def _zennit_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("zennit")
    except Exception:  # pragma: no cover - zennit missing
        return None


def _lrp_markdown(results: dict[str, Any]) -> list[str]:
    rows = [r for r in results["rows"] if "relevance_sum_ratio" in r]
    lines: list[str] = []
    if rows:
        lines += [
            "## LRP: relevance sum ratio",
            "",
            "`sum(R_input) / T` on the benchmark UNet (random weights, biases and InstanceNorm absorb relevance, "
            "so 1 is not expected; a bias-free network gives 1, see `Testing/test_lrp.py`). zennit has no rule "
            "for InstanceNorm nor for MONAI's functional residual addition, so its maps differ from ours (the "
            "max abs diff above).",
            "",
            "| method | size | ours | zennit |",
            "|---|---|---|---|",
        ]
        for r in rows:
            lines.append(f"| {r['method']} | {r['size']}^3 | {r['relevance_sum_ratio']:.4g} | "
                         f"{r['reference_relevance_sum_ratio']:.4g} |")
        lines.append("")
    lesion = results.get("lrp_lesion_model")
    if lesion:
        grid = " x ".join(str(v) for v in lesion["model_grid"])
        lines += [
            f"## LRP on the bundled lesion model ({lesion['model']})",
            "",
            f"{lesion['case']}; model grid {grid}, {lesion['windows']} sliding windows; target: {lesion['target']} "
            f"({lesion['target_voxels']} voxels, T = {lesion['target_value']:.1f}). Ratio: `sum(R_input) / T`; "
            "positive: `sum(max(R_input, 0)) / T`. Times in-process (after the runs above; noisy under load).",
            "",
            "| composite | seconds | relevance sum ratio | positive ratio |",
            "|---|---|---|---|",
        ]
        for r in lesion["rows"]:
            lines.append(f"| {r['composite']} | {r['seconds']:.2f} | {r['relevance_sum_ratio']:.4f} | "
                         f"{r['positive_relevance_ratio']:.4f} |")
        lines.append("")
    return lines


def markdown(results: dict[str, Any]) -> str:
    p = results["params"]
    lines = [
        "# Attribution benchmark: SegXAI vs. Captum (and zennit for LRP)",
        "",
        f"{results['date']}; {results['machine']['processor']}, {results['machine']['cpu_count']} CPU cores, "
        f"{results['machine']['torch_threads']} torch threads"
        + (f", {results['machine']['cuda']}" if results["machine"]["cuda"] else "")
        + f"; torch {results['versions']['torch']}, captum {results['versions']['captum']}, "
        f"monai {results['versions']['monai']}.",
        "",
        f"Model: {results['model']}. Target: {results['target']}. One window covers the volume. "
        f"SmoothGrad n_samples={p['n_samples']}, noise_level={p['noise_level']}; IG n_steps={p['n_steps']}, zero "
        f"baseline; batch {p['batch']} samples per backward pass for both sides. Times: median of "
        f"{results['repeats']} runs, each implementation in a fresh process. Peak MB: growth of the peak resident "
        "set (CPU) or of the peak CUDA allocation over the state after building model and input. "
        "Ratios < 1: ours is faster / smaller. "
        f"Load average (1, 5, 15 min) at the end: {results.get('load_average_at_end', 'n/a')} "
        "(other processes on the machine make the times noisy).",
        "",
        "| method | size | device | ours s | reference s | ratio (time) | peak MB ours / ref | ratio (memory) | max abs diff | relative diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        memory_ratio = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] is not None else "n/a"
        lines.append(
            f"| {r['method']} | {r['size']}^3 | {r['device']} | {r['ours_s']:.2f} | {r['reference_s']:.2f} | "
            f"{r['time_ratio']:.2f} | {r['ours_peak_mb']:.0f} / {r['reference_peak_mb']:.0f} | {memory_ratio} | "
            f"{r['equality']['max_abs_diff']:.2e} | {r['equality']['relative_diff']:.1e} |"
        )
    lines += [
        "",
        "References: SmoothGrad vs. Captum `NoiseTunnel(Saliency(abs=False))`, `nt_samples_batch_size` = batch; "
        "IG vs. Captum `IntegratedGradients(method=\"riemann_right\")`, `internal_batch_size` = batch.",
        "",
        "Max abs diff: IG against Captum's output. SmoothGrad draws its noise differently from Captum, so its "
        "difference is against Captum `Saliency` averaged over *our* noise samples (the timing comparison uses "
        "Captum's own noise).",
        "",
        f"Grad-CAM++: {results['gradcam_plusplus']}. pytorch-grad-cam (the usual reference) requires "
        "torchvision, which cannot be installed in this environment; the Grad-CAM++ reference, when included, "
        "is an independent implementation of the formulas in `bench_attribution.py`.",
        "",
        "LRP: ours (`composite=zplus`, the default, and `composite=epsilon`) vs. zennit's `Gradient` attributor "
        "(`EpsilonPlus`; all-`Epsilon`), output relevance = the target's logits on both sides.",
        "",
        "PatternAttribution / PatternNet (two-component patterns fitted in the untimed warm-up): no "
        "library offers them for 3D networks, so they are timed against Captum `Saliency` on the same target, the "
        "plain gradient (the cost floor of a modified backward); their outputs are not expected to agree with it.",
        "",
    ]
    lines += _lrp_markdown(results)
    return "\n".join(lines)


def write_results(results: dict[str, Any], out: Path, name: str = "attribution", as_markdown=None) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` (``as_markdown(results)``, default this module's
    table) into ``out``, atomically. Shared by the benchmarks of this folder."""
    from SegXAILib.io import atomic_path, check_writable_dir

    out = check_writable_dir(out)
    paths = out / f"{name}.json", out / f"{name}.md"
    with atomic_path(paths[0]) as temporary:
        temporary.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    with atomic_path(paths[1]) as temporary:
        temporary.write_text((as_markdown or markdown)(results), encoding="utf-8")
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="cube edge lengths (multiples of 8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (median reported)")
    parser.add_argument("--n-samples", type=int, default=DEFAULTS["n_samples"])
    parser.add_argument("--n-steps", type=int, default=DEFAULTS["n_steps"])
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--methods", nargs="+", choices=list(REFERENCES), default=None,
                        help="only these methods: their rows replace those in the existing results (others kept)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = run_measurement(json.loads(args.worker), args.save)
        Path(args.result).write_text(json.dumps(result), encoding="utf-8")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if any(size % 8 for size in args.sizes):
        parser.error("--sizes must be multiples of 8 (the UNet downsamples three times)")
    params = {**DEFAULTS, "n_samples": args.n_samples, "n_steps": args.n_steps, "batch": args.batch}
    start = time.perf_counter()
    results = benchmark(args.sizes, args.device, args.repeats, params, log=lambda m: print(m, flush=True),
                        methods=args.methods, lesion_model=args.methods is None)
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    existing = args.out / "attribution.json"
    if args.methods and existing.is_file():  # a partial run: merge into the last full run
        previous = json.loads(existing.read_text(encoding="utf-8"))
        kept = [r for r in previous["rows"] if r["method"] not in args.methods]
        results = {**previous, "rows": kept + results["rows"],
                   "partial_runs": previous.get("partial_runs", []) + [
                       {"methods": args.methods, "date": results["date"], "seconds": results["total_seconds"],
                        "load_average_at_end": results["load_average_at_end"]}]}
    json_path, md_path = write_results(results, args.out)
    print(markdown(results))
    print(f"wrote {json_path} and {md_path} ({results['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
