"""Uncertainty of the shipped nnU-Net v2 model: its folds are an ensemble, its mirror axes the
flips. Each sample must be the prediction of one fold (and one flip), as SegXAI's nnU-Net
inference gives it for a model of that fold alone: the mean over samples is checked against
those single-fold predictions, made independently through ``segment``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is not installed (pip install 'SegXAILib[nnunet]')")

from conftest import grid_matrix  # noqa: E402
from test_nnunet_models import _sphere_image  # noqa: E402

from SegXAILib.models import LoadedModel, load_model, segment  # noqa: E402
from SegXAILib.uncertainty import estimate_uncertainty  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEMO = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "nnunet_demo"


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO, device="cpu"), _sphere_image(grid_matrix("oblique"), shape=(24, 28, 18))


def one_fold(model: LoadedModel, fold: int, mirror_axes=None) -> LoadedModel:
    card = model.card
    if mirror_axes is not None:
        card = dataclasses.replace(card, inference={**card.inference, "mirror_axes": list(mirror_axes)})
    return LoadedModel(model.networks[fold], card, model.device)


def test_the_folds_are_the_ensemble_samples(demo):
    model, image = demo
    assert len(model.networks) == 2
    result = estimate_uncertainty(image, model, sources="ensemble")
    assert result.samples == 2
    # each sample: one fold with the card's 8-flip mirroring, mapped back as nnU-Net maps it
    folds = [segment(image, one_fold(model, k)).probabilities.array for k in range(2)]
    expected = (folds[0].astype(np.float64) + folds[1]) / 2
    np.testing.assert_allclose(result.mean_probability.array, expected, atol=1e-5)
    assert result.mean_probability.same_grid(image)
    # two folds trained apart disagree somewhere, never with negative information
    information = result.mutual_information.array
    assert float(information.max()) > 1e-4 and float(information.min()) >= 0.0
    core = [row for row in result.structures if row.structure == "core"][0]
    assert 0.0 < core.pairwise_dice <= 1.0


def test_folds_times_flips(demo):
    model, image = demo
    result = estimate_uncertainty(image, model, sources=["flips", "ensemble"])
    assert result.samples == 2 * 8  # the checkpoint's mirror axes (0, 1, 2)
    # the oracle: each fold's single-flip predictions, the card's mirroring replaced by that flip
    from SegXAILib.models.windows import mirror_combinations

    total = np.zeros_like(result.mean_probability.array, dtype=np.float64)
    for fold in range(2):
        for flips in mirror_combinations(model.card.mirror_axes):
            flipped = one_fold(model, fold, mirror_axes=())
            network = flipped.network
            dims = [a + 2 for a in flips]
            flipped.network = flipped.networks[0] = _Flip(network, dims)
            total += segment(image, flipped).probabilities.array
    np.testing.assert_allclose(result.mean_probability.array, total / 16, atol=1e-5)


class _Flip(torch.nn.Module):
    def __init__(self, network: torch.nn.Module, dims: list[int]) -> None:
        super().__init__()
        self.network, self.dims = network, dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dims:
            return self.network(x)
        return torch.flip(self.network(torch.flip(x, self.dims)), self.dims)
