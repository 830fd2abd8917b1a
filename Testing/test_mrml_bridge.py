"""The MRML bridge on real slicer-core nodes: geometry, segments, colour tables, clicks,
tables, plots and .mrb bundles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from conftest import GRIDS, grid_matrix, random_image
from SegXAILib.image import Image, SegXAIInputError

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from SegXAILib import mrml  # noqa: E402


@pytest.fixture
def scene():
    return mrml.headless_scene()


def linear_transform(scene, name="moved", angles=(10, -25, 40), shift=(12.0, -7.5, 3.25)):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    matrix[:3, 3] = shift
    node.SetMatrixTransformToParent(mrml.nodes._numpy_to_matrix(matrix))
    return node, matrix


def node_matrix(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return mrml.nodes._matrix_to_numpy(matrix)


# ---------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_volume_round_trip_keeps_voxels_and_geometry(scene, name, tmp_path):
    image = random_image(name, shape=(6, 5, 4), seed=1)
    node = mrml.image_to_volume_node(image, scene, "case")
    # Slicer's own numpy view of the node is [k, j, i]
    assert np.array_equal(slicer.util.arrayFromVolume(node), image.array[0].transpose(2, 1, 0))
    assert np.allclose(node_matrix(node), grid_matrix(name), atol=1e-12)
    back = mrml.volume_node_to_image(node)
    assert np.array_equal(back.array, image.array) and back.array.dtype == image.array.dtype
    assert np.allclose(back.ijk_to_ras, image.ijk_to_ras, atol=1e-12)
    # independent chain: Slicer's NRRD writer, then ITK's reader through our LPS conversion
    from SegXAILib.io import read_image

    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "case.nrrd"))
    assert storage.WriteData(node)
    read = read_image(tmp_path / "case.nrrd")
    assert np.array_equal(read.array, image.array)
    assert np.allclose(read.ijk_to_ras, image.ijk_to_ras, atol=1e-5)


def test_parent_transform_is_applied_to_the_geometry(scene):
    image = random_image("oblique", shape=(5, 4, 3))
    transform, matrix = linear_transform(scene)
    node = mrml.image_to_volume_node(image, scene, "local")
    node.SetAndObserveTransformNodeID(transform.GetID())
    world = mrml.volume_node_to_image(node)
    local = mrml.volume_node_to_image(node, apply_transform=False)
    assert np.allclose(local.ijk_to_ras, image.ijk_to_ras)
    ijk = np.array([[0, 0, 0], [4, 3, 2], [1, 2, 1]])
    for index, point in zip(ijk, image.ijk_to_ras_points(ijk)):
        # Slicer's general transform chain (not a matrix product) moves the point itself
        to_world = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(node.GetParentTransformNode(), None, to_world)
        expected = to_world.TransformPoint(point.tolist())
        assert np.allclose(world.ijk_to_ras_points(index)[0], expected, atol=1e-9)
    # a node written under the same transform keeps the world positions of the image
    copy = mrml.image_to_volume_node(world, scene, "copy", parent_transform=transform)
    assert copy.GetParentTransformNode() is transform
    assert np.allclose(node_matrix(copy), image.ijk_to_ras, atol=1e-9)
    assert np.allclose(mrml.volume_node_to_image(copy).ijk_to_ras, world.ijk_to_ras, atol=1e-9)


def test_non_linear_parent_transform_is_refused(scene):
    node = mrml.image_to_volume_node(random_image("identity"), scene, "warped")
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(SegXAIInputError, match="not linear"):
        mrml.volume_node_to_image(node)


def test_volume_nodes_become_channels(scene, caplog):
    flair = random_image("oblique", seed=1)
    t1 = random_image("oblique", seed=2)
    nodes = [mrml.image_to_volume_node(flair, scene, "FLAIR"), mrml.image_to_volume_node(t1, scene, "T1")]
    stacked = mrml.channel_image_from_volume_nodes(nodes, ["FLAIR", "T1"])
    assert stacked.channel_names == ("FLAIR", "T1")
    assert np.array_equal(stacked.array, np.concatenate([flair.array, t1.array]))
    # a constant volume on another (coarser, shifted) grid is resampled onto the first
    other = Image(np.full((1, 12, 10, 8), 7.0, np.float32), grid_matrix("oblique") @ np.diag([0.9, 0.9, 0.9, 1.0]))
    nodes.append(mrml.image_to_volume_node(other, scene, "PD"))
    resampled = mrml.channel_image_from_volume_nodes(nodes)
    assert "resampled" in caplog.text
    assert np.allclose(resampled.array[2][resampled.array[2] != 0], 7.0)
    with pytest.raises(SegXAIInputError):
        mrml.channel_image_from_volume_nodes([nodes[0], None])


# ---------------------------------------------------------------------------- segmentations


def test_segmentation_has_one_segment_per_class_with_card_names_and_colours(scene):
    rng = np.random.default_rng(0)
    labels = Image(rng.integers(0, 3, size=(1, 7, 6, 5)).astype(np.uint8), grid_matrix("oblique_left_handed"))
    labels.array[labels.array == 2] = 0  # class 2 ("empty") has no voxel
    transform, _ = linear_transform(scene)
    volume = mrml.image_to_volume_node(labels.with_array(labels.array.astype(np.float32)), scene, "input",
                                       parent_transform=transform)
    world = mrml.volume_node_to_image(volume)
    labels_world = world.with_array(labels.array)
    names, colors = ["background", "lesion", "empty"], [(0, 0, 0), (230, 70, 50), (10, 200, 30)]
    node = mrml.segmentation_node_from_labels(labels_world, scene, names, colors, reference_volume=volume)
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == names[1:]
    for name, color in zip(names[1:], colors[1:]):
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))
        assert np.allclose(segment.GetColor(), np.array(color) / 255.0)
        # Slicer's own export, on the input's world grid, gives back the class voxels
        assert np.array_equal(mrml.segment_mask(node, name, labels_world), labels.array[0] == names.index(name))
    assert node.GetParentTransformNode() is transform
    assert segmentation.GetConversionParameter("Reference image geometry")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == hierarchy.GetItemByDataNode(volume)


def test_instances_segmentation_and_risk_tags(scene):
    ids = np.zeros((1, 8, 8, 4), np.int32)
    ids[0, 1:3, 1:3, 1:3] = 1
    ids[0, 5:7, 5:7, 1:2] = 2
    labels = Image(ids, grid_matrix("anisotropic"))
    node = mrml.instances_segmentation_node(labels, scene, risk_bands={2: "high"})
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    assert np.array_equal(mrml.segment_mask(node, "Lesion 2", labels), ids[0] == 2)
    assert mrml.segment_risk_tags(node, "Lesion 2") == {"band": "high"}
    assert mrml.segment_risk_tags(node, "Lesion 1") == {}
    risk = {"pc1": -1.25, "band": "moderate", "estimated_dice": 0.61, "insufficient_probability": 0.3}
    mrml.set_segment_risk(node, "Lesion 1", risk)
    tags = mrml.segment_risk_tags(node, "Lesion 1")
    assert tags["band"] == "moderate" and float(tags["pc1"]) == -1.25 and float(tags["estimated_dice"]) == 0.61
    with pytest.raises(SegXAIInputError):
        mrml.set_segment_risk(node, "Lesion 9", risk)


# ---------------------------------------------------------------------------- saliency display


def displayed_rgba(volume_node) -> np.ndarray:
    """RGBA ``(I, J, K, 4)`` that Slicer's own volume display pipeline makes of the node."""
    display = volume_node.GetDisplayNode()
    display.SetInputImageDataConnection(volume_node.GetImageDataConnection())
    producer = display.GetOutputImageDataConnection().GetProducer()
    producer.Update()
    output = producer.GetOutputDataObject(0)
    i, j, k = output.GetDimensions()
    from vtkmodules.util import numpy_support

    flat = numpy_support.vtk_to_numpy(output.GetPointData().GetScalars())
    return flat.reshape(k, j, i, 4).transpose(2, 1, 0, 3)


