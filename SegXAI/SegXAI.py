"""SegXAI: explain and quality-check 3D segmentation models in 3D Slicer.

Module / Widget / Logic / Test of the scripted module. The Logic is a thin caller of the case
pipeline (:mod:`SegXAILib.pipeline`: settings, ``run_case`` and its steps) and of the Qt-free
node-making in :mod:`SegXAILib.mrml.logic`, so ``SegXAILogic(scene).process(...)`` also runs
headless with the slicer-core wheel; the Qt imports below are guarded for that case, and only
the Module, Widget and Test need Slicer's GUI. Beside this file: ``SegXAIInstaller.py`` (the
first-run dependency install) and ``SegXAIMethodForm.py`` (the method's parameter form).
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
        self._methodForm = None
        self._methodSpecs = {}
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
        from SegXAIMethodForm import MethodForm

        self._methodForm = MethodForm(self.ui.methodParametersFrame)
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
        from SegXAIMethodForm import methodSpecs

        self._methodSpecs = methodSpecs()
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
            return self.logic.modelCard(self._modelChoice())
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
        from SegXAIMethodForm import savedParameters

        name = self.ui.methodComboBox.currentData
        spec = self._methodSpecs.get(name)
        if spec is None:
            self._methodForm.build(None, {})
            return
        self.ui.methodSummaryLabel.text = spec["summary"]
        saved = {}
        if self._parameterNode and self._parameterNode.method == name:  # the saved values are this method's
            saved = savedParameters(self._parameterNode.methodParameters)
        elif self._parameterNode:
            self._parameterNode.method = name
            self._parameterNode.methodParameters = "{}"
        self._methodForm.build(spec, saved)

    def _methodParameters(self):
        """The form's values, saved in the parameter node."""
        values = self._methodForm.values()
        if self._parameterNode:
            self._parameterNode.methodParameters = json.dumps(values)
        return values

    def _caseSettings(self, withMethod=False):
        """The case settings of the parameter node's choices (the chosen method's map with
        ``withMethod``); the Logic validates them."""
        node = self._parameterNode
        model = node.modelCardPath if node.model == "file" else node.model
        target = "" if node.target == "class" else f"instance:{node.instanceId}"
        methods, params = [], None
        if withMethod:
            methods, params = [node.method], {node.method: self._methodParameters()}
        # QA is its own step (computeQA): the case's settings name only what was computed
        return self.logic.caseSettings(model, methods, params, target=target, device=node.device or "auto",
                                       qaMethod="")

    def updateButtons(self, *args):
        card = self._card() if self.logic is not None else None
        busy = self.logic is not None and self.logic.busy
        ready = card is not None and all(self._inputVolumes(card)) and len(card.input_channels) <= MAX_CHANNELS
        segmented = self.logic is not None and self.logic.case is not None
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
        import SegXAIInstaller

        ok = SegXAIInstaller.ensureDependencies(confirm=True)
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
            settings = self._caseSettings()
            volumes = self._inputVolumes(self.logic.modelCard(settings.model))
            self.logic.forgetCase()
            image = self.logic.caseImage(volumes, settings)
            self._run("Segment", lambda progress, cancel: self.logic.computeSegmentation(
                image, settings, progress=progress, cancel=cancel),
                lambda case: self._showSegmentation(volumes[0]))

    def _showSegmentation(self, referenceVolume):
        nodes = self.logic.showSegmentation(referenceVolume)
        if nodes.lesion_table is not None:
            self.ui.lesionTableView.setMRMLTableNode(nodes.lesion_table)
            self.ui.lesionsCollapsibleButton.collapsed = False
        slicer.util.setSliceViewerLayers(background=referenceVolume)

    def onExplain(self):
        with slicer.util.tryWithErrorDisplay("Explanation failed.", waitCursor=True):
            methods = self._caseSettings(withMethod=True).methods
            names = [m.name for m in methods]
            display, opacity = self.ui.displayComboBox.currentData, self.ui.opacitySliderWidget.value
            self._run(f"Explain ({', '.join(names)})", lambda progress, cancel: self.logic.computeExplanation(
                methods, progress=progress, cancel=cancel),
                lambda case: self.logic.showExplanations(display=display, opacity=opacity, maps=names))

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
            display, opacity = self.ui.displayComboBox.currentData, self.ui.opacitySliderWidget.value
            self._run(f"Lesion {instanceId} saliency", lambda progress, cancel: self.logic.computeInstanceSaliency(
                instanceId, progress=progress, cancel=cancel),
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
            # without a risk model: the EC curve of the chosen method's map when it was computed
            method = self._parameterNode.method if self._parameterNode else ""
            method = method if method in self.logic.case.maps else ""
            self._run("QA", lambda progress, cancel: self.logic.computeQA(
                riskModel, method, progress=progress, cancel=cancel), self._showQA)

    def _showQA(self, qa):
        nodes = self.logic.showQA()
        risk = qa.risk
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
    """Everything the module runs, usable without the panel (Python console, batch).

    A thin caller of the case pipeline (:mod:`SegXAILib.pipeline`): :meth:`caseSettings` turns
    the panel's choices into a validated :class:`~SegXAILib.pipeline.CaseSettings`,
    :meth:`process` runs a whole case (``run_case``) and shows it, the compute* methods run
    the pipeline's incremental steps in the worker (no MRML) and the show* methods make the
    nodes (main thread). ``scene`` defaults to ``slicer.mrmlScene``; give one headless.

    Attributes
    ----------
    models : SegXAILib.pipeline.ModelCache
        The loaded network, kept between jobs and cases.
    case : SegXAILib.pipeline.Case or None
        The current case.
    nodes : SegXAILib.mrml.logic.CaseNodes or None
        The nodes showing it.
    referenceVolume : vtkMRMLScalarVolumeNode or None
        The first input volume (the geometry of every node made).
    """

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self._models = None
        self._worker = None
        self.case = None
        self.nodes = None
        self.referenceVolume = None

    # ---- plumbing ---------------------------------------------------------------------------
    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer

        return slicer.mrmlScene

    @property
    def models(self):
        # made on first use: the panel (and this Logic) exist before the dependencies the
        # pipeline imports (torch, pydantic) are installed
        if self._models is None:
            from SegXAILib.pipeline import ModelCache

            self._models = ModelCache()
        return self._models

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
        self.case, self.nodes, self.referenceVolume = None, None, None

    # ---- settings -----------------------------------------------------------------------------
    @staticmethod
    def modelCard(model):
        """The model card of a bundled name, a card file or folder, or a ModelCard."""
        from SegXAILib.pipeline import resolve_model_card

        return resolve_model_card(model)

    @staticmethod
    def caseSettings(model="lesions", methods=(), params=None, target="", device="auto", riskModel=None,
                     qaMethod=None, instances=None, aggregation="mean", instanceParams=None, className="",
                     trustBundle=False):
        """Validated :class:`~SegXAILib.pipeline.CaseSettings` from the panel's choices.

        Parameters
        ----------
        model : str, path or ModelCard
            A bundled model (``lesions``, ``parotid-S2``...) or a model card file / folder.
        methods : sequence of str or MethodSettings
            Class-level maps: registry names (``segxai methods``), each with
            ``params[name]`` and ``target``, or ready MethodSettings.
        params : dict, optional
            ``{method: {parameter: value}}``; a method that is not in ``methods`` or a parameter
            the method does not take is an error.
        target : str
            The maps' target (``class:NAME``, ``instance:ID``...); the structure's class when empty.
        device : str
            ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        riskModel : str or path, optional
            A QA risk model JSON file, or ``bundled:<model>/<method>``.
        qaMethod : str, optional
            Without a risk model, the map whose EC curve QA shows: the first of ``methods``
            when None, no QA when ``""``.
        instances : sequence of int, optional
            Instances (1 = largest) that get an instance map; none when None.
        aggregation : str
            The instance maps' aggregation, ``mean`` (paper 001 eq. 2, one backward per noise
            sample; the panel's default) or ``max`` (eq. 3, one per lesion voxel and sample).
        instanceParams : dict, optional
            Further :class:`~SegXAILib.pipeline.InstanceSettings` fields (``n_samples``,
            ``noise_level``, ``batch_size``, ``seed``, ``min_voxels``, ``shell_mm``).
        className : str
            The structure (the model's first foreground class when empty).
        trustBundle : bool
            Allow MONAI bundles (their configs execute code).

        Raises
        ------
        SegXAIInputError
            Any invalid choice, naming the setting.
        """
        from SegXAILib.image import SegXAIInputError
        from SegXAILib.models.card import ModelCard
        from SegXAILib.pipeline import CaseSettings, MethodSettings

        params = dict(params or {})
        if isinstance(model, ModelCard):
            if model.path is None:
                raise SegXAIInputError("model: a ModelCard without a file; give its path")
            model = model.path
        entries = []
        for method in methods:
            if isinstance(method, MethodSettings):
                entries.append(method.model_dump())
            else:
                entries.append({"method": str(method), "params": dict(params.get(method) or {}), "target": target})
        unknown = sorted(set(params) - {entry["method"] for entry in entries})
        if unknown:  # never dropped: a parameter dict meant for another method is a mistake
            raise SegXAIInputError(f"params: {unknown} are not among the methods {[e['method'] for e in entries]}")
        if riskModel:
            qa = {"risk_model": str(riskModel)}
        else:
            first = (entries[0].get("label") or entries[0]["method"]) if entries else ""
            qa = {"method": first if qaMethod is None else qaMethod}
        chosen = {"ids": [int(i) for i in instances] if instances is not None else [],
                  "aggregations": [aggregation], **dict(instanceParams or {})}
        return CaseSettings.from_dict({"model": str(model), "class_name": className, "methods": entries,
                                       "instances": chosen, "qa": qa, "device": device,
                                       "trust_bundle": bool(trustBundle)}, source="settings")

    def caseImage(self, inputVolumes, settings):
        """The input volumes (main thread) as one ``(C, I, J, K)`` image in the card's order; the
        first becomes the reference volume of the nodes to come."""
        from SegXAILib.mrml.logic import case_image

        image = case_image(inputVolumes, self.modelCard(settings.model))
        self.referenceVolume = inputVolumes[0]
        return image

    # ---- computing (worker thread: no MRML here) --------------------------------------------
    def computeSegmentation(self, image, settings, progress=None, cancel=None):
        """Start a case: its one prediction, instances and lesion table (``start_case``)."""
        from SegXAILib.pipeline import start_case

        model = self.models.get(settings)
        self.case = start_case(image, model, settings, progress=progress, cancel=cancel)
        return self.case

    def computeExplanation(self, methods, progress=None, cancel=None):
        """Class-level maps of ``methods`` (MethodSettings, e.g. ``caseSettings(...).methods``,
        or their dicts) into the case (``add_maps``); a map of the same name is replaced."""
        from SegXAILib.pipeline import MethodSettings, add_maps

        case = self._requireCase()
        entries = [m.model_dump() if isinstance(m, MethodSettings) else dict(m) for m in methods]
        names = [entry.get("label") or entry.get("method", "") for entry in entries]
        # validated as part of the case's settings, which keep naming the case's maps (QA's
        # qa.method must be one of them)
        settings = self._settingsWith(methods=[m.model_dump() for m in case.settings.methods if m.name not in names]
                                      + entries)
        add_maps(case, self.models.get(case.settings), [settings.method(name) for name in names],
                 progress=progress, cancel=cancel)
        case.settings = settings
        return case

    def computeInstanceSaliency(self, instanceId, progress=None, cancel=None):
        """The instance map of one instance (``add_instance_maps``) under the case's instance
        settings; returns ``{aggregation: Image (C, I, J, K)}``."""
        from SegXAILib.image import SegXAIInputError
        from SegXAILib.pipeline import add_instance_maps

        case = self._requireCase()
        instanceId = int(instanceId)
        if not 1 <= instanceId <= len(case.instances):
            raise SegXAIInputError(f"instance {instanceId}: the prediction has {len(case.instances)} instance(s) of "
                                   f"{case.structure!r}")
        add_instance_maps(case, self.models.get(case.settings), [instanceId], progress=progress, cancel=cancel)
        ids = case.settings.instances.ids
        if ids is not None and instanceId not in ids:
            case.settings = self._settingsWith(instances={**case.settings.instances.model_dump(),
                                                          "ids": [*ids, instanceId]})
        return case.instance_maps[instanceId]

    def computeQA(self, riskModel=None, method="", progress=None, cancel=None):
        """The QA of the structure (``add_qa``): with ``riskModel`` its risk band, else the EC
        curve of the map ``method`` (the first map of the case when empty)."""
        from SegXAILib.pipeline import add_qa

        case = self._requireCase()
        if riskModel:
            qa = {"risk_model": str(riskModel)}
        else:
            qa = {"method": method or next(iter(case.maps), "")}
        previous = case.settings
        case.settings = self._settingsWith(qa=qa)
        try:
            add_qa(case, self.models.get(case.settings), progress=progress, cancel=cancel)
        except BaseException:
            case.settings = previous  # the settings keep describing what the case holds
            raise
        return case.qa

    def _settingsWith(self, **changes):
        """The case's settings with ``changes`` (JSON-ready fields), validated."""
        from SegXAILib.pipeline import CaseSettings

        return CaseSettings.from_dict({**self.case.settings.to_dict(), **changes}, source="settings")

    def _requireCase(self):
        if self.case is None:
            from SegXAILib.image import SegXAIInputError

            raise SegXAIInputError("no case: segment the input volumes first")
        return self.case

    # ---- nodes (main thread) ----------------------------------------------------------------
    def showSegmentation(self, referenceVolume=None):
        from SegXAILib.mrml.logic import show_segmentation

        self.referenceVolume = referenceVolume or self.referenceVolume
        self.nodes = show_segmentation(self.scene, self._requireCase(), reference_volume=self.referenceVolume)
        return self.nodes

    def showExplanations(self, display="normalised", opacity=0.5, maps=None):
        """Saliency volumes of the case's maps (``maps``: their names, all by default)."""
        from SegXAILib.mrml.logic import show_explanations

        return show_explanations(self.scene, self._requireCase(), self.nodes, reference_volume=self.referenceVolume,
                                 display=display, opacity=opacity, maps=maps)

    def showInstanceSaliency(self, instanceId, display="normalised", opacity=0.5):
        from SegXAILib.mrml.logic import show_instance_saliency

        return show_instance_saliency(self.scene, self._requireCase(), int(instanceId), self.nodes,
                                      reference_volume=self.referenceVolume, display=display, opacity=opacity)

    def showQA(self):
        from SegXAILib.mrml.logic import show_qa

        return show_qa(self.scene, self._requireCase(), self.nodes)

    def instanceAtClick(self, markupsNode, radiusMm=5.0):
        """The instance id under the last point of ``markupsNode`` (a click in a slice view)."""
        from SegXAILib.image import SegXAIInputError
        from SegXAILib.mrml import instance_from_markup

        case = self._requireCase()
        if case.instance_labels is None:
            raise SegXAIInputError("the case has no instances (settings.instances.enabled is false)")
        return instance_from_markup(markupsNode, case.instance_labels, radius_mm=radiusMm)

    # ---- one call -----------------------------------------------------------------------------
    def process(self, inputVolumes, settings=None, display="normalised", progress=None, cancel=None, **choices):
        """Run one case through the pipeline (``run_case``) and show it.

        Parameters
        ----------
        inputVolumes : list of vtkMRMLScalarVolumeNode
            One per model input channel, in the card's order (``lesions``: FLAIR, T1).
        settings : SegXAILib.pipeline.CaseSettings, optional
            What to run. Instead, the keywords of :meth:`caseSettings` (``model="lesions",
            methods=["smoothgrad"], instances=[1], riskModel=...``).
        display : str
            ``normalised`` (paper 000, 17 % threshold) or ``signed``.

        Returns
        -------
        SegXAILib.mrml.logic.CaseNodes
            The segmentation, instances, saliency volumes, lesion table, QA table and chart;
            the case itself is ``self.case``.
        """
        from SegXAILib.image import SegXAIInputError
        from SegXAILib.mrml.logic import process
        from SegXAILib.pipeline import CaseSettings

        if settings is None:
            settings = self.caseSettings(**choices)
        elif choices:
            raise SegXAIInputError(f"process: give settings or the choices {sorted(choices)}, not both")
        elif not isinstance(settings, CaseSettings):
            raise SegXAIInputError(f"settings: expected CaseSettings (see caseSettings), got {type(settings).__name__}")
        self.case, self.nodes = process(self.scene, inputVolumes, settings, model=self.models.get(settings),
                                        display=display, progress=progress, cancel=cancel)
        self.referenceVolume = inputVolumes[0]
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
        self.assertTrue(np.array_equal(mask, logic.case.mask))
        self.assertGreater(dice_score(mask, phantom.truth), 0.7)
        self.assertEqual(len(nodes.saliency["vanilla_gradient"]), 2)
        self.assertEqual(nodes.lesion_table.GetNumberOfRows(), len(logic.case.instances))
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
        settings = logic.caseSettings("lesions", device="cpu")
        image = logic.caseImage(volumes, settings)
        slow = logic.caseSettings("lesions", ["smoothgrad"], {"smoothgrad": {"n_samples": 200}}, device="cpu").methods
        outcomes = []
        logic.submit(lambda p, c: logic.computeSegmentation(image, settings, p, c), lambda v, e: outcomes.append(e))
        logic.submit(lambda p, c: logic.computeExplanation(slow, progress=p, cancel=c),
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
        quick = logic.caseSettings("lesions", ["vanilla_gradient"], device="cpu").methods
        logic.submit(lambda p, c: logic.computeExplanation(quick, progress=p, cancel=c),
                     lambda v, e: outcomes.append(e))
        while len(outcomes) < 3 and time.time() < deadline:
            for onDone, value, error in logic.poll()[1]:
                onDone(value, error)
            slicer.app.processEvents()
        self.assertIsNone(outcomes[2])
        self.assertEqual(logic.models.loads, 1)  # the worker kept the model loaded across the three jobs
        logic.stopWorker()
