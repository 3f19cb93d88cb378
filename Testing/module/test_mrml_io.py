"""MRML side on real ``slicer-core`` MRML: export, import into segments in world space, tables, params.

The labelmap written here comes from SimpleITK thresholding the exported file (the same file and
geometry path a worker uses), so the world-space placement is checked independently of any network.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from MedQuantSlicerLib import mrml_io, parameters
from MedQuantSlicerLib.results import ResultRow, rows_from_compare
from mrml_helpers import oblique_volume, ras_of_voxels

sitk = pytest.importorskip("SimpleITK")

TABLE = [
    {"value": 0, "name": "background", "color": [0, 0, 0]},
    {"value": 1, "name": "ball", "color": [255, 0, 0]},
    {
        "value": 2,
        "name": "box",
        "color": [0, 128, 255],
        "terminology": {"category": ["SCT", "85756007", "Tissue"], "type": ["SCT", "85756007", "Tissue"]},
    },
    {"value": 3, "name": "never present", "color": [10, 200, 10]},
]


def _phantom() -> np.ndarray:
    k, j, i = np.mgrid[:24, :30, :36]
    array = np.zeros((24, 30, 36), np.int16)
    ball = (k - 8) ** 2 + (j - 10) ** 2 + (i - 12) ** 2 < 25
    array[ball] = 100
    array[14:20, 18:26, 20:32] = 200  # box, off-centre so flips would show
    return array


def test_oblique_volume_round_trip_lands_in_world_space(scene, tmp_path):
    array = _phantom()
    volume = oblique_volume(scene, array)
    before = volume.GetMTime()
    path = mrml_io.export_volume(volume, tmp_path / "input.nrrd")
    image = sitk.ReadImage(str(path))
    # SimpleITK (LPS) sees the same voxels at the same physical points
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    kji = np.array([[8, 10, 12], [17, 22, 26]])
    ras = ras_of_voxels(volume, kji)
    for (k, j, i), (r, a, s) in zip(kji, ras, strict=True):
        lps = image.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
        np.testing.assert_allclose(lps, (-r, -a, s), atol=1e-4)

    # "worker": label the exported file in its own geometry, write labels + table
    labels = sitk.Cast(
        sitk.BinaryThreshold(image, 50, 150, 1, 0) + sitk.BinaryThreshold(image, 150, 250, 2, 0),
        sitk.sitkUInt8,
    )
    sitk.WriteImage(labels, str(tmp_path / "labels.nrrd"))
    (tmp_path / "labels.labels.json").write_text(json.dumps({"model": "phantom", "labels": TABLE}))

    node = mrml_io.import_segmentation(
        scene,
        tmp_path / "labels.nrrd",
        tmp_path / "labels.labels.json",
        volume,
        model_id="phantom",
        precision="int8",
    )
    segmentation = node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["ball", "box", "never present"]
    box = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("box"))
    np.testing.assert_allclose(box.GetColor(), (0, 128 / 255, 1.0), atol=1e-6)
    assert "85756007" in box.GetTerminology()
    for name, value in (("ball", 100), ("box", 200)):
        mask = mrml_io.segment_array(node, segmentation.GetSegmentIdBySegmentName(name), volume)
        np.testing.assert_array_equal(mask > 0, array == value)
    empty = mrml_io.segment_array(node, segmentation.GetSegmentIdBySegmentName("never present"), volume)
    assert not empty.any()
    # geometry + hierarchy + input untouched
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is None or True
    assert volume.GetMTime() == before
    np.testing.assert_array_equal(__import__("slicer").util.arrayFromVolume(volume), array)
    hierarchy = mrml_io._subject_hierarchy(scene)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == hierarchy.GetItemParent(
        hierarchy.GetItemByDataNode(volume)
    )


def test_rerun_never_overwrites_an_edited_segmentation(scene, tmp_path):
    array = _phantom()
    volume = oblique_volume(scene, array)
    path = mrml_io.export_volume(volume, tmp_path / "input.nrrd")
    labels = sitk.Cast(sitk.BinaryThreshold(sitk.ReadImage(str(path)), 50, 250, 1, 0), sitk.sitkUInt8)
    sitk.WriteImage(labels, str(tmp_path / "labels.nrrd"))
    table = TABLE[:2]
    first = mrml_io.import_segmentation(scene, tmp_path / "labels.nrrd", table, volume, model_id="m")
    second = mrml_io.import_segmentation(scene, tmp_path / "labels.nrrd", table, volume, model_id="m")
    assert second is not first and second.GetName() != first.GetName()  # default: always a new node
    third = mrml_io.import_segmentation(
        scene, tmp_path / "labels.nrrd", table, volume, model_id="m", replace_previous=True
    )
    assert third is second  # unedited previous result is reused
    # the user edits it: paint a voxel
    segment_id = third.GetSegmentation().GetNthSegmentID(0)
    edited = mrml_io.segment_array(third, segment_id, volume)
    edited[0, 0, 0] = 1
    import slicer

    painted = slicer.vtkMRMLLabelMapVolumeNode()
    slicer.util.updateVolumeFromArray(painted, edited.astype(np.uint8))
    painted.CopyOrientation(volume)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    image = logic.CreateOrientedImageDataFromVolumeNode(painted)
    assert logic.SetBinaryLabelmapToSegment(image, third, segment_id)
    assert mrml_io.was_edited(third)
    fourth = mrml_io.import_segmentation(
        scene, tmp_path / "labels.nrrd", table, volume, model_id="m", replace_previous=True
    )
    assert fourth is not third
    assert mrml_io.segment_array(third, segment_id, volume)[0, 0, 0] == 1  # the edit survives


def test_results_table_and_chart(scene):
    report = {
        "backend": "openvino",
        "rows": {
            "fp32": {
                "status": "ok",
                "engine": {"backend": "openvino", "device": "cpu"},
                "bytes_on_disk": 4 * 2**20,
                "latency_ms_per_window": 80.0,
                "segment_seconds": 12.5,
                "dice_vs_reference": {"mean": 0.91},
            },
            "int8": {
                "status": "ok",
                "engine": {"backend": "openvino", "device": "cpu"},
                "bytes_on_disk": 2**20,
                "latency_ms_per_window": 20.0,
                "segment_seconds": 4.0,
                "cache": "hit",
                "agreement_vs_fp32": {"mean": 0.985, "largest_volume_change": [2, -0.0125]},
                "dice_vs_reference": {"mean": 0.905},
            },
            "bf16": {"status": "unavailable", "reason": "no BF16 on this CPU"},
        },
    }
    rows = rows_from_compare(report)
    assert [r.precision for r in rows] == ["FP32", "INT8", "BF16"]
    table_node, chart = mrml_io.results_table(scene, rows)
    content = mrml_io.table_rows(table_node)
    assert content[1]["Precision"] == "INT8"
    assert content[1]["Size (MB)"] == pytest.approx(1.0)
    assert content[1]["Latency / window (ms)"] == pytest.approx(20.0)
    assert content[1]["Dice vs FP32"] == pytest.approx(0.985)
    assert content[0]["Dice vs FP32"] == pytest.approx(1.0)
    assert content[1]["Dice vs reference"] == pytest.approx(0.905)
    change = "Largest label volume change vs FP32 (%)"
    assert content[1][change] == pytest.approx(-1.25) and np.isnan(content[0][change])
    assert rows[1].cells()[-1] == "-1.25" and rows[0].cells()[-1] == "–"
    assert "cached" in content[1]["Engine"]
    assert np.isnan(content[2]["Latency / window (ms)"])
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    series = chart.GetNthPlotSeriesNode(0)
    assert series.GetPlotType() == series.PlotTypeBar and series.GetTableNode() is table_node
    # refill in place: no new nodes
    count = scene.GetNumberOfNodes()
    mrml_io.results_table(
        scene,
        [ResultRow("FP32", "openvino (cpu)", 4.0, 80.0, 12.5, 1.0)],
        table_node=table_node,
        chart_node=chart,
    )
    assert scene.GetNumberOfNodes() == count
    assert len(mrml_io.table_rows(table_node)) == 1


def test_parameters_persist(scene):
    volume = oblique_volume(scene, _phantom())
    node = parameters.parameter_node(scene)
    assert parameters.parameter_node(scene) is node
    settings = parameters.Settings(
        model="brainchop-model5_gw_ae",
        calibration_folder="/data/scans",
        windows=8,
        backend="openvino",
        precision="int8",
        compare_fp32=True,
    )
    parameters.save(node, settings, volume)
    loaded, input_node, reference = parameters.load(node)
    assert loaded == settings and input_node is volume and reference is None


def test_bad_inputs_are_named(scene, tmp_path):
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(ValueError, match="no image data"):
        mrml_io.export_volume(empty, tmp_path / "x.nrrd")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        mrml_io.read_label_table(tmp_path / "bad.json")
