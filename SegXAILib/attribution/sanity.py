"""Sanity check of attribution methods: cascading model-parameter randomisation (Adebayo et al.
2018; METHODS section 5).

A faithful method's map depends on the weights: randomise the layers one by one, from the
output side towards the input ("top-down", cumulatively), recompute the map after each step
and report how similar it still is to the original map. A method whose map barely changes
(e.g. an edge detector) fails the check.

Similarity measures (per step):

* ``spearman_abs``: Spearman rank correlation of the absolute values (Adebayo's main measure);
* ``spearman``: Spearman rank correlation of the signed values;
* ``pearson``: Pearson correlation of the signed values. Pearson is chosen over SSIM: it needs
  no window size nor dynamic range (which differ between methods and volumes) and is defined
  the same way in 3D; Adebayo report both and they agree qualitatively.

A correlation with a constant map is reported as 0 (no shared ranking).
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ..image import SegXAIInputError
from ..models.card import ModelCard
from ..progress import CancelToken, ProgressCallback, report, sub_progress
from .base import Attribution
from .forward import SegmentationForward
from .registry import get_method
from .targets import Target

__all__ = ["model_randomisation", "parameterised_layers", "randomise_module", "similarity"]

INITIALISATIONS = ("normal", "default")


def parameterised_layers(network: torch.nn.Module, example: Optional[torch.Tensor] = None) -> list[str]:
    """Names of the modules that own parameters directly, output side first.

    With ``example`` (one network input, e.g. a zero patch) the order is the reverse of the
    order in which the modules first run (data flow); modules that do not run are left out.
    Without it (or when hooks do not fire, e.g. TorchScript) the reverse registration order.
    """
    owners = [(name, module) for name, module in network.named_modules()
              if any(True for _ in module.parameters(recurse=False))]
    order: list[str] = []
    if example is not None:
        seen: set[str] = set()
        handles = []

        def hook_for(name: str):
            def hook(module, args, output):
                if name not in seen:
                    seen.add(name)
                    order.append(name)
            return hook

        try:
            for name, module in owners:
                handles.append(module.register_forward_hook(hook_for(name)))
            with torch.no_grad():
                network(example)
        except Exception:  # scripted modules do not take Python hooks
            order = []
        finally:
            for handle in handles:
                handle.remove()
    if not order:
        order = [name for name, _ in owners]
    return order[::-1]


def randomise_module(module: torch.nn.Module, generator: torch.Generator, init: str = "normal") -> None:
    """Re-initialise the parameters ``module`` owns directly, in place.

    ``"normal"``: each parameter tensor ~ N(0, sd^2) with sd = that tensor's standard deviation
    in the trained model (0.01 when it has fewer than 2 elements or is constant): random values
    at the layer's own scale. ``"default"``: the module's ``reset_parameters()`` (PyTorch's
    default init, drawn from a generator-seeded stream); modules without it fall back to normal.
    """
    if init not in INITIALISATIONS:
        raise SegXAIInputError(f"init must be one of {INITIALISATIONS}, got {init!r}")
    if init == "default" and hasattr(module, "reset_parameters"):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            module.reset_parameters()
        return
    with torch.no_grad():
        for parameter in module.parameters(recurse=False):
            sd = float(parameter.detach().float().std()) if parameter.numel() > 1 else 0.0
            if not np.isfinite(sd) or sd == 0.0:
                sd = 0.01
            draw = torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * sd
            parameter.copy_(draw.to(parameter.device, parameter.dtype))


def _correlation(a: np.ndarray, b: np.ndarray, ranks: bool = False) -> float:
    """Pearson (:func:`scipy.stats.pearsonr`) or, with ``ranks``, Spearman
    (:func:`scipy.stats.spearmanr`: Pearson of the average ranks, ties share their rank)
    correlation of two flat arrays; 0 when either is constant (undefined there: SciPy
    returns NaN with a warning), e.g. a map that randomisation zeroed."""
    from scipy.stats import pearsonr, spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float((spearmanr if ranks else pearsonr)(a, b).statistic)


def similarity(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """``spearman_abs``, ``spearman`` and ``pearson`` between two maps of one shape."""
    a = reference.detach().double().cpu().numpy().ravel()
    b = other.detach().double().cpu().numpy().ravel()
    return {
        "spearman_abs": _correlation(np.abs(a), np.abs(b), ranks=True),
        "spearman": _correlation(a, b, ranks=True),
        "pearson": _correlation(a, b),
    }


def model_randomisation(
    network: torch.nn.Module,
    card: ModelCard,
    inputs: torch.Tensor,
    target: Target,
    method: Union[str, type[Attribution]] = "vanilla_gradient",
    params: Optional[dict[str, Any]] = None,
    seed: int = 0,
    cascading: bool = True,
    init: str = "normal",
    layers: Optional[Sequence[str]] = None,
    window_batch: int = 1,
    amp: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> list[dict[str, Any]]:
    """Cascading (or independent) model-parameter randomisation of one method on one case.

    Parameters
    ----------
    network : torch.nn.Module
        The trained network, in eval mode. It is never modified: the randomised networks are
        deep copies.
    card : ModelCard
    inputs : (1, C, D, H, W) tensor
        Model-grid input (preprocessed), on the network's device.
    target : Target
        What to explain (fixed across steps: e.g. the trained model's class mask).
    method : str or Attribution subclass
        A registry name (``"vanilla_gradient"``, ``"integrated_gradients"``, ...).
    params : dict
        The method's parameters. A stochastic method gets ``seed`` unless ``params`` sets it,
        so that every step draws the same noise.
    seed : int
        Seed of the re-initialisation (and of the method, see above).
    cascading : bool
        True: randomise cumulatively, output side first (Adebayo's cascading test); False:
        randomise one layer at a time on a fresh copy (the independent test).
    init : ``"normal"`` or ``"default"``
        See :func:`randomise_module`.
    layers : list of str, optional
        Module names to randomise, in this order; default: every module owning parameters,
        output side first (:func:`parameterised_layers`).

    Returns
    -------
    list of dict
        Step 0 is the original model (similarities 1); step k >= 1 has ``layer`` (the module
        randomised at this step), ``module`` (its class), ``randomised`` (layers randomised so
        far), ``spearman_abs``, ``spearman``, ``pearson`` (similarity to the original map)
        and ``map_abs_sum`` (L1 norm of the map).
    """
    method_class = get_method(method) if isinstance(method, str) else method
    params = dict(params or {})
    if method_class.stochastic:
        params.setdefault("seed", seed)
    if inputs.ndim != 5 or inputs.shape[0] != 1:
        raise SegXAIInputError(f"inputs must be one volume (1, C, D, H, W), got {tuple(inputs.shape)}")
    spatial = tuple(inputs.shape[2:])

    def attribute(net: torch.nn.Module, step_progress) -> torch.Tensor:
        forward = SegmentationForward(net, card, spatial, target, amp=amp, window_batch=window_batch)
        return method_class(forward).attribute(inputs, progress=step_progress, cancel=cancel, **params).detach()

    working = copy.deepcopy(network)
    modules = dict(working.named_modules())
    if layers is None:
        device = next(iter(working.parameters()), torch.zeros(())).device
        example = torch.zeros((1, inputs.shape[1], *card.patch_size), device=device, dtype=inputs.dtype)
        order = parameterised_layers(working, example)
    else:
        order = list(layers)
        unknown = [name for name in order if name not in modules]
        if unknown:
            raise SegXAIInputError(f"model_randomisation: no module named {unknown} in the network")
    total = len(order) + 1
    generator = torch.Generator().manual_seed(int(seed))

    original = attribute(working, sub_progress(progress, 0.0, 1.0 / total))
    results: list[dict[str, Any]] = [{
        "step": 0, "layer": None, "module": None, "randomised": 0, "spearman_abs": 1.0, "spearman": 1.0,
        "pearson": 1.0, "map_abs_sum": float(original.abs().sum()),
    }]
    for step, name in enumerate(order, start=1):
        if cancel is not None:
            cancel.raise_if_cancelled()
        if cascading:
            net, module = working, modules[name]
        else:
            net = copy.deepcopy(network)
            module = dict(net.named_modules())[name]
        randomise_module(module, generator, init)
        current = attribute(net, sub_progress(progress, step / total, (step + 1) / total))
        results.append({
            "step": step, "layer": name, "module": type(module).__name__,
            "randomised": step if cascading else 1, **similarity(original, current),
            "map_abs_sum": float(current.abs().sum()),
        })
        report(progress, (step + 1) / total, "model randomisation")
    return results
