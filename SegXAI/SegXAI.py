"""SegXAI: explain and quality-check 3D segmentation models in 3D Slicer.

Module / Widget / Logic / Test of the scripted module. Heavy work never runs in Slicer's
interpreter: each action launches the engine process (PythonSlicer running ``segxai run``,
:class:`SegXAILib.pipeline.EngineJob`) and the panel's timer polls it; the job flow (launch,
progress with ETA, cancel, failure, import of the results as nodes) is the Qt-free
:class:`SegXAILib.mrml.session.CaseSession`, tested headless with slicer-core. The Logic is a
thin caller of it and of the pipeline's settings, so ``SegXAILogic(scene).process(...)`` also
runs headless; the Qt imports below are guarded for that case, and only the Module, Widget and
Test need Slicer's GUI. Beside this file: ``SegXAIInstaller.py`` (the dependency install) and
``SegXAIMethodForm.py`` (the method's parameter form).
"""

import json
import logging
import os
import sys
import unittest
from pathlib import Path
from typing import Annotated


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
    from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
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

    class WithinRange:  # the annotation's bounds, read by the conformance test's checker
        def __init__(self, minimum, maximum):
            self.minimum, self.maximum = minimum, maximum

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
#: the instance id spin box's range (the .ui's minimum and maximum)
MAX_INSTANCE_ID = 100000
#: the uncertainty samples the panel offers (more: the Python console or segxai uncertainty)
MAX_UNCERTAINTY_SAMPLES = 1000
MAX_SEED = 2**31 - 1


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
    outputFolder - where the case folders go (empty: a SegXAI folder in Slicer's temporary folder).
    counterfactualGenerators - a trained counterfactual generator pair (generators.pt or its folder).
    uncertaintySources - a key of SegXAILib.uncertainty.UNCERTAINTY_PRESETS; uncertaintySamples / uncertaintySeed the
        number of samples of a random source and its seed.
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
    # bounded: Slicer's GUI connectors refuse an unbounded float on a ctkSliderWidget and reset
    # a spin box bound to an unbounded int to the full int range
    instanceId: Annotated[int, WithinRange(1, MAX_INSTANCE_ID)] = 1
    display: str = "normalised"
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    riskModelPath: str = ""
    outputFolder: str = ""
    counterfactualGenerators: str = ""
    uncertaintySources: str = "flips"
    uncertaintySamples: Annotated[int, WithinRange(2, MAX_UNCERTAINTY_SAMPLES)] = 8
    uncertaintySeed: Annotated[int, WithinRange(0, MAX_SEED)] = 0


#
# SegXAIWidget
#


class SegXAIWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Each action launches the engine process through the Logic's
    :class:`~SegXAILib.mrml.session.CaseSession`; a timer polls it and shows its results."""

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
        self._restoring = False  # the widgets are being set from the parameter node
        self._missing = []  # Python requirements not installed yet
        self._running = ("", None)  # the label and launch of the job running (or last started)

    # ---- set-up ---------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegXAI.ui"))
        # the case's input warnings (SegXAILib.mrml.logic.input_warnings_text), above everything
        self.inputWarningLabel = qt.QLabel()
        self.inputWarningLabel.wordWrap = True
        self.inputWarningLabel.setStyleSheet("QLabel { background: #fff8c5; color: #3b2300; border: 2px solid #bf8700; "
                                             "padding: 6px; }")
        self.inputWarningLabel.setVisible(False)
        self.layout.addWidget(self.inputWarningLabel)
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
        self.ui.uncertaintyCollapsibleButton.collapsed = True
        self.ui.counterfactualCollapsibleButton.collapsed = True

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.outputFolderButton.connect("directoryChanged(QString)", self.onOutputFolderChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.modelCardPathLineEdit.connect("currentPathChanged(QString)", self.onModelCardPathChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.targetComboBox.connect("currentIndexChanged(int)", self.onTargetChanged)
        self.ui.displayComboBox.connect("currentIndexChanged(int)", self.onDisplayChanged)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.explainButton.connect("clicked(bool)", self.onExplain)
        self.ui.pickLesionButton.connect("toggled(bool)", self.onPickLesionToggled)
        self.ui.qaButton.connect("clicked(bool)", self.onQA)
        self.ui.uncertaintyButton.connect("clicked(bool)", self.onUncertainty)
        self.ui.counterfactualButton.connect("clicked(bool)", self.onCounterfactual)
        self.ui.counterfactualGeneratorsPathLineEdit.connect("currentPathChanged(QString)", self.onGeneratorsChanged)
        self.ui.uncertaintySourceComboBox.connect("currentIndexChanged(int)", self.onUncertaintySourceChanged)
        self.ui.riskModelPathLineEdit.connect("currentPathChanged(QString)", self.onRiskModelChanged)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.lesionTableView.connect("selectionChanged()", self.onLesionSelected)
        for selector in self._channelSelectors:
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)

        # the review list of given contours (a case folder of 'segxai qa score --contour'): a plain
        # read-only table under the QA section, filled from the case by contour_qa_summary
        self.contourReviewTable = qt.QTableWidget()
        self.contourReviewTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.contourReviewTable.setToolTip("Given contours against the model's prediction, most suspicious first "
                                           "(suspicion: the risk model's P(insufficient), else 1 - Dice)")
        self.contourReviewTable.setVisible(False)
        self.ui.qaCollapsibleButton.layout().addRow(self.contourReviewTable)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self.onPoll)
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setEnabled(False)
        self.refreshChoices()
        self.initializeParameterNode()

    def refreshChoices(self):
        """Fill the menus from what is installed now: at set-up and after an install (no
        restart needed). The model, device and method lists need SegXAILib's dependencies."""
        import SegXAIInstaller

        self._missing = SegXAIInstaller.missingRequirements()
        problem = SegXAIInstaller.torchProblem()
        if self._missing or problem:
            self.ui.dependenciesLabel.text = (problem or "Python packages to install: " + ", ".join(self._missing)
                                              + ". Press Install dependencies (also offered by the first action).")
        else:
            self.ui.dependenciesLabel.text = "All Python dependencies are installed."
        self.ui.installDependenciesButton.setVisible(bool(self._missing or problem))
        self.ui.setupCollapsibleButton.collapsed = not (self._missing or problem)
        self._restoring = True  # filling the menus is not a choice of the user
        try:
            self._fillChoices()
        finally:
            self._restoring = False
        if self._parameterNode:
            self._restoreFromParameterNode()
        self.onModelChanged()
        self.onMethodChanged()

    def _fillChoices(self):
        self.ui.modelComboBox.clear()
        self.ui.deviceComboBox.clear()
        self.ui.methodComboBox.clear()
        self.ui.targetComboBox.clear()
        self.ui.targetComboBox.addItem("class (the whole segmented class)", "class")
        self.ui.targetComboBox.addItem("instance (one lesion)", "instance")
        self.ui.displayComboBox.clear()
        self.ui.displayComboBox.addItem("normalised, hide below 17 % (paper 000)", "normalised")
        self.ui.displayComboBox.addItem("signed (blue negative, red positive)", "signed")
        self.ui.uncertaintySourceComboBox.clear()
        if self._missing:
            return
        from SegXAILib.uncertainty import UNCERTAINTY_PRESETS

        for key, (label, _, _) in UNCERTAINTY_PRESETS.items():
            self.ui.uncertaintySourceComboBox.addItem(label, key)
        from SegXAILib.mrml.logic import available_devices
        from SegXAILib.sample_data import BUNDLED_MODELS
        from SegXAIMethodForm import methodSpecs

        for name in BUNDLED_MODELS:
            self.ui.modelComboBox.addItem(name, name)
        self.ui.modelComboBox.addItem("model card file...", "file")
        for device, label in available_devices():
            self.ui.deviceComboBox.addItem(label, device)
        self._methodSpecs = methodSpecs()
        for name in self._methodSpecs:
            self.ui.methodComboBox.addItem(name, name)

    def cleanup(self):
        self.removeObservers()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self.logic is not None:
            self.logic.close()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.ui.pickLesionButton.checked = False  # never leave Slicer in place mode
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        self.ui.pickLesionButton.checked = False
        self.logic.close()  # a running job is cancelled; its results would land in the next scene
        self.ui.lesionTableView.setMRMLTableNode(None)
        self.ui.riskBandLabel.text = ""
        self.showContourReview()

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
            self._restoreFromParameterNode()
            self.onModelChanged()
            self.onMethodChanged()

    def _restoreFromParameterNode(self):
        """Set the other widgets from the parameter node. Their signals fire while they change:
        ``_restoring`` keeps the handlers from writing the half-restored widgets back (which
        would overwrite, e.g., the saved model card path and display mode)."""
        node = self._parameterNode
        self._restoring = True
        try:
            self.ui.modelCardPathLineEdit.currentPath = node.modelCardPath
            self.ui.riskModelPathLineEdit.currentPath = node.riskModelPath
            self.ui.counterfactualGeneratorsPathLineEdit.currentPath = node.counterfactualGenerators
            self.ui.outputFolderButton.directory = self.logic.outputFolder(node.outputFolder)
            self._selectData(self.ui.modelComboBox, node.model)
            self._selectData(self.ui.deviceComboBox, node.device)
            self._selectData(self.ui.methodComboBox, node.method)
            self._selectData(self.ui.targetComboBox, node.target)
            self._selectData(self.ui.displayComboBox, node.display)
            self._selectData(self.ui.uncertaintySourceComboBox, node.uncertaintySources)
        finally:
            self._restoring = False

    @staticmethod
    def _selectData(comboBox, value):
        index = comboBox.findData(value)
        if index >= 0:
            comboBox.currentIndex = index

    def _write(self, **fields):
        """Store the user's choices in the parameter node (not while restoring from it)."""
        if self._parameterNode and not self._restoring:
            for name, value in fields.items():
                setattr(self._parameterNode, name, value)

    # ---- state ------------------------------------------------------------------------------
    def _card(self):
        """The chosen model card (None when it cannot be read yet)."""
        if self._missing:
            return None
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

    def onModelCardPathChanged(self, *args):
        self._write(modelCardPath=self.ui.modelCardPathLineEdit.currentPath)
        self.onModelChanged()

    def onModelChanged(self, *args):
        choice = self.ui.modelComboBox.currentData
        self.ui.modelCardPathLineEdit.setVisible(choice == "file")
        if choice:
            self._write(model=choice)
        card = self._card()
        channels = card.input_channels if card is not None else []
        for index, (label, selector) in enumerate(zip(self._channelLabels, self._channelSelectors)):
            # before the dependencies are installed the card is unknown: offer the first input
            visible = index < len(channels) or (card is None and index == 0)
            label.setVisible(visible)
            selector.setVisible(visible)
            if index < len(channels):
                label.text = f"{channels[index]}:"
        if card is not None:
            self.ui.modelInfoLabel.text = (f"{card.name} {card.version}: classes {', '.join(card.class_names[1:])}; "
                                           f"inputs {', '.join(card.input_channels)}")
            if len(channels) > MAX_CHANNELS:
                self.ui.modelInfoLabel.text += f" (more than {MAX_CHANNELS} inputs: use the Python console)"
        elif self._missing:
            self.ui.modelInfoLabel.text = "The model list fills once the Python dependencies are installed."
        self.updateButtons()

    def onTargetChanged(self, *args):
        self._write(target=self.ui.targetComboBox.currentData or "class")
        self.updateButtons()

    def onDisplayChanged(self, *args):
        self._write(display=self.ui.displayComboBox.currentData or "normalised")

    def onOpacityChanged(self, value):
        """The overlay shown now follows the slider (the parameter node stores it)."""
        if self.logic.nodes is not None and (self.logic.nodes.saliency or self.logic.nodes.instance_saliency):
            slicer.util.setSliceViewerLayers(foregroundOpacity=value)

    def onUncertaintySourceChanged(self, *args):
        key = self.ui.uncertaintySourceComboBox.currentData
        if not key:  # the menu is empty until the dependencies are installed
            return
        from SegXAILib.uncertainty import UNCERTAINTY_PRESETS

        self._write(uncertaintySources=key)
        # samples and seed belong to a random source; the others give every combination
        random = UNCERTAINTY_PRESETS[key][2]
        self.ui.uncertaintySamplesSpinBox.enabled = random
        self.ui.uncertaintySeedSpinBox.enabled = random

    def onGeneratorsChanged(self, *args):
        self._write(counterfactualGenerators=self.ui.counterfactualGeneratorsPathLineEdit.currentPath)
        self.updateButtons()

    def onRiskModelChanged(self, *args):
        self._write(riskModelPath=self.ui.riskModelPathLineEdit.currentPath)

    def onOutputFolderChanged(self, *args):
        self._write(outputFolder=self.ui.outputFolderButton.directory)

    def onDeviceChanged(self, *args):
        self.ui.deviceInfoLabel.text = self.ui.deviceComboBox.currentText
        self._write(device=self.ui.deviceComboBox.currentData or "auto")

    def onMethodChanged(self, *args):
        """Rebuild the parameter form from the registry's description of the method."""
        from SegXAIMethodForm import savedParameters

        name = self.ui.methodComboBox.currentData
        spec = self._methodSpecs.get(name)
        if spec is None:
            self._methodForm.build(None, {})
            self.ui.methodSummaryLabel.text = ""
            return
        self.ui.methodSummaryLabel.text = spec["summary"]
        saved = {}
        if self._parameterNode and self._parameterNode.method == name:  # the saved values are this method's
            saved = savedParameters(self._parameterNode.methodParameters)
        else:
            self._write(method=name, methodParameters="{}")
        self._methodForm.build(spec, saved)

    def _methodParameters(self):
        """The form's values, saved in the parameter node."""
        values = self._methodForm.values()
        self._write(methodParameters=json.dumps(values))
        return values

    def _caseSettings(self, withMethod=False, riskModel=None, qaMethod="", uncertainty=False):
        """The case settings of the parameter node's choices (the chosen method's map with
        ``withMethod``, the uncertainty choices with ``uncertainty``; the counterfactual
        generators always); the Logic validates them."""
        node = self._parameterNode
        chosen = None
        if uncertainty:
            chosen = self.logic.uncertaintySettings(node.uncertaintySources, node.uncertaintySamples,
                                                    node.uncertaintySeed)
        model = node.modelCardPath if node.model == "file" else node.model
        target = "" if node.target == "class" else f"instance:{node.instanceId}"
        methods, params = [], None
        if withMethod:
            methods, params = [node.method], {node.method: self._methodParameters()}
        return self.logic.caseSettings(model, methods, params, target=target, device=node.device or "auto",
                                       riskModel=riskModel, qaMethod=qaMethod, uncertainty=chosen,
                                       counterfactualGenerators=node.counterfactualGenerators)

    def updateButtons(self, *args):
        if self.logic is None:
            return
        busy = self.logic.busy
        card = self._card()
        inputs = card is not None and all(self._inputVolumes(card)) and len(card.input_channels) <= MAX_CHANNELS
        # before the install, Segment stays pressable: it offers the install
        self.ui.segmentButton.enabled = (inputs or bool(self._missing)) and not busy
        segmented = self.logic.case is not None
        self.ui.explainButton.enabled = segmented and not busy
        self.ui.pickLesionButton.enabled = segmented
        self.ui.qaButton.enabled = segmented and not busy
        self.ui.uncertaintyButton.enabled = segmented and not busy
        self.ui.counterfactualButton.enabled = (segmented and not busy
                                                 and bool(self.ui.counterfactualGeneratorsPathLineEdit.currentPath))
        self.ui.installDependenciesButton.enabled = not busy
        self.ui.cancelButton.enabled = busy
        self.ui.instanceSpinBox.enabled = self.ui.targetComboBox.currentData == "instance"

    # ---- dependencies ---------------------------------------------------------------------
    def onInstallDependencies(self):
        self.ensureDependencies(ask=True)

    def ensureDependencies(self, ask=True):
        """Install what is missing (the user confirms), then refill the menus; True when
        everything is importable."""
        import SegXAIInstaller

        if not self._missing and not SegXAIInstaller.torchProblem():
            return True
        try:
            ok = SegXAIInstaller.ensureDependencies(confirm=ask)
        except Exception as error:  # a failed pip run: say so, the panel stays usable
            slicer.util.errorDisplay(f"SegXAI could not install its dependencies: {error}",
                                     detailedText=getattr(error, "output", None) or str(error))
            ok = False
        self.refreshChoices()
        return ok

    # ---- running ----------------------------------------------------------------------------
    def _attempt(self, label, action):
        """``(True, action())``, or ``(False, None)`` after showing the error: never re-raised
        (``slicer.util.tryWithErrorDisplay`` re-raises, which would skip what follows and leave
        the buttons as they were)."""
        try:
            with slicer.util.WaitCursor():
                return True, action()
        except Exception as error:  # shown to the user; the panel stays ready
            import traceback

            logging.exception("SegXAI: %s", label)
            slicer.util.errorDisplay(f"{label}: {error}", detailedText=traceback.format_exc())
            return False, None

    def _start(self, label, launch):
        """Start an engine job (``launch()`` starts it); the timer follows it."""
        started, _ = self._attempt(f"{label} could not start", launch)
        if started:
            self._running = (label, launch)
            self.ui.statusLabel.text = f"{label}: started"
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.value = 0
            self._pollTimer.start()
        self.updateButtons()

    def onPoll(self):
        """The timer (100 ms): the job's progress; when it ends, its outcome. Never raises:
        an error is shown and the panel stays ready."""
        update = self.logic.poll()
        status = update.status
        if status is not None and not update.finished:
            self.ui.progressBar.value = int(round(100 * status.fraction))
            self.ui.progressBar.setFormat(f"%p%  {status.text()}")
            if status.estimate:  # the running computation's estimate (memory, time), from one measured pass
                self.ui.statusLabel.text = f"{self._running[0]}: {status.estimate}"
            return
        self._pollTimer.stop()
        self.ui.progressBar.setVisible(False)
        if update.finished:
            label = update.action.capitalize()
            refusal = self.logic.costRefusal(update)
            if refusal:
                # refused before it started, for its estimated time: the user decides
                self.ui.statusLabel.text = f"{label}: not started (estimated too long)"
                runningLabel, launch = self._running
                if launch is not None and slicer.util.confirmOkCancelDisplay(
                        f"{refusal}\n\nRun it anyway?", windowTitle="SegXAI: a long computation"):
                    self._start(runningLabel, lambda: self.logic.runConfirmed(launch))
                    return
            elif update.error:
                self.ui.statusLabel.text = f"{label}: failed"
                slicer.util.errorDisplay(f"SegXAI {update.action} failed: {update.error}")
            elif update.state == "cancelled":
                self.ui.statusLabel.text = f"{label}: cancelled"
            else:
                self.ui.statusLabel.text = f"{label}: done in {status.elapsed_s:.1f} s"
                self._attempt(f"{label}: could not show the results", lambda: self._afterImport(update.action))
        self.updateButtons()

    #: the review list's columns shown in the panel: row key -> header
    CONTOUR_REVIEW_COLUMNS = (("rank", "#"), ("structure", "structure"), ("class", "class"),
                              ("suspicion", "suspicion"), ("dice_with_prediction", "Dice vs model"),
                              ("hd95_mm", "HD95 (mm)"), ("mean_probability_inside", "p inside"),
                              ("risk_band", "risk band"))

    def showContourReview(self):
        """Fill the review table from the current case (hidden when it has no contour review)."""
        rows = self.logic.contourQASummary() if self.logic is not None else []
        table = self.contourReviewTable
        table.clear()
        table.setRowCount(len(rows))
        table.setColumnCount(len(self.CONTOUR_REVIEW_COLUMNS))
        table.setHorizontalHeaderLabels([title for _, title in self.CONTOUR_REVIEW_COLUMNS])
        for row, values in enumerate(rows):
            for column, (key, _) in enumerate(self.CONTOUR_REVIEW_COLUMNS):
                value = values.get(key)
                text = "" if value is None else (f"{value:.3g}" if isinstance(value, float) else str(value))
                table.setItem(row, column, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()
        table.setVisible(bool(rows))
        if rows:
            self.ui.qaCollapsibleButton.collapsed = False

    def _afterImport(self, action):
        self.showContourReview()
        nodes = self.logic.nodes
        warnings = self.logic.inputWarnings()
        self.inputWarningLabel.text = warnings
        self.inputWarningLabel.setVisible(bool(warnings))
        if action == "segment":
            if nodes.lesion_table is not None:
                self.ui.lesionTableView.setMRMLTableNode(nodes.lesion_table)
                self.ui.lesionsCollapsibleButton.collapsed = False
            if not nodes.saliency and not nodes.instance_saliency:
                slicer.util.setSliceViewerLayers(background=self.logic.referenceVolume)
        elif action == "qa":
            qa = self.logic.case.qa
            self.ui.riskBandLabel.text = qa.summary_text()  # the text every front end shows
            slicer.modules.plots.logic().ShowChartInLayout(nodes.chart)
        elif action == "counterfactual":
            self.ui.counterfactualLabel.text = self.logic.counterfactualSummary(self.ui.instanceSpinBox.value)
        elif action == "uncertainty":
            self.ui.uncertaintyLabel.text = self.logic.uncertaintySummary()
            if nodes.lesion_table is not None:
                self.ui.lesionTableView.setMRMLTableNode(nodes.lesion_table)

    def onCancel(self):
        self.logic.cancel()
        self.ui.statusLabel.text = "cancelling..."

    def onSegment(self):
        if not self.ensureDependencies(ask=True):
            return
        self.logic.setOutputFolder(self._parameterNode.outputFolder)

        def launch():
            settings = self._caseSettings()
            self.logic.segment(self._inputVolumes(self.logic.modelCard(settings.model)), settings)

        self._start("Segment", launch)

    def onExplain(self):
        node = self._parameterNode
        self._start("Explain", lambda: self.logic.explain(self._caseSettings(withMethod=True), display=node.display,
                                                           opacity=node.opacity))

    def onPickLesionToggled(self, checked):
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        if not checked:
            # place-mode persistence is a global setting of Slicer's: give it back
            interaction.SetPlaceModePersistence(0)
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
        if not self.ui.pickLesionButton.checked or not self.parent.isEntered:
            return  # a point placed for something else, or after the module was left
        if self.logic.busy:
            self.ui.statusLabel.text = "a job is running: wait for it or cancel it before picking a lesion"
            return
        found, instanceId = self._attempt("Pick lesion", lambda: self.logic.instanceAtClick(self._clickNode))
        if not found:
            return
        self.ui.instanceSpinBox.value = instanceId
        node = self._parameterNode
        self._start(f"Lesion {instanceId}", lambda: self.logic.instanceMap(
            instanceId, self._caseSettings(), display=node.display, opacity=node.opacity))

    def onLesionSelected(self):
        """Jump the slice views to the selected lesion's centroid."""
        from SegXAILib.mrml import jump_slices_to, lesion_centroid_ras, table_row_of_model_row

        table = self.ui.lesionTableView.mrmlTableNode()
        if table is None:
            return
        # the view shows the table through a sort proxy: its rows map to the table model's
        proxy = self.ui.lesionTableView.sortFilterProxyModel()
        selected = self.ui.lesionTableView.selectionModel().selectedIndexes()
        rows = sorted({table_row_of_model_row(table, proxy.mapToSource(index).row()) for index in selected})
        centroid = lesion_centroid_ras(table, rows[0]) if rows else None
        if centroid is not None:
            jump_slices_to(slicer.mrmlScene, centroid)

    def onCounterfactual(self):
        """The counterfactual of the lesion in the instance box (a picked lesion sets it)."""
        node, instanceId = self._parameterNode, int(self.ui.instanceSpinBox.value)
        self._start(f"Counterfactual of lesion {instanceId}", lambda: self.logic.counterfactual(
            instanceId, self._caseSettings(), opacity=node.opacity))

    def onUncertainty(self):
        node = self._parameterNode
        self._start("Uncertainty", lambda: self.logic.uncertainty(self._caseSettings(uncertainty=True),
                                                                   opacity=node.opacity))

    def onQA(self):
        riskModel = self.ui.riskModelPathLineEdit.currentPath or None
        # without a risk model: the EC curve of the chosen method's map
        self._start("QA", lambda: self.logic.qa(self._caseSettings(
            withMethod=riskModel is None, riskModel=riskModel, qaMethod=None if riskModel is None else "")))


#
# SegXAILogic
#


class SegXAILogic(ScriptedLoadableModuleLogic):
    """Everything the module runs, usable without the panel (Python console, batch).

    A thin caller: :meth:`caseSettings` turns the panel's choices into a validated
    :class:`~SegXAILib.pipeline.CaseSettings`; the actions (:meth:`segment`, :meth:`explain`,
    :meth:`instanceMap`, :meth:`qa`) start an engine process through the
    :class:`~SegXAILib.mrml.session.CaseSession` and :meth:`poll` shows its results;
    :meth:`process` runs a whole case that way and waits. ``scene`` defaults to
    ``slicer.mrmlScene``; give one headless.

    Attributes
    ----------
    session : SegXAILib.mrml.session.CaseSession
        The job flow and the current case (made on first use).
    case, nodes, referenceVolume
        The session's case (:class:`~SegXAILib.pipeline.Case`), the nodes showing it, and the
        first input volume (the geometry of every node made).
    """

    def __init__(self, scene=None, workFolder=None, python=None, env=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self._workFolder = workFolder
        self._python = python
        self._env = dict(env or {})
        self._session = None

    # ---- plumbing ---------------------------------------------------------------------------
    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer

        return slicer.mrmlScene

    @staticmethod
    def outputFolder(chosen=""):
        """Where case folders go: ``chosen``, else a ``SegXAI`` folder in Slicer's temporary
        folder (the system's outside Slicer)."""
        if chosen:
            return str(chosen)
        try:
            import slicer

            base = slicer.app.temporaryPath
        except (ImportError, AttributeError):  # headless
            import tempfile

            base = tempfile.gettempdir()
        return os.path.join(base, "SegXAI")

    def setOutputFolder(self, folder=""):
        """Case folders of the next jobs go to ``folder`` (see :meth:`outputFolder`)."""
        self._workFolder = self.outputFolder(folder)
        if self._session is not None:
            self._session.work_dir = Path(self._workFolder)

    @property
    def session(self):
        # made on first use: the panel (and this Logic) exist before SegXAILib's dependencies
        # are installed
        if self._session is None:
            from SegXAILib.mrml.session import CaseSession

            self._session = CaseSession(self.scene, self._workFolder or self.outputFolder(), python=self._python,
                                        env=self._env)
        return self._session

    @property
    def case(self):
        return self._session.case if self._session is not None else None

    @property
    def nodes(self):
        return self._session.nodes if self._session is not None else None

    @property
    def referenceVolume(self):
        return self._session.reference_volume if self._session is not None else None

    @property
    def busy(self):
        return self._session is not None and self._session.busy

    def getParameterNode(self):
        return SegXAIParameterNode(super().getParameterNode())

    def close(self):
        """Cancel a running job and forget the case (the scene is closing)."""
        if self._session is not None:
            self._session.close()

    @staticmethod
    def modelCard(model):
        """The model card of a bundled name, a card file or folder, or a ModelCard."""
        from SegXAILib.pipeline import resolve_model_card

        return resolve_model_card(model)

    @staticmethod
    def caseSettings(model="lesions", methods=(), params=None, target="", device="auto", riskModel=None,
                     qaMethod=None, instances=None, aggregation="mean", instanceParams=None, className="",
                     trustCode=False, uncertainty=None, counterfactualGenerators=""):
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
        trustCode : bool
            Allow models whose loading runs code: MONAI bundles (their configs) and the
            ``python`` card format (an importable network class).
        uncertainty : dict, optional
            :class:`~SegXAILib.pipeline.UncertaintySettings` fields (see
            :meth:`uncertaintySettings`); computed with the case when ``enabled``.
        counterfactualGenerators : str
            A trained counterfactual generator pair (``generators.pt`` or its folder), used by
            :meth:`counterfactual`.

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
                                       "trust_code": bool(trustCode), "uncertainty": dict(uncertainty or {}),
                                       "counterfactual": {"generators": str(counterfactualGenerators or "")}},
                                      source="settings")

    @staticmethod
    def uncertaintySettings(preset="flips", samples=8, seed=0):
        """The uncertainty fields of a panel choice (:func:`SegXAILib.uncertainty.preset_settings`):
        ``preset`` a key of ``UNCERTAINTY_PRESETS``; ``samples`` and ``seed`` count for a random
        preset (the others take every flip / member combination)."""
        from SegXAILib.uncertainty import preset_settings

        return preset_settings(preset, samples, seed)

    # ---- actions: each an engine process -----------------------------------------------------
    def segment(self, inputVolumes, settings):
        """Start segmenting ``inputVolumes`` (one per model input, in the card's order); a
        whole case when ``settings`` also asks for maps, instance maps or QA."""
        return self.session.segment(inputVolumes, settings)

    def explain(self, settings, display="normalised", opacity=0.5):
        """Start the class-level maps of ``settings.methods``."""
        return self.session.explain(settings, display=display, opacity=opacity)

    def instanceMap(self, instanceId, settings, display="normalised", opacity=0.5):
        """Start the instance map of one lesion."""
        return self.session.instance_map(instanceId, settings, display=display, opacity=opacity)

    def qa(self, settings):
        """Start the QA of the structure (risk band with ``settings.qa.risk_model``)."""
        return self.session.qa(settings)

    def counterfactual(self, instanceId, settings, opacity=0.5):
        """Start one lesion's counterfactual (``settings.counterfactual.generators``)."""
        return self.session.counterfactual(instanceId, settings, opacity=opacity)

    def counterfactualSummary(self, instanceId):
        """One line on a lesion's counterfactual scores (the panel's label); empty without one."""
        from SegXAILib.mrml.logic import counterfactual_summary

        return counterfactual_summary(self.case, instanceId).get("text", "")

    def uncertainty(self, settings, opacity=0.5):
        """Start the uncertainty of the prediction (``settings.uncertainty``'s samples)."""
        return self.session.uncertainty(settings, opacity=opacity)

    def inputWarnings(self):
        """The banner text of the case's input warnings (how the input differs from what the model
        card expects); empty when it fits or there is no case."""
        from SegXAILib.mrml.logic import input_warnings_text

        return input_warnings_text(self.case) if self.case is not None else ""
    def openCase(self, caseFolder):
        """Show a saved case folder (e.g. of ``segxai qa score --contour --out``) without computing
        anything; returns the case."""
        return self.session.open(caseFolder)

    def contourQASummary(self):
        """The review list of given contours, most suspicious first (the panel's table rows); []
        without one."""
        from SegXAILib.mrml.logic import contour_qa_summary

        return contour_qa_summary(self.case)

    def uncertaintySummary(self):
        """One line on the structure's uncertainty (the panel's label); empty without one."""
        from SegXAILib.mrml.logic import uncertainty_summary

        return uncertainty_summary(self.case).get("text", "")

    @staticmethod
    def costRefusal(update):
        """The message of a job refused before it started because its estimated time was over
        the limit (the estimate and the ways forward), else "": ask the user, then
        :meth:`runConfirmed`."""
        status = getattr(update, "status", None)
        if status is None or not update.finished or getattr(status, "error_kind", "") != "cost":
            return ""
        return update.error or status.error

    def runConfirmed(self, action):
        """Run ``action()`` (which starts a job: :meth:`explain`, :meth:`instanceMap`...) with no
        time limit: the user confirmed the estimate. Returns what ``action`` returns."""
        from SegXAILib.progress import MAX_MINUTES_ENV

        env = self.session.env
        before = env.get(MAX_MINUTES_ENV)
        env[MAX_MINUTES_ENV] = "0"  # the engine's default limit: none, for this job only
        try:
            return action()
        finally:
            if before is None:
                env.pop(MAX_MINUTES_ENV, None)
            else:
                env[MAX_MINUTES_ENV] = before

    def poll(self):
        """The running job's progress; its results shown when it has ended (main thread)."""
        if self._session is None:
            from SegXAILib.mrml.session import SessionUpdate

            return SessionUpdate()
        return self._session.poll()

    def cancel(self):
        if self._session is not None:
            self._session.cancel()

    def wait(self, timeout=3600.0):
        """Block until the running job has ended and its results are shown (console, tests)."""
        return self.session.wait(timeout)

    def instanceAtClick(self, markupsNode, radiusMm=5.0):
        """The instance id under the last point of ``markupsNode`` (a click in a slice view)."""
        return self.session.instance_at(markupsNode, radius_mm=radiusMm)

    # ---- one call -----------------------------------------------------------------------------
    def process(self, inputVolumes, settings=None, timeout=3600.0, confirmLong=False, **choices):
        """Run one whole case in the engine process, wait, and show it.

        Parameters
        ----------
        inputVolumes : list of vtkMRMLScalarVolumeNode
            One per model input channel, in the card's order (``lesions``: FLAIR, T1).
        settings : SegXAILib.pipeline.CaseSettings, optional
            What to run. Instead, the keywords of :meth:`caseSettings` (``model="lesions",
            methods=["smoothgrad"], instances=[1], riskModel=...``).
        confirmLong : bool
            Run computations whatever their estimated time; else one estimated over the limit
            (10 minutes, or ``SEGXAI_MAX_MINUTES``) is refused before it starts, with the estimate.

        Returns
        -------
        SegXAILib.mrml.logic.CaseNodes
            The segmentation, instances, saliency volumes, lesion table, QA table and chart;
            the case itself is ``self.case``.

        Raises
        ------
        SegXAIInputError
            Invalid settings or inputs, or the engine's error when the run failed.
        """
        from SegXAILib.image import SegXAIInputError
        from SegXAILib.pipeline import CaseSettings

        if settings is None:
            settings = self.caseSettings(**choices)
        elif choices:
            raise SegXAIInputError(f"process: give settings or the choices {sorted(choices)}, not both")
        elif not isinstance(settings, CaseSettings):
            raise SegXAIInputError(f"settings: expected CaseSettings (see caseSettings), got {type(settings).__name__}")
        if confirmLong:
            self.runConfirmed(lambda: self.segment(inputVolumes, settings))
        else:
            self.segment(inputVolumes, settings)
        update = self.wait(timeout)
        if update.state != "done":
            raise SegXAIInputError(f"process: the run {update.state}: {update.error or update.status.state}")
        return self.nodes


#
# SegXAITest
#


class SegXAITest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test): the clinician's flow through the panel itself.

    Sample data -> Segment -> Explain -> pick a lesion (a click in a slice view) -> its
    instance map -> QA risk band; then a long job cancelled; then a failing job, after which
    the panel is ready again. Every action runs in the engine process, as for a user.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_clinician_flow()

    # ---- helpers ------------------------------------------------------------------------------
    def _widget(self):
        slicer.util.selectModule("SegXAI")
        return slicer.modules.segxai.widgetRepresentation().self()

    def _waitForJob(self, widget, timeout=900.0):
        """Let the panel's timer follow the job until it has ended; returns the seconds taken."""
        import time

        start = time.monotonic()
        while (widget.logic.busy or widget._pollTimer.isActive()) and time.monotonic() - start < timeout:
            slicer.app.processEvents()
            time.sleep(0.02)
        self.assertFalse(widget.logic.busy, "the job did not end in time")
        return time.monotonic() - start

    def _sampleVolumes(self):
        from SegXAILib.mrml import image_to_volume_node
        from SegXAILib.phantoms import make_lesion_phantom
        from SegXAILib.sample_data import load_sample_head

        phantom = make_lesion_phantom(load_sample_head(), seed=2026)
        volumes = [image_to_volume_node(phantom.image, slicer.mrmlScene, name, channel=name)
                   for name in phantom.image.channel_names]
        return phantom, volumes

    # ---- the flow -------------------------------------------------------------------------------
    def test_clinician_flow(self):
        import time

        import numpy as np

        from SegXAILib.metrics import dice_score
        from SegXAILib.mrml import segment_mask, slice_composite_nodes, volume_node_to_image

        widget = self._widget()
        self.assertTrue(widget.ensureDependencies(ask=False))
        phantom, volumes = self._sampleVolumes()
        widget._selectData(widget.ui.modelComboBox, "lesions")
        widget._selectData(widget.ui.deviceComboBox, "cpu")
        for selector, volume in zip(widget._channelSelectors, volumes):
            selector.setCurrentNode(volume)

        self.delayDisplay("Segment (engine process)")
        self.assertTrue(widget.ui.segmentButton.enabled)
        widget.ui.segmentButton.click()
        self.assertTrue(widget.ui.cancelButton.enabled and widget.ui.progressBar.visible)
        self._waitForJob(widget)
        logic = widget.logic
        grid = volume_node_to_image(volumes[0])
        mask = segment_mask(logic.nodes.segmentation, "lesion", grid)
        self.assertTrue(np.array_equal(mask, logic.case.mask))
        self.assertGreater(dice_score(mask, phantom.truth), 0.7)
        self.assertEqual(logic.nodes.lesion_table.GetNumberOfRows(), len(logic.case.instances))
        self.assertEqual(widget.ui.lesionTableView.mrmlTableNode().GetID(), logic.nodes.lesion_table.GetID())

        self.delayDisplay("Explain")
        widget._selectData(widget.ui.methodComboBox, "vanilla_gradient")
        widget.ui.explainButton.click()
        self._waitForJob(widget)
        saliency = logic.nodes.saliency["vanilla_gradient"]
        self.assertEqual(len(saliency), 2)
        self.assertTrue(all(c.GetForegroundVolumeID() == saliency[0].GetID()
                            for c in slice_composite_nodes(slicer.mrmlScene)))

        self.delayDisplay("Pick a lesion in a slice view")
        widget.ui.pickLesionButton.checked = True
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        self.assertEqual(interaction.GetCurrentInteractionMode(), interaction.Place)
        lesion = logic.case.instances[0]
        widget._clickNode.AddControlPointWorld(*lesion.centroid_ras.tolist())
        if not widget.logic.busy:  # the point-defined event already started the job otherwise
            widget.onLesionClicked()
        self.assertEqual(widget.ui.instanceSpinBox.value, 1)
        self._waitForJob(widget)
        widget.ui.pickLesionButton.checked = False
        self.assertEqual(interaction.GetPlaceModePersistence(), 0)
        shown = logic.nodes.instance_saliency[1][0]
        self.assertTrue(all(c.GetForegroundVolumeID() == shown.GetID()
                            for c in slice_composite_nodes(slicer.mrmlScene)))

        self.delayDisplay("QA risk band")
        from SegXAILib.topology import bundled_risk_model

        widget.ui.riskModelPathLineEdit.currentPath = str(bundled_risk_model("lesions"))  # the shipped one
        widget.ui.qaButton.click()
        self._waitForJob(widget)
        self.assertIn(logic.case.qa.band, ("low", "moderate", "high"))
        self.assertIn(logic.case.qa.band.upper(), widget.ui.riskBandLabel.text)

        self.delayDisplay("What would change the model's mind about lesion 1")
        from SegXAILib.sample_data import bundled_model_card

        widget.ui.counterfactualGeneratorsPathLineEdit.currentPath = str(bundled_model_card("lesions").parent
                                                                          / "counterfactual" / "generators.pt")
        widget.ui.instanceSpinBox.value = 1
        self.assertTrue(widget.ui.counterfactualButton.enabled)
        widget.ui.counterfactualButton.click()
        self._waitForJob(widget)
        relevance = logic.nodes.counterfactual[1]["relevance"][0]
        self.assertTrue(all(c.GetForegroundVolumeID() == relevance.GetID()
                            for c in slice_composite_nodes(slicer.mrmlScene)))
        scores = logic.case.counterfactuals[1].scores
        self.assertGreater(scores["plus"], scores["original"])
        self.assertIn("after G+", widget.ui.counterfactualLabel.text)

        self.delayDisplay("Where the model is unsure")
        widget._selectData(widget.ui.uncertaintySourceComboBox, "tta")
        self.assertTrue(widget.ui.uncertaintySamplesSpinBox.enabled)
        widget.ui.uncertaintySamplesSpinBox.value = 4
        widget.ui.uncertaintyButton.click()
        self._waitForJob(widget)
        self.assertEqual(logic.case.uncertainty.samples, 4)
        entropy = logic.nodes.uncertainty["predictive_entropy"][0]
        self.assertTrue(all(c.GetForegroundVolumeID() == entropy.GetID()
                            for c in slice_composite_nodes(slicer.mrmlScene)))
        self.assertIn("mean entropy", widget.ui.uncertaintyLabel.text)

        self.delayDisplay("A long job: refused with its estimate, confirmed, then cancelled")
        widget._selectData(widget.ui.methodComboBox, "smoothgrad")
        samples = widget._methodForm.editors["n_samples"][1]
        samples.value = samples.maximum
        # a limit of 60 ms (the default is 10 min): certainly refused, whatever the machine
        logic.session.env["SEGXAI_MAX_MINUTES"] = "0.001"
        asked, confirm = [], slicer.util.confirmOkCancelDisplay
        slicer.util.confirmOkCancelDisplay = lambda text, *args, **kwargs: asked.append(text) or True  # no modal dialog
        try:
            widget.ui.explainButton.click()
            deadline = time.monotonic() + 300
            # the panel's timer polls the job, asks, and starts it again confirmed; the test only reads what it saw
            while not (asked and logic.session.job.env.get("SEGXAI_MAX_MINUTES") == "0"
                       and logic.session.job.status.step == "map smoothgrad") and time.monotonic() < deadline:
                slicer.app.processEvents()
                time.sleep(0.02)
        finally:
            slicer.util.confirmOkCancelDisplay = confirm
            logic.session.env.pop("SEGXAI_MAX_MINUTES", None)
        self.assertTrue(asked and "smoothgrad" in asked[0] and "over the time limit" in asked[0])
        widget.ui.cancelButton.click()
        seconds = self._waitForJob(widget, timeout=30)
        self.assertLess(seconds, 2.5)  # the 2 s grace + the 100 ms poll
        self.assertIn("cancelled", widget.ui.statusLabel.text)
        self.assertTrue(widget.ui.explainButton.enabled)

        self.delayDisplay("A failing job leaves the panel ready")
        widget.ui.riskModelPathLineEdit.currentPath = os.path.join(slicer.app.temporaryPath, "no-such-risk.json")
        shown, errorDisplay = [], slicer.util.errorDisplay
        slicer.util.errorDisplay = lambda text, *args, **kwargs: shown.append(text)  # no modal dialog in a test
        try:
            widget.ui.qaButton.click()
            self._waitForJob(widget)
        finally:
            slicer.util.errorDisplay = errorDisplay
        self.assertIn("failed", widget.ui.statusLabel.text)
        self.assertTrue(shown and "no-such-risk.json" in shown[-1])
        self.assertTrue(widget.ui.qaButton.enabled and widget.ui.explainButton.enabled)
        self.assertFalse(widget.ui.cancelButton.enabled)
        self.delayDisplay("Test passed")
