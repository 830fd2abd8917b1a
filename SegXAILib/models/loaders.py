"""Loading networks named by a model card: MONAI network + state dict, TorchScript, MONAI bundle.

Security: state dicts are read with ``torch.load(..., weights_only=True)`` (no pickled code);
a MONAI bundle's configs can instantiate and run arbitrary Python, so bundles load only with
an explicit ``trust=True``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..image import SegXAIInputError
from .card import ModelCard, load_model_card, sha256_of

__all__ = ["LoadedModel", "load_model", "resolve_device", "load_state_dict_file", "native_cpu_convolutions"]


@contextlib.contextmanager
def native_cpu_convolutions(enabled: bool = True) -> Iterator[None]:
    """Turn oneDNN off for the block (when ``enabled``): on the CPU its Conv3d backward is
    about 3.5x slower than PyTorch's native kernels when training (weight gradients; MONAI
    UNet, 48^3 patches, 2 cores). Input gradients (attribution) are the other way round:
    oneDNN was 2.2x faster there, so attribution leaves it on."""
    if not enabled:
        yield
        return
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) picks CUDA, then Apple MPS, then the CPU; otherwise checks the name.

    Raises SegXAIInputError for an unknown name or a device that is not available here.
    """
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise SegXAIInputError(f"device {device!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SegXAIInputError(f"device {device!r}: CUDA is not available on this machine")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise SegXAIInputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SegXAIInputError(f"device {device!r}: Apple MPS is not available on this machine")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise SegXAIInputError(f"device {device!r}: expected auto, cpu, cuda, cuda:N or mps")
    return resolved


@dataclass
class LoadedModel:
    """A network ready for inference, with the card that describes it."""

    network: torch.nn.Module
    card: ModelCard
    device: torch.device

    def to(self, device: str | torch.device) -> "LoadedModel":
        device = resolve_device(device)
        self.network.to(device)
        self.device = device
        return self


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict with ``weights_only=True``; unwraps ``{"state_dict": ...}`` / ``{"model": ...}``."""
    if not path.is_file():
        raise SegXAIInputError(f"weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors, zip errors, unsafe globals
        raise SegXAIInputError(f"weights {path}: cannot be read as a PyTorch state dict ({error})") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "network"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SegXAIInputError(f"weights {path}: not a state dict of tensors")
    return state


def _check_checksum(card: ModelCard, path: Path) -> None:
    expected = card.architecture.get("sha256")
    if expected and sha256_of(path) != expected:
        raise SegXAIInputError(
            f"weights {path}: SHA-256 differs from the one in {card.path}; these are not the card's weights"
        )


def _load_monai(card: ModelCard) -> torch.nn.Module:
    import monai.networks.nets as nets

    arch = card.architecture
    network_class = getattr(nets, arch["name"], None)
    if not (isinstance(network_class, type) and issubclass(network_class, torch.nn.Module)):
        raise SegXAIInputError(f"model card {card.path}: {arch['name']!r} is not a network in monai.networks.nets")
    try:
        network = network_class(**arch.get("kwargs", {}))
    except TypeError as error:
        raise SegXAIInputError(f"model card {card.path}: cannot build {arch['name']}: {error}") from None
    weights = card.resolve(arch["weights"])
    state = load_state_dict_file(weights)
    _check_checksum(card, weights)
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        details = " ".join(str(error).split())[:400]
        raise SegXAIInputError(f"weights {weights} do not match {arch['name']}{arch.get('kwargs', {})}: {details}") from None
    return network


def _load_torchscript(card: ModelCard) -> torch.nn.Module:
    path = card.resolve(card.architecture["file"])
    if not path.is_file():
        raise SegXAIInputError(f"TorchScript file {path}: no such file")
    _check_checksum(card, path)
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as error:
        raise SegXAIInputError(f"TorchScript file {path}: cannot be loaded ({error})") from None


def _load_bundle(card: ModelCard, trust: bool) -> torch.nn.Module:
    folder = card.resolve(card.architecture["path"])
    if not trust:
        raise SegXAIInputError(
            f"MONAI bundle {folder}: bundle configs can run arbitrary code; load it only if you trust "
            "its source, with trust=True"
        )
    from monai.bundle import ConfigParser

    configs = folder / "configs"
    config = next((configs / f"inference.{ext}" for ext in ("json", "yaml", "yml") if (configs / f"inference.{ext}").is_file()), None)
    if config is None:
        raise SegXAIInputError(f"MONAI bundle {folder}: no configs/inference.json or .yaml")
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(folder)
    network_key = card.architecture.get("network_key", "network_def")
    try:
        network = parser.get_parsed_content(network_key)
    except Exception as error:
        raise SegXAIInputError(f"MONAI bundle {folder}: cannot build {network_key!r} ({error})") from None
    weights = folder / card.architecture.get("weights", "models/model.pt")
    state = load_state_dict_file(weights)
    _check_checksum(card, weights)
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise SegXAIInputError(f"MONAI bundle {folder}: weights do not match the network ({error})") from None
    return network


def load_model(
    card: ModelCard | str | os.PathLike,
    device: str | torch.device | None = "auto",
    trust: bool = False,
) -> LoadedModel:
    """Build the network a card names, load its weights, put it in eval mode on ``device``.

    Parameters
    ----------
    card : ModelCard or path
        The card, or the path of its JSON (or of the folder holding ``model_card.json``).
    device : str or torch.device
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
    trust : bool
        Needed for MONAI bundles, whose configs can execute code.
    """
    if not isinstance(card, ModelCard):
        card = load_model_card(card)
    torch_device = resolve_device(device)
    loaders = {
        "monai": lambda: _load_monai(card),
        "torchscript": lambda: _load_torchscript(card),
        "bundle": lambda: _load_bundle(card, trust),
    }
    network = loaders[card.format]()
    network.eval().to(torch_device)
    return LoadedModel(network=network, card=card, device=torch_device)
