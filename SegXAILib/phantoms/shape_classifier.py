"""A tiny CNN that learns the shape phantoms' rule (:mod:`SegXAILib.phantoms.shapes`).

The classification test case of issue 20 (paper 004's own setting): a frozen two-class
classifier ``(B, 1, H, W) -> (B, 2)`` logits whose decision the counterfactual generators
explain (:class:`~SegXAILib.counterfactual.ClassifierScore`,
:func:`~SegXAILib.counterfactual.classifier_domains`).

Kept out of ``SegXAILib.phantoms``' namespace (import this module) so that the phantoms
themselves need only numpy and SciPy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..image import SegXAIInputError
from .shapes import ShapePatches

__all__ = ["ShapeClassifier", "ShapeClassifierTraining", "train_shape_classifier", "predict_probability"]


class ShapeClassifier(nn.Module):
    """Three 3x3 convolution stages (two 2x max-pools between them), a global max-pool and a
    linear layer to two logits.

    The global max-pool answers "is there an elongated structure anywhere", which the rule
    asks; the last stage's receptive field (18 pixels) covers the longest blob. Inputs are
    normalised by the fixed ``shift`` / ``scale`` buffers (set from the training patches).

    Parameters
    ----------
    channels : int
        Input channels.
    width : int
        Channels of the first stage (then 2x and 4x).

    ``forward(x)``: ``(B, channels, H, W)`` -> ``(B, 2)`` logits.
    """

    def __init__(self, channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))
        w = int(width)
        self.features = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4 * w, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features((x - self.shift) / self.scale)
        return self.head(torch.amax(h, dim=(2, 3)))


@dataclass
class ShapeClassifierTraining:
    """What :func:`train_shape_classifier` returns.

    Attributes
    ----------
    network : ShapeClassifier
        In eval mode, parameters frozen (``requires_grad`` False).
    losses : numpy.ndarray
        ``(epochs,)`` mean training cross-entropy per epoch.
    train_accuracy : float
        Accuracy on the training patches after the last epoch.
    """

    network: ShapeClassifier
    losses: np.ndarray
    train_accuracy: float


def predict_probability(network: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Class-1 probability ``softmax(network(x))[:, 1]`` ``(N,)`` of ``images`` ``(N, C, H, W)``."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out.append(torch.softmax(network(x[start:start + batch_size]), dim=1)[:, 1])
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def train_shape_classifier(patches: ShapePatches, epochs: int = 12, batch_size: int = 32,
                           learning_rate: float = 3e-3, width: int = 8, seed: int = 0) -> ShapeClassifierTraining:
    """Train a :class:`ShapeClassifier` on ``patches`` (CPU, seeded).

    Adam on the cross-entropy with the rule's labels, shuffled mini-batches. Initialisation
    and shuffling come from ``seed`` (the global RNG is left as it was), so the same call gives
    the same network on the same torch build and thread count.

    Parameters
    ----------
    patches : ShapePatches
        Training patches (both classes present).
    epochs, batch_size : int
    learning_rate : float
    width : int
        The network's first-stage channels.
    seed : int

    Returns
    -------
    ShapeClassifierTraining
    """
    if not isinstance(patches, ShapePatches):
        raise SegXAIInputError("patches: expected ShapePatches (make_shape_patches)")
    if len(np.unique(patches.labels)) != 2:
        raise SegXAIInputError("patches: need patches of both classes")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise SegXAIInputError(f"{name} {value!r}: expected an integer >= 1")
    if not 0 < float(learning_rate) < float("inf"):
        raise SegXAIInputError(f"learning_rate {learning_rate!r}: expected a number > 0")
    x = torch.from_numpy(np.ascontiguousarray(patches.images, dtype=np.float32))
    y = torch.from_numpy(patches.labels.astype(np.int64))
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, the caller's RNG untouched
        torch.manual_seed(int(seed))
        network = ShapeClassifier(x.shape[1], width)
    network.shift.fill_(float(x.mean()))
    network.scale.fill_(float(x.std()))
    optimiser = torch.optim.Adam(network.parameters(), lr=float(learning_rate))
    rng = torch.Generator().manual_seed(int(seed))
    losses = []
    network.train()
    for _ in range(int(epochs)):
        order = torch.randperm(len(x), generator=rng)
        total = 0.0
        for start in range(0, len(x), int(batch_size)):
            rows = order[start:start + int(batch_size)]
            loss = F.cross_entropy(network(x[rows]), y[rows])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(rows)
        losses.append(total / len(x))
    network.eval().requires_grad_(False)
    accuracy = float(((predict_probability(network, x) >= 0.5) == patches.labels.astype(bool)).mean())
    return ShapeClassifierTraining(network, np.asarray(losses), accuracy)
