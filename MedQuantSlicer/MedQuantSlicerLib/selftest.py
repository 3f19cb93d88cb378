"""The module's self-test, offline: a tiny network built here, then a shipped model if its weights exist.

``MedQuantSlicerTest`` (in ``MedQuantSlicer.py``) runs :func:`run` inside Slicer; the pytest suite runs
the same function on a ``slicer-core`` scene. Nothing is downloaded: the tiny network is a 1×1×1 3-D
convolution written as ONNX with ``onnx.helper`` (class 1 where the normalised intensity exceeds 0.5),
registered with ``medquant models add``, built FP32 and INT8 (calibrated on phantoms written here) and
run on an oblique phantom volume. The shipped-model part runs only when that model's weights are
present, else the reason is reported in ``skipped``. All files live in a temporary folder, including
the engine cache.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from MedQuantSlicerLib import mrml_io
from MedQuantSlicerLib.logic import EngineOptions, MedQuantLogic
from MedQuantSlicerLib.tasks import TaskCallbacks

TINY_MODEL = "selftest-threshold"
SHIPPED_MODEL = "brainchop-model5_gw_ae"


@dataclass
class SelfTestReport:
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    dice: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures


def write_threshold_network(path: Path) -> Path:
    """A two-class 3-D network (``[1,1,D,H,W]`` → ``[1,2,D,H,W]``): logits ``0.5 - x`` and ``x - 0.5``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.array([-1.0, 1.0], np.float32).reshape(2, 1, 1, 1, 1), "weight")
    bias = numpy_helper.from_array(np.array([0.5, -0.5], np.float32), "bias")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "weight", "bias"], ["logits"], kernel_shape=[1, 1, 1])],
        "threshold",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, "D", "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2, "D", "H", "W"])],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def phantom_array(shift: int = 0) -> Any:
    """A dark 32³ volume with a bright box (intensities 10 and 200, some noise)."""
    import numpy as np

    rng = np.random.default_rng(shift)
    array = rng.normal(10.0, 2.0, (32, 32, 32)).astype(np.float32)
    array[8 + shift : 22 + shift, 6:20, 10:26] = 200.0
    return array


def _write_calibration(folder: Path) -> Path:
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    for shift in range(3):
        image = sitk.GetImageFromArray(phantom_array(shift))
        image.SetSpacing((1.2, 1.0, 1.5))
        sitk.WriteImage(image, str(folder / f"phantom{shift}.nrrd"))
    return folder


def _phantom_node(scene: Any) -> Any:
    import slicer
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MedQuant self-test phantom")
    slicer.util.updateVolumeFromArray(node, phantom_array())
    node.SetSpacing(1.2, 1.0, 1.5)
    node.SetOrigin(10.0, -20.0, 5.0)
    rotation = vtk.vtkTransform()
    rotation.RotateZ(20)
    rotation.RotateX(10)
    node.SetIJKToRASDirectionMatrix(rotation.GetMatrix())
    node.CreateDefaultDisplayNodes()
    return node


def _dice(node: Any, segment_name: str, volume: Any, truth: Any) -> float:
    segmentation = node.GetSegmentation()
    mask = mrml_io.segment_array(node, segmentation.GetSegmentIdBySegmentName(segment_name), volume) > 0
    return float(2 * (mask & truth).sum() / max(1, mask.sum() + truth.sum()))


def run(
    scene: Any,
    logic: MedQuantLogic,
    log: Callable[[str], None] = print,
    timeout: float = 900,
    shipped_model: str = SHIPPED_MODEL,
) -> SelfTestReport:
    """Run the self-test on ``scene`` with ``logic``'s worker factory; never raises for a failed check."""
    report = SelfTestReport()
    folder = Path(tempfile.mkdtemp(prefix="medquant-selftest-"))
    saved_env = dict(logic.extra_env)
    logic.extra_env["MEDQUANT_CACHE_DIR"] = str(folder / "cache")
    try:
        _tiny_network_part(scene, logic, folder, report, log, timeout)
        _shipped_model_part(scene, logic, report, log, timeout, shipped_model)
    finally:
        logic.extra_env.clear()
        logic.extra_env.update(saved_env)
        shutil.rmtree(folder, ignore_errors=True)
    return report


def _tiny_network_part(
    scene: Any,
    logic: MedQuantLogic,
    folder: Path,
    report: SelfTestReport,
    log: Callable[[str], None],
    timeout: float,
) -> None:
    log("Self-test: writing a tiny ONNX network and registering it")
    network = write_threshold_network(folder / "threshold.onnx")
    added = logic.start_add_model(network, ["background", "bright"], 16, TINY_MODEL).wait(timeout)
    if not added.succeeded:
        report.failures.append(f"models add: {added.message}")
        return
    volume = _phantom_node(scene)
    import slicer

    truth = slicer.util.arrayFromVolume(volume) > 100
    calibration = _write_calibration(folder / "calibration")
    for precision in ("fp32", "int8"):
        log(f"Self-test: segmenting the phantom with the tiny network ({precision.upper()})")
        options = EngineOptions(
            backend="openvino", precision=precision, calibration_folder=str(calibration), windows=4
        )
        task = logic.start_segment(volume, TINY_MODEL, options, TaskCallbacks())
        result = task.wait(timeout)
        if not result.succeeded:
            report.failures.append(f"{precision} segment: {result.message}")
            continue
        dice = _dice(result.segmentation, "bright", volume, truth)
        report.dice[precision] = dice
        if dice < 0.95:
            report.failures.append(f"{precision}: Dice {dice:.3f} of the bright box (expected >= 0.95)")


def _shipped_model_part(
    scene: Any,
    logic: MedQuantLogic,
    report: SelfTestReport,
    log: Callable[[str], None],
    timeout: float,
    model: str,
) -> None:
    listed = logic.start_models().wait(timeout)
    entries = (listed.result or {}).get("models", []) if listed.succeeded else []
    entry = next((e for e in entries if e.get("id") == model), None)
    if entry is None:
        report.skipped.append(f"{model}: no model card found ({listed.message})")
        return
    if entry.get("weights_present") is not True:
        report.skipped.append(
            f"{model}: weights not present on this machine (download them with the panel's "
            "'Download weights' or `medquant fetch`); the shipped-model check did not run"
        )
        return
    log(f"Self-test: segmenting the phantom with {model}")
    volume = _phantom_node(scene)
    task = logic.start_segment(volume, model, EngineOptions(backend="openvino", precision="fp32"))
    result = task.wait(timeout)
    if not result.succeeded:
        report.failures.append(f"{model}: {result.message}")
        return
    names = [s.GetName() for s in _segments(result.segmentation)]
    wanted = [e["name"] for e in result.result["label_table"] if int(e["value"]) != 0]
    if names != wanted:
        report.failures.append(f"{model}: segments {names} differ from the card's labels {wanted}")


def _segments(node: Any) -> list[Any]:
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())]
