"""No traffic but what the user asked for: a full INT8 build (ONNX export, OpenVINO model conversion,
NNCF PTQ, accuracy guard) with every socket blocked makes no connection attempt and succeeds.

Runs in a fresh interpreter: NNCF silences its telemetry whenever ``pytest`` is imported, which would
hide exactly what is being tested. ``HOME`` points at a temporary folder so that openvino-telemetry
finds no consent file of the developer's (its default then is to send).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from shared_data import REPO, shared_path

pytest.importorskip("openvino", reason="OpenVINO not installed")
pytest.importorskip("nncf", reason="NNCF not installed")

GUARD = textwrap.dedent(
    r"""
    import json, os, socket, sys, time
    LOG = os.environ["MEDQUANT_TEST_ATTEMPTS"]  # a file: senders may run in forked processes

    def refuse(kind):
        def blocked(*args, **kwargs):
            with open(LOG, "a") as log:
                log.write(json.dumps([kind, repr(args[1:] if kind == "connect" else args)[:200]]) + "\n")
            raise OSError(f"network blocked by test ({kind})")
        return blocked

    socket.socket.connect = refuse("connect")
    socket.socket.connect_ex = refuse("connect")
    socket.getaddrinfo = refuse("getaddrinfo")
    socket.create_connection = refuse("create_connection")
    """
)

BUILD = textwrap.dedent(
    """
    import numpy as np
    import engine_tools  # opts out of telemetry on import
    import openvino as ov
    from engine_tools.pipeline import prepare_engine
    from engine_tools.registry import ModelCard, get_card
    card = get_card("brainchop-model5_gw_ae")
    card = ModelCard.from_dict({**card.raw, "window": {**card.raw["window"], "size": [32, 32, 32]}}, card.path)
    rng = np.random.default_rng(0)
    windows = rng.random((4, 1, 32, 32, 32), dtype=np.float32)
    engine = prepare_engine(card, backend="openvino", precision="int8", calibration=windows,
                            weights_dir=sys.argv[1], options={"max_kept_layers": 1})
    # the OpenVINO converter is the other telemetry channel: exercise it too
    ov.convert_model(sys.argv[2])
    out = engine.run(windows[:1])
    result = {"shape": list(out.shape), "kernels": engine.describe()["kernels"]["convolutions"]}
    """
)

CONTROL = textwrap.dedent(
    """
    import openvino as ov  # without engine_tools: nothing opts out
    ov.convert_model(sys.argv[2])
    result = {}
    """
)

REPORT = textwrap.dedent(
    """
    time.sleep(3)  # telemetry senders run in background threads / processes
    attempts = [json.loads(line) for line in open(LOG)] if os.path.exists(LOG) else []
    print("RESULT " + json.dumps({"attempts": attempts, **result}))
    """
)


def _run(body: str, tmp_path: Path, brainchop: Path, onnx: Path) -> dict:
    env = {**os.environ, "HOME": str(tmp_path / "home"), "MEDQUANT_CACHE_DIR": str(tmp_path / "cache")}
    for key in ("NNCF_CI", "NNCF_DEV", "CI", "TF_BUILD", "JENKINS_URL", "PYTEST_CURRENT_TEST"):
        env.pop(key, None)
    env["MEDQUANT_TEST_ATTEMPTS"] = str(tmp_path / "attempts.jsonl")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    (tmp_path / "home").mkdir(exist_ok=True)
    script = GUARD + body + REPORT
    proc = subprocess.run(
        [sys.executable, "-c", script, str(brainchop), str(onnx)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_int8_build_makes_no_connection_attempt(tmp_path: Path) -> None:
    brainchop = shared_path("models", "brainchop")
    onnx = shared_path("models", "niivue", "gwm_meshnet.onnx")
    result = _run(BUILD, tmp_path, brainchop, onnx)
    assert result["attempts"] == [], result["attempts"]
    assert result["shape"] == [1, 3, 32, 32, 32]
    assert result["kernels"]["int8"] >= 1
    assert not any((tmp_path / "home").rglob("openvino_ga_cid")), "telemetry client id was written"


def test_socket_guard_catches_telemetry_when_not_opted_out(tmp_path: Path) -> None:
    """Control: the same guard does see openvino-telemetry's attempt when nothing opts out, so the
    empty list above means something."""
    onnx = shared_path("models", "niivue", "gwm_meshnet.onnx")
    result = _run(CONTROL, tmp_path, shared_path("models", "brainchop"), onnx)
    assert any("google-analytics" in attempt[1] for attempt in result["attempts"]), result["attempts"]
