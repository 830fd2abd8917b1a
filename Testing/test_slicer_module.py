"""The Slicer module without a Slicer GUI: the file compiles and imports headless, its UI file
and code agree, the CMake files list everything, and the Logic runs on a slicer-core scene."""

from __future__ import annotations

import ast
import re
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest

from conftest import grid_matrix, write_voxelwise_card
from SegXAILib.image import Image, SegXAIInputError

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "SegXAI"
SOURCE = (MODULE / "SegXAI.py").read_text(encoding="utf-8")
UI = ElementTree.parse(MODULE / "Resources" / "UI" / "SegXAI.ui").getroot()


def cmake_list(text: str, variable: str, substitutions: dict[str, str]) -> set[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not found"
    items = set()
    for line in match.group(1).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            for key, value in substitutions.items():
                line = line.replace("${" + key + "}", value)
            items.add(line)
    return items


# ---------------------------------------------------------------------------- the file


def test_module_compiles_and_has_the_four_classes():
    tree = ast.parse(SOURCE, filename="SegXAI.py")
    compile(tree, "SegXAI.py", "exec")
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"SegXAI", "SegXAIWidget", "SegXAILogic", "SegXAITest", "SegXAIParameterNode"} <= classes
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegXAIParameterNode")
    assert any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in wrapper.decorator_list)
    assert "slicer.util.tryWithErrorDisplay" in SOURCE


def ui_widgets() -> dict[str, str]:
    """name -> class of every named widget of the .ui (the top-level form excluded)."""
    return {w.get("name"): w.get("class") for w in UI.iter("widget") if w.get("name") and w.get("name") != "SegXAI"}


def parameter_fields() -> dict[str, str]:
    tree = ast.parse(SOURCE)
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegXAIParameterNode")
    return {n.target.id: ast.unparse(n.annotation) for n in wrapper.body if isinstance(n, ast.AnnAssign)}


def test_ui_names_and_code_agree():
    widgets = ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", SOURCE))
    assert used - set(widgets) == set(), "self.ui names missing from SegXAI.ui"
    assert set(widgets) - used == set(), "widgets in SegXAI.ui that the code never uses"
    assert len(widgets) == len([w for w in UI.iter("widget") if w.get("name") and w.get("name") != "SegXAI"]), \
        "duplicate widget names"


def test_parameter_bindings_name_fields_of_the_parameter_node():
    fields = parameter_fields()
    widgets = ui_widgets()
    supported = {"qMRMLNodeComboBox": "vtkMRMLScalarVolumeNode", "QSpinBox": "int", "ctkSliderWidget": "float"}
    bound = {}
    for widget in UI.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = prop.find("string").text
    assert bound, "no widget is bound to the parameter node"
    for name, field in bound.items():
        assert field in fields, f"{name} is bound to {field!r}, not a field of SegXAIParameterNode"
        assert fields[field] == supported[widgets[name]], f"{name} ({widgets[name]}) cannot hold a {fields[field]}"
    # every MRML widget gets the scene from the top-level qMRMLWidget
    receivers = {c.find("receiver").text for c in UI.iter("connection") if c.find("signal").text.startswith("mrmlSceneChanged")}
    assert {n for n, cls in widgets.items() if cls.startswith("qMRML")} == receivers


# ---------------------------------------------------------------------------- CMake


