"""The panel offscreen (PySide6, ``QT_QPA_PLATFORM=offscreen``) on the real ``.ui`` and real workers.

Pick a model, set a calibration folder, Build shows real progress from a real ``engine_tools`` worker,
Cancel returns to idle and leaves no half-written engine, Run adds a segmentation. A PNG of the panel
is saved in each state under ``Testing/artifacts/``.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("PySide6", reason="PySide6 is needed for the offscreen widget test")
pytest.importorskip("slicer", reason="slicer-core is needed for the MRML scene")

from MedQuantSlicerLib import parameters, paths  # noqa: E402
from MedQuantSlicerLib.controller import CANCEL_TEXT, State  # noqa: E402
from MedQuantSlicerLib.logic import MedQuantLogic  # noqa: E402
from MedQuantSlicerLib.panel import Panel  # noqa: E402
from mrml_helpers import oblique_volume  # noqa: E402
from pyside_host import PySideHost, load_panel_ui, spin  # noqa: E402

MODEL = os.environ.get("MEDQUANT_WIDGET_TEST_MODEL", "brainchop-model5_gw_ae")


def _screenshot(root, artifacts_dir, name):
    root.resize(440, 1000)
    image = root.grab()
    path = artifacts_dir / f"panel_{name}.png"
    assert image.save(str(path)), f"could not save {path}"
    assert path.stat().st_size > 1000
    return path


def _skip_if_not_implemented(outcome, what):
    if outcome is not None and outcome.error_type == "NotImplementedError":
        pytest.skip(f"{what} not implemented in engine_tools yet: {outcome.error}")


@pytest.fixture
def panel(scene, artifacts_dir):
    root, ui = load_panel_ui(paths.ui_file())
    host = PySideHost(scene)
    ui.inputVolumeSelector.setMRMLScene(scene)
    ui.referenceSegmentationSelector.setMRMLScene(scene)
    panel = Panel(ui, host, MedQuantLogic(scene))
    panel.root = root
    yield panel
    worker = panel.worker
    panel.cleanup()
    spin(lambda: worker is None or not worker.is_running(), 30)


def test_panel_loads_and_lists_models(panel, artifacts_dir):
    ui = panel.ui
    assert ui.buildButton.text() == "Build engine"
    assert not ui.runButton.isEnabled()  # no input volume yet
    assert spin(lambda: panel.models_worker.outcome is not None, 120), "models worker did not finish"
    outcome = panel.models_worker.outcome
    _screenshot(panel.root, artifacts_dir, "idle")
    if outcome.error_type == "NotImplementedError":
        # the failure is shown, readable, and the panel stays usable
        assert "Could not list models" in ui.modelInfoLabel.text()
        pytest.skip(f"`models` not implemented in engine_tools yet: {outcome.error}")
    assert outcome.succeeded, outcome.message()
    assert ui.modelComboBox.count() == len(panel.models) > 0
    assert panel.selected_model() in panel.models
    assert ui.buildButton.isEnabled()


def test_build_progress_cancel_then_run(panel, scene, artifacts_dir, shared, tmp_path):
    from engine_tools.cache import partial_artifacts

    ui = panel.ui
    assert spin(lambda: panel.models_worker.outcome is not None, 120)
    _skip_if_not_implemented(panel.models_worker.outcome, "`models`")
    if MODEL not in panel.models:
        pytest.skip(f"model card {MODEL} not available (cards: {', '.join(panel.models)})")
    ui.modelComboBox.setCurrentIndex(ui.modelComboBox.findData(MODEL))
    calibration = shared / "data" / "mri"
    ui.calibrationPathLineEdit.setProperty("currentPath", str(calibration))
    ui.windowsSpinBox.setValue(2)
    ui.precisionComboBox.setCurrentIndex(ui.precisionComboBox.findText("INT8"))
    assert parameters.load(panel.parameter_node)[0].calibration_folder == str(calibration)

    # Build: real worker, real progress
    ui.buildButton.click()
    assert panel.controller.state is State.RUNNING
    assert ui.buildButton.text() == CANCEL_TEXT and ui.buildButton.isEnabled()
    assert not ui.runButton.isEnabled() and not ui.modelComboBox.isEnabled()
    got_progress = spin(
        lambda: (
            panel.worker.outcome is not None
            or (panel.worker.last_progress is not None and (panel.worker.last_progress[0] or 0) > 0)
        ),
        240,
    )
    _skip_if_not_implemented(panel.worker.outcome, "`build`")
    assert got_progress and panel.worker.outcome is None, (
        panel.worker.outcome and panel.worker.outcome.message()
    )
    assert ui.progressBar.value() > 0 or ui.progressBar.maximum() == 0
    _screenshot(panel.root, artifacts_dir, "building")

    # Cancel: back to idle, nothing half-written in the engine cache
    ui.buildButton.click()
    assert panel.controller.state is State.CANCELLING and not ui.buildButton.isEnabled()
    assert spin(lambda: panel.controller.state is State.IDLE, 60), "cancel did not return to idle"
    assert panel.last_outcome.status == "cancelled"
    assert ui.buildButton.text() == "Build engine" and ui.buildButton.isEnabled()
    assert ui.statusLabel.text().startswith("Cancelled")
    assert partial_artifacts(panel.logic.cache_root()) == []
    _screenshot(panel.root, artifacts_dir, "cancelled")

    # Run: segment a loaded volume (FP32 keeps this test short), a segmentation node appears
    import numpy as np
    import SimpleITK as sitk

    t1 = sitk.GetArrayFromImage(sitk.ReadImage(str(shared / "data" / "mri" / "t1_crop.nii.gz")))
    volume = oblique_volume(scene, t1.astype(np.int16), spacing=(1.0, 1.0, 1.0), angle_deg=10, name="T1")
    ui.inputVolumeSelector.refresh()
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.precisionComboBox.setCurrentIndex(ui.precisionComboBox.findText("FP32"))
    assert ui.runButton.isEnabled()
    before = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    ui.runButton.click()
    assert ui.runButton.text() == CANCEL_TEXT
    assert spin(lambda: panel.controller.state is State.IDLE, 600), "segmentation did not finish"
    _skip_if_not_implemented(panel.last_outcome, "`segment`")
    assert panel.last_outcome.succeeded, panel.last_outcome.message()
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before + 1
    assert panel.last_segmentation.GetSegmentation().GetNumberOfSegments() >= 2
    assert ui.resultsTableWidget.rowCount() == 1
    assert ui.resultsTableWidget.item(0, 0).text() == "FP32"
    assert panel.table_node is not None and ui.showChartButton.isEnabled()
    ui.showChartButton.click()
    assert panel.host.charts == [panel.chart_node]
    _screenshot(panel.root, artifacts_dir, "result")
