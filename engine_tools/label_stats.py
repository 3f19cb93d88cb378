"""Numbers per label of a segmentation: voxel counts, volumes in mL and Dice against a reference.

:func:`label_volumes` is what the batch writes into ``volumes.csv`` and what the Slicer results table
shows for one segmentation. Volumes are counted on the labelmap's own grid (the input geometry), so
one voxel is ``spacing_x * spacing_y * spacing_z / 1000`` mL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk


def _values_and_spacing(
    labelmap: sitk.Image | np.ndarray, spacing: Sequence[float] | None
) -> tuple[np.ndarray, tuple[float, ...]]:
    if isinstance(labelmap, sitk.Image):
        return sitk.GetArrayViewFromImage(labelmap), tuple(spacing or labelmap.GetSpacing())
    if spacing is None:
        raise ValueError("a numpy labelmap needs its voxel spacing in mm")
    return np.asarray(labelmap), tuple(spacing)


def label_volumes(
    labelmap: sitk.Image | np.ndarray,
    spacing: Sequence[float] | None = None,
    label_table: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """One entry per label of ``label_table`` (``value``, ``name``, ``voxels``, ``volume_ml``).

    ``labelmap`` is a SimpleITK image (its spacing is used unless ``spacing`` is given) or an integer
    array with ``spacing`` in mm. Values present in the labelmap but missing from the table are
    appended as ``label <value>`` so no voxel goes uncounted.
    """
    values, spacing = _values_and_spacing(labelmap, spacing)
    voxel_ml = math.prod(float(s) for s in spacing) / 1000.0
    flat = np.asarray(values).ravel()
    if flat.size and flat.min() < 0:
        raise ValueError("labelmap holds negative values; expected label values >= 0")
    counts = np.bincount(flat.astype(np.int64, copy=False)) if flat.size else np.zeros(0, np.int64)
    table = [{"value": int(entry["value"]), "name": str(entry["name"])} for entry in label_table]
    known = {entry["value"] for entry in table}
    table += [{"value": v, "name": f"label {v}"} for v in np.flatnonzero(counts) if int(v) not in known]
    rows = []
    for entry in table:
        voxels = int(counts[entry["value"]]) if entry["value"] < len(counts) else 0
        rows.append({**entry, "voxels": voxels, "volume_ml": voxels * voxel_ml})
    return rows


def dice_per_label(
    labels: np.ndarray, reference: np.ndarray, values: Sequence[int]
) -> dict[int, float | None]:
    """Dice of each label value between two arrays of one grid (``None`` when both lack the label)."""
    if labels.shape != reference.shape:
        raise ValueError(f"labelmap shape {labels.shape} differs from the reference's {reference.shape}")
    scores: dict[int, float | None] = {}
    for value in values:
        mine, theirs = labels == value, reference == value
        total = int(mine.sum()) + int(theirs.sum())
        scores[int(value)] = 2.0 * int(np.logical_and(mine, theirs).sum()) / total if total else None
    return scores


def reference_on_grid(reference: sitk.Image, labels: sitk.Image) -> tuple[sitk.Image, str | None]:
    """``reference`` on the grid of ``labels`` (nearest neighbour when the grids differ) and a warning."""
    same = (
        reference.GetSize() == labels.GetSize()
        and np.allclose(reference.GetSpacing(), labels.GetSpacing(), atol=1e-4)
        and np.allclose(reference.GetOrigin(), labels.GetOrigin(), atol=1e-3)
        and np.allclose(reference.GetDirection(), labels.GetDirection(), atol=1e-4)
    )
    if same:
        return reference, None
    resampled = sitk.Resample(
        reference, labels, sitk.Transform(), sitk.sitkNearestNeighbor, 0, reference.GetPixelID()
    )
    return resampled, "the reference labelmap's grid differs from the scan's; resampled (nearest neighbour)"
