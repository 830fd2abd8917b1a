"""Method parameters are checked, never dropped: ``check_params`` refuses a key a method does
not take (naming the method and every parameter it takes), coerces JSON values and enforces
ranges and choices; every ``attribute`` lists exactly its registry parameters, so an unknown
keyword is a TypeError (issue 13: a risk model's record passed as method parameters ran
silently with the defaults)."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from SegXAILib.attribution import available_methods, check_params, get_method, parse_params
from SegXAILib.attribution.targets import ClassThresholdTarget
from SegXAILib.image import SegXAIInputError

from conftest import make_forward, tiny_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: the keywords every ``attribute`` takes besides the registry parameters
COMMON = ("self", "inputs", "progress", "cancel")


def every_method() -> list:
    """All registry names."""
    return list(available_methods())


def parameter_cases() -> list[tuple[str, object]]:
    return [(name, p) for name in available_methods() for p in get_method(name).parameters]


@pytest.fixture(scope="module")
def tiny():
    """A forward of a tiny two-class UNet on one 8^3 window and a volume for it."""
    forward = make_forward(tiny_unet(), (8, 8, 8), ClassThresholdTarget(1))
    x = torch.randn((1, 1, 8, 8, 8), generator=torch.Generator().manual_seed(0))
    return forward, x


# ---- the signatures ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", every_method())
def test_attribute_takes_exactly_the_registry_parameters(name):
    cls = get_method(name)
    signature = inspect.signature(cls.attribute)
    kinds = {p.kind for p in signature.parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds
    own = [n for n in signature.parameters if n not in COMMON]
    assert own == [p.name for p in cls.parameters], "same names, in the signature's order"
    assert all(n in signature.parameters for n in COMMON)
    for p in cls.parameters:  # what front ends show as the default is what the method uses
        assert signature.parameters[p.name].default == p.default, p.name


@pytest.mark.parametrize("name", every_method())
def test_attribute_refuses_an_unknown_keyword(tiny, name):
    forward, x = tiny
    method = get_method(name)(forward)
    with pytest.raises(TypeError, match="method_parameters"):
        method.attribute(x, method_parameters={"n_samples": 3})
    with pytest.raises(TypeError, match="bogus"):
        method.attribute(x, bogus=1, progress=None, cancel=None)


# ---- check_params: keys ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", every_method())
def test_unknown_key_names_the_method_and_every_parameter(name):
    accepted = [p.name for p in get_method(name).parameters]
    with pytest.raises(SegXAIInputError) as caught:
        check_params(name, {"bogus_key": 1})
    message = str(caught.value)
    assert f"method {name!r}" in message and "'bogus_key'" in message
    listed = message.split("; it takes ", 1)[1]
    if accepted:
        assert listed.split(", ") == accepted
    else:
        assert listed == "no parameters"
    assert "--" not in message, "library messages name parameters, not command-line flags"


def test_a_provenance_record_is_not_taken_for_parameters():
    """The issue-13 case: a risk model's ``method_parameters`` record, not its ``params``."""
    record = {"params": {"layer": "bottleneck_decoder", "aggregation": "target", "batch_size": 4},
              "target": "class:lesion", "channel_reduction": "sum"}
    with pytest.raises(SegXAIInputError, match="has no parameters 'params', 'target', 'channel_reduction'; "
                                               "it takes layer, aggregation, batch_size"):
        check_params("guided_gradcam", record)
    assert check_params("guided_gradcam", record["params"]) == record["params"]
    with pytest.raises(SegXAIInputError, match="expected a mapping"):
        check_params("smoothgrad", [("n_samples", 3)])  # type: ignore[arg-type]
    with pytest.raises(SegXAIInputError, match="method 'no_such_method': unknown; available: "):
        check_params("no_such_method", {})


# ---- check_params: values ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", every_method())
def test_defaults_survive_a_json_round_trip(name):
    """A record written as JSON (ints where floats were, say) reads back as the typed defaults."""
    defaults = {p.name: p.default for p in get_method(name).parameters}
    checked = check_params(name, json.loads(json.dumps(defaults)))
    assert checked == defaults
    assert [type(v) for v in checked.values()] == [type(v) for v in defaults.values()]


