"""Training writes weights and a card atomically, and is reproducible from its seed."""

from __future__ import annotations

import pytest
import torch

from SegXAILib.models import load_model, load_model_card
from SegXAILib.models.card import sha256_of
from SegXAILib.image import SegXAIInputError
from SegXAILib.training import DEMO_MODELS, TrainingConfig, train_model, train_seed_ensemble


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


def test_seed_ensemble_card_lists_each_seeds_member(tmp_path, cases):
    card_factory, training, heldout = cases
    config = TrainingConfig(iterations=3, batch_size=1)
    ensemble = train_seed_ensemble(card_factory(), training, heldout, tmp_path / "seeds", config, [7, 8])
    assert ensemble.weights_files == ["seed7/model.pt", "seed8/model.pt"]
    assert ensemble.provenance["training"]["seeds"] == [7, 8]
    assert len(ensemble.metrics["members_dice_heldout_mean"]) == 2
    # each member is what a single training with that seed gives (training is seeded)
    train(tmp_path / "single7", cases, seed=7)
    single = torch.load(tmp_path / "single7" / "model.pt", weights_only=True)
    member = torch.load(tmp_path / "seeds" / "seed7" / "model.pt", weights_only=True)
    assert all(torch.equal(single[k], member[k]) for k in single)
    loaded = load_model(load_model_card(tmp_path / "seeds"), device="cpu")
    assert len(loaded.networks) == 2
    with pytest.raises(SegXAIInputError, match="seeds"):
        train_seed_ensemble(card_factory(), training, heldout, tmp_path / "bad", config, [3, 3])
