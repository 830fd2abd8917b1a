"""Any PyTorch network through a model card (format ``python``), and guided backprop /
deconvolution on activations called as functions.

Oracles: the network run directly (its class from this file, the same state dict) for the
loaded model's prediction; Captum's LayerGradCam for Grad-CAM on the eager module; for the
functional activations, the module-based twin of each network (same weights, ``nn.ReLU`` /
``nn.LeakyReLU`` / ... modules), whose guided and deconvolution maps are checked against
Captum and closed-form derivatives in ``test_attribution_guided_cam``.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from SegXAILib.attribution.cam import GradCAM, GuidedGradCAM
from SegXAILib.attribution.guided import Deconvolution, GuidedBackprop, backward_rules
from SegXAILib.attribution.targets import ClassTarget
from SegXAILib.image import Image, SegXAIInputError, geometry_matrix
from SegXAILib.models import load_model, load_model_card, segment

from conftest import make_forward

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- the network, written here and saved as a module file -----------------------------------------
class TinyEagerNet(torch.nn.Module):
    """A two-level 3D network that calls its activations as functions."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 4, slope: float = 0.1) -> None:
        super().__init__()
        self.encode = torch.nn.Conv3d(in_channels, width, 3, padding=1)
        self.down = torch.nn.Conv3d(width, 2 * width, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose3d(2 * width, width, 2, stride=2)
        self.head = torch.nn.Conv3d(2 * width, out_channels, 1)
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.encode(x))
        b = F.leaky_relu(self.down(a), self.slope)
        c = torch.relu(self.up(b))
        return self.head(torch.cat([a, c], dim=1))


KWARGS = {"in_channels": 2, "out_channels": 2, "width": 4, "slope": 0.1}
PATCH = (16, 16, 16)


