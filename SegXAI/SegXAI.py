"""SegXAI: explain and quality-check 3D segmentation models in 3D Slicer.

Module / Widget / Logic / Test of the scripted module. The Logic's computing and node-making
core lives in :mod:`SegXAILib.mrml.logic` (Qt-free), so ``SegXAILogic(scene).process(...)``
also runs headless with the slicer-core wheel; the Qt imports below are guarded for that
case, and only the Module, Widget and Test need Slicer's GUI.
"""

import json
import os
import sys
import unittest


def _addCheckoutToPath():
    """From a source checkout added with "Add module path" (the SegXAI folder), make the
    sibling SegXAILib package importable; an installed extension has it beside this file."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "SegXAILib", "__init__.py")) and root not in sys.path:
        sys.path.append(root)


_addCheckoutToPath()

try:  # inside 3D Slicer
    import ctk
    import qt
    import slicer
    import vtk
    from slicer import vtkMRMLScalarVolumeNode
    from slicer.parameterNodeWrapper import parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin

    HAVE_SLICER_GUI = True
except ImportError:  # headless: slicer-core (MRML without Qt) or no Slicer at all
    HAVE_SLICER_GUI = False
    vtkMRMLScalarVolumeNode = object

    def parameterNodeWrapper(cls):
        return cls

    class ScriptedLoadableModule:  # only the Logic is usable headless
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleWidget(ScriptedLoadableModule):
        pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest(unittest.TestCase):
        pass

    class VTKObservationMixin:
        def __init__(self):
            pass


#: model input channels the panel offers selectors for
MAX_CHANNELS = 4
#: packages SegXAILib needs besides Slicer's own numpy / SimpleITK / vtk and PyTorch
PIP_REQUIREMENTS = [
    "monai>=1.3",
    "einops>=0.7",
    "gudhi>=3.8",
    "scipy>=1.10",
    "scikit-image>=0.21",
    "scikit-learn>=1.3",
    "tqdm>=4.60",
    "matplotlib>=3.7",
]
#: packages Slicer ships: never replaced by an install
SLICER_OWNED = ("numpy", "SimpleITK", "vtk")


#
# SegXAI
#


class SegXAI(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SegXAI"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SegXAI developers"]
        self.parent.helpText = (
            "Segment a scan with a PyTorch / MONAI model, see which voxels drove each contour (saliency maps), "
            "click a lesion to see what drove that lesion, and get a risk band that flags contours likely to be "
            "wrong. See the <a href=\"https://github.com/SegXAI/SegXAI/blob/main/SegXAI/README.md\">module "
            "documentation</a>."
        )
        self.parent.acknowledgementText = (
            "Sample data: ITK example head T1 (Apache-2.0). The demo models are trained on phantoms and are not "
            "clinical models."
        )


#
# Parameter node
#


@parameterNodeWrapper
class SegXAIParameterNode:
    """The panel's state, saved with the scene.

    inputVolume0..3 - one volume per model input channel, in the model card's order.
    model - a bundled model name, or "file" for the model card in modelCardPath.
    device - "auto", "cpu", "cuda:N" or "mps".
    method - attribution method (registry name); methodParameters its parameters as JSON.
    target - "class" or "instance"; instanceId the instance for "instance".
    display - "normalised" (paper 000, 17 % threshold) or "signed"; opacity of the overlay.
    riskModelPath - a calibrated QA risk model (JSON).
    """

    inputVolume0: vtkMRMLScalarVolumeNode
    inputVolume1: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    model: str = "lesions"
    modelCardPath: str = ""
    device: str = "auto"
    method: str = "smoothgrad"
    methodParameters: str = "{}"
    target: str = "class"
    instanceId: int = 1
    display: str = "normalised"
    opacity: float = 0.5
    riskModelPath: str = ""


#
# SegXAIWidget
#


class SegXAIWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Heavy work runs in the Logic's worker thread; a timer brings its progress
    and results back to the GUI thread, where nodes are made."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._methodEditors = {}
        self._pollTimer = None
        self._clickNode = None
        self._dependenciesChecked = False

    # ---- set-up ---------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegXAI.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SegXAILogic()

        self._channelLabels = [self.ui.inputVolume0Label, self.ui.inputVolume1Label, self.ui.inputVolume2Label,
                               self.ui.inputVolume3Label]
        self._channelSelectors = [self.ui.inputVolume0Selector, self.ui.inputVolume1Selector,
                                  self.ui.inputVolume2Selector, self.ui.inputVolume3Selector]
        self._methodLayout = qt.QFormLayout(self.ui.methodParametersFrame)
        self.ui.inputsCollapsibleButton.collapsed = False
        self.ui.explainCollapsibleButton.collapsed = False
        self.ui.lesionsCollapsibleButton.collapsed = True  # opened when there are lesions
        self.ui.qaCollapsibleButton.collapsed = True

        self._fillChoices()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.modelCardPathLineEdit.connect("currentPathChanged(QString)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.targetComboBox.connect("currentIndexChanged(int)", self.onTargetOrDisplayChanged)
        self.ui.displayComboBox.connect("currentIndexChanged(int)", self.onTargetOrDisplayChanged)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.explainButton.connect("clicked(bool)", self.onExplain)
        self.ui.pickLesionButton.connect("toggled(bool)", self.onPickLesionToggled)
        self.ui.qaButton.connect("clicked(bool)", self.onQA)
        self.ui.riskModelPathLineEdit.connect("currentPathChanged(QString)", self.onRiskModelChanged)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.lesionTableView.connect("selectionChanged()", self.onLesionSelected)
        for selector in self._channelSelectors:
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self.onPoll)
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setEnabled(False)
        self.initializeParameterNode()
        self.onModelChanged()
        self.onMethodChanged()

    def _fillChoices(self):
        from SegXAILib.sample_data import BUNDLED_MODELS

        self.ui.modelComboBox.clear()
        for name in BUNDLED_MODELS:
            self.ui.modelComboBox.addItem(name, name)
        self.ui.modelComboBox.addItem("model card file...", "file")
        self.ui.targetComboBox.clear()
        self.ui.targetComboBox.addItem("class (the whole segmented class)", "class")
        self.ui.targetComboBox.addItem("instance (one lesion)", "instance")
        self.ui.displayComboBox.clear()
        self.ui.displayComboBox.addItem("normalised, hide below 17 % (paper 000)", "normalised")
        self.ui.displayComboBox.addItem("signed (blue negative, red positive)", "signed")
        self.ui.deviceComboBox.clear()
        try:
            from SegXAILib.mrml.logic import available_devices

            devices = available_devices()
        except ImportError:  # torch not installed yet
            devices = [("auto", "auto"), ("cpu", "CPU")]
        for device, label in devices:
            self.ui.deviceComboBox.addItem(label, device)
        self.ui.methodComboBox.clear()
        try:
            from SegXAILib.attribution import method_specs

            self._methodSpecs = {spec["name"]: spec for spec in method_specs()}
        except ImportError:
            self._methodSpecs = {}
        for name in self._methodSpecs:
            self.ui.methodComboBox.addItem(name, name)

    def cleanup(self):
        self.removeObservers()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self.logic is not None:
            self.logic.stopWorker()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        self.ui.pickLesionButton.checked = False
        self.logic.forgetCase()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume0:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume0 = first

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # widgets with a SlicerParameterName property in the .ui follow the parameter node
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self._selectData(self.ui.modelComboBox, self._parameterNode.model)
            self._selectData(self.ui.deviceComboBox, self._parameterNode.device)
            self._selectData(self.ui.methodComboBox, self._parameterNode.method)
            self._selectData(self.ui.targetComboBox, self._parameterNode.target)
            self._selectData(self.ui.displayComboBox, self._parameterNode.display)
            self.ui.modelCardPathLineEdit.currentPath = self._parameterNode.modelCardPath
            self.ui.riskModelPathLineEdit.currentPath = self._parameterNode.riskModelPath
            self.updateButtons()

    @staticmethod
    def _selectData(comboBox, value):
        index = comboBox.findData(value)
        if index >= 0:
            comboBox.currentIndex = index

    # ---- state ------------------------------------------------------------------------------
    def _card(self):
        """The chosen model card (None when it cannot be read yet)."""
        try:
            return self.logic.engine.card(self._modelChoice())
        except Exception as error:  # a half-typed path, a broken card: say why, do not raise
            self.ui.modelInfoLabel.text = str(error)
            return None

    def _modelChoice(self):
        choice = self.ui.modelComboBox.currentData
        return self.ui.modelCardPathLineEdit.currentPath if choice == "file" else choice

    def _inputVolumes(self, card):
        return [selector.currentNode() for selector in self._channelSelectors[: len(card.input_channels)]]

    def onModelChanged(self, *args):
        choice = self.ui.modelComboBox.currentData
        self.ui.modelCardPathLineEdit.setVisible(choice == "file")
        if self._parameterNode:
            self._parameterNode.model = choice or "lesions"
            self._parameterNode.modelCardPath = self.ui.modelCardPathLineEdit.currentPath
        card = self._card()
        channels = card.input_channels if card is not None else []
        for index, (label, selector) in enumerate(zip(self._channelLabels, self._channelSelectors)):
            visible = index < len(channels)
            label.setVisible(visible)
            selector.setVisible(visible)
            if visible:
                label.text = f"{channels[index]}:"
        if card is not None:
            self.ui.modelInfoLabel.text = (f"{card.name} {card.version}: classes {', '.join(card.class_names[1:])}; "
                                           f"inputs {', '.join(card.input_channels)}")
            if len(channels) > MAX_CHANNELS:
                self.ui.modelInfoLabel.text += f" (more than {MAX_CHANNELS} inputs: use the Python console)"
        self.updateButtons()

    def onTargetOrDisplayChanged(self, *args):
        if self._parameterNode:
            self._parameterNode.target = self.ui.targetComboBox.currentData or "class"
            self._parameterNode.display = self.ui.displayComboBox.currentData or "normalised"
        self.updateButtons()

    def onRiskModelChanged(self, *args):
        if self._parameterNode:
            self._parameterNode.riskModelPath = self.ui.riskModelPathLineEdit.currentPath

    def onDeviceChanged(self, *args):
        device = self.ui.deviceComboBox.currentData or "auto"
        self.ui.deviceInfoLabel.text = self.ui.deviceComboBox.currentText
        if self._parameterNode:
            self._parameterNode.device = device

    def onMethodChanged(self, *args):
        """Rebuild the parameter form from the registry's description of the method."""
        name = self.ui.methodComboBox.currentData
        while self._methodLayout.count():
            item = self._methodLayout.takeAt(0)
            if item.widget():
                item.widget().deleteLater()
        self._methodEditors = {}
        spec = self._methodSpecs.get(name)
        if spec is None:
            return
        self.ui.methodSummaryLabel.text = spec["summary"]
        saved = {}
        if self._parameterNode and self._parameterNode.method == name:  # the saved values are this method's
            try:
                saved = json.loads(self._parameterNode.methodParameters or "{}")
            except ValueError:
                saved = {}
        elif self._parameterNode:
            self._parameterNode.method = name
            self._parameterNode.methodParameters = "{}"
        for parameter in spec["parameters"]:
            editor = self._parameterEditor(parameter, saved.get(parameter["name"], parameter["default"]))
            if editor is None:
                continue
            editor.toolTip = parameter["help"]
            self._methodLayout.addRow(parameter["name"], editor)
            self._methodEditors[parameter["name"]] = (parameter, editor)

    @staticmethod
    def _parameterEditor(parameter, value):
        kind = parameter["kind"]
        if kind == "int":
            editor = qt.QSpinBox()
            editor.minimum = int(parameter["minimum"]) if parameter["minimum"] is not None else -(2**31)
            editor.maximum = int(parameter["maximum"]) if parameter["maximum"] is not None else 2**31 - 1
            editor.value = int(value) if value is not None else 0
        elif kind == "float":
            editor = ctk.ctkDoubleSpinBox()
            editor.decimals = 4
            editor.minimum = float(parameter["minimum"]) if parameter["minimum"] is not None else -1e9
            editor.maximum = float(parameter["maximum"]) if parameter["maximum"] is not None else 1e9
            editor.value = float(value) if value is not None else 0.0
        elif kind == "bool":
            editor = qt.QCheckBox()
            editor.checked = bool(value)
        elif kind == "choice":
            editor = qt.QComboBox()
            for choice in parameter["choices"]:
                editor.addItem(str(choice))
            editor.currentText = str(value)
        else:
            if value is not None and not isinstance(value, str):
                return None  # tensors, lists: console only
            editor = qt.QLineEdit()
            editor.text = value or ""
        return editor

    def _methodParameters(self):
        values = {}
        for name, (parameter, editor) in self._methodEditors.items():
            kind = parameter["kind"]
            if kind == "int":
                values[name] = int(editor.value)
            elif kind == "float":
                values[name] = float(editor.value)
            elif kind == "bool":
                values[name] = bool(editor.checked)
            elif kind == "choice":
                values[name] = editor.currentText
            elif editor.text:
                values[name] = editor.text
        if self._parameterNode:
            self._parameterNode.methodParameters = json.dumps(values)
        return values

    def updateButtons(self, *args):
        card = self._card() if self.logic is not None else None
        busy = self.logic is not None and self.logic.busy
        ready = card is not None and all(self._inputVolumes(card)) and len(card.input_channels) <= MAX_CHANNELS
        segmented = self.logic is not None and self.logic.result is not None
        self.ui.segmentButton.enabled = ready and not busy
        self.ui.explainButton.enabled = segmented and not busy
        self.ui.pickLesionButton.enabled = segmented
        self.ui.qaButton.enabled = segmented and not busy
        self.ui.instanceSpinBox.enabled = self.ui.targetComboBox.currentData == "instance"

    # ---- dependencies ---------------------------------------------------------------------
    def ensureDependencies(self):
        """Install what is missing, on the main thread, after the user confirms."""
        if self._dependenciesChecked:
            return True
        ok = self.logic.ensureDependencies(confirm=True)
        self._dependenciesChecked = ok
        return ok

    # ---- running ----------------------------------------------------------------------------
    def _run(self, label, job, onDone):
        """Run ``job(progress, cancel)`` in the worker; ``onDone(result)`` on the GUI thread."""
        self.ui.statusLabel.text = label
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.value = 0
        self.ui.cancelButton.setEnabled(True)

        def finished(value, error):
            self.ui.progressBar.setVisible(False)
            self.ui.cancelButton.setEnabled(False)
            from SegXAILib.progress import Cancelled

            if isinstance(error, Cancelled):
                self.ui.statusLabel.text = f"{label}: cancelled"
            elif error is not None:
                self.ui.statusLabel.text = f"{label}: failed"
                with slicer.util.tryWithErrorDisplay(f"{label} failed."):
                    raise error
            else:
                with slicer.util.tryWithErrorDisplay(f"{label}: could not show the results.", waitCursor=True):
                    onDone(value)
                    self.ui.statusLabel.text = f"{label}: done"
            self.updateButtons()

        self.logic.submit(job, finished)
        self._pollTimer.start()
        self.updateButtons()

    def onPoll(self):
        (fraction, message), finished = self.logic.poll()
        self.ui.progressBar.value = int(round(100 * fraction))
        if message:
            self.ui.progressBar.setFormat(f"{message} %p%")
        for onDone, value, error in finished:
            onDone(value, error)
        if not self.logic.busy and not finished:
            self._pollTimer.stop()

    def onCancel(self):
        self.logic.cancel()
        self.ui.statusLabel.text = "cancelling..."

    def onSegment(self):
        with slicer.util.tryWithErrorDisplay("Segmentation failed.", waitCursor=True):
            if not self.ensureDependencies():
                return
            card = self._card()
            volumes = self._inputVolumes(card)
            image = self.logic.imageFromVolumes(volumes, card)
            model, device = self._modelChoice(), self.ui.deviceComboBox.currentData or "auto"
            self.logic.forgetCase()
            self._run("Segment", lambda progress, cancel: self.logic.computeSegmentation(
                image, model, device, progress=progress, cancel=cancel),
                lambda result: self._showSegmentation(result, volumes[0]))

    def _showSegmentation(self, result, referenceVolume):
        nodes = self.logic.showSegmentation(result, referenceVolume)
        if nodes.lesion_table is not None:
            self.ui.lesionTableView.setMRMLTableNode(nodes.lesion_table)
            self.ui.lesionsCollapsibleButton.collapsed = False
        slicer.util.setSliceViewerLayers(background=referenceVolume)

    def onExplain(self):
        with slicer.util.tryWithErrorDisplay("Explanation failed.", waitCursor=True):
            method = self.ui.methodComboBox.currentData
            params = {method: self._methodParameters()}
            target = "" if self.ui.targetComboBox.currentData == "class" else f"instance:{self.ui.instanceSpinBox.value}"
            device = self.ui.deviceComboBox.currentData or "auto"
            display, opacity = self.ui.displayComboBox.currentData, self.ui.opacitySliderWidget.value
            self._run(f"Explain ({method})", lambda progress, cancel: self.logic.computeExplanation(
                [method], params, target, device, progress=progress, cancel=cancel),
                lambda result: self.logic.showExplanations(display=display, opacity=opacity))

    def onPickLesionToggled(self, checked):
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        if not checked:
            interaction.SwitchToViewTransformMode()
            return
        if self._clickNode is None or self._clickNode.GetScene() is None:
            self._clickNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "SegXAI click")
            self._clickNode.CreateDefaultDisplayNodes()
            self.addObserver(self._clickNode, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onLesionClicked)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
        selection.SetActivePlaceNodeID(self._clickNode.GetID())
        interaction.SetPlaceModePersistence(1)
        interaction.SetCurrentInteractionMode(interaction.Place)

    def onLesionClicked(self, caller=None, event=None):
        with slicer.util.tryWithErrorDisplay("Pick lesion failed.", waitCursor=True):
            instanceId = self.logic.instanceAtClick(self._clickNode)
            self.ui.instanceSpinBox.value = instanceId
            device = self.ui.deviceComboBox.currentData or "auto"
            display, opacity = self.ui.displayComboBox.currentData, self.ui.opacitySliderWidget.value
            self._run(f"Lesion {instanceId} saliency", lambda progress, cancel: self.logic.computeInstanceSaliency(
                instanceId, device, progress=progress, cancel=cancel),
                lambda result: self.logic.showInstanceSaliency(instanceId, display=display, opacity=opacity))

    def onLesionSelected(self):
        """Jump the slice views to the selected lesion's centroid."""
        table = self.logic.nodes.lesion_table if self.logic.nodes is not None else None
        rows = self.ui.lesionTableView.selectedMRMLTableRowIndices() if table is not None else []
        if table is None or not rows:
            return
        from SegXAILib.mrml import jump_slices_to, table_node_columns

        columns = table_node_columns(table)
        row = rows[0]
        if all(f"centroid_{axis}" in columns for axis in "RAS"):
            jump_slices_to(slicer.mrmlScene, [columns[f"centroid_{axis}"][row] for axis in "RAS"])

    def onQA(self):
        with slicer.util.tryWithErrorDisplay("QA failed.", waitCursor=True):
            riskModel = self.ui.riskModelPathLineEdit.currentPath or None
            device = self.ui.deviceComboBox.currentData or "auto"
            method = self.ui.methodComboBox.currentData
            self._run("QA", lambda progress, cancel: self.logic.computeQA(
                riskModel, method, device, progress=progress, cancel=cancel), self._showQA)

    def _showQA(self, result):
        nodes = self.logic.showQA(riskModelName=os.path.basename(self.ui.riskModelPathLineEdit.currentPath or ""))
        risk = self.logic.result.risk
        if risk is None:
            self.ui.riskBandLabel.text = "EC curve only (no risk model chosen)"
        else:
            self.ui.riskBandLabel.text = (f"risk band: {risk['band'].upper()}  (PC1 {risk['pc1']:.3g}, "
                                          f"estimated Dice {risk['estimated_dice']:.2f})")
        slicer.modules.plots.logic().ShowChartInLayout(nodes.chart)