def test_every_module_file_is_listed_in_cmake():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    names = {"MODULE_NAME": re.search(r"set\(MODULE_NAME (\w+)\)", text).group(1)}
    assert names["MODULE_NAME"] == "SegXAI"
    listed = cmake_list(text, "MODULE_PYTHON_SCRIPTS", names) | cmake_list(text, "MODULE_PYTHON_RESOURCES", names)
    present = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.name not in ("CMakeLists.txt", "README.md")}
    assert present - listed == set(), "files under SegXAI/ missing from SegXAI/CMakeLists.txt"
    assert listed - present == set(), "SegXAI/CMakeLists.txt lists files that do not exist"
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}.*RESOURCES", text, re.S)
    # every CMakeLists.txt below SegXAI/ is reached through add_subdirectory
    reached, queue = set(), [MODULE]
    while queue:
        folder = queue.pop()
        reached.add(folder / "CMakeLists.txt")
        for sub in re.findall(r"add_subdirectory\((\w+)\)", (folder / "CMakeLists.txt").read_text(encoding="utf-8")):
            queue.append(folder / sub)
    assert set(MODULE.rglob("CMakeLists.txt")) == reached
    test_cmake = (MODULE / "Testing" / "Python" / "CMakeLists.txt").read_text(encoding="utf-8")
    script = re.search(r"slicer_add_python_unittest\(SCRIPT (\S+)\)", test_cmake).group(1)
    script = script.replace("${CMAKE_CURRENT_SOURCE_DIR}", str(MODULE / "Testing" / "Python"))
    assert Path(script.replace("${MODULE_NAME}", "SegXAI")).resolve() == MODULE / "SegXAI.py"


def test_extension_adds_the_module():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"^add_subdirectory\(SegXAI\)$", text, re.M), "top-level CMakeLists.txt lacks add_subdirectory(SegXAI)"


# ---------------------------------------------------------------------------- the Logic headless

slicer = pytest.importorskip("slicer")


@pytest.fixture(scope="module")
def module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("SegXAI", MODULE / "SegXAI.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    assert loaded.HAVE_SLICER_GUI is False  # slicer-core has no Qt: the guarded imports took over
    return loaded


@pytest.fixture
def case(tmp_path):
    """A two-channel case on an oblique grid and a per-voxel model reading channel 0 > 50."""
    from SegXAILib import mrml

    card = write_voxelwise_card(tmp_path / "model", orientation=None, threshold=50.0, in_channels=2,
                                patch=(8, 8, 8))
    scene = mrml.headless_scene()
    bright = np.zeros((12, 10, 8), np.float32)
    bright[1:5, 1:5, 1:4] = 100.0  # lesion 1 (48 voxels)
    bright[8:10, 6:9, 5:7] = 100.0  # lesion 2 (12 voxels)
    dark = 100.0 - bright  # as channel 0 it would segment the background
    grid = grid_matrix("oblique")
    volumes = [mrml.image_to_volume_node(Image(a[None], grid), scene, name) for a, name in ((bright, "A"), (dark, "B"))]
    return scene, volumes, card, bright > 50


def test_logic_process_runs_on_a_slicer_core_scene(module, case):
    from SegXAILib import mrml

    scene, volumes, card, truth = case
    logic = module.SegXAILogic(scene)
    nodes = logic.process(volumes, model=card, methods=["vanilla_gradient"], instances=[2], device="cpu")
    grid = mrml.volume_node_to_image(volumes[0])
    # the per-voxel model's exact prediction: the channel mapping (A first) is respected
    assert np.array_equal(mrml.segment_mask(nodes.segmentation, "bright", grid), truth)
    assert nodes.instances.GetSegmentation().GetNumberOfSegments() == 2
    assert len(nodes.saliency["vanilla_gradient"]) == 2  # one map per input channel
    assert mrml.table_node_columns(nodes.lesion_table)["voxels"] == [48, 12]
    assert mrml.table_node_columns(nodes.lesion_table)["saliency"] == ["vanilla_gradient", "instance"]
    # the instance map is the foreground of every slice view, which is centred on lesion 2
    foreground = nodes.instance_saliency[2][0]
    assert all(c.GetForegroundVolumeID() == foreground.GetID() for c in mrml.slice_composite_nodes(scene))
    red = scene.GetSingletonNode("Red", "vtkMRMLSliceNode").GetSliceToRAS()
    assert np.allclose([red.GetElement(r, 3) for r in range(3)], logic.result.instances[1].centroid_ras)
    # a click on lesion 2 finds it
    click = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "click")
    click.AddControlPointWorld(*logic.result.instances[1].centroid_ras.tolist())
    assert logic.instanceAtClick(click) == 2
    assert nodes.chart.GetNumberOfPlotSeriesNodes() == 1
    assert mrml.table_node_columns(nodes.qa_table)["band"] == ["no risk model"]
    # swapping the inputs swaps the channels: the model now segments the dark channel
    swapped = module.SegXAILogic(scene).process(volumes[::-1], model=card, device="cpu")
    assert np.array_equal(mrml.segment_mask(swapped.segmentation, "bright", grid), ~truth)