def write_module(folder: Path, module_name: str = "tiny_eager_net", marker: Path | None = None) -> Path:
    """``TinyEagerNet``'s source as ``folder/<module_name>.py``; importing it touches ``marker``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["import torch", "import torch.nn.functional as F", ""]
    if marker is not None:  # evidence that the module ran
        lines += ["import pathlib", f"pathlib.Path({str(marker)!r}).touch()", ""]
    source = "\n".join(lines) + "\n" + textwrap.dedent(inspect.getsource(TinyEagerNet))
    path = folder / f"{module_name}.py"
    path.write_text(source, encoding="utf-8")
    return path


def write_eager_card(folder: Path, architecture: dict, seed: int = 0) -> tuple[Path, dict]:
    """A card with ``architecture`` (weights added) and the state dict it names."""
    torch.manual_seed(seed)
    state = TinyEagerNet(**KWARGS).state_dict()
    torch.save(state, folder / "tiny.pt")
    card = {
        "name": "tiny-eager",
        "architecture": {"format": "python", "kwargs": KWARGS, "weights": "tiny.pt", **architecture},
        "input_channels": ["a", "b"],
        "classes": [{"name": "background"}, {"name": "thing"}],
        "inference": {"patch_size": list(PATCH), "overlap": 0.25, "blend": "constant"},
    }
    (folder / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    return folder / "model_card.json", state


def direct_network(state: dict) -> TinyEagerNet:
    network = TinyEagerNet(**KWARGS)
    network.load_state_dict(state)
    return network.eval()


# ---- loading -----------------------------------------------------------------------------------------
def test_file_card_loads_with_trust_and_predicts_as_the_network(tmp_path):
    write_module(tmp_path)
    path, state = write_eager_card(tmp_path, {"file": "tiny_eager_net.py", "name": "TinyEagerNet"})
    model = load_model(path, device="cpu", trust_code=True)
    assert type(model.network).__name__ == "TinyEagerNet"
    assert not model.network.training
    direct = direct_network(state)
    x = torch.randn(1, 2, *PATCH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # the same float32 operations on the same weights: the same numbers
        assert torch.equal(model.network(x), direct(x))
    # through the runtime: one window (patch = volume, constant blend), no resampling
    image = Image(x[0].numpy(), geometry_matrix((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)))
    result = segment(image, model)
    with torch.no_grad():
        expected = torch.softmax(direct(x), dim=1)[0].numpy()
    np.testing.assert_allclose(result.probabilities.array, expected, rtol=1e-5, atol=1e-6)
    decided = np.abs(expected[1] - expected[0]) > 1e-4
    assert np.array_equal(result.labels.array[0][decided], expected.argmax(0)[decided])


def test_importable_class_and_the_old_trust_name(tmp_path, monkeypatch):
    write_module(tmp_path / "site", "segxai_test_eager_pkg_net")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path, state = write_eager_card(tmp_path, {"name": "segxai_test_eager_pkg_net:TinyEagerNet"})
    model = load_model(path, device="cpu", trust=True)  # the former name of trust_code
    x = torch.randn(1, 2, *PATCH, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model.network(x), direct_network(state)(x))


def test_refused_without_trust_and_nothing_imported(tmp_path):
    marker = tmp_path / "imported"
    write_module(tmp_path, marker=marker)
    path, _ = write_eager_card(tmp_path, {"file": "tiny_eager_net.py", "name": "TinyEagerNet"})
    with pytest.raises(SegXAIInputError, match=r"format 'python' imports the file .*tiny_eager_net\.py.*trust_code=True"):
        load_model(path, device="cpu")
    assert not marker.exists()  # refused before the module ran
    load_model(path, device="cpu", trust_code=True)
    assert marker.exists()


@pytest.mark.parametrize("architecture, message", [
    ({"file": "tiny_eager_net.py", "name": "NoSuchNet"}, r"no class 'NoSuchNet' in the file .*tiny_eager_net\.py"),
    ({"name": "segxai_no_such_module_xyz:TinyEagerNet"}, r"cannot import the module 'segxai_no_such_module_xyz'"),
    ({"file": "missing.py", "name": "TinyEagerNet"}, r"Python file .*missing\.py: no such file"),
    ({"file": "tiny_eager_net.py", "name": "F"}, r"'F' in the file .* is not a torch.nn.Module class"),
])
def test_missing_class_module_or_file_is_named(tmp_path, architecture, message):
    write_module(tmp_path)
    path, _ = write_eager_card(tmp_path, architecture)
    with pytest.raises(SegXAIInputError, match=message):
        load_model(path, device="cpu", trust_code=True)


def test_constructor_and_weights_errors_are_named(tmp_path):
    write_module(tmp_path)
    path, _ = write_eager_card(tmp_path, {"file": "tiny_eager_net.py", "name": "TinyEagerNet"})
    data = json.loads(path.read_text(encoding="utf-8"))
    data["architecture"]["kwargs"] = {"in_channels": 2, "out_channels": 2, "depth": 3}
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(SegXAIInputError, match=r"cannot build TinyEagerNet.*depth"):
        load_model(path, device="cpu", trust_code=True)
    data["architecture"]["kwargs"] = {**KWARGS, "width": 8}
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(SegXAIInputError, match=r"weights .*tiny\.pt do not match TinyEagerNet"):
        load_model(path, device="cpu", trust_code=True)


@pytest.mark.parametrize("architecture, message", [
    ({"name": "TinyEagerNet"}, r"architecture: format 'python': name 'TinyEagerNet' should be 'module.path:Class'"),
    ({"file": "net.py", "name": "pkg:TinyEagerNet"}, r"architecture: format 'python': name 'pkg:TinyEagerNet' should be the class"),
    ({"file": "net.txt", "name": "TinyEagerNet"}, r"architecture: format 'python': file 'net.txt' should be a .py file"),
    ({"file": "net.py"}, r"architecture.name: Field required for format 'python'"),
])
def test_card_validation_of_the_python_format(tmp_path, architecture, message):
    card = {"name": "x", "architecture": {"format": "python", "weights": "w.pt", **architecture},
            "input_channels": ["a"], "classes": [{"name": "bg"}, {"name": "fg"}], "inference": {"patch_size": [8, 8, 8]}}
    (tmp_path / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(SegXAIInputError, match=message):
        load_model_card(tmp_path)


def test_checksum_covers_the_code(tmp_path):
    source = write_module(tmp_path)
    path, _ = write_eager_card(tmp_path, {"file": "tiny_eager_net.py", "name": "TinyEagerNet"})
    before = load_model_card(path).checksum()
    source.write_text(source.read_text(encoding="utf-8") + "\n# changed\n", encoding="utf-8")
    assert load_model_card(path).checksum() != before


def test_flag_names_in_settings_and_cli(tmp_path, capsys):
    from SegXAILib.cli.app import main
    from SegXAILib.pipeline import CaseSettings

    assert CaseSettings.from_dict({"trust_bundle": True}).trust_code  # the former name still reads
    assert CaseSettings(trust_code=True).to_dict()["trust_code"] is True
    write_module(tmp_path)
    path, _ = write_eager_card(tmp_path, {"file": "tiny_eager_net.py", "name": "TinyEagerNet"})
    assert main(["info", str(path), "--load"]) == 2
    err = capsys.readouterr().err
    assert "--trust-code" in err and "'python' model card" in err
    for option in ("--trust-code", "--trust-bundle"):
        assert main(["info", str(path), "--load", option]) == 0
        assert "parameters" in capsys.readouterr().out


# ---- Grad-CAM on the eager module ------------------------------------------------------------------
class _Scalar(torch.nn.Module):
    def __init__(self, network, target):
        super().__init__()
        self.network = network
        self.target = target

    def forward(self, x):
        return self.target(self.network(x))


@pytest.mark.parametrize("layer", ["down", "up", "encode"])
def test_gradcam_on_the_loaded_network_matches_captum(tmp_path, layer):
    from captum.attr import LayerGradCam

    write_module(tmp_path)
    path, _ = write_eager_card(tmp_path, {"file": "tiny_eager_net.py", "name": "TinyEagerNet"})
    network = load_model(path, device="cpu", trust_code=True).network
    x = torch.randn(1, 2, *PATCH, generator=torch.Generator().manual_seed(4))
    target = ClassTarget(1, torch.rand(PATCH, generator=torch.Generator().manual_seed(5)) < 0.2)
    forward = make_forward(network, PATCH, target, in_channels=2)
    module = dict(network.named_modules())[layer]
    layer_map = LayerGradCam(_Scalar(network, target), module).attribute(x, relu_attributions=True)
    expected = F.interpolate(layer_map.detach(), size=PATCH, mode="trilinear", align_corners=False)
    result = GradCAM(forward).attribute(x, layer=layer)
    assert float(expected.max()) > 0
    torch.testing.assert_close(result[:, :1], expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    # the layer options trace the eager module too
    assert GradCAM(forward).attribute(x).shape == x.shape


# ---- activations called as functions ----------------------------------------------------------------
class TinyModuleNet(torch.nn.Module):
    """``TinyEagerNet`` with activation modules (its twin: the same parameters)."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 4, slope: float = 0.1) -> None:
        super().__init__()
        self.encode = torch.nn.Conv3d(in_channels, width, 3, padding=1)
        self.down = torch.nn.Conv3d(width, 2 * width, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose3d(2 * width, width, 2, stride=2)
        self.head = torch.nn.Conv3d(2 * width, out_channels, 1)
        self.act_encode = torch.nn.ReLU()
        self.act_down = torch.nn.LeakyReLU(slope)
        self.act_up = torch.nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act_encode(self.encode(x))
        c = self.act_up(self.up(self.act_down(self.down(a))))
        return self.head(torch.cat([a, c], dim=1))


def same_maps(a: torch.Tensor, b: torch.Tensor) -> None:
    # the same float32 kernels on the same numbers, in the same order: equal to a few roundings of
    # the map's largest value (8 float32 epsilons of it)
    torch.testing.assert_close(a, b, rtol=0.0, atol=8 * torch.finfo(torch.float32).eps * float(b.abs().max()))


@pytest.fixture(scope="module")
def twins():
    torch.manual_seed(21)
    functional = TinyEagerNet(**KWARGS).eval()
    modules = TinyModuleNet(**KWARGS).eval()
    modules.load_state_dict(functional.state_dict())
    x = torch.randn(1, 2, 8, 8, 8, generator=torch.Generator().manual_seed(22))
    target = ClassTarget(1, torch.rand((8, 8, 8), generator=torch.Generator().manual_seed(23)) < 0.1)
    return functional, modules, x, target


@pytest.mark.parametrize("aggregation", ["target", "per_voxel"])
@pytest.mark.parametrize("method", [GuidedBackprop, Deconvolution])
def test_functional_activations_get_the_rules(twins, method, aggregation):
    functional, modules, x, target = twins
    forward = make_forward(functional, (8, 8, 8), target, in_channels=2)
    twin_forward = make_forward(modules, (8, 8, 8), target, in_channels=2)
    result = method(forward).attribute(x, aggregation=aggregation, batch_size=8)
    expected = method(twin_forward).attribute(x, aggregation=aggregation, batch_size=8)
    assert float(expected.abs().max()) > 0
    same_maps(result, expected)
    # the rule matters: not the plain gradient (as it silently was)
    gradient = forward.gradient(x)
    assert (result - gradient).abs().max() > 1e-3 * gradient.abs().max()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in functional.modules())
    assert torch._C._len_torch_function_stack() == 0