#
# SegXAILogic
#


class SegXAILogic(ScriptedLoadableModuleLogic):
    """Everything the module computes, usable without the panel (Python console, batch).

    ``SegXAILogic().process(inputVolumes, model="lesions", methods=["smoothgrad"])`` runs a
    whole case; the compute* methods run in the worker (no MRML), the show* methods make the
    nodes (main thread). ``scene`` defaults to ``slicer.mrmlScene``; give one headless.
    """

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self._engine = None
        self._worker = None
        self.result = None
        self.nodes = None
        self.referenceVolume = None
        self._model = "lesions"

    # ---- plumbing ---------------------------------------------------------------------------
    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer

        return slicer.mrmlScene

    @property
    def engine(self):
        if self._engine is None:
            from SegXAILib.mrml.logic import CaseEngine

            self._engine = CaseEngine()
        return self._engine

    def getParameterNode(self):
        return SegXAIParameterNode(super().getParameterNode())

    def submit(self, job, onDone):
        """Queue ``job(progress, cancel)`` on the persistent worker thread."""
        if self._worker is None:
            from SegXAILib.mrml.logic import Worker

            self._worker = Worker()
        return self._worker.submit(job, onDone)

    def poll(self):
        if self._worker is None:
            return (0.0, ""), []
        return self._worker.poll()

    @property
    def busy(self):
        return self._worker is not None and self._worker.busy

    def cancel(self):
        if self._worker is not None:
            self._worker.cancel()

    def waitForWorker(self, timeout=600.0):
        """Block until the queued jobs are done and run their callbacks (console / batch use)."""
        if self._worker is None:
            return
        for onDone, value, error in self._worker.wait(timeout):
            onDone(value, error)

    def stopWorker(self):
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def forgetCase(self):
        self.result, self.nodes, self.referenceVolume = None, None, None

    # ---- dependencies (main thread) ---------------------------------------------------------
    def missingRequirements(self):
        """The PIP_REQUIREMENTS (and torch) that cannot be imported here."""
        import importlib.util

        modules = {"monai": "monai", "einops": "einops", "gudhi": "gudhi", "scipy": "scipy",
                   "scikit-image": "skimage", "scikit-learn": "sklearn", "tqdm": "tqdm", "matplotlib": "matplotlib"}
        missing = [r for r in PIP_REQUIREMENTS if importlib.util.find_spec(modules[r.split(">")[0]]) is None]
        if importlib.util.find_spec("torch") is None:
            missing.insert(0, "torch")
        return missing

    def ensureDependencies(self, confirm=True):
        """Install PyTorch (through the PyTorch extension's PyTorchUtils when present) and the
        other packages (``slicer.packaging.pip_ensure``, else ``slicer.util.pip_install``) with
        the user's confirmation. Slicer's numpy, SimpleITK and vtk are pinned to the installed
        versions so that no install replaces them. Returns True when everything is importable."""
        import importlib.metadata

        missing = self.missingRequirements()
        if not missing:
            return True
        import slicer

        if "torch" in missing:
            try:
                import PyTorchUtils

                torchLogic = PyTorchUtils.PyTorchUtilsLogic()
                if torchLogic.installTorch(askConfirmation=confirm, torchVersionRequirement=">=2.1") is None:
                    return False
            except ImportError:
                if confirm and not slicer.util.confirmOkCancelDisplay(
                        "SegXAI needs PyTorch. Install the CPU/CUDA build pip chooses now? (Installing the PyTorch "
                        "extension from the Extensions Manager picks the right CUDA build.)"):
                    return False
                slicer.util.pip_install("torch>=2.1")
            missing.remove("torch")
        if missing:
            pins = []
            for package in SLICER_OWNED:
                try:
                    pins.append(f"{package}=={importlib.metadata.version(package)}")
                except importlib.metadata.PackageNotFoundError:
                    pass
            constraints = os.path.join(slicer.app.temporaryPath, "SegXAI-constraints.txt")
            with open(constraints, "w", encoding="utf-8") as handle:
                handle.write("\n".join(pins) + "\n")
            packaging = getattr(slicer, "packaging", None)
            if packaging is not None and hasattr(packaging, "pip_ensure"):
                packaging.pip_ensure(missing, requester="SegXAI", constraints=constraints)
            else:
                if confirm and not slicer.util.confirmOkCancelDisplay(
                        "SegXAI needs these Python packages: " + ", ".join(missing) + ". Install them now?"):
                    return False
                slicer.util.pip_install(missing + ["-c", constraints])
        return not self.missingRequirements()

    # ---- computing (worker thread: no MRML here) --------------------------------------------
    def imageFromVolumes(self, inputVolumes, card):
        """The input volumes (main thread) as one multi-channel image in the card's order."""
        from SegXAILib.mrml import channel_image_from_volume_nodes

        volumes = list(inputVolumes)
        if len(volumes) != len(card.input_channels) or not all(volumes):
            raise ValueError(f"model {card.name} needs {len(card.input_channels)} input volume(s): "
                             f"{', '.join(card.input_channels)}")
        self.referenceVolume = volumes[0]
        return channel_image_from_volume_nodes(volumes, card.input_channels)

    def computeSegmentation(self, image, model, device="auto", progress=None, cancel=None):
        self.result = self.engine.segment(image, model, device, progress=progress, cancel=cancel)
        self._model = model
        return self.result

    def computeExplanation(self, methods, params=None, target="", device="auto", progress=None, cancel=None):
        self._requireCase()
        return self.engine.explain(self.result, self._model, methods, params, target=target, device=device,
                                   progress=progress, cancel=cancel)

    def computeInstanceSaliency(self, instanceId, device="auto", progress=None, cancel=None, **kwargs):
        self._requireCase()
        return self.engine.instance_saliency(self.result, self._model, int(instanceId), device=device,
                                             progress=progress, cancel=cancel, **kwargs)

    def computeQA(self, riskModel=None, method="", device="auto", progress=None, cancel=None):
        self._requireCase()
        return self.engine.qa(self.result, self._model, risk_model=riskModel, method=method, device=device,
                              progress=progress, cancel=cancel)

    def _requireCase(self):
        if self.result is None:
            raise ValueError("segment a case first")

    # ---- nodes (main thread) ----------------------------------------------------------------
    def showSegmentation(self, result=None, referenceVolume=None):
        from SegXAILib.mrml.logic import show_segmentation

        self.referenceVolume = referenceVolume or self.referenceVolume
        self.nodes = show_segmentation(self.scene, result or self.result, reference_volume=self.referenceVolume)
        return self.nodes

    def showExplanations(self, display="normalised", opacity=0.5):
        from SegXAILib.mrml.logic import show_explanations

        return show_explanations(self.scene, self.result, self.nodes, reference_volume=self.referenceVolume,
                                 display=display, opacity=opacity)

    def showInstanceSaliency(self, instanceId, display="normalised", opacity=0.5):
        from SegXAILib.mrml.logic import show_instance_saliency

        return show_instance_saliency(self.scene, self.result, int(instanceId), self.nodes,
                                      reference_volume=self.referenceVolume, display=display, opacity=opacity)

    def showQA(self, riskModelName=""):
        from SegXAILib.mrml.logic import show_qa

        return show_qa(self.scene, self.result, self.nodes, risk_model_name=riskModelName)

    def instanceAtClick(self, markupsNode, radiusMm=5.0):
        """The instance id under the last point of ``markupsNode`` (a click in a slice view)."""
        from SegXAILib.mrml import instance_from_markup

        self._requireCase()
        return instance_from_markup(markupsNode, self.result.instance_labels, radius_mm=radiusMm)

    # ---- one call -----------------------------------------------------------------------------
    def process(self, inputVolumes, model="lesions", methods=(), params=None, target="", device="auto",
                riskModel=None, instances=(), display="normalised", progress=None, cancel=None):
        """Segment, explain (``methods``), instance saliency (``instances``) and QA for one case.

        Parameters
        ----------
        inputVolumes : list of vtkMRMLScalarVolumeNode
            One per model input channel, in the card's order (``lesions``: FLAIR, T1).
        model : str
            A bundled model (``lesions``, ``parotid-S2``...) or a model card file.
        methods : list of str
            Attribution methods (``segxai methods``); ``params`` {method: {name: value}}.
        riskModel : str, optional
            A QA risk model JSON file.

        Returns
        -------
        SegXAILib.mrml.logic.CaseNodes
            The segmentation, instances, saliency volumes, lesion table, QA table and chart.
        """
        from SegXAILib.mrml.logic import process

        self.referenceVolume = inputVolumes[0]
        self._model = model
        self.result, self.nodes = process(self.scene, inputVolumes, model=model, methods=methods, params=params,
                                          target=target, device=device, risk_model=riskModel, instances=instances,
                                          display=display, engine=self.engine, progress=progress, cancel=cancel)
        return self.nodes


