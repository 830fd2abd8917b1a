"""Loading networks named by a model card: MONAI network + state dict, TorchScript, MONAI
bundle, any eager PyTorch network (its Python class + state dict).

Security: state dicts are read with ``torch.load(..., weights_only=True)`` (no pickled code).
A MONAI bundle's configs can instantiate and run arbitrary Python, and a ``python`` card
imports the network's module (which runs it), so both load only with an explicit
``trust_code=True`` (the one name of the flag: ``trust_code`` in case settings,
``--trust-code`` on the command line; the old names ``trust``, ``trust_bundle`` and
``--trust-bundle`` are still accepted).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..image import SegXAIInputError
from .card import CODE_FORMATS, ModelCard, load_model_card, sha256_of

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
    """A network ready for inference, with the card that describes it.

    Attributes
    ----------
    network : torch.nn.Module
        The (first) network: ``networks[0]``, for hooks and the single-network methods.
    card : ModelCard
    device : torch.device
    networks : list of torch.nn.Module
        One network per ensemble member (a fold ensemble lists one state dict per member in
        its card's ``weights``); predictions average their logits. Defaults to ``[network]``.
    """

    network: torch.nn.Module
    card: ModelCard
    device: torch.device
    networks: list[torch.nn.Module] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.networks:
            self.networks = [self.network]
        elif self.networks[0] is not self.network:
            raise ValueError("LoadedModel: network must be networks[0]")

    def to(self, device: str | torch.device) -> "LoadedModel":
        device = resolve_device(device)
        for network in self.networks:
            network.to(device)
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


def _check_checksum(card: ModelCard, path: Path, member: int = 0) -> None:
    expected = card.architecture.get("sha256")
    if isinstance(expected, list):  # a fold ensemble: one checksum per weights file
        expected = expected[member]
    if expected and sha256_of(path) != expected:
        raise SegXAIInputError(
            f"weights {path}: SHA-256 differs from the one in {card.path}; these are not the card's weights"
        )


def _load_weights(card: ModelCard, build: Callable[[], torch.nn.Module], what: str) -> list[torch.nn.Module]:
    """One network per file of the card's ``weights`` (a fold ensemble lists several), each
    built by ``build`` and given its state dict (checksum checked)."""
    networks = []
    for member, relative in enumerate(card.weights_files):
        weights = card.resolve(relative)
        state = load_state_dict_file(weights)
        _check_checksum(card, weights, member)
        network = build()
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            details = " ".join(str(error).split())[:400]
            raise SegXAIInputError(
                f"weights {weights} do not match {what}{card.architecture.get('kwargs', {})}: {details}"
            ) from None
        networks.append(network)
    return networks


def _load_monai(card: ModelCard) -> list[torch.nn.Module]:
    import monai.networks.nets as nets

    arch = card.architecture
    network_class = getattr(nets, arch["name"], None)
    if not (isinstance(network_class, type) and issubclass(network_class, torch.nn.Module)):
        raise SegXAIInputError(f"model card {card.path}: {arch['name']!r} is not a network in monai.networks.nets")

    def build() -> torch.nn.Module:
        try:
            return network_class(**arch.get("kwargs", {}))
        except TypeError as error:
            raise SegXAIInputError(f"model card {card.path}: cannot build {arch['name']}: {error}") from None

    return _load_weights(card, build, arch["name"])


def _refuse_untrusted(card: ModelCard, trust_code: bool) -> None:
    if trust_code:
        return
    arch = card.architecture
    if card.format == "bundle":
        raise SegXAIInputError(
            f"MONAI bundle {card.resolve(arch['path'])}: bundle configs can run arbitrary code; load it only if you "
            "trust its source, with trust_code=True"
        )
    where = f"the file {card.resolve(arch['file'])}" if arch.get("file") else f"the module {arch['name'].split(':')[0]!r}"
    raise SegXAIInputError(
        f"model card {card.path}: format 'python' imports {where}, which runs its code; load it only if you trust "
        "its source, with trust_code=True"
    )


def _python_module(card: ModelCard) -> tuple[object, str]:
    """The module holding a ``python`` card's class (imported, i.e. run) and how to name it."""
    arch = card.architecture
    if not arch.get("file"):
        module_name = arch["name"].split(":")[0]
        try:
            return importlib.import_module(module_name), f"module {module_name!r}"
        except Exception as error:  # the module's own code may raise anything
            raise SegXAIInputError(
                f"model card {card.path}: cannot import the module {module_name!r} ({type(error).__name__}: {error})"
            ) from None
    path = card.resolve(arch["file"])
    if not path.is_file():
        raise SegXAIInputError(f"model card {card.path}: Python file {path}: no such file")
    # a private name per file: two cards' "network.py" must not share a module
    module_name = f"_segxai_card_{hashlib.sha256(str(path).encode()).hexdigest()[:16]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise SegXAIInputError(f"model card {card.path}: Python file {path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look a class's module up there
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        sys.modules.pop(module_name, None)
        raise SegXAIInputError(
            f"model card {card.path}: importing {path} failed ({type(error).__name__}: {error})"
        ) from None
    return module, f"file {path}"


def _load_python(card: ModelCard) -> list[torch.nn.Module]:
    """Any eager network: its class (``module:Class``, or ``Class`` in ``file``), built with
    ``kwargs``, with the state dict ``weights``."""
    arch = card.architecture
    module, where = _python_module(card)
    class_name = arch["name"].split(":")[-1]
    network_class: object = module
    for part in class_name.split("."):
        network_class = getattr(network_class, part, None)
        if network_class is None:
            raise SegXAIInputError(f"model card {card.path}: no class {class_name!r} in the {where}")
    if not (isinstance(network_class, type) and issubclass(network_class, torch.nn.Module)):
        raise SegXAIInputError(f"model card {card.path}: {class_name!r} in the {where} is not a torch.nn.Module class")

    def build() -> torch.nn.Module:
        try:
            return network_class(**arch.get("kwargs", {}))  # type: ignore[operator]
        except Exception as error:  # the constructor is the model's own code
            raise SegXAIInputError(
                f"model card {card.path}: cannot build {class_name}(**{arch.get('kwargs', {})}): "
                f"{type(error).__name__}: {error}"
            ) from None

    return _load_weights(card, build, class_name)


def _load_nnunetv2(card: ModelCard, trust_code: bool) -> list[torch.nn.Module]:
    """One network per fold of an nnU-Net v2 results folder (see :mod:`SegXAILib.models.nnunet`)."""
    from .nnunet import load_nnunet_networks

    return load_nnunet_networks(card, trust_code)


def _load_torchscript(card: ModelCard) -> torch.nn.Module:
    path = card.resolve(card.architecture["file"])
    if not path.is_file():
        raise SegXAIInputError(f"TorchScript file {path}: no such file")
    _check_checksum(card, path)
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as error:
        raise SegXAIInputError(f"TorchScript file {path}: cannot be loaded ({error})") from None


def _load_bundle(card: ModelCard) -> torch.nn.Module:
    folder = card.resolve(card.architecture["path"])
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
    trust_code: bool = False,
    *,
    trust: Optional[bool] = None,
) -> LoadedModel:
    """Build the network a card names, load its weights, put it in eval mode on ``device``.

    Parameters
    ----------
    card : ModelCard or path
        The card, or the path of its JSON (or of the folder holding ``model_card.json``).
    device : str or torch.device
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
    trust_code : bool
        Needed for the formats whose loading runs the model's own code: MONAI bundles (their
        configs) and ``python`` cards (their module is imported); for ``nnunetv2`` cards whose
        checkpoints (pickles) hold objects beyond the ones nnU-Net's trainer writes, or whose
        plans name a network outside ``dynamic_network_architectures``.
    trust : bool, optional
        The former name of ``trust_code`` (either allows).

    Raises
    ------
    SegXAIInputError
        A bundle or ``python`` card without ``trust_code``, naming it; a module, file or class
        that cannot be found or built; weights that do not fit.
    """
    if not isinstance(card, ModelCard):
        card = load_model_card(card)
    torch_device = resolve_device(device)
    if card.format in CODE_FORMATS:
        _refuse_untrusted(card, bool(trust_code or trust))
    loaders = {
        "monai": lambda: _load_monai(card),
        "torchscript": lambda: [_load_torchscript(card)],
        "bundle": lambda: [_load_bundle(card)],
        "python": lambda: _load_python(card),
        # one network per fold; checkpoints are pickles: unknown globals need trust_code
        "nnunetv2": lambda: _load_nnunetv2(card, bool(trust_code or trust)),
    }
    networks = loaders[card.format]()
    for network in networks:
        network.eval().to(torch_device)
    return LoadedModel(network=networks[0], card=card, device=torch_device, networks=networks)
