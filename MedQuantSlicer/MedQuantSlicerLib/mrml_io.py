"""Move data between the MRML scene and the files a worker reads and writes.

Works with the Slicer application and with PyPI ``slicer-core`` (real MRML, no application): only MRML
storage nodes and ``vtkSlicerSegmentationsModuleLogic`` static methods are used. The input volume node
is never modified; a segmentation the user edited is never overwritten.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from MedQuantSlicerLib.results import COLUMNS, TEXT_COLUMNS, ResultRow

#: Node attributes written on result nodes (to find them again and to detect user edits).
ATTR_MODEL = "MedQuant.Model"
ATTR_PRECISION = "MedQuant.Precision"
ATTR_INPUT = "MedQuant.InputVolumeID"
ATTR_IMPORTED_MTIME = "MedQuant.ImportedContentSHA256"


def _slicer() -> Any:
    import slicer

    return slicer


def input_problem(volume_node: Any) -> str | None:
    """Why ``volume_node`` cannot be segmented, in one sentence; ``None`` when it can."""
    if volume_node is None:
        return "Choose an input volume."
    name = volume_node.GetName()
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        return f"{name} is a label map; choose the scalar (intensity) volume to segment."
    if volume_node.IsA("vtkMRMLVectorVolumeNode") or volume_node.IsA("vtkMRMLDiffusionWeightedVolumeNode"):
        return f"{name} is a vector or multi-channel volume; these networks segment single-channel scans."
    image = volume_node.GetImageData()
    if image is None:
        return f"{name} has no image data; load a scalar volume first."
    if image.GetNumberOfScalarComponents() != 1:
        return (
            f"{name} has {image.GetNumberOfScalarComponents()} components per voxel; these networks "
            "segment single-channel scans."
        )
    return None


def export_volume(volume_node: Any, path: str | Path) -> Path:
    """Write ``volume_node`` to ``path`` (``.nrrd``) without touching the node or the scene.

    The file holds the node's own voxel grid (IJK → RAS of the node; a parent transform is *not*
    hardened, the result is placed under the same transform instead).
    """
    slicer = _slicer()
    path = Path(path)
    problem = input_problem(volume_node)
    if problem is not None:
        raise ValueError(problem)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(0)
    if not storage.WriteData(volume_node):
        raise OSError(f"could not write {volume_node.GetName()} to {path}")
    return path


def read_label_table(value: Any) -> list[dict[str, Any]]:
    """The label table of a result: a list of ``{value, name, color[, terminology]}``, or a path to the
    JSON file ``segment`` writes (``{"model": ..., "labels": [...]}``)."""
    if isinstance(value, (str, Path)):
        path = Path(value)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"label table {path}: cannot read ({exc})") from exc
    if isinstance(value, dict):
        value = value.get("labels", [])
    if not isinstance(value, list) or not all(isinstance(e, dict) and "value" in e for e in value):
        raise ValueError("label table: expected a list of {value, name, color} entries")
    return value


def terminology_string(terminology: Any) -> str | None:
    """Slicer's terminology entry string from a card's entry (already a string, or a dict with
    ``category``/``type``/``typeModifier``/``anatomicRegion`` given as ``[scheme, code, meaning]``)."""
    if isinstance(terminology, str):
        return terminology
    if not isinstance(terminology, dict) or "category" not in terminology or "type" not in terminology:
        return None

    def coded(key: str) -> str:
        entry = terminology.get(key)
        return "^".join(str(x) for x in entry) if entry else ""

    context = terminology.get("context", "Segmentation category and type - 3D Slicer General Anatomy list")
    anatomic_context = terminology.get("anatomicContext", "Anatomic codes - DICOM master list")
    return "~".join(
        [
            context,
            coded("category"),
            coded("type"),
            coded("typeModifier"),
            anatomic_context if terminology.get("anatomicRegion") else "",
            coded("anatomicRegion"),
            coded("anatomicRegionModifier"),
        ]
    )


def _read_labelmap(path: Path) -> Any:
    slicer = _slicer()
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetCenterImage(False)
    if not storage.ReadData(labelmap):
        raise OSError(f"could not read the labelmap {path}")
    return labelmap


def _subject_hierarchy(scene: Any) -> Any:
    slicer = _slicer()
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def content_fingerprint(segmentation_node: Any) -> str:
    """Hash of the segments' names, label values and binary labelmap voxels (detects user edits).

    Segments imported from one labelmap share one ``vtkOrientedImageData`` (Slicer's shared
    labelmaps); each distinct image is hashed once, not once per segment (104 times for the
    104-class model).
    """
    import hashlib

    from vtk.util.numpy_support import vtk_to_numpy

    digest = hashlib.sha256()
    segmentation = segmentation_node.GetSegmentation()
    images: dict[str, tuple[int, Any]] = {}  # address -> (ordinal, image)
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        image = segment.GetRepresentation("Binary labelmap")
        ordinal = -1
        if image is not None:
            address = image.GetAddressAsString("vtkOrientedImageData")
            ordinal = images.setdefault(address, (len(images), image))[0]
        segment_id = segmentation.GetNthSegmentID(index)
        digest.update(f"{segment_id}|{segment.GetName()}|{segment.GetLabelValue()}|{ordinal}".encode())
    for _, image in images.values():
        digest.update(str(image.GetExtent()).encode())
        scalars = image.GetPointData().GetScalars()
        if scalars is not None:
            digest.update(vtk_to_numpy(scalars).tobytes())
    return digest.hexdigest()


def was_edited(segmentation_node: Any) -> bool:
    """True when the segmentation changed after this module imported it (or was not made by it)."""
    recorded = segmentation_node.GetAttribute(ATTR_IMPORTED_MTIME)
    if not recorded:
        return True
    return content_fingerprint(segmentation_node) != recorded


def find_previous_result(scene: Any, input_node: Any, model_id: str) -> Any | None:
    """The newest segmentation this module made for ``input_node`` with ``model_id``, or ``None``."""
    found = None
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        if node.GetAttribute(ATTR_INPUT) == input_node.GetID() and node.GetAttribute(ATTR_MODEL) == model_id:
            found = node
    return found


def import_segmentation(
    scene: Any,
    labels_path: str | Path,
    label_table: Any,
    input_node: Any,
    *,
    model_id: str,
    precision: str = "",
    name: str | None = None,
    replace_previous: bool = False,
    include_background: bool = False,
) -> Any:
    """Create a segmentation node from a labelmap file written in the input volume's geometry.

    One segment per label of ``label_table`` (names, colours, terminology; labels absent from the
    result become empty segments), reference geometry from ``input_node``, same parent transform and
    subject-hierarchy folder as the input. With ``replace_previous`` the last result of this model for
    this input is reused, but only when the user has not edited it; otherwise a new node with a unique
    name is created.
    """
    slicer = _slicer()
    labels_path = Path(labels_path)
    table = [e for e in read_label_table(label_table) if include_background or int(e["value"]) != 0]
    labelmap = _read_labelmap(labels_path)
    if labelmap.GetImageData() is None:
        raise OSError(f"{labels_path}: no image data")

    node = None
    if replace_previous:
        previous = find_previous_result(scene, input_node, model_id)
        if previous is not None and not was_edited(previous):
            node = previous
            node.GetSegmentation().RemoveAllSegments()
    if node is None:
        base = name or f"{input_node.GetName()} {model_id}" + (f" {precision.upper()}" if precision else "")
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(base))
        node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(input_node)
    # The labelmap file holds the input's *local* voxel grid. ImportLabelmapToSegmentationNode maps
    # the labelmap from its own (untransformed) space into the segmentation node's space through
    # GetTransformBetweenNodes (Modules/Loadable/Segmentations/Logic/
    # vtkSlicerSegmentationsModuleLogic.cxx), so with the transform already set the segments would be
    # moved by its inverse. Import into an untransformed node, then place it under the input's
    # parent transform.
    node.SetAndObserveTransformNodeID(None)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.ImportLabelmapToSegmentationNode(labelmap, node, ""):
        raise RuntimeError(f"could not import {labels_path} into {node.GetName()}")
    parent_transform = input_node.GetParentTransformNode()
    node.SetAndObserveTransformNodeID(parent_transform.GetID() if parent_transform is not None else None)
    segmentation = node.GetSegmentation()
    by_value = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        by_value[int(segment.GetLabelValue())] = segmentation.GetNthSegmentID(index)
    known = {int(e["value"]) for e in table}
    for value, segment_id in list(by_value.items()):
        if value not in known:  # a value the card does not name (or background): drop it
            segmentation.RemoveSegment(segment_id)
    for entry in table:
        value = int(entry["value"])
        color = [c / 255.0 for c in entry.get("color", (128, 128, 128))[:3]]
        label_name = str(entry.get("name", f"label {value}"))
        segment_id = by_value.get(value)
        if segment_id is None:
            segment_id = segmentation.AddEmptySegment("", label_name, color)
        segment = segmentation.GetSegment(segment_id)
        segment.SetName(label_name)
        segment.SetColor(*color)
        terminology = terminology_string(entry.get("terminology"))
        if terminology:
            segment.SetTerminology(terminology)

    node.SetAttribute(ATTR_MODEL, model_id)
    node.SetAttribute(ATTR_PRECISION, precision)
    node.SetAttribute(ATTR_INPUT, input_node.GetID())
    node.SetAttribute(ATTR_IMPORTED_MTIME, content_fingerprint(node))

    hierarchy = _subject_hierarchy(scene)
    if hierarchy is not None:
        input_item = hierarchy.GetItemByDataNode(input_node)
        if input_item:
            parent = hierarchy.GetItemParent(input_item)
            item = hierarchy.GetItemByDataNode(node) or hierarchy.CreateItem(parent, node)
            hierarchy.SetItemParent(item, parent)
    return node


def segment_array(segmentation_node: Any, segment_id: str, reference_volume: Any) -> Any:
    """A segment as a numpy array on ``reference_volume``'s voxel grid (k, j, i order)."""
    slicer = _slicer()
    import vtk

    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    segmentation_node.GetScene().AddNode(labelmap)
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, reference_volume
        ):
            raise RuntimeError(f"could not export segment {segment_id}")
        return slicer.util.arrayFromVolume(labelmap).copy()
    finally:
        segmentation_node.GetScene().RemoveNode(labelmap)