#
# SegXAITest
#


class SegXAITest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: the bundled sample end to end through the Logic and the worker."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_bundled_sample_end_to_end()
        self.setUp()
        self.test_worker_keeps_the_model_and_cancels()

    def _sampleVolumes(self):
        from SegXAILib.mrml import image_to_volume_node
        from SegXAILib.phantoms import make_lesion_phantom
        from SegXAILib.sample_data import load_sample_head

        phantom = make_lesion_phantom(load_sample_head(), seed=2026)
        volumes = [image_to_volume_node(phantom.image, slicer.mrmlScene, name, channel=name)
                   for name in phantom.image.channel_names]
        return phantom, volumes

    def test_bundled_sample_end_to_end(self):
        import numpy as np

        from SegXAILib.metrics import dice_score
        from SegXAILib.mrml import segment_mask, volume_node_to_image

        self.delayDisplay("Segmenting the bundled sample with the lesion model")
        phantom, volumes = self._sampleVolumes()
        logic = SegXAILogic()
        nodes = logic.process(volumes, model="lesions", methods=["vanilla_gradient"], instances=[1], device="cpu")
        grid = volume_node_to_image(volumes[0])
        mask = segment_mask(nodes.segmentation, "lesion", grid)
        self.assertTrue(np.array_equal(mask, logic.result.segmentation.mask(1)))
        self.assertGreater(dice_score(mask, phantom.truth), 0.7)
        self.assertEqual(len(nodes.saliency["vanilla_gradient"]), 2)
        self.assertEqual(nodes.lesion_table.GetNumberOfRows(), len(logic.result.instances))
        self.assertEqual(nodes.chart.GetNumberOfPlotSeriesNodes(), 1)
        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(composite.GetForegroundVolumeID(), nodes.instance_saliency[1][0].GetID())
        self.delayDisplay("Saving and reloading the scene bundle")
        from SegXAILib.mrml import save_scene_bundle

        path = os.path.join(slicer.app.temporaryPath, "SegXAITest.mrb")
        save_scene_bundle(slicer.mrmlScene, path)
        slicer.mrmlScene.Clear()
        slicer.util.loadScene(path)
        self.assertIsNotNone(slicer.mrmlScene.GetFirstNodeByName("SegXAI segmentation"))
        self.delayDisplay("Test passed")

    def test_worker_keeps_the_model_and_cancels(self):
        import time

        phantom, volumes = self._sampleVolumes()
        logic = SegXAILogic()
        card = logic.engine.card("lesions")
        image = logic.imageFromVolumes(volumes, card)
        outcomes = []
        logic.submit(lambda p, c: logic.computeSegmentation(image, "lesions", "cpu", p, c), lambda v, e: outcomes.append(e))
        logic.submit(lambda p, c: logic.computeExplanation(["smoothgrad"], {"smoothgrad": {"n_samples": 200}},
                                                           device="cpu", progress=p, cancel=c),
                     lambda v, e: outcomes.append(e))
        deadline = time.time() + 300
        while len(outcomes) < 1 and time.time() < deadline:
            for onDone, value, error in logic.poll()[1]:
                onDone(value, error)
            slicer.app.processEvents()
        time.sleep(1.0)
        start = time.time()
        logic.cancel()
        while len(outcomes) < 2 and time.time() < deadline:
            for onDone, value, error in logic.poll()[1]:
                onDone(value, error)
            slicer.app.processEvents()
        from SegXAILib.progress import Cancelled

        self.assertIsNone(outcomes[0])
        self.assertIsInstance(outcomes[1], Cancelled)
        self.delayDisplay(f"Cancelled after {time.time() - start:.2f} s")
        logic.submit(lambda p, c: logic.computeExplanation(["vanilla_gradient"], device="cpu", progress=p, cancel=c),
                     lambda v, e: outcomes.append(e))
        while len(outcomes) < 3 and time.time() < deadline:
            for onDone, value, error in logic.poll()[1]:
                onDone(value, error)
            slicer.app.processEvents()
        self.assertIsNone(outcomes[2])
        self.assertEqual(logic.engine.loads, 1)  # the worker kept the model loaded across the three jobs
        logic.stopWorker()
