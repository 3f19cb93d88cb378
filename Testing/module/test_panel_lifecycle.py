"""The panel across scene close and module reload, on a real MRML scene and offscreen PySide6 widgets.

After File > Close scene the panel must write to the scene's (new) parameter node and make new result
table/chart nodes; after a reload (``cleanup`` + the library dropped from ``sys.modules``) nothing of
the old panel may be called again. A vector volume gets a message and a disabled Run, not a traceback.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("PySide6", reason="PySide6 is needed for the offscreen widget test")
pytest.importorskip("slicer", reason="slicer-core is needed for the MRML scene")

from MedQuantSlicerLib import parameters, paths, support  # noqa: E402
from MedQuantSlicerLib.logic import MedQuantLogic  # noqa: E402
from MedQuantSlicerLib.panel import BELOW_TARGET_COLOR, Panel  # noqa: E402
from MedQuantSlicerLib.results import ResultRow  # noqa: E402
from mrml_helpers import oblique_volume  # noqa: E402
from pyside_host import PySideHost, load_panel_ui, spin  # noqa: E402


def _panel(scene):
    root, ui = load_panel_ui(paths.ui_file())
    ui.inputVolumeSelector.setMRMLScene(scene)
    ui.referenceSegmentationSelector.setMRMLScene(scene)
    panel = Panel(ui, PySideHost(scene), MedQuantLogic(scene))
    assert spin(lambda: panel.models_task.done, 120), "models worker did not finish"
    return panel


def test_scene_close_rereads_parameter_node_and_drops_stale_results(scene):
    panel = _panel(scene)
    rows = [ResultRow("INT8", "openvino (cpu)", 1.0, 20.0, 4.0, 0.99)]
    panel.logic.set_rows(rows)
    panel.show_rows(rows)
    old_table = panel.table_node
    assert old_table.GetScene() is scene and panel.ui.showChartButton.isEnabled()

    scene.Clear(0)  # File > Close scene
    assert panel.table_node is None and not panel.ui.showChartButton.isEnabled()
    assert panel.ui.resultsTableWidget.rowCount() == 0
    assert panel.parameter_node.GetScene() is scene
    panel.ui.windowsSpinBox.setValue(7)  # saved into the scene's parameter node
    assert parameters.load(parameters.parameter_node(scene))[0].windows == 7

    panel.logic.set_rows(rows)
    assert panel.table_node is not old_table and panel.table_node.GetScene() is scene
    assert panel.chart_node.GetScene() is scene
    panel.cleanup()


def test_result_below_the_accuracy_target_is_shown_in_red(scene):
    panel = _panel(scene)
    rows = [
        ResultRow("FP32", "openvino (cpu)", 1.0, 40.0, 8.0, 1.0),
        ResultRow("INT8", "openvino (cpu)", 0.3, 20.0, 4.0, 0.95, below_target=True),
    ]
    panel.show_rows(rows)
    table = panel.ui.resultsTableWidget
    red = [table.item(1, c).foreground().color().name() for c in range(table.columnCount())]
    assert set(red) == {BELOW_TARGET_COLOR}
    assert "Below the accuracy target" in table.item(1, 0).toolTip()
    assert table.item(0, 0).foreground().color().name() != BELOW_TARGET_COLOR
    panel.cleanup()


def test_scene_load_restores_the_saved_selections(scene, tmp_path):
    panel = _panel(scene)
    panel.ui.windowsSpinBox.setValue(5)
    panel.ui.rebuildCheckBox.setChecked(True)
    scene.SetURL(str(tmp_path / "saved.mrml"))
    assert scene.Commit()
    scene.Clear(0)
    assert panel.ui.windowsSpinBox.value() == 32  # a fresh scene: defaults
    scene.SetURL(str(tmp_path / "saved.mrml"))
    assert scene.Import()
    assert panel.parameter_node.GetScene() is scene
    assert panel.ui.windowsSpinBox.value() == 5 and panel.ui.rebuildCheckBox.isChecked()
    assert scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
    panel.cleanup()


def test_reload_disconnects_the_old_panel_and_forgets_the_library(scene):
    panel = _panel(scene)
    calls = []
    panel.on_scene_end_close = lambda: calls.append("end close")  # what a stale observer would call
    scene.Clear(0)
    assert calls == ["end close"]  # connected while the panel lives
    panel.cleanup()
    calls.clear()
    scene.Clear(0)
    assert calls == [], "a scene observer of the old panel is still connected"
    assert panel._observers == [] and panel.controller._listeners == []

    old_panel_module = sys.modules["MedQuantSlicerLib.panel"]
    forgotten = support.forget_library()
    assert "MedQuantSlicerLib.panel" in forgotten and "MedQuantSlicerLib" in forgotten
    assert not [name for name in sys.modules if name.startswith("MedQuantSlicerLib")]
    import MedQuantSlicerLib.panel as reloaded

    assert reloaded is not old_panel_module and reloaded.Panel is not Panel


def test_vector_volume_gets_a_message_not_a_traceback(scene):
    import slicer

    panel = _panel(scene)
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour photo")
    slicer.util.updateVolumeFromArray(vector, np.zeros((4, 5, 6, 3), np.uint8))
    scalar = oblique_volume(scene, np.zeros((8, 9, 10), np.int16), name="T1")
    panel.ui.inputVolumeSelector.refresh()
    listed = [panel.ui.inputVolumeSelector.itemText(i) for i in range(panel.ui.inputVolumeSelector.count())]
    assert listed == ["T1"], f"only scalar volumes are offered (showChildNodeTypes false): {listed}"
    panel.ui.inputVolumeSelector.setCurrentNode(vector)  # e.g. restored from a scene
    assert not panel.ui.runButton.isEnabled()
    assert "vector" in panel.ui.runButton.toolTip()
    panel.start_run()  # pressed from a script anyway: a readable error, no worker
    assert panel.host.errors and "colour photo is a vector" in panel.host.errors[-1][0]
    assert panel.task is None or panel.task.name != "segment"
    panel.ui.inputVolumeSelector.setCurrentNode(scalar)
    assert panel.ui.runButton.isEnabled() == (panel.selected_model() is not None)
    panel.cleanup()
