"""The shipped demo models: cards load, weights are the card's, and the held-out Dice in each
card is what the shipped weights give today on the same seeded phantoms."""

from __future__ import annotations

import numpy as np
import pytest

from SegXAILib.models import load_model, segment
from SegXAILib.models.card import sha256_of
from SegXAILib.pipeline import resolve_model_card
from SegXAILib.sample_data import BUNDLED_MODELS
from SegXAILib.metrics import dice_score
from SegXAILib.training import DEMO_MODELS


@pytest.mark.parametrize("name", sorted(BUNDLED_MODELS))
def test_bundled_card_and_weights(name):
    card = resolve_model_card(name)
    weights = card.resolve(card.architecture["weights"])
    assert sha256_of(weights) == card.architecture["sha256"]
    assert weights.stat().st_size < 5_000_000, "demo weights stay a few MB"
    model = load_model(card, device="cpu")
    assert sum(p.numel() for p in model.network.parameters()) > 1000
    assert card.metrics["dice_heldout_mean"] == pytest.approx(np.mean(card.metrics["dice_heldout_per_case"]), abs=1e-3)
    assert "intended_use" in card.provenance and "training" in card.provenance


@pytest.mark.parametrize("name", sorted(BUNDLED_MODELS))
def test_heldout_dice_in_the_card_is_reproduced(name):
    _, _, make_cases, _, heldout_seeds, _ = DEMO_MODELS[name]
    card = resolve_model_card(name)
    case = make_cases([heldout_seeds[0]])[0]
    prediction = segment(case.image, load_model(card, device="cpu"))
    assert prediction.labels.same_grid(case.image)
    dice = dice_score(prediction.mask(1), case.labels == 1)
    assert dice == pytest.approx(card.metrics["dice_heldout_per_case"][0], abs=2e-3)


def test_lesion_model_is_useful():
    """A floor on the shipped lesion model, so a broken retraining cannot land silently."""
    assert resolve_model_card("lesions").metrics["dice_heldout_mean"] > 0.5
