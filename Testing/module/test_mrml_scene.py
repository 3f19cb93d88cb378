"""Real MRML (``slicer-core``): parent transforms, shared-labelmap fingerprint, input checks, scene close.

Each test failed on the code before its fix: the segmentation landed at the inverse of the input's
parent transform, the fingerprint hashed the shared labelmap once per segment, a vector volume reached
the exporter, the parameter node and the results table went stale after a scene close.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from MedQuantSlicerLib import mrml_io, parameters
from MedQuantSlicerLib.results import ResultRow
from mrml_helpers import oblique_volume

sitk = pytest.importorskip("SimpleITK")
TABLE = [
    {"value": 1, "name": "ball", "color": [255, 0, 0]},
    {"value": 2, "name": "box", "color": [0, 128, 255]},
]


def _phantom() -> np.ndarray:
    k, j, i = np.mgrid[:24, :30, :36]
    array = np.zeros((24, 30, 36), np.int16)
    array[(k - 8) ** 2 + (j - 10) ** 2 + (i - 12) ** 2 < 25] = 100
    array[14:20, 18:26, 20:32] = 200
    return array


def _labels_for(volume, tmp_path) -> tuple:
    """What a worker writes: labels on the exported grid (thresholds, so independent of any network)."""
    image = sitk.ReadImage(str(mrml_io.export_volume(volume, tmp_path / "input.nrrd")))
    labels = sitk.Cast(
        sitk.BinaryThreshold(image, 50, 150, 1, 0) + sitk.BinaryThreshold(image, 150, 250, 2, 0),
        sitk.sitkUInt8,
    )
    sitk.WriteImage(labels, str(tmp_path / "labels.nrrd"))
    return tmp_path / "labels.nrrd"


def _matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _to_world(node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    transform = node.GetParentTransformNode()
    if transform is not None:
        transform.GetMatrixTransformToWorld(matrix)
    return _matrix(matrix)


def _segment_on_input_grid(node, name, volume) -> np.ndarray:
    """The segment's voxels mapped through world space onto the input's local voxel grid."""
    import slicer
    import vtk

    segmentation = node.GetSegmentation()
    image = slicer.vtkOrientedImageData()
    segment_id = segmentation.GetSegmentIdBySegmentName(name)
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        node,
        segment_id,
        image,
        False,  # segmentation-local; the parent transform is applied below
    )
    extent = image.GetExtent()
    scalars = vtk.util.numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    dims = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
    mask = scalars.reshape(dims[2], dims[1], dims[0])
    kji = np.argwhere(mask > 0) + [extent[4], extent[2], extent[0]]
    image_to_world = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(image_to_world)
    ijk1 = np.c_[kji[:, ::-1], np.ones(len(kji))]
    world = _to_world(node) @ _matrix(image_to_world) @ ijk1.T
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    input_ijk = np.linalg.inv(_to_world(volume) @ _matrix(ijk_to_ras)) @ world
    indices = np.rint(input_ijk[:3].T).astype(int)[:, ::-1]
    shape = slicer.util.arrayFromVolume(volume).shape
    out = np.zeros(shape, bool)
    inside = np.all((indices >= 0) & (indices < shape), axis=1)
    out[tuple(indices[inside].T)] = True
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def _transform(scene, translation=(0, 0, 0), rotate_deg=0.0):
    import vtk

    transform = vtk.vtkTransform()
    transform.Translate(*translation)
    transform.RotateWXYZ(rotate_deg, 0.3, 0.2, 1.0)
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    node.SetMatrixTransformToParent(transform.GetMatrix())
    return node


@pytest.mark.parametrize(
    "translation,rotate_deg", [((50.0, 0.0, 0.0), 0.0), ((10.0, -20.0, 35.0), 30.0)], ids=["+50mm", "rotated"]
)
def test_segments_follow_the_input_parent_transform(scene, tmp_path, translation, rotate_deg):
    volume = oblique_volume(scene, _phantom())
    labels = _labels_for(volume, tmp_path)
    plain = mrml_io.import_segmentation(scene, labels, TABLE, volume, model_id="phantom")
    expected = {name: _segment_on_input_grid(plain, name, volume) for name in ("ball", "box")}
    assert all(mask.sum() > 50 for mask in expected.values())

    transform = _transform(scene, translation, rotate_deg)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    moved = mrml_io.import_segmentation(scene, labels, TABLE, volume, model_id="phantom")
    assert moved.GetParentTransformNode() is transform
    for name, truth in expected.items():
        dice = _dice(_segment_on_input_grid(moved, name, volume), truth)
        assert dice >= 0.99, f"{name}: Dice {dice:.3f} in world space under the input's transform"
    # and reusing an unedited previous result under the transform lands in the same place
    again = mrml_io.import_segmentation(
        scene, labels, TABLE, volume, model_id="phantom", replace_previous=True
    )
    assert again is moved
    assert _dice(_segment_on_input_grid(again, "ball", volume), expected["ball"]) >= 0.99


def test_fingerprint_hashes_the_shared_labelmap_once(scene, tmp_path, monkeypatch):
    volume = oblique_volume(scene, _phantom())
    array = np.zeros((24, 30, 36), np.uint8)
    table = []
    for value in range(1, 41):  # 40 labels in one labelmap, as a many-class model writes
        array[value % 24, : value % 30 + 1, value % 36] = value
        table.append({"value": value, "name": f"label {value}", "color": [value, 0, 0]})
    grid = sitk.ReadImage(str(mrml_io.export_volume(volume, tmp_path / "input.nrrd")))
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(grid)
    sitk.WriteImage(labels, str(tmp_path / "labels.nrrd"))
    node = mrml_io.import_segmentation(scene, tmp_path / "labels.nrrd", table, volume, model_id="many")
    assert node.GetSegmentation().GetNumberOfSegments() == 40

    hashed = []
    real_sha256 = hashlib.sha256

    class Counting:
        def __init__(self) -> None:
            self.inner = real_sha256()

        def update(self, data: bytes) -> None:
            hashed.append(len(data))
            self.inner.update(data)

        def hexdigest(self) -> str:
            return self.inner.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", Counting)
    fingerprint = mrml_io.content_fingerprint(node)
    monkeypatch.undo()
    assert sum(hashed) < 2 * array.nbytes, f"hashed {sum(hashed)} bytes for a {array.nbytes}-byte labelmap"
    assert fingerprint == node.GetAttribute(mrml_io.ATTR_IMPORTED_MTIME)
    assert not mrml_io.was_edited(node)
    node.GetSegmentation().GetNthSegment(3).SetName("renamed")
    assert mrml_io.was_edited(node)


def test_vector_and_label_volumes_get_a_clear_message(scene, tmp_path):
    import slicer

    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour photo")
    slicer.util.updateVolumeFromArray(vector, np.zeros((4, 5, 6, 3), np.uint8))
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(label, np.zeros((4, 5, 6), np.uint8))
    assert "vector or multi-channel" in mrml_io.input_problem(vector)
    assert "label map" in mrml_io.input_problem(label)
    assert mrml_io.input_problem(oblique_volume(scene, _phantom())) is None
    with pytest.raises(ValueError, match="colour photo is a vector"):
        mrml_io.export_volume(vector, tmp_path / "x.nrrd")
    assert not (tmp_path / "x.nrrd").exists()


def test_parameter_node_survives_scene_close(scene):
    node = parameters.parameter_node(scene)
    parameters.save(node, parameters.Settings(model="m1", windows=8))
    scene.Clear(0)  # File > Close scene: singleton nodes stay but are reset
    again = parameters.parameter_node(scene)
    assert again.GetScene() is scene, "the parameter node must be the one in the scene"
    assert scene.GetSingletonNode("MedQuantSlicer", "vtkMRMLScriptedModuleNode") is again
    parameters.save(again, parameters.Settings(model="m2"))
    assert parameters.load(parameters.parameter_node(scene))[0].model == "m2"
    assert scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1


def test_results_table_is_recreated_after_scene_close(scene):
    rows = [ResultRow("FP32", "openvino (cpu)", 4.0, 80.0, 12.5, 1.0)]
    table, chart = mrml_io.results_table(scene, rows)
    scene.Clear(0)
    assert table.GetScene() is None
    new_table, new_chart = mrml_io.results_table(scene, rows, table_node=table, chart_node=chart)
    assert new_table.GetScene() is scene and new_chart.GetScene() is scene
    assert new_chart.GetNthPlotSeriesNode(0).GetTableNode() is new_table
    assert mrml_io.table_rows(new_table)[0]["Precision"] == "FP32"


def test_labels_json_round_trip(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"labels": TABLE}))
    assert mrml_io.read_label_table(tmp_path / "t.json") == TABLE
