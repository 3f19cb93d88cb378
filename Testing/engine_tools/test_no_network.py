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
    from engine_tools.calibration import CalibrationSet
    from engine_tools.pipeline import prepare_engine
    from engine_tools.registry import ModelCard, get_card
    card = get_card("brainchop-model5_gw_ae")
    card = ModelCard.from_dict({**card.raw, "window": {**card.raw["window"], "size": [32, 32, 32]}}, card.path)
    rng = np.random.default_rng(0)
    windows = rng.random((4, 1, 32, 32, 32), dtype=np.float32)
    engine = prepare_engine(card, backend="openvino", precision="int8",
                            calibration=CalibrationSet.from_windows(windows),
                            weights_dir=sys.argv[1], options={"max_kept_layers": 1, "scanner_variations": False})
    # (random windows: no scanner-variation copies, which would blur noise into another input)
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


CLI = "from engine_tools.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def _cli_without_network(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[int, dict, list]:
    """``medquant ARGS --progress jsonl`` with every socket blocked: exit code, last event, attempts."""
    attempts = tmp_path / "attempts.jsonl"
    full_env = {
        **os.environ,
        "MEDQUANT_CACHE_DIR": str(tmp_path / "cache"),
        "MEDQUANT_SHARED": str(tmp_path / "no-shared"),
        "MEDQUANT_TEST_ATTEMPTS": str(attempts),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    for key in ("MEDQUANT_OFFLINE", "MEDQUANT_WEIGHTS_DIR"):
        if key not in (env or {}):
            full_env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-c", GUARD + CLI, *args, "--progress", "jsonl"],
        capture_output=True,
        text=True,
        timeout=300,
        env=full_env,
        cwd=tmp_path,
    )
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events, proc.stderr[-3000:]
    logged = [json.loads(line) for line in attempts.read_text().splitlines()] if attempts.exists() else []
    return proc.returncode, events[-1], logged


OFFLINE_RUNS = {
    "build --offline": (
        ["build", "brainchop-model5_gw_ae", "--backend", "openvino", "--precision", "fp32", "--offline"],
        {},
    ),
    "segment, MEDQUANT_OFFLINE=1": (
        [
            "segment",
            "brainchop-model5_gw_ae",
            "--backend",
            "openvino",
            "--precision",
            "fp32",
            "-i",
            "SCAN",
            "-o",
            "out.nii.gz",
        ],
        {"MEDQUANT_OFFLINE": "1"},
    ),
    "compare, MEDQUANT_OFFLINE=1": (
        [
            "compare",
            "brainchop-model5_gw_ae",
            "--backend",
            "openvino",
            "--precisions",
            "fp32",
            "-i",
            "SCAN",
            "-o",
            "report",
        ],
        {"MEDQUANT_OFFLINE": "1"},
    ),
    "demo --offline, no shared folder": (["demo", "--offline", "-o", "report"], {}),
}


@pytest.mark.parametrize("run", OFFLINE_RUNS, ids=list(OFFLINE_RUNS))
def test_offline_commands_never_touch_the_network(tmp_path: Path, run: str) -> None:
    """With nothing local, an offline command ends in one error naming the file, its URL and how to
    provide it, and makes no connection attempt (the socket guard would log it)."""
    args, env = OFFLINE_RUNS[run]
    scan = str(shared_path("data", "mri", "t1_crop.nii.gz"))
    code, final, attempts = _cli_without_network(
        tmp_path, *[scan if a == "SCAN" else a for a in args], env=env
    )
    assert code == 1 and final["event"] == "error", final
    message = final["message"]
    assert "downloads are off (MEDQUANT_OFFLINE=1 or --offline)" in message, message
    assert "https://raw.githubusercontent.com/neuroneural/brainchop/" in message
    assert "--weights-dir" in message and "MEDQUANT_WEIGHTS_DIR" in message
    if run.startswith("demo"):
        assert final["error_type"] == "DemoDataMissing" and "t1_crop.nii.gz" in message
        assert "MEDQUANT_SHARED" in message and str(tmp_path / "no-shared" / "data" / "mri") in message
    else:
        assert final["error_type"] == "WeightsUnavailable" and "model.json" in message
    assert attempts == []
    assert not (tmp_path / "out.nii.gz").exists() and not (tmp_path / "report").exists()


def test_mismatching_mirror_copy_is_an_error_not_a_download(tmp_path: Path) -> None:
    """issue: a mirror file failing its SHA-256 was rejected, then ``build`` went to the network."""
    mirror = tmp_path / "mirror" / "model5_gw_ae"
    mirror.mkdir(parents=True)
    published = shared_path("models", "brainchop", "model5_gw_ae")
    (mirror / "model.json").write_bytes((published / "model.json").read_bytes().replace(b"relu", b"RELU"))
    code, final, attempts = _cli_without_network(
        tmp_path,
        "build",
        "brainchop-model5_gw_ae",
        "--backend",
        "openvino",
        "--precision",
        "fp32",
        "--weights-dir",
        str(tmp_path / "mirror"),
    )
    assert code == 1 and final["error_type"] == "ChecksumMismatch", final
    assert str(mirror / "model.json") in final["message"] and "SHA-256" in final["message"]
    assert "not replaced by a download" in final["message"]
    assert attempts == []


def test_help_says_when_the_network_is_used(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    from engine_tools.cli import main

    for command in ("fetch", "build", "segment", "compare", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "Network: nothing is downloaded except by `fetch`" in text, command
        assert "--offline" in text and "MEDQUANT_OFFLINE=1 forbids every download" in text, command
    # --offline holds for its own command only (in-process callers run more commands afterwards)
    monkeypatch.delenv("MEDQUANT_OFFLINE", raising=False)
    assert main(["fetch", "brainchop-model5_gw_ae", "--offline", "--progress", "none"]) == 1
    assert "MEDQUANT_OFFLINE" not in os.environ