def test_logic_risk_band_goes_to_the_segment_and_the_qa_table(module, case, tmp_path):
    from SegXAILib import mrml
    from SegXAILib.models import load_model_card
    from SegXAILib.topology import RiskModel, calibrate_risk_model, default_thresholds

    scene, volumes, card, _ = case
    rng = np.random.default_rng(0)
    thresholds = default_thresholds(20)
    risk = calibrate_risk_model(rng.normal(size=(16, 20)).cumsum(axis=1), rng.uniform(0.3, 0.9, 16), thresholds,
                                method="gradient_x_input", method_parameters={},
                                model_checksum=load_model_card(card).checksum(), cv_folds=2)
    path = risk.save(tmp_path / "risk.json")
    logic = module.SegXAILogic(scene)
    nodes = logic.process(volumes, model=card, riskModel=str(path), device="cpu")
    assert "gradient_x_input" in logic.result.explanations  # the risk model's method was run for it
    table = mrml.table_node_columns(scene.GetFirstNodeByName("SegXAI EC curves table"))
    curve = np.array(table["bright (gradient_x_input)"])
    assert np.allclose(table["threshold"], thresholds) and np.allclose(table["calibration mean"], risk.pca_mean)
    expected = RiskModel.load(path).score(curve, "gradient_x_input", load_model_card(card).checksum())
    assert mrml.segment_risk_tags(nodes.segmentation, "bright")["band"] == expected["band"]
    qa = mrml.table_node_columns(nodes.qa_table)
    assert qa["band"] == [expected["band"]] and qa["pc1"] == pytest.approx([expected["pc1"]])


def test_worker_keeps_the_model_loaded_and_cancels(module, case):
    from SegXAILib.progress import Cancelled

    scene, volumes, card, _ = case
    logic = module.SegXAILogic(scene)
    loaded = logic.engine.card(card)
    image = logic.imageFromVolumes(volumes, loaded)
    outcomes = []

    def record(value, error):
        outcomes.append((value, error))

    logic.submit(lambda p, c: logic.computeSegmentation(image, card, "cpu", p, c), record)
    logic.submit(lambda p, c: logic.computeExplanation(["vanilla_gradient"], device="cpu", progress=p, cancel=c), record)
    logic.submit(lambda p, c: logic.computeInstanceSaliency(7, "cpu", progress=p, cancel=c), record)
    logic.waitForWorker(60)
    assert outcomes[0][1] is None and outcomes[1][1] is None
    assert isinstance(outcomes[2][1], SegXAIInputError)  # errors come back to the GUI thread
    assert logic.engine.loads == 1  # one network for all jobs
    # a long job stops soon after Cancel
    logic.submit(lambda p, c: logic.computeInstanceSaliency(1, "cpu", progress=p, cancel=c, n_samples=100000,
                                                           batch_size=1), record)
    while logic.poll()[0][0] <= 0.0:
        time.sleep(0.01)
    started = time.perf_counter()
    logic.cancel()
    logic.waitForWorker(60)
    latency = time.perf_counter() - started
    assert isinstance(outcomes[3][1], Cancelled)
    print(f"cancel latency {latency:.3f} s")
    logic.stopWorker()


def test_logic_refuses_a_wrong_number_of_inputs(module, case):
    scene, volumes, card, _ = case
    with pytest.raises(SegXAIInputError, match="one volume node per model input channel|takes 2"):
        module.SegXAILogic(scene).process(volumes[:1], model=card, device="cpu")
