"""Training the two generators (paper 004, sections 2.5 and 3.2).

Each iteration draws a batch ``x`` from both domains (half lesion, half lesion-free patches:
both generators see the same images, as in the paper), a real lesion patch for each sample
(D+'s real partner) and a real lesion-free one (D-'s), and a random order for every pair. First
the discriminators take one step on ``(real, G(x))`` pairs, then both generators on

    ``L(G+) = w_c [L_cyc(x, G-(G+(x)))] + w_s DSSIM(x, G+(x)) + w_a L_adv(D+, real+, G+(x))
              + w_m CE(sigmoid(score(G+(x))), 1)``

and the same for G- with the signs swapped (label 0, D-, real-), summed (eq. 4; the cycle
term of G+ is ``L_cyc(x, G-(G+(x)))``, that of G- ``L_cyc(x, G+(G-(x)))``).

Reproducibility. Every random choice (network initialisation, batches, pair orders) comes from
``config.seed``: the networks are built inside :func:`torch.random.fork_rng` (the global RNG
is left as it was) and sampling uses a private :class:`torch.Generator`. A checkpoint every
``checkpoint_every`` iterations (written atomically, read with ``weights_only=True``) holds
the four networks, both optimisers, the generator's RNG state, the loss history and the
iteration, so a run killed at any point and started again with the same arguments continues
from the last checkpoint and ends bit for bit where an uninterrupted run ends (on the same
device, torch build and thread count).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..image import SegXAIInputError
from ..io import atomic_path, check_writable_dir
from ..models.loaders import resolve_device
from ..progress import CancelToken, ProgressCallback, report
from .domains import CounterfactualDomains, PatchGeometry
from .losses import (LossWeights, activation_loss, cycle_loss, discriminator_loss, generator_adversarial_loss,
                     similarity_loss)
from .networks import IntensityFrame, PairDiscriminator, ResidualGenerator
from .scores import Score

__all__ = ["CounterfactualConfig", "CounterfactualGenerators", "CounterfactualTraining", "train_counterfactual",
           "load_counterfactual_generators", "CHECKPOINT_NAME", "HISTORY_COLUMNS"]

CHECKPOINT_NAME = "counterfactual_checkpoint.pt"
FORMAT = "segxai-counterfactual-generators"
#: columns of :attr:`CounterfactualTraining.history`, one row per iteration
HISTORY_COLUMNS = ("discriminator", "cycle", "similarity", "adversarial", "activation", "generator",
                   "score_plus", "score_minus")


@dataclass(frozen=True)
class CounterfactualConfig:
    """Settings of :func:`train_counterfactual`.

    The defaults are a CPU-sized version of the paper's networks (it used U-Net stages of 48,
    96, 192 and 384 channels; Adam settings as CycleGAN's).
    """

    iterations: int = 2000
    batch_size: int = 4
    learning_rate: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weights: LossWeights = LossWeights()
    generator_features: tuple[int, ...] = (32, 64, 128, 256)
    generator_strides: tuple[int, ...] = (2, 2, 2)
    generator_res_units: int = 1
    discriminator_features: tuple[int, ...] = (32, 64, 128)
    ssim_window: int = 7
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        def positive_int(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise SegXAIInputError(f"{name} {value!r}: expected an integer >= {minimum}")

        positive_int("iterations")
        positive_int("batch_size", 2)
        positive_int("checkpoint_every")
        positive_int("ssim_window", 3)
        positive_int("generator_res_units", 0)
        positive_int("seed", 0)
        if not 0 < float(self.learning_rate) < float("inf"):
            raise SegXAIInputError(f"learning_rate {self.learning_rate!r}: expected a number > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise SegXAIInputError(f"betas {self.betas!r}: expected two numbers in [0, 1)")
        if not isinstance(self.weights, LossWeights):
            raise SegXAIInputError("weights: expected a LossWeights")
        for name in ("generator_features", "generator_strides", "discriminator_features"):
            values = getattr(self, name)
            if not values or any(int(v) < 1 for v in values):
                raise SegXAIInputError(f"{name} {values!r}: expected positive integers")

    def to_dict(self) -> dict:
        data = asdict(self)
        return json.loads(json.dumps(data))  # tuples -> lists, JSON-ready

    @classmethod
    def from_dict(cls, data: dict) -> "CounterfactualConfig":
        data = dict(data)
        data["weights"] = LossWeights(**data.get("weights", {}))
        for name in ("betas", "generator_features", "generator_strides", "discriminator_features"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)


@dataclass
class CounterfactualGenerators:
    """The trained pair: ``plus`` (G+, raises the score) and ``minus`` (G-, lowers it).

    ``save(path)`` writes one file (state dicts and JSON metadata, readable with
    ``weights_only=True``); :func:`load_counterfactual_generators` reads it back.
    """

    plus: ResidualGenerator
    minus: ResidualGenerator
    geometry: PatchGeometry
    frame: IntensityFrame
    config: CounterfactualConfig
    class_index: int = 1
    model_name: str = ""

    def metadata(self) -> dict:
        return {"format": FORMAT, "version": 1, "geometry": self.geometry.describe(),
                "frame": {"shift": list(self.frame.shift), "scale": list(self.frame.scale)},
                "config": self.config.to_dict(), "class_index": self.class_index, "model_name": self.model_name}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        state = {"metadata": json.dumps(self.metadata()),
                 "plus": {k: v.detach().cpu() for k, v in self.plus.state_dict().items()},
                 "minus": {k: v.detach().cpu() for k, v in self.minus.state_dict().items()}}
        with atomic_path(path) as temporary:
            torch.save(state, temporary)
        return path

    def to(self, device: str | torch.device) -> "CounterfactualGenerators":
        device = resolve_device(device)
        self.plus.to(device)
        self.minus.to(device)
        return self


def _build_generator(geometry: PatchGeometry, frame: IntensityFrame, config: CounterfactualConfig) -> ResidualGenerator:
    return ResidualGenerator(geometry.spatial_dims, frame, config.generator_features, config.generator_strides,
                             config.generator_res_units)


def load_counterfactual_generators(path: str | Path, device: str | torch.device = "cpu") -> CounterfactualGenerators:
    """Read generators written by :meth:`CounterfactualGenerators.save` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise SegXAIInputError(f"generators {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        metadata = json.loads(state["metadata"])
    except Exception as error:  # pickle, zip or JSON errors
        raise SegXAIInputError(f"generators {path}: cannot be read ({error})") from None
    if metadata.get("format") != FORMAT:
        raise SegXAIInputError(f"generators {path}: not a SegXAI counterfactual generator file")
    geometry = PatchGeometry.from_dict(metadata["geometry"])
    frame = IntensityFrame(tuple(metadata["frame"]["shift"]), tuple(metadata["frame"]["scale"]))
    config = CounterfactualConfig.from_dict(metadata["config"])
    plus, minus = _build_generator(geometry, frame, config), _build_generator(geometry, frame, config)
    plus.load_state_dict(state["plus"])
    minus.load_state_dict(state["minus"])
    result = CounterfactualGenerators(plus.eval(), minus.eval(), geometry, frame, config,
                                      int(metadata["class_index"]), str(metadata.get("model_name", "")))
    return result.to(device)


@dataclass
class CounterfactualTraining:
    """What :func:`train_counterfactual` returns.

    Attributes
    ----------
    generators : CounterfactualGenerators
    discriminators : tuple of PairDiscriminator
        (D+, D-).
    history : numpy.ndarray
        ``(iterations, len(HISTORY_COLUMNS))`` batch means per iteration (:data:`HISTORY_COLUMNS`).
    resumed_from : int
        The checkpoint iteration the run continued from (0: a fresh start).
    seconds : float
        Wall time of this call's iterations.
    """

    generators: CounterfactualGenerators
    discriminators: tuple[PairDiscriminator, PairDiscriminator]
    history: np.ndarray
    resumed_from: int = 0
    seconds: float = 0.0
    columns: tuple[str, ...] = field(default=HISTORY_COLUMNS)


def _checkpoint_state(nets: dict, optimisers: dict, rng: torch.Generator, history: list, iteration: int,
                      fingerprint: str) -> dict:
    state = {name: {k: v.detach().cpu() for k, v in net.state_dict().items()} for name, net in nets.items()}
    state.update({f"optimiser_{name}": opt.state_dict() for name, opt in optimisers.items()})
    state["rng"] = rng.get_state()
    state["history"] = torch.tensor(np.asarray(history, dtype=np.float64).reshape(-1, len(HISTORY_COLUMNS)))
    state["iteration"] = torch.tensor(iteration, dtype=torch.int64)
    state["fingerprint"] = fingerprint
    return state


def train_counterfactual(
    domains: CounterfactualDomains,
    score: Score,
    config: CounterfactualConfig = CounterfactualConfig(),
    checkpoint_dir: Optional[str | Path] = None,
    device: str | torch.device = "cpu",
    model_name: str = "",
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> CounterfactualTraining:
    """Train G+ and G- (and their pair discriminators) against the frozen model's ``score``.

    Parameters
    ----------
    domains : CounterfactualDomains
        Lesion and lesion-free patches (:func:`~SegXAILib.counterfactual.build_domains`); both
        must be non-empty.
    score : Score
        ``(context, generated) -> (B,)`` log-odds of the frozen model
        (:class:`~SegXAILib.counterfactual.SegmentationScore`, :class:`ClassifierScore`); on
        ``device``.
    config : CounterfactualConfig
    checkpoint_dir : path, optional
        Folder for :data:`CHECKPOINT_NAME`, written every ``config.checkpoint_every`` iterations
        and at the end. A checkpoint already there from the same config and domains is resumed
        (one from other settings is an error); a finished one returns at once.
    device : str or torch.device
    model_name : str
        Stored with the generators (the card's name).
    progress, cancel
        Progress callback and cancel token (:mod:`SegXAILib.progress`); ``cancel`` is checked
        before every iteration (the run can be resumed from its last checkpoint).

    Returns
    -------
    CounterfactualTraining
    """
    if not isinstance(domains, CounterfactualDomains):
        raise SegXAIInputError("domains: expected CounterfactualDomains (see build_domains)")
    if len(domains.lesion) == 0 or len(domains.free) == 0:
        raise SegXAIInputError(f"domains: need lesion and lesion-free patches, got {len(domains.lesion)} lesion and "
                               f"{len(domains.free)} lesion-free")
    if not isinstance(config, CounterfactualConfig):
        raise SegXAIInputError("config: expected a CounterfactualConfig")
    geometry = domains.geometry
    factor = int(np.prod(config.generator_strides))
    if any(s % factor for s in geometry.patch_size):
        raise SegXAIInputError(f"patch_size {list(geometry.patch_size)}: every size must divide by "
                               f"{factor} (the product of generator_strides)")
    if min(geometry.patch_size) < config.ssim_window:
        raise SegXAIInputError(f"ssim_window {config.ssim_window}: larger than patch_size {list(geometry.patch_size)}")
    device = resolve_device(device)
    path = None if checkpoint_dir is None else check_writable_dir(checkpoint_dir) / CHECKPOINT_NAME
    fingerprint = json.dumps({"config": config.to_dict(), "domains": domains.fingerprint()}, sort_keys=True)

    frame = IntensityFrame.fit(domains.all_patches())
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, the caller's RNG untouched
        torch.manual_seed(config.seed)
        nets = {"plus": _build_generator(geometry, frame, config), "minus": _build_generator(geometry, frame, config),
                "d_plus": PairDiscriminator(geometry.spatial_dims, frame, config.discriminator_features),
                "d_minus": PairDiscriminator(geometry.spatial_dims, frame, config.discriminator_features)}
    for net in nets.values():
        net.to(device).train()
    generator_parameters = [p for name in ("plus", "minus") for p in nets[name].parameters()]
    discriminator_parameters = [p for name in ("d_plus", "d_minus") for p in nets[name].parameters()]
    optimisers = {"generators": torch.optim.Adam(generator_parameters, config.learning_rate, betas=config.betas),
                  "discriminators": torch.optim.Adam(discriminator_parameters, config.learning_rate, betas=config.betas)}
    rng = torch.Generator().manual_seed(config.seed)
    history: list[list[float]] = []
    start = 0
    if path is not None and path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise SegXAIInputError(f"checkpoint_dir {path.parent}: {path.name} cannot be read ({error})") from None
        if state.get("fingerprint") != fingerprint:
            raise SegXAIInputError(f"checkpoint_dir {path.parent}: its checkpoint was made with another config or "
                                   "other domains; use an empty folder")
        for name, net in nets.items():
            net.load_state_dict(state[name])
        for name, opt in optimisers.items():
            opt.load_state_dict(state[f"optimiser_{name}"])
        rng.set_state(state["rng"])
        history = state["history"].tolist()
        start = int(state["iteration"])

    weights, window = config.weights, config.ssim_window
    g_plus, g_minus, d_plus, d_minus = nets["plus"], nets["minus"], nets["d_plus"], nets["d_minus"]
    began = time.perf_counter()
    for iteration in range(start, config.iterations):
        if cancel is not None:
            cancel.raise_if_cancelled()
        half = config.batch_size // 2
        lesion_rows = torch.randint(len(domains.lesion), (config.batch_size - half,), generator=rng)
        free_rows = torch.randint(len(domains.free), (half,), generator=rng)
        real_plus_rows = torch.randint(len(domains.lesion), (config.batch_size,), generator=rng)
        real_minus_rows = torch.randint(len(domains.free), (config.batch_size,), generator=rng)
        order_plus = torch.randint(2, (config.batch_size,), generator=rng).to(device)
        order_minus = torch.randint(2, (config.batch_size,), generator=rng).to(device)
        x = torch.cat([domains.patches("lesion", lesion_rows), domains.patches("free", free_rows)]).to(device)
        context = torch.cat([domains.contexts("lesion", lesion_rows), domains.contexts("free", free_rows)]).to(device)
        real_plus = domains.patches("lesion", real_plus_rows).to(device)
        real_minus = domains.patches("free", real_minus_rows).to(device)

        # 1. discriminators, on the current generators' output
        with torch.no_grad():
            fake_plus, fake_minus = g_plus(x), g_minus(x)
        loss_d = (discriminator_loss(d_plus, real_plus, fake_plus, order_plus).mean()
                  + discriminator_loss(d_minus, real_minus, fake_minus, order_minus).mean())
        optimisers["discriminators"].zero_grad(set_to_none=True)
        loss_d.backward(inputs=discriminator_parameters)
        optimisers["discriminators"].step()

        # 2. generators (eq. 4 for G+ and G-); gradients reach only their parameters
        fake_plus, fake_minus = g_plus(x), g_minus(x)
        normalise = g_plus.normalise  # losses in the frame's units (the same frame for all four)
        u = normalise(x)
        cycle = (cycle_loss(u, normalise(g_minus(fake_plus)), window)
                 + cycle_loss(u, normalise(g_plus(fake_minus)), window)).mean()
        similarity = (similarity_loss(u, normalise(fake_plus), window)
                      + similarity_loss(u, normalise(fake_minus), window)).mean()
        adversarial = (generator_adversarial_loss(d_plus, real_plus, fake_plus, order_plus)
                       + generator_adversarial_loss(d_minus, real_minus, fake_minus, order_minus)).mean()
        score_plus, score_minus = score(context, fake_plus), score(context, fake_minus)
        activation = (activation_loss(score_plus, 1) + activation_loss(score_minus, 0)).mean()
        loss_g = (weights.cycle * cycle + weights.similarity * similarity + weights.adversarial * adversarial
                  + weights.activation * activation)
        optimisers["generators"].zero_grad(set_to_none=True)
        loss_g.backward(inputs=generator_parameters)
        optimisers["generators"].step()

        history.append([float(v) for v in (loss_d.detach(), cycle.detach(), similarity.detach(),
                                           adversarial.detach(), activation.detach(), loss_g.detach(),
                                           score_plus.detach().mean(), score_minus.detach().mean())])
        done = iteration + 1
        if path is not None and (done % config.checkpoint_every == 0 or done == config.iterations):
            with atomic_path(path) as temporary:
                torch.save(_checkpoint_state(nets, optimisers, rng, history, done, fingerprint), temporary)
        report(progress, done / config.iterations,
               f"counterfactual training {done}/{config.iterations}: generator loss {history[-1][5]:.3f}")

    generators = CounterfactualGenerators(g_plus.eval(), g_minus.eval(), geometry, frame, config,
                                          domains.class_index, model_name)
    return CounterfactualTraining(generators, (d_plus.eval(), d_minus.eval()),
                                  np.asarray(history, dtype=np.float64).reshape(-1, len(HISTORY_COLUMNS)),
                                  start, time.perf_counter() - began)
