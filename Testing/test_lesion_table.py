"""Instance Grad-CAM++ (paper 001 eqs. 8-10) and the per-lesion table / TP-FP-FN-TN analysis."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from SegXAILib.attribution.cam import windowed_cam
from SegXAILib.attribution.forward import SegmentationForward
from SegXAILib.attribution.targets import ClassThresholdTarget, InstanceTarget
from SegXAILib.image import Image, SegXAIInputError, geometry_matrix
from SegXAILib.instances.gradcam import instance_gradcam_plusplus
from SegXAILib.instances.instances import find_instances
from SegXAILib.instances.table import classify_instances, compare_groups, lesion_table
from SegXAILib.models.card import model_card_from_dict

from conftest import grid_matrix

SHAPE = (8, 8, 8)


def _card(patch=SHAPE):
    return model_card_from_dict({
        "name": "tiny", "architecture": {"format": "torchscript", "file": "unused.pt"},
        "input_channels": ["a"], "classes": [{"name": "bg"}, {"name": "fg"}],
        "inference": {"patch_size": list(patch), "overlap": 0.25},
    })


def _network():
    torch.manual_seed(3)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1)).eval()
    with torch.no_grad():
        network[2].weight[1, :, 0, 0, 0] = torch.tensor([1.5, -0.7, 0.4, 2.0])  # mixed signs: relu(g) matters
    return network


def _two_blobs():
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[1:3, 1:3, 1:3] = True
    other = torch.zeros(SHAPE, dtype=torch.bool)
    other[5:7, 5:7, 5:7] = True
    return mask, other


def test_instance_gradcam_plusplus_equals_numpy():
    network = _network()
    x = torch.randn(1, 1, *SHAPE, generator=torch.Generator().manual_seed(5))
    mask, _ = _two_blobs()
    forward = SegmentationForward(network, _card(), SHAPE, InstanceTarget(1, mask, instance_id=1))
    ours = instance_gradcam_plusplus(forward, x, layer="1")
    assert ours.shape == (1, 1, *SHAPE)

    # numpy: A = relu(conv0(x)), T = sum_{i in L} (W2 A + b)_1,i, so g_k,i = W2[1, k] [i in L]
    with torch.no_grad():
        a = network[1](network[0](x))[0].numpy().astype(np.float64)  # (K, D, H, W)
    w = network[2].weight[1, :, 0, 0, 0].detach().numpy().astype(np.float64)
    g = w[:, None, None, None] * mask.numpy()[None].astype(np.float64)
    s = a.sum(axis=(1, 2, 3), keepdims=True)
    den = 2 * g**2 + s * g**3
    alpha = np.where(den != 0, g**2 / np.where(den != 0, den, 1.0), 0.0)
    expected = np.maximum((alpha * np.maximum(g, 0) * a).sum(axis=0), 0.0)
    assert expected.max() > 0
    np.testing.assert_allclose(ours[0, 0].numpy(), expected, rtol=1e-4, atol=1e-6)


def test_per_element_weights_differ_from_class_level():
    """Class-level Grad-CAM++ spreads its channel weights over the whole layer (the other
    lesion lights up); the per-element weights keep the map on the instance's gradient support."""
    network = _network()
    x = torch.randn(1, 1, *SHAPE, generator=torch.Generator().manual_seed(5))
    mask, other = _two_blobs()
    forward = SegmentationForward(network, _card(), SHAPE, InstanceTarget(1, mask, instance_id=1))
    instance = instance_gradcam_plusplus(forward, x, layer="1")[0, 0]
    class_level = windowed_cam(forward, x, ["1"], "gradcam_plusplus")[0, 0]
    assert float(instance[~mask].abs().max()) == 0.0  # g = 0 outside L (1x1 head)
    assert float(class_level[other].max()) > 0.0
    assert not torch.allclose(instance, class_level)