def test_saliency_colour_table_is_transparent_below_the_threshold(scene):
    values = np.linspace(0.0, 2.0, 8 * 8 * 8).reshape(1, 8, 8, 8).astype(np.float32)  # peak 2
    maps = Image(values, grid_matrix("coronal"))
    node = mrml.saliency_volume_node(maps, scene, "saliency", threshold=0.17)
    rgba = displayed_rgba(node)[..., 3]
    fraction = values[0] / 2.0
    step = 2.0 / 256  # one colour entry
    assert np.all(rgba[fraction < 0.17 - step] == 0)
    assert np.all(rgba[fraction > 0.17 + step] == 255)
    assert np.allclose(mrml.volume_node_to_image(node).array, values)  # the voxels are not altered


def test_signed_saliency_is_blue_negative_red_positive(scene):
    values = np.linspace(-1.0, 1.0, 6 * 6 * 6).reshape(1, 6, 6, 6).astype(np.float32)
    node = mrml.saliency_volume_node(Image(values, grid_matrix("oblique")), scene, "signed", threshold=0.17)
    assert node.GetAttribute("SegXAI.Saliency") == "signed"
    rgba = displayed_rgba(node).astype(int)
    v = values[0]
    strong_negative, strong_positive = v < -0.3, v > 0.3
    faint = np.abs(v) < 0.17 - 2 / 256
    assert np.all(rgba[strong_negative][:, 2] > rgba[strong_negative][:, 0] + 100)
    assert np.all(rgba[strong_positive][:, 0] > rgba[strong_positive][:, 2] + 100)
    assert np.all(rgba[faint][:, 3] == 0)
    assert np.all(rgba[strong_negative | strong_positive][:, 3] == 255)


