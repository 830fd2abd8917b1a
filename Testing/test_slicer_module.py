"""The Slicer module without a Slicer GUI: the files compile and import headless, its UI file
and code agree, the CMake files list everything, the installer reads SegXAILib's own
dependency list, the method form keeps every registry default, and the Logic (a thin caller of
the case pipeline) runs on a slicer-core scene."""

from __future__ import annotations

import ast
import importlib.util
import math
import re
import time
import tomllib
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest

from conftest import grid_matrix, write_voxelwise_card
from SegXAILib.image import Image, SegXAIInputError

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "SegXAI"
SOURCE = (MODULE / "SegXAI.py").read_text(encoding="utf-8")
#: the module's Python files beside SegXAI.py (Slicer puts the module folder on sys.path)
HELPERS = ("SegXAIInstaller", "SegXAIMethodForm")
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


def load_helper(name: str):
    """A helper module of SegXAI/ imported from its file, as Slicer imports it."""
    spec = importlib.util.spec_from_file_location(name, MODULE / f"{name}.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def test_module_compiles_and_has_the_four_classes():
    tree = ast.parse(SOURCE, filename="SegXAI.py")
    compile(tree, "SegXAI.py", "exec")
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"SegXAI", "SegXAIWidget", "SegXAILogic", "SegXAITest", "SegXAIParameterNode"} <= classes
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegXAIParameterNode")
    assert any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in wrapper.decorator_list)
    assert "slicer.util.errorDisplay" in SOURCE  # errors are shown, never re-raised into Qt
    # the installer and the method form live beside it, not in it
    for name in HELPERS:
        compile((MODULE / f"{name}.py").read_text(encoding="utf-8"), f"{name}.py", "exec")
        assert f"import {name}" in SOURCE or f"from {name} import" in SOURCE, name
    logic = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegXAILogic")
    methods = {n.name for n in logic.body if isinstance(n, ast.FunctionDef)}
    assert not {"missingRequirements", "ensureDependencies"} & methods
    assert "_parameterEditor" not in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert "PIP_REQUIREMENTS" not in SOURCE and "SLICER_OWNED" not in SOURCE  # no copy of the dependency list


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
        # the type under its annotations (the bounds Slicer's connectors need are checked
        # against Slicer's sources in test_slicer_conformance.py)
        kind = re.sub(r"^Annotated\[(\w+),.*\]$", r"\1", fields[field])
        assert kind == supported[widgets[name]], f"{name} ({widgets[name]}) cannot hold a {fields[field]}"
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


