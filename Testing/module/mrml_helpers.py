"""MRML helpers of the Slicer-module tests (importable as ``mrml_helpers``)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MedQuantSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


def oblique_volume(
    scene, array, spacing=(0.9, 1.3, 2.2), origin=(12.0, -30.0, 25.0), angle_deg=25.0, name="phantom"
):
    """A scalar volume node with an oblique (rotated about two axes), anisotropic, LPS-stored geometry."""

    import slicer
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, array)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    transform = vtk.vtkTransform()
    transform.RotateZ(angle_deg)
    transform.RotateX(angle_deg / 2)
    directions = vtk.vtkMatrix4x4()
    directions.DeepCopy(transform.GetMatrix())
    # LPS-style axes: i toward L, j toward P (negate the first two RAS axes)
    for row in range(3):
        directions.SetElement(row, 0, -directions.GetElement(row, 0))
        directions.SetElement(row, 1, -directions.GetElement(row, 1))
    node.SetIJKToRASDirectionMatrix(directions)
    node.CreateDefaultDisplayNodes()
    return node


def ras_of_voxels(node, kji):
    """World (RAS) coordinates of voxel indices given as (k, j, i) rows."""
    import numpy as np
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    ijk = np.c_[kji[:, ::-1], np.ones(len(kji))]
    return (m @ ijk.T).T[:, :3]
