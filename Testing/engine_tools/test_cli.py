"""`medquant segment | compare | demo` as a user runs them: subprocesses speaking the jsonl protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine_tools.progress import validate_event

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cache: Path | None = None, timeout: float = 600) -> tuple[int, list[dict]]:
    """Run ``python -m engine_tools ... --progress jsonl``; every stdout line must be a valid event."""
    env = dict(os.environ)
    if cache is not None:
        env["MEDQUANT_CACHE_DIR"] = str(cache)
    proc = subprocess.run(
        [sys.executable, "-m", "engine_tools", *args, "--progress", "jsonl"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    events = []
    for line in proc.stdout.splitlines():
        event = json.loads(line)
        validate_event(event)
        events.append(event)
    assert events, f"no events; stderr:\n{proc.stderr[-2000:]}"
    finals = [e for e in events if e["event"] in ("result", "error")]
    assert finals == [events[-1]], "exactly one result/error event, and it is the last line"
    return proc.returncode, events


def test_missing_input_ends_in_one_error_event_and_exit_1(tmp_path):
    missing = tmp_path / "nowhere" / "scan.nii.gz"
    code, events = run_cli(
        "segment", "brainchop-model11_gw_ae", "--input", str(missing), "--output", str(tmp_path / "o.nii.gz")
    )
    assert code == 1
    assert events[-1]["event"] == "error"
    assert events[-1]["error_type"] == "FileNotFoundError"
    assert str(missing) in events[-1]["message"]
    assert not (tmp_path / "o.nii.gz").exists()


@pytest.mark.parametrize("existing", ["labels", "table"])
def test_segment_refuses_to_overwrite_user_files(tmp_path, existing):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"not used: the refusal comes first")
    output = tmp_path / "labels.nii.gz"
    target = output if existing == "labels" else tmp_path / "labels.labels.json"
    target.write_text("the user's own file")
    code, events = run_cli(
        "segment", "brainchop-model11_gw_ae", "--input", str(scan), "--output", str(output)
    )
    assert code == 1
    assert events[-1]["error_type"] == "FileExistsError"
    assert str(target) in events[-1]["message"] and "--overwrite" in events[-1]["message"]
    assert target.read_text() == "the user's own file"


def test_compare_rejects_unknown_precision(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine_tools",
            "compare",
            "m",
            "--input",
            "x",
            "--precisions",
            "fp32,int4",
            "--output-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "int4" in proc.stderr and "int8" in proc.stderr


def test_build_with_random_weights_runs_a_seed_network_without_its_weights(tmp_path):
    """The published U-Net weights are unreachable here: ``--random-weights`` still builds the real
    full-size architecture (and says so), while a plain build names the missing download."""
    code, events = run_cli(
        "build",
        "unet-btcv",
        "--backend",
        "openvino",
        "--precision",
        "fp32",
        "--random-weights",
        cache=tmp_path,
    )
    assert code == 0, events[-1]
    assert any(e["event"] == "log" and "--random-weights" in e["message"] for e in events)
    engine = events[-1]["data"]["engine"]
    assert engine["backend"] == "openvino" and engine["precision"] == "fp32"
    # 5.65M float32 parameters: the published U-Net's size (paper: 23.11 MB FP32 engine)
    assert 20e6 < engine["bytes_on_disk"] < 25e6, engine["bytes_on_disk"]

    code, events = run_cli(
        "build",
        "unet-btcv",
        "--backend",
        "openvino",
        "--precision",
        "fp32",
        "--weights-dir",
        str(tmp_path),
        cache=tmp_path,
    )
    assert code == 1 and events[-1]["event"] == "error" and "--weights-dir" in events[-1]["message"]


def test_build_recipe_is_a_tensorrt_choice(tmp_path):
    code, events = run_cli(
        "build", "brainchop-model5_gw_ae", "--backend", "openvino", "--recipe", "medptq", cache=tmp_path
    )
    assert code == 1 and "--recipe is a TensorRT INT8 recipe" in events[-1]["message"]
    proc = subprocess.run(
        [sys.executable, "-m", "engine_tools", "build", "m", "--recipe", "paper"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "medptq" in proc.stderr


def test_guard_flags_give_build_and_segment_one_engine_key(tmp_path):
    """``--no-guard`` and ``--no-scanner-variations`` are engine settings: ``build`` and ``segment``
    (and ``compare``) accept both and turn them into the same build options, which name the cache
    entry, so a segment after a build with the same flags finds that build's engine."""
    from engine_tools.cli import build_parser
    from engine_tools.commands._options import engine_spec
    from engine_tools.progress import SilentProgress
    from engine_tools.registry import get_card

    card = get_card("brainchop-model11_gw_ae")
    parser = build_parser()
    flags = ["--no-guard", "--no-scanner-variations", "--backend", "openvino"]
    commands = {
        "build": ["build", card.id],
        "segment": ["segment", card.id, "--input", "in.nii.gz", "--output", str(tmp_path / "out.nii.gz")],
        "compare": ["compare", card.id, "--input", "in.nii.gz", "--output-dir", str(tmp_path)],
    }
    options = {}
    for name, words in commands.items():
        for extra in ([], flags):
            args = parser.parse_args([*words, *extra])
            options[name, bool(extra)] = engine_spec(
                args, card, SilentProgress(), precision="int8"
            ).build_options()
    assert options["build", True] == options["segment", True] == options["compare", True]
    assert options["build", True]["guard"] is False and options["build", True]["scanner_variations"] is False
    assert options["build", False] == options["segment", False] and "guard" not in options["build", False]