def test_instance_gradcam_plusplus_unet_windows_and_refusals(tmp_path):
    from conftest import write_unet_card
    from SegXAILib.models.card import load_model_card
    from monai.networks.nets import UNet

    card_path = write_unet_card(tmp_path)
    card = load_model_card(card_path)
    torch.manual_seed(0)
    network = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=[4, 8], strides=[2]).eval()
    shape = (24, 16, 16)  # two windows along the first axis
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[10:14, 6:9, 6:9] = True
    forward = SegmentationForward(network, card, shape, InstanceTarget(1, mask, instance_id=1))
    cam = instance_gradcam_plusplus(forward, x)
    assert cam.shape == (1, 1, *shape) and bool(torch.isfinite(cam).all()) and float(cam.min()) >= 0
    with pytest.raises(SegXAIInputError, match="instance or region target"):
        instance_gradcam_plusplus(SegmentationForward(network, card, shape, ClassThresholdTarget(1, 0.0)), x)


# ---- lesion_table -----------------------------------------------------------------------

def _lesions():
    mask = np.zeros((20, 16, 12), bool)
    mask[4:7, 4:7, 4:6] = True
    mask[13:16, 9:12, 7:9] = True
    mask[14, 3, 2] = True
    return mask


def test_lesion_table_shares_peaks_and_physical_shell():
    matrix = grid_matrix("anisotropic")  # spacing (0.5, 0.9, 3.0)
    mask = _lesions()
    prob = np.random.default_rng(0).uniform(size=mask.shape)
    labels, instances = find_instances(mask, probabilities=prob, grid=matrix)
    rng = np.random.default_rng(1)
    saliency = Image(rng.normal(size=(2, *mask.shape)), matrix, channel_names=("FLAIR", "T1"))
    rows = lesion_table(instances, labels, saliency, matrix, shell_mm=2.0)
    assert [r["id"] for r in rows] == [1, 2, 3]
    spacing = np.array([0.5, 0.9, 3.0])
    for row, instance in zip(rows, instances):
        assert row["volume_mm3"] == pytest.approx(instance.volume_mm3)
        assert row["mean_probability"] == pytest.approx(prob[labels == instance.id].mean())
        inside = labels == instance.id
        # brute-force physical distance from every voxel centre to the instance's voxel centres
        ijk = np.argwhere(np.ones(mask.shape, bool))
        points = np.argwhere(inside) * spacing
        distance = np.min(np.linalg.norm((ijk * spacing)[:, None, :] - points[None], axis=2), axis=1).reshape(mask.shape)
        shell = ~inside & (distance <= 2.0)
        for c, name in enumerate(("FLAIR", "T1")):
            s = saliency.array[c]
            entry = row["channels"][name]
            assert entry["share_inside"] + entry["share_shell"] + entry["share_outside"] == pytest.approx(1.0)
            positive = np.maximum(s, 0)
            assert entry["share_shell"] == pytest.approx(positive[shell].sum() / positive.sum())
            assert entry["share_inside"] == pytest.approx(positive[inside].sum() / positive.sum())
            assert entry["peak_positive"] == pytest.approx(s.max())
            assert entry["peak_negative"] == pytest.approx(s.min())
            assert entry["peak_positive_local"] == pytest.approx(s[inside | shell].max())
        # anisotropy matters: a shell of 2 voxels (unit sampling) is a different set
        voxel_distance = np.min(np.linalg.norm(ijk[:, None, :] - np.argwhere(inside)[None], axis=2), axis=1)
        assert not np.array_equal(shell, ~inside & (voxel_distance.reshape(mask.shape) <= 2.0))


def test_lesion_table_per_instance_maps():
    mask = _lesions()
    matrix = grid_matrix("identity")
    labels, instances = find_instances(mask, grid=matrix)
    maps = {}
    for instance in instances:
        s = np.zeros((1, *mask.shape))
        s[0][labels == instance.id] = 1.0  # all positive mass inside its own instance
        s[0, 0, 0, 0] = -0.5 * instance.id
        maps[instance.id] = s
    rows = lesion_table(instances, labels, maps, matrix)
    for row in rows:
        entry = row["channels"]["ch0"]
        assert entry["share_inside"] == 1.0 and entry["share_shell"] == 0.0 and entry["share_outside"] == 0.0
        assert entry["peak_negative"] == -0.5 * row["id"]
    zero = {i.id: np.zeros((1, *mask.shape)) for i in instances}
    assert math.isnan(lesion_table(instances, labels, zero, matrix)[0]["channels"]["ch0"]["share_inside"])
    with pytest.raises(SegXAIInputError, match="no saliency map"):
        lesion_table(instances, labels, {1: maps[1]}, matrix)


