"""Guided backprop, deconvolution, Grad-CAM, Grad-CAM++ and the guided variants: oracles and axioms.

Oracles: Captum (GuidedBackprop, Deconvolution, LayerGradCam, GuidedGradCam) on a MONAI UNet
with ReLU; hand-computed Grad-CAM / Grad-CAM++ on a two-layer linear network; an independent
numpy Grad-CAM++ closed form (pytorch-grad-cam imports torchvision, which cannot be installed
beside this torch); closed-form activation derivatives for the guided rules; a python loop of
single-voxel backward passes for the per-voxel aggregation. Axioms: linearity of the plain
per-voxel sum, PReLU with zero slopes = ReLU, multi-window CAM support and sign, and a
paper-000 proxy on the shipped S2 model (guided mass at the rod's tip).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from SegXAILib.attribution.cam import (
    GradCAM,
    GradCAMPlusPlus,
    GuidedGradCAM,
    GuidedGradCAMPlusPlus,
    cam_from_layer,
    resolve_layers,
    trace_conv_layers,
)
from SegXAILib.attribution.forward import SegmentationForward
from SegXAILib.attribution.guided import Deconvolution, GuidedBackprop, backward_rules, per_voxel_sum
from SegXAILib.attribution.targets import ClassTarget, RegionTarget, VoxelTarget
from SegXAILib.image import SegXAIInputError


from conftest import make_forward


# ---- helpers -------------------------------------------------------------------------------------
def unet(act="relu", seed: int = 0, in_channels: int = 1):
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=2, channels=(4, 8), strides=(2,),
                num_res_units=1, act=act).eval()


def random_mask(shape, fraction=0.2, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) < fraction


class ScalarTarget(torch.nn.Module):
    """``x -> T(network(x))`` ``(B,)``: the function Captum explains."""

    def __init__(self, network, target):
        super().__init__()
        self.network = network
        self.target = target

    def forward(self, x):
        return self.target(self.network(x))


def close(a: torch.Tensor, b: torch.Tensor, rtol=1e-4, atol_scale=1e-5) -> bool:
    atol = atol_scale * float(b.abs().max()) + 1e-12
    return torch.allclose(a, b, rtol=rtol, atol=atol)


# ---- Captum oracles ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def relu_case():
    network = unet("relu", seed=3, in_channels=2)
    x = torch.randn(1, 2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    target = ClassTarget(1, random_mask((16, 16, 16), 0.2, seed=2))
    return network, x, target


@pytest.mark.parametrize("ours, theirs", [(GuidedBackprop, "GuidedBackprop"), (Deconvolution, "Deconvolution")])
def test_guided_and_deconvolution_match_captum(relu_case, ours, theirs):
    import captum.attr

    network, x, target = relu_case
    forward = make_forward(network, (16, 16, 16), target, in_channels=2)
    expected = getattr(captum.attr, theirs)(ScalarTarget(network, target)).attribute(x.clone().requires_grad_(True))
    result = ours(forward).attribute(x, aggregation="target")
    assert result.shape == x.shape
    assert float(expected.abs().max()) > 0
    assert close(result, expected.detach())
    # and the rule matters: the map is not the plain gradient
    assert not torch.allclose(result, forward.gradient(x), atol=1e-6)


# layers not followed by an InstanceNorm (see test_gradcam_weights_vanish_before_instance_norm) and
# a block output (any module giving a 5D tensor)
@pytest.mark.parametrize("layer", ["model.0.residual", "model.1.submodule.residual", "model.2.1.conv.unit0.conv",
                                   "model.1.submodule"])
def test_gradcam_matches_captum_layer_gradcam(relu_case, layer):
    from captum.attr import LayerGradCam

    network, x, target = relu_case
    forward = make_forward(network, (16, 16, 16), target, in_channels=2)
    module = dict(network.named_modules())[layer]
    layer_map = LayerGradCam(ScalarTarget(network, target), module).attribute(x, relu_attributions=True)
    expected = F.interpolate(layer_map.detach(), size=(16, 16, 16), mode="trilinear", align_corners=False)
    result = GradCAM(forward).attribute(x, layer=layer)
    assert result.shape == x.shape
    assert torch.equal(result[:, 0], result[:, 1])  # one map broadcast to both channels
    assert float(expected.max()) > 0
    assert close(result[:, :1], expected)


def test_guided_gradcam_matches_captum(relu_case):
    from captum.attr import GuidedGradCam

    network, x, target = relu_case
    forward = make_forward(network, (16, 16, 16), target, in_channels=2)
    layer = "model.0.residual"
    module = dict(network.named_modules())[layer]
    expected = GuidedGradCam(ScalarTarget(network, target), module).attribute(
        x.clone().requires_grad_(True), interpolate_mode="trilinear"
    )
    result = GuidedGradCAM(forward).attribute(x, layer=layer, aggregation="target")
    assert float(expected.abs().max()) > 0
    assert close(result, expected.detach())


def test_cam_fitting_in_a_padded_window_is_the_plain_cam(relu_case):
    """A 12^3 volume in a 16^3 patch: one window on the replicate-padded input, cropped."""
    from captum.attr import LayerGradCam

    network, x, _ = relu_case
    x = x[:, :, 2:14, 2:14, 2:14].contiguous()
    target = ClassTarget(1, random_mask((12, 12, 12), 0.3, seed=5))
    forward = make_forward(network, (12, 12, 12), target, patch=(16, 16, 16), in_channels=2)
    layer = "model.1.submodule"
    padded = F.pad(x, (2, 2, 2, 2, 2, 2), mode="replicate")
    padded_target = ClassTarget(1, F.pad(target.mask[None, None].float(), (2,) * 6)[0, 0] > 0.5)
    layer_map = LayerGradCam(ScalarTarget(network, padded_target), dict(network.named_modules())[layer]).attribute(
        padded, relu_attributions=True
    )
    expected = F.interpolate(layer_map.detach(), size=(16, 16, 16), mode="trilinear", align_corners=False)
    expected = expected[:, :, 2:14, 2:14, 2:14]
    result = GradCAM(forward).attribute(x, layer=layer)
    assert result.shape == x.shape
    assert close(result[:, :1], expected)


# ---- hand-computed Grad-CAM / Grad-CAM++ -----------------------------------------------------------
def hand_network() -> torch.nn.Module:
    """Layer "0": A_1 = x, A_2 = -x; head "1": class-1 logit = 2 A_1 + A_2 (class 0: 0)."""
    layer = torch.nn.Conv3d(1, 2, 1, bias=False)
    head = torch.nn.Conv3d(2, 2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1, 1))
        head.weight.copy_(torch.tensor([[0.0, 0.0], [2.0, 1.0]]).view(2, 2, 1, 1, 1))
    return torch.nn.Sequential(layer, head)


def test_gradcam_and_gradcam_plusplus_by_hand():
    x = torch.arange(1.0, 9.0).view(1, 1, 2, 2, 2)  # sum 36
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask.view(-1)[:2] = True  # two target voxels
    forward = make_forward(hand_network(), (2, 2, 2), ClassTarget(1, mask), blend="constant", overlap=0.0)
    # g_1 = 2 on the mask, g_2 = 1 on the mask, 0 elsewhere.
    # Grad-CAM: w_1 = 2 * 2 / 8 = 0.5, w_2 = 1 * 2 / 8 = 0.25; map = relu(0.5 x - 0.25 x) = 0.25 x
    assert torch.allclose(GradCAM(forward).attribute(x, layer="0"), 0.25 * x, atol=1e-6)
    # Grad-CAM++: channel 1: alpha = 4 / (2*4 + 36*8) = 1/74 on the mask (0 off it: 0/0),
    # w_1 = 2 voxels * 1/74 * relu(2) = 2/37; channel 2: alpha = 1 / (2 + (-36)*1) = -1/34,
    # w_2 = 2 * (-1/34) * 1 = -1/17; map = relu(2/37 x + (-1/17)(-x)) = 71/629 x
    assert torch.allclose(GradCAMPlusPlus(forward).attribute(x, layer="0"), 71.0 / 629.0 * x, atol=1e-6)


def numpy_cam(a: np.ndarray, g: np.ndarray, plusplus: bool) -> np.ndarray:
    """Independent oracle: Selvaraju / Chattopadhay closed forms on (K, d, h, w) arrays."""
    a = a.astype(np.float64)
    g = g.astype(np.float64)
    if not plusplus:
        weights = np.array([g[k].mean() for k in range(g.shape[0])])
    else:
        weights = np.zeros(g.shape[0])
        for k in range(g.shape[0]):
            total = a[k].sum()
            num = g[k] ** 2
            den = 2 * g[k] ** 2 + total * g[k] ** 3
            alpha = np.zeros_like(num)
            np.divide(num, den, out=alpha, where=den != 0)
            weights[k] = (alpha * np.maximum(g[k], 0)).sum()
    return np.maximum(np.tensordot(weights, a, axes=1), 0)


@pytest.mark.parametrize("plusplus", [False, True])
def test_cam_against_numpy_closed_form(plusplus):
    torch.manual_seed(7)
    network = torch.nn.Sequential(
        torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv3d(4, 6, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.ConvTranspose3d(6, 4, 2, stride=2), torch.nn.ReLU(),
        torch.nn.Conv3d(4, 2, 1),
    ).eval()
    x = torch.randn(1, 2, 12, 12, 12, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        margin = network(x)[0, 1] - network(x)[0, 0]
    target = ClassTarget(1, margin > margin.median())  # a class-level mask of half the voxels
    forward = make_forward(network, (12, 12, 12), target, in_channels=2)
    # oracle: activations of layer "2" and dT/dA by splitting the network there
    with torch.no_grad():
        a = network[:3](x)
    leaf = a.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(target(network[3:](leaf)).sum(), leaf)
    layer_map = numpy_cam(a[0].numpy(), g[0].numpy(), plusplus)
    assert layer_map.max() > 0
    expected = F.interpolate(torch.from_numpy(layer_map).float()[None, None], size=(12, 12, 12), mode="trilinear",
                             align_corners=False)
    method = GradCAMPlusPlus if plusplus else GradCAM
    result = method(forward).attribute(x, layer="2")
    # float32 weights (means of signed gradients) against the float64 oracle
    assert close(result[:, :1], expected, rtol=1e-3, atol_scale=1e-4)
    # the internal per-layer function agrees before upsampling too
    assert np.allclose(cam_from_layer(a, g, "gradcam_plusplus" if plusplus else "gradcam")[0, 0].numpy(), layer_map,
                       rtol=1e-3, atol=1e-4 * layer_map.max())


def test_guided_gradcam_plusplus_is_the_product():
    network = unet("prelu", seed=4)
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    forward = make_forward(network, (16, 16, 16), ClassTarget(1, random_mask((16, 16, 16), 0.2, 4)))
    for guided_cls, cam_cls in ((GuidedGradCAMPlusPlus, GradCAMPlusPlus), (GuidedGradCAM, GradCAM)):
        result = guided_cls(forward).attribute(x, layer="final", aggregation="target")
        expected = GuidedBackprop(forward).attribute(x, aggregation="target") * cam_cls(forward).attribute(x, layer="final")
        assert torch.allclose(result, expected)
        assert float(result.abs().max()) > 0


# ---- layer selection -------------------------------------------------------------------------------
def test_layer_options_on_a_monai_unet():
    from monai.networks.nets import UNet

    network = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                   num_res_units=1).eval()
    order, out_channels = trace_conv_layers(network, 1, (16, 16, 16))
    names = [info.name for info in order]
    modules = dict(network.named_modules())
    convs = {n for n, m in modules.items() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))}
    # one layer per convolution: its feature map after norm + PReLU, or the convolution itself
    # where no activation follows (residual projections, the output convolution)
    assert out_channels == 2 and len(names) == len(convs)
    assert all(isinstance(modules[n], (torch.nn.Conv3d, torch.nn.ConvTranspose3d, torch.nn.PReLU)) for n in names)
    assert "model.0.conv.unit0.adn.A" in names and "model.0.conv.unit0.conv" not in names
    assert "model.0.residual" in names and "model.2.1.conv.unit0.conv" in names
    assert resolve_layers(network, "all_conv", 1, (16, 16, 16)) == names
    # the head: the trailing layers with 2 channels (ConvTranspose3d(., 2) + its PReLU, Conv3d(2, 2))
    (final,) = resolve_layers(network, "final", 1, (16, 16, 16))
    assert final == "model.1.submodule.2.1.conv.unit0.adn.A"
    info = {i.name: i for i in order}
    assert info[final].out_channels != 2 and all(i.out_channels == 2 for i in order[names.index(final) + 1:])
    bottleneck = resolve_layers(network, "bottleneck_decoder", 1, (16, 16, 16))
    smallest = min(i.voxels for i in order)
    assert info[bottleneck[0]].voxels == smallest
    assert all(i.voxels > smallest for i in order[: names.index(bottleneck[0])])
    assert bottleneck == names[names.index(bottleneck[0]):]
    assert bottleneck[0] == "model.1.submodule.0.residual"  # 4^3; MONAI runs the residual branch first
    assert "model.2.1.conv.unit0.conv" in bottleneck and "model.0.residual" not in bottleneck


def test_gradcam_weights_vanish_before_instance_norm(relu_case):
    """InstanceNorm(A + c) = InstanceNorm(A) per channel, so sum_space dT/dA_k = 0: Grad-CAM of a
    convolution followed by an InstanceNorm (every MONAI UNet convolution but the residual ones and
    the last) is 0 up to rounding, while Grad-CAM++ (weights from relu(g)) is not."""
    network, x, target = relu_case
    forward = make_forward(network, (16, 16, 16), target, in_channels=2)
    layer = "model.1.submodule.conv.unit0.conv"
    block = GradCAM(forward).attribute(x, layer="model.1.submodule")
    assert float(GradCAM(forward).attribute(x, layer=layer).max()) < 1e-4 * float(block.max())
    assert float(GradCAMPlusPlus(forward).attribute(x, layer=layer).max()) > 0


def test_layer_means_and_unknown_layer():
    network = unet("prelu", seed=5)
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    forward = make_forward(network, (16, 16, 16), ClassTarget(1, random_mask((16, 16, 16), 0.2, 5)))
    names = resolve_layers(network, "bottleneck_decoder", 1, (16, 16, 16))
    mean = torch.stack([GradCAM(forward).attribute(x, layer=n) for n in names]).mean(0)
    assert torch.allclose(GradCAM(forward).attribute(x), mean, atol=1e-6 * float(mean.max()))
    with pytest.raises(SegXAIInputError, match=r"model\.0\.(residual|conv\.unit0\.conv)"):
        GradCAM(forward).attribute(x, layer="model.9.nothing")


# ---- guided rules ---------------------------------------------------------------------------------
def _manual_guided(activation, derivative, x, target, deconvolution=False):
    """conv1^T(rule(conv2^T(dT/dy))) by hand for Sequential(conv1, activation, conv2)."""
    conv1, conv2 = activation_network(activation)[0], activation_network(activation)[2]
    xin = x.clone().requires_grad_(True)
    pre = conv1(xin)
    post = activation(pre.detach().clone()).requires_grad_(True)
    (g,) = torch.autograd.grad(target(conv2(post)).sum(), post)
    signal = F.relu(g) if deconvolution else F.relu(derivative(pre.detach()) * g)
    (result,) = torch.autograd.grad(pre, xin, grad_outputs=signal)
    return result


_NETWORKS: dict = {}


def activation_network(activation):
    key = id(activation)
    if key not in _NETWORKS:
        torch.manual_seed(11)
        _NETWORKS[key] = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), activation, torch.nn.Conv3d(3, 2, 3, padding=1)).eval()
    return _NETWORKS[key]


def _prelu_per_channel():
    module = torch.nn.PReLU(3)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([0.3, -0.2, 0.7]))
    return module


def _phi(x):
    return torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _Phi(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def _swish(alpha):
    from monai.networks.blocks.activation import Swish

    return Swish(alpha)


RULE_CASES = {
    "relu": (lambda: torch.nn.ReLU(inplace=True), lambda x: (x > 0).float()),
    "leaky": (lambda: torch.nn.LeakyReLU(0.2), lambda x: torch.where(x > 0, 1.0, 0.2)),
    "prelu_channels": (_prelu_per_channel, lambda x: torch.where(x > 0, torch.ones_like(x),
                                                                  torch.tensor([0.3, -0.2, 0.7]).view(1, 3, 1, 1, 1).expand_as(x))),
    "gelu": (torch.nn.GELU, lambda x: _Phi(x) + x * _phi(x)),
    "silu": (torch.nn.SiLU, lambda x: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x)))),
    "monai_swish": (lambda: _swish(1.5), lambda x: torch.sigmoid(1.5 * x) * (1 + 1.5 * x * (1 - torch.sigmoid(1.5 * x)))),
}


@pytest.mark.parametrize("deconvolution", [False, True])
@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_rules_against_closed_form_derivatives(case, deconvolution):
    make, derivative = RULE_CASES[case]
    activation = make()
    network = activation_network(activation)
    x = torch.randn(1, 1, 6, 6, 6, generator=torch.Generator().manual_seed(12))
    target = ClassTarget(1, random_mask((6, 6, 6), 0.4, 12))
    forward = make_forward(network, (6, 6, 6), target)
    method = Deconvolution if deconvolution else GuidedBackprop
    result = method(forward).attribute(x, aggregation="target")
    expected = _manual_guided(activation, derivative, x, target, deconvolution)
    assert float(expected.abs().max()) > 0
    assert close(result, expected)
    assert getattr(activation, "inplace", False) == (case == "relu")  # restored


def test_prelu_differs_from_gradient_and_zero_slopes_equal_relu():
    prelu = unet("prelu", seed=6)
    relu = unet("relu", seed=6)
    relu.load_state_dict({k: v for k, v in prelu.state_dict().items() if not k.endswith("A.weight")})
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(6))
    target = ClassTarget(1, random_mask((16, 16, 16), 0.2, 6))
    prelu_forward = make_forward(prelu, (16, 16, 16), target)
    guided = GuidedBackprop(prelu_forward).attribute(x, aggregation="target")
    assert float(guided.abs().max()) > 0
    assert not torch.allclose(guided, prelu_forward.gradient(x), atol=1e-6)
    for module in prelu.modules():
        if isinstance(module, torch.nn.PReLU):
            torch.nn.init.zeros_(module.weight)
    with torch.no_grad():
        assert torch.allclose(prelu(x), relu(x), atol=1e-6)
    zero_slopes = GuidedBackprop(prelu_forward).attribute(x, aggregation="target")
    with_relu = GuidedBackprop(make_forward(relu, (16, 16, 16), target)).attribute(x, aggregation="target")
    assert close(zero_slopes, with_relu)


@pytest.mark.parametrize("make, type_name", [
    (torch.nn.ELU, "ELU"), (torch.nn.Tanh, "Tanh"), (torch.nn.Sigmoid, "Sigmoid"), (torch.nn.ReLU6, "ReLU6"),
    (torch.nn.Mish, "Mish"), (lambda: __import__("monai.networks.blocks.activation", fromlist=["Mish"]).Mish(), "Mish"),
])
def test_unsupported_activation_raises_naming_it(make, type_name):
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.Sequential(torch.nn.ReLU(), make())).eval()
    forward = make_forward(network, (4, 4, 4), ClassTarget(1, random_mask((4, 4, 4), 0.5, 0)))
    x = torch.randn(1, 1, 4, 4, 4)
    for method in (GuidedBackprop, Deconvolution, GuidedGradCAM):
        kwargs = {"layer": "0"} if method is GuidedGradCAM else {}  # only the CAM has a layer
        with pytest.raises(SegXAIInputError, match=rf"'1\.1' \({type_name}\)"):
            method(forward).attribute(x, **kwargs)
    # nothing is left hooked
    assert not any(m._forward_hooks for m in network.modules())


def test_torchscript_networks(tmp_path):
    from conftest import write_voxelwise_card

    from SegXAILib.models import load_model
    from SegXAILib.pipeline import resolve_model_card

    model = load_model(resolve_model_card(str(write_voxelwise_card(tmp_path / "v"))), "cpu")
    x = torch.randn(1, 1, 16, 16, 16)
    forward = SegmentationForward(model.network, model.card, (16, 16, 16), ClassTarget(1, x[0, 0] > 0))
    # a single convolution has no activation: guided backprop is its gradient
    assert torch.allclose(GuidedBackprop(forward).attribute(x), forward.gradient(x))
    with pytest.raises(SegXAIInputError, match="TorchScript"):
        GradCAM(forward).attribute(x)
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.ReLU()))
    with pytest.raises(SegXAIInputError, match="relu"):
        with backward_rules(scripted):
            pass


# ---- per-voxel aggregation ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_case():
    torch.manual_seed(13)
    network = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.PReLU(), torch.nn.Conv3d(4, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv3d(4, 2, 3, padding=1),
    ).eval()
    x = torch.randn(1, 1, 6, 6, 6, generator=torch.Generator().manual_seed(13))
    mask = random_mask((6, 6, 6), 0.04, 13)
    return network, x, mask


@pytest.mark.parametrize("rule", ["guided", "deconvolution"])
def test_per_voxel_equals_a_loop_of_single_voxel_passes(tiny_case, rule):
    network, x, mask = tiny_case
    voxels = [tuple(int(i) for i in v) for v in torch.nonzero(mask)]
    assert 3 <= len(voxels) <= 20
    method = GuidedBackprop if rule == "guided" else Deconvolution
    forward = make_forward(network, (6, 6, 6), RegionTarget(1, mask))
    loop = sum(method(make_forward(network, (6, 6, 6), VoxelTarget(1, v, (6, 6, 6)))).attribute(x) for v in voxels)
    for batch_size in (2, 64):
        result = method(forward).attribute(x, aggregation="per_voxel", batch_size=batch_size)
        assert close(result, loop)
    # the rule is non-linear in the backward signal: the summed target differs
    assert not torch.allclose(method(forward).attribute(x, aggregation="target"), loop, atol=1e-6)


def test_per_voxel_plain_gradient_is_linear(tiny_case):
    network, x, mask = tiny_case
    forward = make_forward(network, (6, 6, 6), RegionTarget(1, mask))
    assert close(per_voxel_sum(forward, x, rule=None, batch_size=4), forward.gradient(x))


# ---- sliding windows --------------------------------------------------------------------------------
def test_multi_window_cam_is_supported_where_windows_ran():
    network = unet("prelu", seed=9)
    shape = (28, 28, 28)
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[1:5, 2:6, 1:4] = True  # one corner
    forward = make_forward(network, shape, ClassTarget(1, mask), patch=(16, 16, 16))
    windowed = forward.windowed
    assert len(windowed.windows) > 1
    ran = windowed.windows_for(mask)
    assert 0 < len(ran) < len(windowed.windows)
    covered = torch.zeros(windowed.padded_shape, dtype=torch.bool)
    for index in ran:
        covered[windowed.windows[index]] = True
    covered = covered[windowed._crop_slices()]
    for method in (GradCAM, GradCAMPlusPlus):
        result = method(forward).attribute(x, layer="all_conv")
        assert result.shape == x.shape
        assert bool(torch.isfinite(result).all()) and float(result.min()) >= 0
        assert float(result[0, 0][~covered].abs().max()) == 0
        assert float(result[0, 0][covered].max()) > 0


# ---- paper-000 proxy: the shipped S2 model -----------------------------------------------------------
def _ball_mass(values: np.ndarray, centre, radius: float) -> float:
    grid = np.indices(values.shape)
    distance2 = sum((grid[axis] - centre[axis]) ** 2 for axis in range(3))
    return float(values[distance2 <= radius * radius].sum())


def test_s2_guided_backprop_mass_at_the_rod_tip():
    """Paper 000, S2 (no sphere contrast, rod present): the model can only find the gland from the
    rod's end, so guided backprop (accumulated per predicted voxel, as in paper 000) must put its
    mass there.

    Measure: the absolute map's mass in the ball of radius 5 voxels around the rod's tip (the rod
    voxel closest to the gland's centroid), over the mean mass of 200 equally sized balls centred
    at uniformly drawn head voxels (head: the smoothed image above half the head density; balls
    clipped at the volume's edge). Measured ratios 7.56, 6.86, 5.56 for seeds 1000-1002; asserted > 3.

    With the summed class target (``aggregation="target"``) this model's guided map is exactly 0:
    the gradient reaching its last PReLU is <= 0 everywhere (the head convolution's class-1
    weights sum to about -8), so guided backprop of the sum passes nothing - the case where
    METHODS section 1's per-voxel aggregation is not optional.
    """
    from scipy import ndimage

    from SegXAILib.models import load_model
    from SegXAILib.models.preprocessing import preprocess
    from SegXAILib.phantoms import make_parotid_phantom
    from SegXAILib.pipeline import resolve_model_card

    model = load_model(resolve_model_card("parotid-S2"), "cpu")
    ratios = []
    for seed in (1000, 1002):  # 1001 measured too (see above); two keep the test short
        phantom = make_parotid_phantom("S2", seed, shape=(32, 32, 32), spacing=(3.0, 3.0, 3.0))
        x = preprocess(phantom.image, model.card).as_tensor()[None].float()
        with torch.no_grad():
            predicted = model.network(x).argmax(1)[0] == 1
        forward = SegmentationForward(model.network, model.card, x.shape[2:], ClassTarget(1, predicted))
        values = GuidedBackprop(forward).attribute(x, aggregation="per_voxel", batch_size=64)[0, 0].abs().numpy()
        gland = phantom.label.array[0] > 0
        rod = np.argwhere(phantom.rod.array[0] > 0)
        tip = rod[np.argmin(((rod - np.array(ndimage.center_of_mass(gland))) ** 2).sum(axis=1))]
        head = np.argwhere(ndimage.gaussian_filter(phantom.image.array[0], 1.0) > 0.05)
        centres = head[np.random.default_rng(seed).integers(len(head), size=200)]
        background = np.mean([_ball_mass(values, c, 5.0) for c in centres])
        ratios.append(_ball_mass(values, tip, 5.0) / background)
        if seed == 1000:
            summed = GuidedBackprop(forward).attribute(x, aggregation="target")
            assert float(summed.abs().max()) < 1e-3 * float(values.max())
    print("S2 tip / random-ball ratios", ratios)
    assert min(ratios) > 3.0, ratios
