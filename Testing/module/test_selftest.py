"""The module's self-test (what ``MedQuantSlicerTest`` runs in Slicer) on a ``slicer-core`` scene.

It must pass offline: the tiny ONNX network is written by the test itself; the shipped-model part runs
only with weights present and otherwise reports why it was skipped.
"""

from __future__ import annotations

import pytest
from MedQuantSlicerLib import selftest
from MedQuantSlicerLib.logic import MedQuantLogic

pytest.importorskip("onnx")


def test_self_test_passes_offline_and_names_what_it_skipped(scene, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDQUANT_WEIGHTS_DIR", str(tmp_path / "no-weights-here"))
    monkeypatch.setenv("MEDQUANT_SHARED", str(tmp_path / "no-mirror-here"))
    logic = MedQuantLogic(scene)
    report = selftest.run(scene, logic, timeout=600)
    print(report)
    assert report.passed, report.failures
    assert report.dice["fp32"] >= 0.95 and report.dice["int8"] >= 0.95
    if report.skipped:  # the shipped model's weights were absent: the reason is given
        assert "weights not present" in report.skipped[0] or "no model card" in report.skipped[0]
    assert "MEDQUANT_CACHE_DIR" not in logic.extra_env  # the temporary cache is not left behind
