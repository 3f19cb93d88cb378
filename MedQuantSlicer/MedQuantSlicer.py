"""MedQuantSlicer: real INT8 quantization of 3D segmentation networks, driven from a Slicer panel.

The classes here are thin; the work lives in ``MedQuantSlicerLib`` (tasks, worker processes, MRML
import/export, panel bindings) and in the out-of-process ``engine_tools`` worker. Supported: Slicer
5.10 and newer (Python 3.12). On an older Slicer this file still imports (annotations are lazy, the
library is not imported) and the module shows why it cannot run.
"""

from __future__ import annotations

import logging
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from MedQuantSlicerLib import support  # noqa: E402  (old-Python safe: checked before the rest)


def _slicer_version():
    app = getattr(slicer, "app", None)
    if app is None or not hasattr(app, "majorVersion"):
        return None
    return (int(app.majorVersion), int(app.minorVersion))


UNSUPPORTED = support.unsupported_reason(_slicer_version())
if UNSUPPORTED is None:
    from MedQuantSlicerLib import paths  # noqa: E402
    from MedQuantSlicerLib.logic import MedQuantLogic  # noqa: E402
    from MedQuantSlicerLib.qt_process import qt_worker_factory  # noqa: E402
else:
    logging.error(UNSUPPORTED)
    MedQuantLogic = object  # noqa: N816 - keeps the class definitions below importable


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
        if UNSUPPORTED is not None:
            self.parent.helpText = UNSUPPORTED
        self.parent.acknowledgementText = (
            "Model weights belong to their publishers (see each model card's licence). Design follows "
            "SlicerNNUnet and SlicerMONAIAuto3DSeg."
        )
        icon = os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "Resources", "Icons", "MedQuantSlicer.png"
        )
        if os.path.isfile(icon):
            self.parent.icon = qt.QIcon(icon)


class MedQuantSlicerWidget(ScriptedLoadableModuleWidget):
    """Loads the .ui file and hands it to :class:`MedQuantSlicerLib.panel.Panel`."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.panel = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if UNSUPPORTED is not None:
            label = qt.QLabel(UNSUPPORTED)
            label.setWordWrap(True)
            self.layout.addWidget(label)
            return
        from MedQuantSlicerLib.panel import Panel
        from MedQuantSlicerLib.slicer_host import SlicerHost

        ui_widget = slicer.util.loadUI(str(paths.ui_file()))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedQuantSlicerLogic()
        # the panel observes scene close itself: parameter node re-read, stale result nodes dropped
        self.panel = Panel(self.ui, SlicerHost(ui_widget, qt, slicer), self.logic)

    def cleanup(self) -> None:
        if self.panel is not None:
            self.panel.cleanup()
            self.panel = None

    def onReload(self) -> None:
        """Reload the library too (Slicer re-executes only this file) with no old callback left."""
        self.cleanup()
        forgotten = support.forget_library()
        logging.debug("MedQuantSlicer reload: dropped %s", ", ".join(forgotten))
        ScriptedLoadableModuleWidget.onReload(self)


class MedQuantSlicerLogic(ScriptedLoadableModuleLogic, MedQuantLogic):
    """Scriptable entry point: ``MedQuantSlicerLogic().segment(volumeNode, "brainchop-model5_gw_ae", ...)``.

    The blocking helpers run the same tasks as the panel with ``QProcess`` workers and keep Slicer's
    event loop running while they wait. ``getParameterNode`` is Slicer's own.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        if UNSUPPORTED is not None:
            raise RuntimeError(UNSUPPORTED)
        MedQuantLogic.__init__(self, slicer.mrmlScene, worker_factory=qt_worker_factory(qt))


class MedQuantSlicerTest(ScriptedLoadableModuleTest):
    """Runs offline: a tiny ONNX network built here, segmenting a phantom; then a shipped model when its
    weights are present (skipped with the reason printed otherwise)."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_self_test()

    def test_self_test(self) -> None:
        from MedQuantSlicerLib import selftest

        if UNSUPPORTED is not None:
            self.skipTest(UNSUPPORTED)
        report = selftest.run(slicer.mrmlScene, MedQuantSlicerLogic(), log=self.delayDisplay)
        for line in report.skipped:
            print(f"MedQuantSlicerTest skipped: {line}")
        self.assertTrue(report.passed, report.failures)
        self.delayDisplay("Test passed")