def test_overlay_on_slice_views_and_jump(scene):
    anatomy = mrml.image_to_volume_node(random_image("identity"), scene, "anatomy")
    saliency = mrml.saliency_volume_node(random_image("identity").with_array(np.ones((1, 9, 7, 5), np.float32)),
                                         scene, "map")
    assert mrml.show_in_slice_views(scene, background=anatomy, foreground=saliency, foreground_opacity=0.4) == 3
    for composite in mrml.slice_composite_nodes(scene):
        assert composite.GetBackgroundVolumeID() == anatomy.GetID()
        assert composite.GetForegroundVolumeID() == saliency.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.4)
    point = (3.5, -2.0, 1.25)
    assert mrml.jump_slices_to(scene, point) == 3
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        slice_to_ras = scene.GetNthNodeByClass(index, "vtkMRMLSliceNode").GetSliceToRAS()
        assert np.allclose([slice_to_ras.GetElement(r, 3) for r in range(3)], point)


# ---------------------------------------------------------------------------- click -> instance


def test_click_picks_the_instance_under_it(scene):
    from SegXAILib.instances import find_instances

    mask = np.zeros((10, 9, 6), bool)
    mask[1:4, 1:4, 1:3] = True  # the larger: id 1
    mask[6:8, 6:8, 3:5] = True
    grid = Image(mask[None].astype(np.uint8), grid_matrix("oblique"))
    labels, instances = find_instances(grid)
    instance_labels = grid.with_array(labels[None])
    click = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "click")
    click.AddControlPointWorld(*instances[1].centroid_ras.tolist())
    assert mrml.instance_from_markup(click, instance_labels) == 2
    # the markups node under a transform: its local point moves to world, where instance 1 is
    transform, matrix = linear_transform(scene)
    click.SetAndObserveTransformNodeID(transform.GetID())
    local = np.linalg.inv(matrix) @ np.append(instances[0].centroid_ras, 1.0)
    click.SetNthControlPointPosition(0, *local[:3].tolist())
    assert np.allclose(mrml.markup_point_ras(click), instances[0].centroid_ras)
    assert mrml.instance_from_markup(click, instance_labels) == 1
    click.SetNthControlPointPositionWorld(0, 500.0, 500.0, 500.0)
    with pytest.raises(SegXAIInputError, match="no instance within"):
        mrml.instance_from_markup(click, instance_labels)


