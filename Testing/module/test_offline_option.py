"""The panel's Offline option reaches every worker command, and the worker then never downloads."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from MedQuantSlicerLib.logic import EngineOptions, MedQuantLogic
from MedQuantSlicerLib.paths import worker_environment
from shared_data import REPO


def _commands(logic: MedQuantLogic, options: EngineOptions, scan: Path, out: Path) -> dict[str, list[str]]:
    model = "brainchop-model5_gw_ae"
    return {
        "build": logic.build_command(model, options),
        "segment": logic.segment_command(model, scan, out / "labels.nii.gz", options),
    }


def test_offline_reaches_build_and_segment_and_blocks_downloads(tmp_path: Path) -> None:
    logic = MedQuantLogic()
    scan = REPO / "no-scan.nii.gz"  # never read: the weights are looked up first
    online = _commands(logic, EngineOptions(backend="openvino", precision="fp32"), scan, tmp_path)
    offline = _commands(
        logic, EngineOptions(backend="openvino", precision="fp32", offline=True), scan, tmp_path
    )
    assert all("--offline" not in c for c in online.values())
    assert all(c.count("--offline") == 1 for c in offline.values())

    env = worker_environment(
        {k: v for k, v in os.environ.items() if k not in ("MEDQUANT_OFFLINE", "MEDQUANT_WEIGHTS_DIR")}
    )
    env.update(MEDQUANT_CACHE_DIR=str(tmp_path / "cache"), MEDQUANT_SHARED=str(tmp_path / "none"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(offline["build"], capture_output=True, text=True, env=env, timeout=300)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not events:
        pytest.fail(proc.stderr[-2000:])
    final = events[-1]
    assert proc.returncode != 0 and final["event"] == "error", final
    assert "downloads are off" in final["message"] and "--weights-dir" in final["message"]
    assert not (tmp_path / "cache" / "weights" / "brainchop-model5_gw_ae").exists()