def _add_column(table: Any, key: str, title: str, values: Sequence[Any]) -> None:
    import vtk

    array = vtk.vtkStringArray() if key in TEXT_COLUMNS else vtk.vtkDoubleArray()
    array.SetName(title)
    for value in values:
        if key in TEXT_COLUMNS:
            array.InsertNextValue(str(value))
        else:
            array.InsertNextValue(float("nan") if value is None else float(value))
    table.AddColumn(array)


def results_table(
    scene: Any,
    rows: Sequence[ResultRow],
    name: str = "MedQuant results",
    table_node: Any = None,
    chart_node: Any = None,
) -> tuple[Any, Any]:
    """A ``vtkMRMLTableNode`` (one row per precision) and a bar chart of latency and size per precision.

    Returns ``(table_node, chart_node)``; existing nodes still in ``scene`` are refilled in place, nodes
    that a scene close removed are replaced by new ones.
    """
    if table_node is not None and table_node.GetScene() is not scene:
        table_node = None
    if chart_node is not None and (chart_node.GetScene() is not scene or table_node is None):
        chart_node = None
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    table = table_node.GetTable()
    disabled = table_node.StartModify()
    table.Initialize()
    for key, title in COLUMNS:
        _add_column(table, key, title, [getattr(row, key) for row in rows])
    table_node.Modified()
    table_node.EndModify(disabled)

    if chart_node is not None:
        return table_node, chart_node
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(f"{name} chart"))
    chart.SetTitle("INT8 vs FP32: latency per window and engine size")
    chart.SetXAxisTitle("precision")
    chart.SetYAxisTitle("ms / MB")
    label_column = dict(COLUMNS)["precision"]
    for key, colour in (("latency_ms", (0.85, 0.35, 0.1)), ("size_mb", (0.2, 0.45, 0.75))):
        title = dict(COLUMNS)[key]
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(f"{name} {key}"))
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetPlotType(series.PlotTypeBar)
        series.SetLabelColumnName(label_column)
        series.SetYColumnName(title)
        series.SetColor(*colour)
        series.SetName(title)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return table_node, chart


VOLUME_COLUMNS = (
    ("value", "Label value"),
    ("name", "Name"),
    ("voxels", "Voxels"),
    ("volume_ml", "Volume (mL)"),
)


def label_volumes_table(scene: Any, volumes: Sequence[dict[str, Any]], name: str) -> Any:
    """A new ``vtkMRMLTableNode`` with one row per label: value, name, voxel count and volume in mL
    (the ``volumes`` of a ``segment`` result, counted by the worker on the labelmap it wrote)."""
    import vtk

    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    table = table_node.GetTable()
    for key, title in VOLUME_COLUMNS:
        array = vtk.vtkStringArray() if key == "name" else vtk.vtkDoubleArray()
        array.SetName(title)
        for entry in volumes:
            array.InsertNextValue(str(entry[key]) if key == "name" else float(entry[key]))
        table.AddColumn(array)
    table_node.Modified()
    return table_node


def table_rows(table_node: Any) -> list[dict[str, Any]]:
    """The table node's content as dicts keyed by column title (tests, scripting)."""
    table = table_node.GetTable()
    out = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c in range(table.GetNumberOfColumns()):
            column = table.GetColumn(c)
            value = column.GetValue(r)
            row[column.GetName()] = value
        out.append(row)
    return out
