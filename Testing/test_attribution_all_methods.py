"""Every registered method runs through ``explain`` on the bundled lesion model (real sample with
inserted lesions) and on a MONAI SwinUNETR, giving finite, non-trivial maps on the input grid."""

from __future__ import annotations

import numpy as np
import pytest

from SegXAILib.attribution import TargetSpec, available_methods, explain, get_method
from SegXAILib.image import Image, SegXAIInputError
from SegXAILib.models import load_model
from SegXAILib.pipeline import resolve_model_card

from conftest import grid_matrix, write_swinunetr_card

#: cheap settings per method (the defaults are for real use; the exact per-voxel aggregation of
#: the guided methods has its own tests in test_attribution_guided_cam.py)
CHEAP = {
    "smoothgrad": {"n_samples": 2},
    "integrated_gradients": {"n_steps": 2},
    "expected_gradients": {"n_samples": 2},
    "occlusion": {"window": 16, "stride": 16},
    "guided_backprop": {"batch_size": 32},
    "deconvolution": {"batch_size": 32},
    "guided_gradcam": {"batch_size": 32},
    "guided_gradcam_plusplus": {"batch_size": 32},
}


def cheap_params(method: str, references) -> dict:
    params = {k: v for k, v in CHEAP.get(method, {}).items() if k in {p.name for p in get_method(method).parameters}}
    if method == "expected_gradients":
        params["references"] = references
    return params


@pytest.fixture(scope="module")
def lesion_case():
    from SegXAILib.phantoms import make_lesion_phantom
    from SegXAILib.sample_data import load_sample_head

    head = load_sample_head()
    case = make_lesion_phantom(head, seed=2026)
    reference = make_lesion_phantom(head, seed=2027)
    # a 96 x 96 x 36 mm block of the real sample around the largest lesion keeps the test short
    centre = np.argwhere(case.lesions.array[0] == 1).mean(axis=0).astype(int)
    start, stop = centre - (24, 24, 6), centre + (24, 24, 6)
    return (
        load_model(resolve_model_card("lesions"), "cpu"),
        case.image.crop(start, stop),
        [reference.image.crop(start, stop)],
    )


@pytest.fixture(scope="module")
def swin_case(tmp_path_factory):
    model = load_model(write_swinunetr_card(tmp_path_factory.mktemp("swin")), "cpu")
    rng = np.random.default_rng(0)
    image = Image(rng.normal(size=(2, 64, 64, 64)).astype(np.float32), grid_matrix("oblique"), ("ch0", "ch1"))
    reference = image.with_array(rng.normal(size=(2, 64, 64, 64)).astype(np.float32))
    return model, image, [reference]


@pytest.mark.parametrize("method", available_methods())
def test_method_on_the_bundled_lesion_model(lesion_case, method):
    model, image, references = lesion_case
    result = explain(image, model, method, "instance:1", cheap_params(method, references))
    assert result.maps.same_grid(image) and result.maps.channel_names == ("FLAIR", "T1")
    assert np.all(np.isfinite(result.maps.array)) and np.abs(result.maps.array).max() > 0
    assert result.metadata()["method"] == method


@pytest.mark.parametrize("method", available_methods())
def test_method_on_a_swinunetr(swin_case, method):
    model, image, references = swin_case
    # a random network predicts class 1 anywhere: explain a small drawn region of it
    region = np.zeros((1, 64, 64, 64), np.uint8)
    region[0, 30:33, 30:33, 30:32] = 1
    target = TargetSpec("region", class_name="thing", mask=image.with_array(region))
    params = cheap_params(method, references)
    names = {p.name for p in get_method(method).parameters}
    if "aggregation" in names:
        params["aggregation"] = "target"  # per-voxel replicas of a 64^3 SwinUNETR are slow on a CPU
    if method == "lrp":  # LRP has rules for UNet-type networks only; SwinUNETR is refused by design
        with pytest.raises(SegXAIInputError, match="not supported"):
            explain(image, model, method, target, params)
        return
    if "patterns" in names:
        if method == "pattern_net":
            pytest.skip("PatternNet's unnormalised signal overflows float32 on an untrained 40-layer SwinUNETR")
        params.update(patterns="input", estimator="linear")  # a random network has no fitted patterns
    if method == "occlusion":
        params.update(window=32, stride=32)
    result = explain(image, model, method, target, params)
    assert result.maps.same_grid(image)
    assert np.all(np.isfinite(result.maps.array)) and np.abs(result.maps.array).max() > 0