# ---------------------------------------------------------------------------- tables and plots


def lesion_rows():
    from SegXAILib.instances import find_instances, lesion_table

    mask = np.zeros((10, 8, 6), bool)
    mask[1:4, 1:4, 1:4] = True
    mask[6:8, 5:7, 2:4] = True
    grid = Image(mask[None].astype(np.uint8), grid_matrix("anisotropic"))
    labels, instances = find_instances(grid, probabilities=mask * 0.8)
    saliency = grid.with_array(np.random.default_rng(3).normal(size=(2, 10, 8, 6)), ("FLAIR", "T1"))
    return lesion_table(instances, labels, saliency, grid)


def test_lesion_table_node_holds_the_rows(scene):
    rows = lesion_rows()
    node = mrml.lesion_table_node(rows, scene, risk_bands={1: "low"})
    columns = mrml.table_node_columns(node)
    assert node.GetNumberOfRows() == len(rows) == 2
    assert columns["id"] == [1, 2]
    assert columns["volume_mm3"] == pytest.approx([r["volume_mm3"] for r in rows])
    for axis, position in zip("RAS", range(3)):
        assert columns[f"centroid_{axis}"] == pytest.approx([r["centroid_ras"][position] for r in rows])
    assert columns["T1 share_inside"] == pytest.approx([r["channels"]["T1"]["share_inside"] for r in rows])
    assert columns["FLAIR peak_positive"] == pytest.approx([r["channels"]["FLAIR"]["peak_positive"] for r in rows])
    assert columns["risk_band"] == ["low", ""]
    with pytest.raises(SegXAIInputError):
        mrml.lesion_table_node([{"volume_mm3": 1.0}], scene)


def test_qa_table_and_ec_chart(scene):
    thresholds = np.linspace(0, 1, 11)
    curve = np.array([1, 1, 2, 3, 2, 1, 1, 0, 0, 0, 0])
    reference = np.linspace(2, 0, 11)
    chart, table = mrml.ec_curve_chart(scene, thresholds, {"lesion": curve}, reference=reference)
    columns = mrml.table_node_columns(table)
    assert columns["threshold"] == pytest.approx(thresholds)
    assert columns["lesion"] == pytest.approx(curve)
    assert columns["calibration mean"] == pytest.approx(reference)
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    series = chart.GetNthPlotSeriesNode(0)
    assert (series.GetXColumnName(), series.GetYColumnName()) == ("threshold", "lesion")
    assert series.GetTableNode() is table
    assert chart.GetNthPlotSeriesNode(1).GetLineStyle() == slicer.vtkMRMLPlotSeriesNode.LineStyleDash
    qa = mrml.qa_table_node([{"structure": "lesion", "pc1": 0.5, "band": "low", "estimated_dice": 0.8}], scene)
    assert mrml.table_node_columns(qa) == {"structure": ["lesion"], "pc1": [0.5], "band": ["low"],
                                           "estimated_dice": [0.8]}
    with pytest.raises(SegXAIInputError):
        mrml.ec_curve_chart(scene, thresholds, {"short": curve[:5]})


# ---------------------------------------------------------------------------- .mrb bundles