# ---- classify_instances -----------------------------------------------------------------

def _case():
    shape = (30, 30, 20)
    reference = np.zeros(shape, bool)
    reference[5:9, 5:9, 5:9] = True      # found -> TP
    reference[20:23, 5:8, 5:8] = True    # missed -> FN
    prediction = np.zeros(shape, bool)
    prediction[6:10, 6:10, 6:9] = True   # overlaps the first reference lesion
    prediction[5:8, 22:25, 12:15] = True  # nothing there -> FP
    body = np.zeros(shape, bool)
    body[2:28, 2:28, 2:18] = True
    return prediction, reference, body


def test_classify_instances_hand_made_case():
    prediction, reference, body = _case()
    matrix = geometry_matrix((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    labels, _ = find_instances(prediction, grid=matrix)
    result = classify_instances(labels, reference, matrix, body_mask=body, rng_seed=3, n_tn=6)
    tp_id = int(labels[7, 7, 7])
    fp_id = int(labels[6, 23, 13])
    assert result["TP"]["ids"] == [tp_id] and result["FP"]["ids"] == [fp_id]
    assert result["FN"]["ids"] == [int(result["reference_labels"][21, 6, 6])]
    assert result["FN"]["mask"].sum() == 27 and result["FN"]["mask"][21, 6, 6]
    assert result["TP"]["mask"].sum() == (labels == tp_id).sum()
    mean_volume = (64 + 27) / 2 * 2.0
    assert result["tn_volume_mm3"] == pytest.approx(mean_volume)
    tn = result["TN"]
    assert tn["ids"] == list(range(1, 7))
    assert not (tn["mask"] & (reference | prediction)).any()
    assert not (tn["mask"] & ~body).any()
    for n in tn["ids"]:  # spheres: distinct, of the physical radius around their centre
        sphere = tn["labels"] == n
        voxels = np.argwhere(sphere)
        centre = tn["centres_ijk"][n - 1]
        assert np.all(np.linalg.norm((voxels - centre) * [1.0, 1.0, 2.0], axis=1) <= result["tn_radius_mm"] + 1e-9)
        assert abs(sphere.sum() * 2.0 - mean_volume) < 0.5 * mean_volume
    again = classify_instances(labels, reference, matrix, body_mask=body, rng_seed=3, n_tn=6)
    np.testing.assert_array_equal(again["TN"]["labels"], tn["labels"])
    other = classify_instances(labels, reference, matrix, body_mask=body, rng_seed=4, n_tn=6)
    assert not np.array_equal(other["TN"]["labels"], tn["labels"])


def test_lesion_rows_groups_missed_lesions_and_saliency_values():
    """The lesion table of a hand-made case: TP / FP groups, the missed reference lesion as an
    FN row, and per aggregation and channel the peaks and the shares of a map whose values are
    placed by hand (one voxel 2 mm from the instance along K: in a 2 mm shell, not in 1 mm)."""
    from SegXAILib.instances.table import LESION_SALIENCY_KEYS, lesion_rows

    prediction, reference, _ = _case()
    matrix = geometry_matrix((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    grid = Image(np.zeros((1, *prediction.shape), np.float32), matrix)
    probabilities = np.where(prediction, 0.75, 0.0)
    labels, instances = find_instances(prediction, probabilities, grid=grid)
    tp_id, fp_id = int(labels[7, 7, 7]), int(labels[6, 23, 13])
    s = np.zeros(prediction.shape)
    s[labels == tp_id] = 1.0             # 48 voxels
    s[7, 7, 9] = 0.5                     # K-neighbour of (7, 7, 8): 2 mm away
    s[25, 25, 18] = 2.0
    s[0, 0, 0] = -3.0
    maps = {"max": Image(s[None], matrix, channel_names=("FLAIR",)),
            "mean": Image(0.5 * s[None], matrix, channel_names=("FLAIR",))}
    rows = lesion_rows(instances, labels, grid, {tp_id: maps}, reference_mask=reference, shell_mm=2.0)

    assert [r["id"] for r in rows] == [i.id for i in instances] + [None]
    by_id = {r["id"]: r for r in rows}
    assert by_id[tp_id]["group"] == "TP" and by_id[fp_id]["group"] == "FP"
    assert by_id[fp_id]["voxels"] == 27 and by_id[fp_id]["volume_mm3"] == pytest.approx(54.0)
    assert by_id[tp_id]["mean_probability"] == pytest.approx(0.75) and "saliency" not in by_id[fp_id]
    missed = rows[-1]
    assert missed["group"] == "FN" and missed["voxels"] == 27 and missed["mean_probability"] is None
    np.testing.assert_allclose(missed["centroid_ras"], [21.0, 6.0, 12.0])  # voxel (21, 6, 6), K spacing 2
    assert set(missed) == {"id", "group", "reference_id", "voxels", "volume_mm3", "centroid_ras", "mean_probability"}

    saliency = by_id[tp_id]["saliency"]
    assert list(saliency) == ["max", "mean"]
    for aggregation, scale in (("max", 1.0), ("mean", 0.5)):
        entry = saliency[aggregation]["FLAIR"]
        assert tuple(entry) == LESION_SALIENCY_KEYS
        total = 48 + 0.5 + 2.0
        assert entry["peak_positive"] == pytest.approx(2.0 * scale)
        assert entry["peak_negative"] == pytest.approx(-3.0 * scale)
        assert entry["peak_positive_local"] == pytest.approx(1.0 * scale)
        assert entry["peak_negative_local"] == 0.0
        assert entry["share_inside"] == pytest.approx(48 / total)
        assert entry["share_shell"] == pytest.approx(0.5 / total)
        assert entry["share_outside"] == pytest.approx(2.0 / total)
    narrow = lesion_rows(instances, labels, grid, {tp_id: maps}, shell_mm=1.0)
    entry = next(r for r in narrow if r["id"] == tp_id)["saliency"]["max"]["FLAIR"]
    assert entry["share_shell"] == 0.0 and entry["share_outside"] == pytest.approx(2.5 / total)
    assert all(r["group"] is None for r in narrow) and len(narrow) == len(instances)  # no reference: no groups


def test_classify_instances_too_many_spheres():
    prediction, reference, _ = _case()
    body = np.zeros(prediction.shape, bool)
    body[24:29, 24:29, 14:19] = True  # room for one sphere of radius ~3 voxels at most
    result = classify_instances(prediction, reference, np.eye(4), body_mask=body, n_tn=5, tn_volume_mm3=33.0)
    assert len(result["TN"]["ids"]) == 1 and result["TN"]["requested"] == 5
    assert not (result["TN"]["mask"] & ~body).any()


# ---- compare_groups ---------------------------------------------------------------------

def test_compare_groups_matches_scipy_and_empty_group():
    rng = np.random.default_rng(0)
    peaks = {"TN": rng.normal(0, 1, 12), "TP": rng.normal(2, 1, 15), "FP": rng.normal(1, 1, 9), "FN": rng.normal(1.5, 1, 7)}
    rows = compare_groups(peaks)
    assert [(r["group_a"], r["group_b"]) for r in rows] == [
        ("TP", "FP"), ("TP", "FN"), ("TP", "TN"), ("FP", "FN"), ("FP", "TN"), ("FN", "TN")]
    for row in rows:
        expected = stats.mannwhitneyu(peaks[row["group_a"]], peaks[row["group_b"]], alternative="two-sided")
        assert row["statistic"] == pytest.approx(expected.statistic)
        assert row["p_value"] == pytest.approx(expected.pvalue)
        assert (row["n_a"], row["n_b"]) == (len(peaks[row["group_a"]]), len(peaks[row["group_b"]]))
        assert row["note"] == ""
    # known small samples: complete separation, U = 0, exact two-sided p = 2 / C(6, 3)
    known = compare_groups({"TP": [1, 2, 3], "FP": [4, 5, 6]})
    assert known[0]["statistic"] == 0.0 and known[0]["p_value"] == pytest.approx(0.1)
    empty = compare_groups({"TP": [1.0, 2.0], "FN": [], "TN": [0.5, 0.1]})
    by_pair = {(r["group_a"], r["group_b"]): r for r in empty}
    assert math.isnan(by_pair[("TP", "FN")]["p_value"]) and "FN is empty" in by_pair[("TP", "FN")]["note"]
    assert not math.isnan(by_pair[("TP", "TN")]["p_value"])
    with pytest.raises(SegXAIInputError):
        compare_groups({"TP": [1.0]})
