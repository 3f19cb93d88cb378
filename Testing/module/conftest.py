"""Fixtures of the Slicer-module tests: real MRML from PyPI ``slicer-core``, offscreen PySide6."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MedQuantSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture
def scene():
    """A fresh ``vtkMRMLScene`` assigned to ``slicer.mrmlScene`` (what the application would do)."""
    slicer = pytest.importorskip("slicer", reason="PyPI slicer-core is needed for the MRML tests")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package has no MRML (install slicer-core)")
    mrml_scene = slicer.vtkMRMLScene()
    # subject hierarchy plugin logic, as in the application: creates SH items for new data nodes
    sh_logic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    sh_logic.SetMRMLScene(mrml_scene)
    slicer.mrmlScene = mrml_scene
    yield mrml_scene
    mrml_scene.Clear(1)


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