def test_extension_installs_pyproject_beside_the_package():
    """The installer reads the dependency list from the pyproject.toml beside SegXAILib: the
    extension installs it in the folder that holds the package (and copies it in the build tree)."""
    text = (ROOT / "SegXAILib" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_SUBDIR", text, re.S)  # the package is a subfolder
    assert re.search(r"install\(\s*FILES \$\{CMAKE_CURRENT_SOURCE_DIR\}/\.\./pyproject\.toml\s+"
                     r"DESTINATION \$\{Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR\}\s", text)
    assert re.search(r"configure_file\(\s*\$\{CMAKE_CURRENT_SOURCE_DIR\}/\.\./pyproject\.toml\s+"
                     r"\$\{CMAKE_BINARY_DIR\}/\$\{Slicer_QTSCRIPTEDMODULES_LIB_DIR\}/pyproject\.toml", text)


# ---------------------------------------------------------------------------- the installer

#: what the installer never installs with pip: PyTorch (the PyTorch extension) and Slicer's own
#: (Slicer's Python ships numpy, SimpleITK, vtk and scipy)
EXCLUDED = {"torch", "numpy", "simpleitk", "vtk", "scipy"}


def distribution(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()


def pyproject_dependencies() -> list[str]:
    """``[project] dependencies`` of the pyproject.toml beside the SegXAILib being tested."""
    import SegXAILib

    with open(Path(SegXAILib.__file__).resolve().parents[1] / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["project"]["dependencies"]


def test_installer_requirements_are_pyprojects_dependencies():
    installer = load_helper("SegXAIInstaller")
    dependencies = pyproject_dependencies()
    assert installer.pipRequirements() == [r for r in dependencies if distribution(r) not in EXCLUDED]
    assert [installer.torchRequirement()] == [r for r in dependencies if distribution(r) == "torch"]
    # everything is installed here, and found under its import name (scikit-image -> skimage)
    assert installer.missingRequirements() == []


def test_installer_falls_back_to_the_distribution_metadata(monkeypatch, tmp_path):
    installer = load_helper("SegXAIInstaller")
    metadata = ["torch>=2.1", "monai>=1.3", "numpy>=1.24", "SimpleITK>=2.3", "scikit-image>=0.21",
                'pytest>=7.4; extra == "test"', "tqdm>=4.60; python_version >= '3'", "old>=1; python_version < '3'"]
    monkeypatch.setattr(installer.importlib.metadata, "requires",
                        lambda name: metadata if name == "SegXAILib" else None)
    # a pyproject.toml of another project beside the package is not SegXAILib's
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\nname = "other"\ndependencies = ["requests"]\n', encoding="utf-8")
    monkeypatch.setattr(installer, "pyprojectPath", lambda: str(other))
    # extras (test) and requirements whose marker does not hold here are not installed
    assert installer.pipRequirements() == ["monai>=1.3", "scikit-image>=0.21", "tqdm>=4.60; python_version >= '3'"]
    assert installer.torchRequirement() == "torch>=2.1"
    assert installer.importName("scikit-image>=0.21") == "skimage"


def test_installer_checks_the_installed_torch_and_pins_slicers_packages(monkeypatch, tmp_path):
    import importlib.metadata

    installer = load_helper("SegXAIInstaller")
    requirement = installer.torchRequirement()  # e.g. torch>=2.1
    minimum = re.search(r">=\s*([0-9.]+)", requirement).group(1)
    assert installer.torchProblem() == ""  # the venv's torch satisfies it
    installed = {"torch": "1.0.0+cu117"}
    real = importlib.metadata.version
    monkeypatch.setattr(installer.importlib.metadata, "version", lambda name: installed.get(name) or real(name))
    problem = installer.torchProblem()
    assert "PyTorch 1.0.0+cu117 is installed" in problem and requirement in problem
    installed["torch"] = f"{minimum}+cu121"  # a local build tag: its public version counts
    assert installer.torchProblem() == ""
    # the constraints pin every Slicer-owned package installed here to its version
    pins = Path(installer.constraintsFile(str(tmp_path))).read_text(encoding="utf-8").split()
    assert {pin.split("==")[0].lower() for pin in pins} == {"numpy", "simpleitk", "vtk", "scipy"} & {
        name.lower() for name in installer.SLICER_OWNED}
    assert f"scipy=={real('scipy')}" in pins and f"numpy=={real('numpy')}" in pins


# ---------------------------------------------------------------------------- the method form


def test_method_form_sends_every_registry_default_unchanged():
    """Each editor the form builds holds its parameter's default in range and reads back that
    default (a float spin box keeps only its decimals), so an untouched form sends the defaults."""
    from types import SimpleNamespace

    from SegXAILib.attribution import check_params

    form = load_helper("SegXAIMethodForm")
    specs = form.methodSpecs()
    assert specs
    edited = 0
    for name, spec in specs.items():
        sent = {}
        for parameter in spec["parameters"]:
            made = form.editorSpec(parameter, parameter["default"])
            if made is None:
                continue
            class_name, items, properties = made
            editor = SimpleNamespace(**properties)
            if class_name in ("QSpinBox", "ctkDoubleSpinBox"):
                assert properties["minimum"] <= properties["value"] <= properties["maximum"], (name, parameter)
            if class_name == "ctkDoubleSpinBox":
                editor.value = round(editor.value, properties["decimals"])
            if class_name == "QComboBox":
                assert properties["currentText"] in items
            given, value = form.editorValue(parameter, editor)
            if given:
                sent[parameter["name"]] = value
                assert value == parameter["default"] and type(value) is type(parameter["default"]), (name, parameter)
                edited += 1
        assert check_params(name, sent) == sent
    assert edited > 0
    # LRP's epsilon (1e-6) is shown with enough decimals to stay 1e-6
    assert round(1e-6, form.floatDecimals(1e-6)) == 1e-6 and round(1e-6, 4) == 0.0
    assert form.savedParameters("not json") == {} and form.savedParameters('{"n_samples": 3}') == {"n_samples": 3}


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
    bright[1:5, 1:5, 1:4] = 1.0  # lesion 1 (48 voxels)
    bright[8:10, 6:9, 5:7] = 1.0  # lesion 2 (12 voxels)
    # varied intensities inside the lesions (all > 50): the saliency maps have structure
    bright *= np.random.default_rng(7).uniform(60.0, 140.0, bright.shape).astype(np.float32)
    dark = 100.0 - bright  # as channel 0 it would segment the background (lesions < 50 there)
    grid = grid_matrix("oblique")
    volumes = [mrml.image_to_volume_node(Image(a[None], grid), scene, name) for a, name in ((bright, "A"), (dark, "B"))]
    return scene, volumes, card, bright > 50, Image(np.stack([bright, dark]), grid, ("ch0", "ch1"))


def test_case_settings_are_validated_and_keep_every_parameter(module, case):
    from SegXAILib.pipeline import CaseSettings

    _, _, card, _, _ = case
    logic = module.SegXAILogic
    settings = logic.caseSettings(card, ["smoothgrad", "vanilla_gradient"], {"smoothgrad": {"n_samples": 3}},
                                  device="cpu", instances=[2], aggregation="mean", instanceParams={"n_samples": 5})
    assert [m.method for m in settings.methods] == ["smoothgrad", "vanilla_gradient"]
    assert settings.methods[0].params == {"n_samples": 3}
    assert settings.model == str(card) and settings.device == "cpu"
    assert settings.instances.ids == [2] and settings.instances.aggregations == ["mean"]
    assert settings.instances.n_samples == 5
    assert settings.qa.method == "smoothgrad" and settings.qa.risk_model is None  # the first map's EC curve
    assert CaseSettings.from_json(settings.to_json()) == settings
    assert logic.caseSettings(card, ["smoothgrad"], qaMethod="").qa.method == ""
    assert logic.caseSettings(card, riskModel="risk.json").qa.risk_model == "risk.json"
    assert logic.caseSettings(card).instances.ids == []  # no instance map unless asked
    # an unknown parameter, a parameter dict for a method not chosen, a bad field: errors naming them
    with pytest.raises(SegXAIInputError, match="n_sample"):
        logic.caseSettings(card, ["smoothgrad"], {"smoothgrad": {"n_sample": 3}})
    with pytest.raises(SegXAIInputError, match="params.*gradcam"):
        logic.caseSettings(card, ["smoothgrad"], {"gradcam": {"layer": "final"}})
    with pytest.raises(SegXAIInputError, match="instances.nsamples"):
        logic.caseSettings(card, instanceParams={"nsamples": 3})
    with pytest.raises(SegXAIInputError, match="device"):
        logic.caseSettings(card, device="gpu")


def test_logic_process_runs_on_a_slicer_core_scene(module, case):
    from SegXAILib import mrml

    scene, volumes, card, truth, _ = case
    logic = module.SegXAILogic(scene)
    nodes = logic.process(volumes, model=card, methods=["vanilla_gradient"], instances=[2], device="cpu")
    grid = mrml.volume_node_to_image(volumes[0])
    # the per-voxel model's exact prediction: the channel mapping (A first) is respected
    assert np.array_equal(mrml.segment_mask(nodes.segmentation, "bright", grid), truth)
    assert nodes.instances.GetSegmentation().GetNumberOfSegments() == 2
    assert len(nodes.saliency["vanilla_gradient"]) == 2  # one map per input channel
    lesions = mrml.table_node_columns(nodes.lesion_table)
    assert lesions["voxels"] == [48, 12]
    # lesion 2's row carries its instance map's saliency (mean aggregation, the panel's default); lesion 1 has none
    shares = lesions["saliency mean ch0 share_inside"]
    assert math.isnan(shares[0]) and 0.0 <= shares[1] <= 1.0
    # the instance map is the foreground of every slice view, which is centred on lesion 2
    foreground = nodes.instance_saliency[2][0]
    assert all(c.GetForegroundVolumeID() == foreground.GetID() for c in mrml.slice_composite_nodes(scene))
    red = scene.GetSingletonNode("Red", "vtkMRMLSliceNode").GetSliceToRAS()
    assert np.allclose([red.GetElement(r, 3) for r in range(3)], logic.case.instances[1].centroid_ras)
    # a click on lesion 2 finds it
    click = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "click")
    click.AddControlPointWorld(*logic.case.instances[1].centroid_ras.tolist())
    assert logic.instanceAtClick(click) == 2
    assert nodes.chart.GetNumberOfPlotSeriesNodes() == 1
    assert mrml.table_node_columns(nodes.qa_table)["band"] == ["no risk model"]
    # swapping the inputs swaps the channels: the model now segments the dark channel
    swapped = module.SegXAILogic(scene).process(volumes[::-1], model=card, device="cpu")
    assert np.array_equal(mrml.segment_mask(swapped.segmentation, "bright", grid), ~truth)


def test_logic_risk_band_goes_to_the_segment_and_the_qa_table(module, case, tmp_path):
    """The band, PC1 and EC curve shown equal those of the risk model's map made here directly
    with the attribution API (no Logic, no pipeline): gradient x input of the class, its
    channels summed, the curve inside the per-voxel model's exact prediction."""
    from SegXAILib import mrml
    from SegXAILib.attribution import explain
    from SegXAILib.models import load_model, load_model_card
    from SegXAILib.topology import RiskModel, calibrate_risk_model, default_thresholds, saliency_curve

    scene, volumes, card, truth, image = case
    checksum = load_model_card(card).checksum()
    rng = np.random.default_rng(0)
    thresholds = default_thresholds(20)
    recipe = {"params": {}, "target": "class:bright", "channel_reduction": "sum"}
    risk = calibrate_risk_model(rng.normal(size=(16, 20)).cumsum(axis=1), rng.uniform(0.3, 0.9, 16), thresholds,
                                method="gradient_x_input", method_parameters=recipe, model_checksum=checksum,
                                cv_folds=2)
    path = risk.save(tmp_path / "risk.json")
    logic = module.SegXAILogic(scene)
    nodes = logic.process(volumes, logic.caseSettings(card, riskModel=str(path), device="cpu"))

    # the oracle: the risk model's map computed directly, its curve and its score
    direct = explain(image, load_model(load_model_card(card), device="cpu"), "gradient_x_input",
                     target="class:bright", params={})
    summed = direct.maps.array.astype(np.float64).sum(axis=0)
    risk = RiskModel.load(path)
    curve = saliency_curve(summed.astype(np.float32), truth, risk.thresholds)
    expected = risk.score(curve, "gradient_x_input", checksum, method_parameters=recipe)
    assert np.allclose(logic.case.qa.saliency, summed, rtol=1e-6, atol=1e-6 * np.abs(summed).max())

    table = mrml.table_node_columns(scene.GetFirstNodeByName("SegXAI EC curves table"))
    assert np.allclose(table["threshold"], thresholds) and np.allclose(table["calibration mean"], risk.pca_mean)
    assert np.array_equal(table["bright (gradient_x_input)"], curve)
    assert mrml.segment_risk_tags(nodes.segmentation, "bright")["band"] == expected["band"]
    qa = mrml.table_node_columns(nodes.qa_table)
    assert qa["band"] == [expected["band"]] and qa["pc1"] == pytest.approx([expected["pc1"]])


def test_logic_refuses_a_wrong_number_of_inputs(module, case):
    scene, volumes, card, _, _ = case
    with pytest.raises(SegXAIInputError, match="takes 2 input volume"):
        module.SegXAILogic(scene).process(volumes[:1], model=card, device="cpu")
    logic = module.SegXAILogic(scene)
    with pytest.raises(SegXAIInputError, match="no case"):
        logic.qa(logic.caseSettings(card, ["vanilla_gradient"], device="cpu"))
    assert not logic.busy  # nothing was started


def test_logic_asks_for_a_refused_long_computation_and_runs_it_confirmed(module, case):
    """A computation estimated over the time limit: the job is refused before it starts, the
    Logic gives the message with the estimate (what the panel asks with), and the same request
    confirmed (:meth:`runConfirmed`) shows the map the library gives with no limit."""
    from SegXAILib import mrml
    from SegXAILib.attribution import explain
    from SegXAILib.models import load_model, load_model_card

    scene, volumes, card, truth, image = case
    logic = module.SegXAILogic(scene, env={"SEGXAI_MAX_MINUTES": "0.00001", "OMP_NUM_THREADS": "1"})  # 0.6 ms
    settings = logic.caseSettings(card, ["guided_backprop"], device="cpu", qaMethod="")
    launch = lambda: logic.segment(volumes, settings)  # noqa: E731 - what the panel's button starts
    launch()
    update = logic.wait(300)
    refusal = logic.costRefusal(update)
    # per-voxel aggregation (the default) over the class: one term per predicted voxel
    assert f"per-voxel maps: {int(truth.sum())} sample(s)" in refusal and "over the time limit" in refusal
    assert update.status.refusal["items"] == int(truth.sum())
    assert logic.costRefusal(update) == update.error
    logic.runConfirmed(launch)
    assert logic.session.env["SEGXAI_MAX_MINUTES"] == "0.00001"  # confirmed for that job only
    update = logic.wait(300)
    assert update.state == "done" and logic.costRefusal(update) == "", update.error
    assert update.status.estimate.startswith("per-voxel maps")  # what the status label shows while it runs
    shown = mrml.volume_node_to_image(logic.nodes.saliency["guided_backprop"][0]).array[0]
    direct = explain(image, load_model(load_model_card(card), device="cpu"), "guided_backprop").maps.array[0]
    np.testing.assert_allclose(shown, direct, rtol=1e-6, atol=1e-6 * np.abs(direct).max())
