"""Fixtures of the Slicer-module tests: real MRML from PyPI ``slicer-core``, offscreen PySide6."""

from __future__ import annotations

import os

import pytest
from mrml_helpers import MODULE_DIR, REPO  # noqa: F401  (puts the module folder on sys.path)

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
_MIRROR = REPO.parent / "shared" / "models" / "brainchop"


@pytest.fixture(autouse=True)
def offline_weights_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers started by the module find the real brainchop weights in the shared offline mirror, as a
    user's workstation would through ``--weights-dir`` / ``$MEDQUANT_WEIGHTS_DIR``."""
    if _MIRROR.is_dir():
        monkeypatch.setenv("MEDQUANT_WEIGHTS_DIR", str(_MIRROR))


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
