"""Training the small demo models shipped in ``Resources/Models`` (``segxai train-demo``).

A MONAI 3D UNet is trained on CPU from seeded phantoms, on the model grid the card defines
(orientation, spacing, intensity), with random patches biased towards the foreground and a
Dice + cross-entropy loss. It is evaluated on held-out phantoms through the same inference
path users run (:func:`SegXAILib.models.segment`), and the held-out Dice goes into the card.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .image import Image, SegXAIInputError
from .io import atomic_path, check_writable_dir
from .metrics import dice_score
from .models.card import ModelCard, model_card_from_dict, sha256_of
from .models.inference import segment
from .models.loaders import LoadedModel, load_model, native_cpu_convolutions
from .models.preprocessing import preprocess, preprocess_labels
from .progress import CancelToken, ProgressCallback, report, sub_progress

__all__ = ["TrainingCase", "TrainingConfig", "train_model", "train_seed_ensemble", "DEMO_MODELS", "train_demo_models"]


@dataclass(frozen=True)
class TrainingCase:
    """An input image and its reference label map ``(I, J, K)`` (class indices) on its grid."""

    image: Image
    labels: np.ndarray


@dataclass(frozen=True)
class TrainingConfig:
    iterations: int = 400
    batch_size: int = 2
    learning_rate: float = 2e-3
    foreground_fraction: float = 0.6
    seed: int = 0


def _sample_patch(
    x: torch.Tensor, y: torch.Tensor, patch: Sequence[int], rng: np.random.Generator, foreground: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A patch ``(C, *patch)`` of x and y, centred on a random foreground voxel if asked."""
    shape = np.array(x.shape[1:])
    patch = np.minimum(np.array(patch), shape)
    if foreground and bool((y > 0).any()):
        candidates = torch.nonzero(y[0] > 0).numpy()
        centre = candidates[rng.integers(len(candidates))]
        start = np.clip(centre - patch // 2 + rng.integers(-patch // 4, patch // 4 + 1), 0, shape - patch)
    else:
        start = np.array([rng.integers(0, s - p + 1) for s, p in zip(shape, patch)])
    window = tuple(slice(int(a), int(a + p)) for a, p in zip(start, patch))
    return x[(slice(None), *window)], y[(slice(None), *window)]


def _optimise(network, optimizer, scheduler, loss_function, prepared, card, config, rng, progress, cancel) -> list[float]:
    """The training loop: random patches, one optimiser step each; returns the losses."""
    losses: list[float] = []
    for iteration in range(config.iterations):
        if cancel is not None:
            cancel.raise_if_cancelled()
        pairs = [
            _sample_patch(*prepared[rng.integers(len(prepared))], card.patch_size, rng, rng.random() < config.foreground_fraction)
            for _ in range(config.batch_size)
        ]
        xb = torch.stack([p[0] for p in pairs])
        yb = torch.stack([p[1] for p in pairs])
        optimizer.zero_grad()
        loss = loss_function(network(xb), yb)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        report(progress, 0.85 * (iteration + 1) / config.iterations, f"training {card.name}: loss {np.mean(losses[-20:]):.3f}")
    return losses


def train_model(
    card_data: dict[str, Any],
    train: Sequence[TrainingCase],
    heldout: Sequence[TrainingCase],
    out_dir: str | Path,
    config: TrainingConfig = TrainingConfig(),
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> ModelCard:
    """Train the MONAI network of ``card_data`` and write ``model.pt`` + ``model_card.json``.

    Parameters
    ----------
    card_data : dict
        A model card (format ``monai``); ``weights``, ``sha256`` and ``metrics`` are filled in.
    train, heldout : sequences of TrainingCase
    out_dir : path
        Folder for the weights and the card (written atomically).
    config : TrainingConfig
    """
    from monai.losses import DiceCELoss
    import monai.networks.nets as nets

    if not train:
        raise SegXAIInputError("train_model: no training cases")
    out_dir = check_writable_dir(out_dir)
    card_data = copy.deepcopy(card_data)
    card_data["architecture"]["weights"] = "model.pt"
    card = model_card_from_dict(card_data, out_dir / "model_card.json")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)

    report(progress, 0.0, "preparing training data")
    prepared = []
    for case in train:
        x = preprocess(case.image, card).as_tensor()
        y = preprocess_labels(case.image.with_array(case.labels[None].astype(np.uint8)), card).as_tensor().long()
        prepared.append((x, y))

    arch = card.architecture
    network = getattr(nets, arch["name"])(**arch.get("kwargs", {}))
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.iterations)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    network.train()
    start = time.perf_counter()
    with native_cpu_convolutions():
        losses = _optimise(network, optimizer, scheduler, loss_function, prepared, card, config, rng, progress, cancel)
    train_seconds = time.perf_counter() - start
    network.eval()

    with atomic_path(out_dir / "model.pt") as temporary:
        torch.save(network.state_dict(), temporary)
    card_data["architecture"]["sha256"] = sha256_of(out_dir / "model.pt")

    report(progress, 0.85, "evaluating on held-out cases")
    loaded = LoadedModel(network=network, card=model_card_from_dict(copy.deepcopy(card_data), out_dir / "model_card.json"), device=torch.device("cpu"))
    scores = []
    evaluate_progress = sub_progress(progress, 0.85, 1.0)
    for index, case in enumerate(heldout):
        prediction = segment(case.image, loaded, cancel=cancel)
        per_class = [dice_score(prediction.labels.array[0] == c, case.labels == c) for c in range(1, card.num_classes)]
        scores.append(float(np.mean(per_class)))
        report(evaluate_progress, (index + 1) / len(heldout), "evaluating")
    card_data.setdefault("metrics", {}).update(
        {
            "dice_heldout_mean": round(float(np.mean(scores)), 4) if scores else None,
            "dice_heldout_per_case": [round(s, 4) for s in scores],
            "final_training_loss": round(float(np.mean(losses[-20:])), 4),
        }
    )
    card_data.setdefault("provenance", {}).update(
        {
            "training": {
                "iterations": config.iterations,
                "batch_size": config.batch_size,
                "learning_rate": config.learning_rate,
                "seed": config.seed,
                "training_cases": len(train),
                "heldout_cases": len(heldout),
                "seconds": round(train_seconds, 1),
                "torch": torch.__version__,
            }
        }
    )
    final = model_card_from_dict(card_data, out_dir / "model_card.json")
    final.save(out_dir / "model_card.json")
    report(progress, 1.0, "done")
    return final


