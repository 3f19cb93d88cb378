"""MedQuantSlicer: real INT8 quantization of 3D segmentation networks, driven from a Slicer panel.

The classes here are thin; the work lives in ``MedQuantSlicerLib`` (worker processes, state machine,
MRML import/export, panel logic) and in the out-of-process ``engine_tools`` worker.
"""

from __future__ import annotations

import os
import sys

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from MedQuantSlicerLib import parameters, paths  # noqa: E402
from MedQuantSlicerLib.logic import EngineOptions, MedQuantLogic  # noqa: E402


class MedQuantSlicer(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedQuantSlicer"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedQuantSlicer contributors"]
        self.parent.helpText = (
            "Choose a pretrained 3D segmentation network, calibrate it on your own unlabeled scans, build a "
            "real INT8 engine (OpenVINO/NNCF or ONNX Runtime on the CPU, TensorRT on NVIDIA GPUs) in a "
            "background process, segment loaded volumes and compare size, speed and agreement with FP32."
        )
        self.parent.acknowledgementText = (
            "Model weights belong to their publishers (see each model card's licence). Design follows "
            "SlicerNNUnet and SlicerMONAIAuto3DSeg."
        )
        try:
            icon = paths.icon_file()
            if icon.is_file():
                self.parent.icon = qt.QIcon(str(icon))
        except FileNotFoundError:
            pass


class SlicerHost:
    """Services the panel needs from the Slicer application."""

    def __init__(self, parent_widget) -> None:
        self.qt = qt
        self.scene = slicer.mrmlScene
        self.parent_widget = parent_widget

    def confirm(self, text: str) -> bool:
        return slicer.util.confirmOkCancelDisplay(text, windowTitle="MedQuantSlicer")

    def show_error(self, text: str, details: str) -> None:
        slicer.util.errorDisplay(text, detailedText=details or None, windowTitle="MedQuantSlicer")

    def choose_card_file(self) -> str:
        return qt.QFileDialog.getOpenFileName(
            self.parent_widget, "Model card of your network", "", "Model card (*.json)"
        )

    def show_chart(self, chart_node) -> None:
        slicer.modules.plots.logic().ShowChartInLayout(chart_node)


class MedQuantSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Loads the .ui file and hands it to :class:`MedQuantSlicerLib.panel.Panel`."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.panel = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        from MedQuantSlicerLib.panel import Panel

        ui_widget = slicer.util.loadUI(str(paths.ui_file()))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedQuantSlicerLogic()
        node = parameters.parameter_node(slicer.mrmlScene, "MedQuantSlicer")
        self.panel = Panel(self.ui, SlicerHost(ui_widget), self.logic, node)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)

    def onSceneStartClose(self, caller, event) -> None:
        if self.panel is not None:
            self.panel.cleanup()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.panel is not None:
            self.panel.cleanup()


class MedQuantSlicerLogic(ScriptedLoadableModuleLogic, MedQuantLogic):
    """Scriptable entry point: ``MedQuantSlicerLogic().segment(volumeNode, "brainchop-model5_gw_ae", ...)``."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        MedQuantLogic.__init__(self, slicer.mrmlScene)


class MedQuantSlicerTest(ScriptedLoadableModuleTest):
    """Runs in Slicer: segment a small oblique sample volume with a real model and check the result."""

    MODEL = "brainchop-model5_gw_ae"

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_segment_oblique_sample()

    def test_segment_oblique_sample(self) -> None:
        import numpy as np
        import SampleData
        import vtk

        self.delayDisplay("Loading MRHead sample")
        volume = SampleData.downloadSample("MRHead")
        original = slicer.util.arrayFromVolume(volume).copy()
        # oblique, anisotropic geometry: rotate the voxel axes 20 degrees about S and stretch k
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASDirectionMatrix(matrix)
        rotation = vtk.vtkTransform()
        rotation.RotateZ(20)
        rotated = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Multiply4x4(rotation.GetMatrix(), matrix, rotated)
        volume.SetIJKToRASDirectionMatrix(rotated)
        spacing = list(volume.GetSpacing())
        volume.SetSpacing(spacing[0], spacing[1], spacing[2] * 1.5)

        logic = MedQuantSlicerLogic()
        self.delayDisplay("Segmenting out of process (first run builds the engine)")
        segmentation, result = logic.segment(
            volume, self.MODEL, EngineOptions(backend="auto", precision="fp32")
        )
        segments = segmentation.GetSegmentation()
        names = [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]
        card_names = [e["name"] for e in logic_label_table(result) if int(e["value"]) != 0]
        self.assertEqual(names, card_names)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), original)  # input untouched
        # the labels lie inside the head: mean intensity under segments above the background
        head = original > np.percentile(original, 60)
        for index in range(segments.GetNumberOfSegments()):
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(
                segmentation, segments.GetNthSegmentID(index), volume
            )
            if mask.any():
                self.assertGreater(float(head[mask > 0].mean()), 0.8)
        self.delayDisplay("Test passed")


def logic_label_table(result):
    from MedQuantSlicerLib.mrml_io import read_label_table

    return read_label_table(result["label_table"])