def test_guided_gradcam_on_functional_activations(twins):
    functional, modules, x, target = twins
    result = GuidedGradCAM(make_forward(functional, (8, 8, 8), target, in_channels=2)).attribute(
        x, layer="down", aggregation="target")
    expected = GuidedGradCAM(make_forward(modules, (8, 8, 8), target, in_channels=2)).attribute(
        x, layer="down", aggregation="target")
    assert float(expected.abs().max()) > 0
    same_maps(result, expected)


class _OneActivation(torch.nn.Module):
    """conv -> activation (a function given at construction, or a module) -> conv."""

    def __init__(self, activation, module: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.first = torch.nn.Conv3d(1, 3, 3, padding=1)
        self.second = torch.nn.Conv3d(3, 2, 3, padding=1)
        self.prelu_weight = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.7]))
        self.activation = activation
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        h = self.module(h) if self.module is not None else self.activation(self, h)
        return self.second(h)


def _in_place_relu(net, h):
    torch.relu_(h)  # the result is not used: the in-place write must carry the rule
    return h


def _prelu_module():
    module = torch.nn.PReLU(3)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([0.3, -0.2, 0.7]))
    return module


SPELLINGS = {
    "F.relu": (lambda net, h: F.relu(h), torch.nn.ReLU),
    "F.relu_inplace": (lambda net, h: F.relu(h, inplace=True), torch.nn.ReLU),
    "torch.relu": (lambda net, h: torch.relu(h), torch.nn.ReLU),
    "torch.relu_": (_in_place_relu, torch.nn.ReLU),
    "Tensor.relu": (lambda net, h: h.relu(), torch.nn.ReLU),
    "F.leaky_relu": (lambda net, h: F.leaky_relu(h, negative_slope=0.2), lambda: torch.nn.LeakyReLU(0.2)),
    "F.leaky_relu_": (lambda net, h: F.leaky_relu_(h, 0.2), lambda: torch.nn.LeakyReLU(0.2)),
    "F.gelu_tanh": (lambda net, h: F.gelu(h, approximate="tanh"), lambda: torch.nn.GELU(approximate="tanh")),
    "F.silu": (lambda net, h: F.silu(h), torch.nn.SiLU),
    "F.prelu": (lambda net, h: F.prelu(h, net.prelu_weight), _prelu_module),
}