@pytest.mark.parametrize("name, parameter", parameter_cases(), ids=lambda v: getattr(v, "name", v))
def test_out_of_range_and_wrong_type_are_refused(name, parameter):
    def refused(value, *words):
        with pytest.raises(SegXAIInputError) as caught:
            check_params(name, {parameter.name: value})
        message = str(caught.value)
        assert f"method {name!r}" in message and f"parameter {parameter.name}" in message
        assert all(word in message for word in words), message

    if parameter.minimum is not None:
        assert check_params(name, {parameter.name: parameter.minimum})[parameter.name] == parameter.minimum
        below = parameter.minimum - 1 if parameter.kind == "int" else parameter.minimum - max(1.0, abs(parameter.minimum))
        refused(below, "must be >=")
        refused(str(below), "must be >=")  # text (a Slicer form, --param) is checked the same
    if parameter.maximum is not None:
        assert check_params(name, {parameter.name: parameter.maximum})[parameter.name] == parameter.maximum
        refused(parameter.maximum + 1, "must be <=")
    if parameter.kind == "choice":
        for choice in parameter.choices:
            assert check_params(name, {parameter.name: choice}) == {parameter.name: choice}
        refused("not_a_choice", "expected one of")
    if parameter.kind == "int":
        assert check_params(name, {parameter.name: 3.0})[parameter.name] == 3  # a JSON number
        assert type(check_params(name, {parameter.name: np.int64(3)})[parameter.name]) is int
        refused(2.5, "expected int")
        refused(True, "expected int")
        refused("three", "expected int")
    if parameter.kind == "float":
        value = check_params(name, {parameter.name: 1})[parameter.name]
        assert value == 1.0 and type(value) is float
        refused(float("nan"), "finite")
        refused([0.1], "float")
    if parameter.kind == "bool":
        assert check_params(name, {parameter.name: "false"}) == {parameter.name: False}
        refused(2, "expected bool")
        refused("maybe", "expected bool")
    if parameter.kind == "str":
        refused(["a"], "expected str")
    if parameter.kind == "object":
        assert check_params(name, {parameter.name: None}) == {parameter.name: None}
        refused("a/path.nii.gz", "not text")


def test_objects_a_method_takes_pass_unchanged():
    """Tensors and images that methods take from Python (references, baselines, feature masks)."""
    volume = torch.zeros((1, 1, 4, 4, 4))
    references = torch.zeros((3, 1, 4, 4, 4))
    for name, key, value in [
        ("expected_gradients", "references", references),
        ("expected_gradients", "references", [object(), object()]),  # images on the input grid: explain maps them
        ("integrated_gradients", "baselines", volume),
        ("integrated_gradients", "baselines", 0.5),
        ("occlusion", "baseline", volume),
        ("kernel_shap", "baseline", volume),
        ("kernel_shap", "feature_mask", np.zeros((4, 4, 4), np.int32)),
        ("supervoxel_occlusion", "feature_mask", torch.zeros((4, 4, 4), dtype=torch.int64)),
    ]:
        assert check_params(name, {key: value})[key] is value, (name, key)
    with pytest.raises(SegXAIInputError, match="parameter baselines"):
        check_params("integrated_gradients", {"baselines": True})  # a bool is no baseline value


# ---- parse_params ----------------------------------------------------------------------------------

def test_parse_params_types_and_messages():
    assert parse_params("smoothgrad", ["n_samples=10", "noise_level=0.2", "squared=yes"]) == {
        "n_samples": 10, "noise_level": 0.2, "squared": True}
    assert parse_params("kernel_shap", ["restrict=false", "baseline=0.3"]) == {"restrict": False, "baseline": "0.3"}
    for pairs, words in [
        (["n_samples"], ("params of method 'smoothgrad'", "expected NAME=VALUE")),
        (["samples=3"], ("method 'smoothgrad' has no parameter 'samples'",)),
        (["n_samples=0"], ("parameter n_samples: must be >= 1",)),
    ]:
        with pytest.raises(SegXAIInputError) as caught:
            parse_params("smoothgrad", pairs)
        assert all(word in str(caught.value) for word in words) and "--" not in str(caught.value)
    with pytest.raises(SegXAIInputError, match="parameter references: takes .* from Python code, not text"):
        parse_params("expected_gradients", ["references=a.nii.gz"])


def test_checked_parameters_run_the_method(tiny):
    """What check_params returns from JSON is what ``attribute`` takes: the same map as the typed call."""
    forward, x = tiny
    params = {"n_steps": 3, "batch_size": 2, "baselines": "min"}
    typed = get_method("integrated_gradients")(forward).attribute(x, **params)
    from_json = check_params("integrated_gradients", json.loads(json.dumps({**params, "n_steps": 3.0})))
    torch.testing.assert_close(get_method("integrated_gradients")(forward).attribute(x, **from_json), typed,
                               rtol=0, atol=0)