def test_scene_bundle_round_trip(scene, tmp_path):
    image = random_image("oblique", shape=(7, 6, 5), seed=4)
    transform, _ = linear_transform(scene, "registration")
    volume = mrml.image_to_volume_node(image, scene, "FLAIR", parent_transform=transform)
    world = mrml.volume_node_to_image(volume)
    labels = world.with_array((image.array > 50).astype(np.uint8))
    mrml.segmentation_node_from_labels(labels, scene, ["background", "lesion"], [(0, 0, 0), (230, 70, 50)],
                                       reference_volume=volume)
    mrml.set_segment_risk(scene.GetFirstNodeByName("SegXAI segmentation"), "lesion", {"band": "high", "pc1": -2.0})
    saliency = mrml.saliency_volume_node(world.with_array(np.abs(image.array)), scene, "saliency FLAIR",
                                         reference_volume=volume)
    mrml.show_in_slice_views(scene, background=volume, foreground=saliency, foreground_opacity=0.3)
    mrml.lesion_table_node(lesion_rows(), scene)
    mrml.ec_curve_chart(scene, np.linspace(0, 1, 5), {"lesion": np.array([3, 2, 1, 1, 0])})
    click = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "click")
    click.AddControlPointWorld(1.0, 2.0, 3.0)

    path = mrml.save_scene_bundle(scene, tmp_path / "case.mrb")
    assert path.is_file() and not list(tmp_path.glob(".segxai-mrb-*"))
    loaded = mrml.load_scene_bundle(path)

    volume2 = loaded.GetFirstNodeByName("FLAIR")
    assert volume2.GetParentTransformNode().GetName() == "registration"
    again = mrml.volume_node_to_image(volume2)
    assert np.array_equal(again.array, image.array)
    assert np.allclose(again.ijk_to_ras, world.ijk_to_ras, atol=1e-6)
    segmentation = loaded.GetFirstNodeByName("SegXAI segmentation")
    segment = segmentation.GetSegmentation().GetSegment(segmentation.GetSegmentation().GetSegmentIdBySegmentName("lesion"))
    assert np.allclose(segment.GetColor(), np.array([230, 70, 50]) / 255.0)
    assert mrml.segment_risk_tags(segmentation, "lesion") == {"band": "high", "pc1": "-2"}
    assert np.array_equal(mrml.segment_mask(segmentation, "lesion", world), labels.array[0] == 1)
    saliency2 = loaded.GetFirstNodeByName("saliency FLAIR")
    colors = saliency2.GetDisplayNode().GetColorNode()
    assert colors.GetName() == scene.GetFirstNodeByName(colors.GetName()).GetName()
    rgba = [0.0] * 4
    colors.GetColor(10, rgba)
    assert rgba[3] == 0.0  # below 17 %: still transparent after the round trip
    colors.GetColor(200, rgba)
    assert rgba[3] == 1.0
    composites = mrml.slice_composite_nodes(loaded)
    assert len(composites) == 3
    assert all(c.GetForegroundVolumeID() == saliency2.GetID() for c in composites)
    assert mrml.table_node_columns(loaded.GetFirstNodeByName("SegXAI lesions"))["id"] == [1, 2]
    assert loaded.GetFirstNodeByName("SegXAI EC curves").GetNumberOfPlotSeriesNodes() == 1
    assert np.allclose(mrml.markup_point_ras(loaded.GetFirstNodeByName("click")), [1.0, 2.0, 3.0])


def test_scene_bundle_bad_paths(scene, tmp_path):
    with pytest.raises(SegXAIInputError, match="mrb"):
        mrml.save_scene_bundle(scene, tmp_path / "case.zip")
    with pytest.raises(SegXAIInputError, match="does not exist"):
        mrml.save_scene_bundle(scene, tmp_path / "missing" / "case.mrb")
    (tmp_path / "fake.mrb").write_text("not a zip", encoding="utf-8")
    with pytest.raises(SegXAIInputError, match="zip"):
        mrml.load_scene_bundle(tmp_path / "fake.mrb")
    with pytest.raises(SegXAIInputError, match="no such file"):
        mrml.load_scene_bundle(tmp_path / "none.mrb")


def test_scene_bundle_with_a_relative_path(tmp_path, monkeypatch):
    """``segxai demo --out demo-output`` passes a relative path; Slicer needs an absolute one."""
    scene = mrml.headless_scene()
    mrml.image_to_volume_node(Image(np.zeros((1, 4, 4, 4), np.float32), np.eye(4)), scene, name="v")
    monkeypatch.chdir(tmp_path)
    path = mrml.save_scene_bundle(scene, Path("relative.mrb"))
    assert (tmp_path / "relative.mrb").is_file() and path == Path("relative.mrb")
    loaded = mrml.load_scene_bundle(tmp_path / "relative.mrb")
    assert loaded.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