@pytest.mark.parametrize("method", [GuidedBackprop, Deconvolution])
@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_every_spelling_equals_its_module(spelling, method):
    function, make_module = SPELLINGS[spelling]
    torch.manual_seed(31)
    functional = _OneActivation(function).eval()
    twin = _OneActivation(None, make_module()).eval()
    twin.load_state_dict(functional.state_dict(), strict=False)
    x = torch.randn(1, 1, 6, 6, 6, generator=torch.Generator().manual_seed(32))
    target = ClassTarget(1, torch.rand((6, 6, 6), generator=torch.Generator().manual_seed(33)) < 0.3)
    forward = make_forward(functional, (6, 6, 6), target)
    result = method(forward).attribute(x, aggregation="target")
    expected = method(make_forward(twin, (6, 6, 6), target)).attribute(x, aggregation="target")
    assert float(expected.abs().max()) > 0
    same_maps(result, expected)
    gradient = forward.gradient(x)
    assert (result - gradient).abs().max() > 1e-3 * gradient.abs().max()


@pytest.mark.parametrize("call, name", [
    (lambda h: F.elu(h), "torch.nn.functional.elu"),
    (lambda h: torch.sigmoid(h), "torch.sigmoid"),
    (lambda h: h.tanh(), "Tensor.tanh"),
    (lambda h: F.softplus(h), "torch.nn.functional.softplus"),
    (lambda h: F.hardtanh(h), "torch.nn.functional.hardtanh"),
    (lambda h: F.mish(h), "torch.nn.functional.mish"),
])
def test_activation_function_without_rule_is_refused_naming_it(call, name):
    network = _OneActivation(lambda net, h: call(F.relu(h))).eval()
    forward = make_forward(network, (4, 4, 4), ClassTarget(1, torch.ones(4, 4, 4, dtype=torch.bool)))
    x = torch.randn(1, 1, 4, 4, 4)
    for method in (GuidedBackprop, Deconvolution):
        with pytest.raises(SegXAIInputError, match=rf"no backward rule for the activation function {name} called"):
            method(forward).attribute(x, aggregation="target")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in network.modules())
    assert torch._C._len_torch_function_stack() == 0
    forward.gradient(x)  # the plain gradient is untouched


def test_softmax_and_calls_outside_the_forward_keep_their_backward():
    """``softmax`` in the forward keeps its ordinary backward (as ``nn.Softmax``); activation
    calls outside the network's forward (a target, a CAM's relu) are not the network's."""
    torch.manual_seed(41)
    network = _OneActivation(lambda net, h: F.softmax(h, dim=1)).eval()
    x = torch.randn(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(42))
    forward = make_forward(network, (4, 4, 4), ClassTarget(1, torch.ones(4, 4, 4, dtype=torch.bool)))
    # no rectifier in the network: the guided map is the gradient
    torch.testing.assert_close(GuidedBackprop(forward).attribute(x, aggregation="target"), forward.gradient(x))
    z = torch.randn(5, requires_grad=True)
    with backward_rules(network):
        (grad,) = torch.autograd.grad(torch.sigmoid(F.relu(z) - 1.0).sum(), z)
    s = torch.sigmoid(F.relu(z) - 1.0)
    torch.testing.assert_close(grad, (s * (1 - s) * (z > 0)).detach())