def train_seed_ensemble(
    card_data: dict[str, Any],
    train: Sequence[TrainingCase],
    heldout: Sequence[TrainingCase],
    out_dir: str | Path,
    config: TrainingConfig,
    seeds: Sequence[int],
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> ModelCard:
    """A seed ensemble: one :func:`train_model` per seed into ``out_dir/seed<k>/``, then one card
    ``out_dir/model_card.json`` listing every member's weights (an ensemble card: each window's
    logits are the mean over the members), evaluated on ``heldout`` as an ensemble.

    Seeds change the initial weights and the patches drawn, not the data: the members'
    disagreement is the model's epistemic uncertainty that seed ensembles estimate
    (Lakshminarayanan et al. 2017), read by :mod:`SegXAILib.uncertainty`.
    """
    seeds = [int(s) for s in seeds]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise SegXAIInputError(f"seeds {seeds}: an ensemble needs at least two distinct seeds")
    out_dir = check_writable_dir(out_dir)
    members = []
    for position, seed in enumerate(seeds):
        step = sub_progress(progress, 0.9 * position / len(seeds), 0.9 * (position + 1) / len(seeds))
        report(step, 0.0, f"seed {seed}")
        member_config = TrainingConfig(**{**config.__dict__, "seed": seed})
        members.append(train_model(card_data, train, heldout, out_dir / f"seed{seed}", member_config, step, cancel))
    data = copy.deepcopy(card_data)
    data["name"] = f"{data['name']}-seeds"
    data["description"] = f"{data.get('description', '')} (seed ensemble of {len(seeds)}: {seeds})".strip()
    data["architecture"]["weights"] = [f"seed{seed}/model.pt" for seed in seeds]
    data["architecture"]["sha256"] = [member.architecture["sha256"] for member in members]
    card = model_card_from_dict(copy.deepcopy(data), out_dir / "model_card.json")
    report(progress, 0.9, "evaluating the ensemble on held-out cases")
    loaded = load_model(card, device="cpu")
    scores = []
    for case in heldout:
        prediction = segment(case.image, loaded, cancel=cancel)
        scores.append(float(np.mean([dice_score(prediction.labels.array[0] == c, case.labels == c)
                                     for c in range(1, card.num_classes)])))
    data["metrics"] = {
        "dice_heldout_mean": round(float(np.mean(scores)), 4) if scores else None,
        "dice_heldout_per_case": [round(s, 4) for s in scores],
        "members_dice_heldout_mean": [member.metrics.get("dice_heldout_mean") for member in members],
    }
    data.setdefault("provenance", {})["training"] = {
        **members[0].provenance["training"], "seed": None, "seeds": seeds}
    final = model_card_from_dict(data, out_dir / "model_card.json")
    final.save(out_dir / "model_card.json")
    report(progress, 1.0, "done")
    return final


# ---- the bundled demo models ------------------------------------------------------------------

def _lesion_cases(seeds: Sequence[int]) -> list[TrainingCase]:
    from .phantoms import make_lesion_phantom
    from .sample_data import load_sample_head

    head = load_sample_head()
    cases = []
    for seed in seeds:
        phantom = make_lesion_phantom(head, seed=seed)
        cases.append(TrainingCase(phantom.image, phantom.truth.astype(np.uint8)))
    return cases


#: Grid of the parotid phantoms the bundled parotid models are trained on (96 mm field of view).
PAROTID_SHAPE = (32, 32, 32)
PAROTID_SPACING_MM = (3.0, 3.0, 3.0)


def _parotid_cases(variant: str, seeds: Sequence[int]) -> list[TrainingCase]:
    from .phantoms import make_parotid_phantom

    cases = []
    for seed in seeds:
        phantom = make_parotid_phantom(variant, seed=seed, shape=PAROTID_SHAPE, spacing=PAROTID_SPACING_MM)
        cases.append(TrainingCase(phantom.image, phantom.label.array[0].astype(np.uint8)))
    return cases


def _lesion_card() -> dict[str, Any]:
    return {
        "name": "segxai-lesions-demo",
        "version": "1.0.0",
        "description": "Demo white-matter lesion model (FLAIR + T1), trained on SegXAI lesion phantoms built on the bundled T1",
        "architecture": {
            "format": "monai",
            "name": "UNet",
            "kwargs": {
                "spatial_dims": 3,
                "in_channels": 2,
                "out_channels": 2,
                "channels": [8, 16, 32, 64],
                "strides": [2, 2, 2],
                "num_res_units": 1,
            },
        },
        "input_channels": ["FLAIR", "T1"],
        "classes": [{"name": "background", "color": [0, 0, 0]}, {"name": "lesion", "color": [230, 70, 50]}],
        "preprocessing": {
            "orientation": "RAS",
            "spacing": [2.0, 3.0, 2.0],
            "intensity": [{"kind": "zscore", "nonzero": True}],
        },
        "inference": {"patch_size": [48, 32, 48], "overlap": 0.25, "blend": "gaussian", "sw_batch_size": 2},
        "output_activation": "softmax",
        "provenance": {
            "data": "SegXAI lesion phantoms (SegXAILib.phantoms.make_lesion_phantom) on the ITK example T1",
            "intended_use": "demonstration and tests of SegXAI only; not for clinical use",
        },
    }


def _parotid_card(variant: str) -> dict[str, Any]:
    return {
        "name": f"segxai-parotid-{variant}",
        "version": "1.0.0",
        "description": f"Parotid-like phantom model, variant {variant} (sphere = gland, rod = mandible)",
        "architecture": {
            "format": "monai",
            "name": "UNet",
            "kwargs": {
                "spatial_dims": 3,
                "in_channels": 1,
                "out_channels": 2,
                "channels": [8, 16, 32],
                "strides": [2, 2],
                "num_res_units": 1,
            },
        },
        "input_channels": ["CT"],
        "classes": [{"name": "background", "color": [0, 0, 0]}, {"name": "gland", "color": [60, 160, 230]}],
        "preprocessing": {"orientation": "RAS", "spacing": None, "intensity": []},
        "inference": {"patch_size": [32, 32, 32], "overlap": 0.25, "blend": "gaussian", "sw_batch_size": 1},
        "output_activation": "softmax",
        "provenance": {
            "data": f"SegXAI parotid phantoms, variant {variant} (SegXAILib.phantoms.make_parotid_phantom)",
            "intended_use": "attribution tests with a known ground truth; not for clinical use",
        },
    }


#: name -> (folder under Resources/Models, card, case factory, training seeds, held-out seeds, config)
DEMO_MODELS: dict[str, tuple[str, Callable[[], dict], Callable[[Sequence[int]], list], range, range, TrainingConfig]] = {
    "lesions": ("lesions", _lesion_card, _lesion_cases, range(0, 48), range(1000, 1004), TrainingConfig(iterations=800, seed=0)),
    **{
        f"parotid-{v}": (
            f"parotid_{v}",
            (lambda v=v: _parotid_card(v)),
            (lambda seeds, v=v: _parotid_cases(v, seeds)),
            range(0, 400),
            range(1000, 1008),
            TrainingConfig(iterations=1500, batch_size=2, foreground_fraction=0.0, seed=0),
        )
        for v in ("S2", "S4", "S6")
    },
}


def train_demo_models(
    out_dir: str | Path,
    names: Sequence[str] | None = None,
    iterations: int | None = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    seeds: Sequence[int] | None = None,
) -> dict[str, ModelCard]:
    """Train the bundled demo models (all, or ``names``) into ``out_dir/<folder>``; with
    ``seeds``, a seed ensemble of each (:func:`train_seed_ensemble`) into ``out_dir/<folder>_seeds``."""
    names = list(names or DEMO_MODELS)
    unknown = [n for n in names if n not in DEMO_MODELS]
    if unknown:
        raise SegXAIInputError(f"names: unknown {unknown}; choose from {sorted(DEMO_MODELS)}")
    cards = {}
    for position, name in enumerate(names):
        folder, card_factory, cases, train_seeds, heldout_seeds, config = DEMO_MODELS[name]
        if iterations is not None:
            config = TrainingConfig(**{**config.__dict__, "iterations": iterations})
        step = sub_progress(progress, position / len(names), (position + 1) / len(names))
        report(step, 0.0, f"{name}: making phantoms")
        if seeds:
            cards[name] = train_seed_ensemble(card_factory(), cases(train_seeds), cases(heldout_seeds),
                                              Path(out_dir) / f"{folder}_seeds", config, seeds, step, cancel)
            continue
        cards[name] = train_model(
            card_factory(), cases(train_seeds), cases(heldout_seeds), Path(out_dir) / folder, config, step, cancel
        )
    return cards
