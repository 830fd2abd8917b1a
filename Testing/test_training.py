"""Training writes weights and a card atomically, and is reproducible from its seed."""

from __future__ import annotations

import pytest
import torch

from SegXAILib.models import load_model, load_model_card
from SegXAILib.models.card import sha256_of
from SegXAILib.training import DEMO_MODELS, TrainingConfig, train_model


@pytest.fixture(scope="module")
def cases():
    _, card_factory, make_cases, _, _, _ = DEMO_MODELS["parotid-S6"]
    return card_factory, make_cases([0, 1]), make_cases([1000])


def train(folder, cases, seed):
    card_factory, training, heldout = cases
    config = TrainingConfig(iterations=3, batch_size=1, seed=seed)
    return train_model(card_factory(), training, heldout, folder, config)


def test_training_writes_a_loadable_card(tmp_path, cases):
    card = train(tmp_path / "a", cases, seed=0)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.pt", "model_card.json"]
    again = load_model_card(tmp_path / "a")
    assert again.architecture["sha256"] == sha256_of(tmp_path / "a" / "model.pt")
    assert len(again.metrics["dice_heldout_per_case"]) == 1
    assert again.provenance["training"]["iterations"] == 3
    load_model(again, device="cpu")
    assert card.name == again.name


def test_same_seed_same_weights(tmp_path, cases):
    train(tmp_path / "a", cases, seed=7)
    train(tmp_path / "b", cases, seed=7)
    train(tmp_path / "c", cases, seed=8)
    a, b, c = (torch.load(tmp_path / n / "model.pt", weights_only=True) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
