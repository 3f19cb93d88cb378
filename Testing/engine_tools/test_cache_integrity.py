"""The engine cache under damage, signals, concurrency and killed builds (`medquant build`, jsonl).

A cached engine is reused only when ``engine.json`` is readable and every artifact file still has its
recorded SHA-256; otherwise a warning says why and it is rebuilt. SIGTERM/SIGINT end with one
``Cancelled`` error event and no partial files; two builds of one key do the work once; builds killed
with SIGKILL at random points never leave anything that a later build reuses or that stays behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from bad_input_helpers import (
    REPO,
    build_args,
    calibration_folder,
    cli_env,
    medquant_command,
    parse_events,
    partial_files,
    run_cli,
    tiny_card,
    warnings_of,
)

from engine_tools.cache import TMP_PREFIX, hash_problem, partial_artifacts, remove_stale_partials

METADATA = "engine.json"


@pytest.fixture
def setup(tmp_path):
    return {
        "card": tiny_card(tmp_path),
        "cache": tmp_path / "cache",
        "calibration": calibration_folder(tmp_path / "calibration"),
    }


def _build(setup, *extra: str) -> tuple[int, list[dict]]:
    args = build_args(setup["card"], "--calibration", str(setup["calibration"]), *extra)
    return run_cli(*args, cache=setup["cache"])


def _engine_dirs(cache: Path) -> list[Path]:
    folder = cache / "engines"
    return (
        sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if folder.exists()
        else []
    )


def _assert_clean_cache(cache: Path) -> None:
    """Nothing partial; every engine and export present verifies against its recorded SHA-256."""
    assert not partial_files(cache), partial_files(cache)
    for folder in _engine_dirs(cache):
        recorded = json.loads((folder / METADATA).read_text())["artifact_sha256"]
        assert hash_problem(folder, recorded, (METADATA,)) is None, folder


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


DAMAGES = {
    "one weight changed, same size": (lambda d: _flip_byte(d / "model.bin"), "SHA-256 differs): model.bin"),
    "model.bin truncated": (lambda d: _truncate(d / "model.bin"), "SHA-256 differs): model.bin"),
    "engine.json truncated": (lambda d: _truncate(d / METADATA), "engine.json is missing or unreadable"),
}


def test_damaged_cached_engine_is_rebuilt_with_the_reason(setup):
    code, events = _build(setup)
    assert code == 0 and events[-1]["data"]["engine"]["cache"] == "built"
    for name, (damage, expected) in DAMAGES.items():
        (folder,) = _engine_dirs(setup["cache"])
        damage(folder)
        code, events = _build(setup)
        assert code == 0, (name, events[-1])
        reasons = [w for w in warnings_of(events) if "is not usable" in w and "rebuilding" in w]
        assert len(reasons) == 1 and expected in reasons[0], (name, warnings_of(events))
        assert events[-1]["data"]["engine"]["cache"] == "built", name
        _assert_clean_cache(setup["cache"])
    code, events = _build(setup)
    assert events[-1]["data"]["engine"]["cache"] == "hit" and not any(
        "not usable" in w for w in warnings_of(events)
    )


def test_truncated_onnx_export_is_exported_again_with_or_without_rebuild(setup):
    assert _build(setup)[0] == 0
    (export,) = (setup["cache"] / "exports").glob("*.onnx")
    for flag in ((), ("--rebuild",)):
        _truncate(export)
        code, events = _build(setup, *flag)
        assert code == 0, events[-1]
        if not flag:
            assert any(f"cached ONNX export {export.name} is not usable" in w for w in warnings_of(events))
        _assert_clean_cache(setup["cache"])


def _start_build(setup, *extra: str) -> subprocess.Popen:
    args = build_args(setup["card"], "--calibration", str(setup["calibration"]), *extra)
    return subprocess.Popen(
        medquant_command(*args), cwd=REPO, env=cli_env(setup["cache"]), stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip


def _wait_for_stage(proc: subprocess.Popen, stage: str) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if json.loads(line).get("stage") == stage:
            return lines
    raise AssertionError(f"the build ended before stage {stage!r}: {lines[-1:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_build_ends_in_one_cancelled_event_and_no_partial_files(setup, sig):
    proc = _start_build(setup)
    lines = _wait_for_stage(proc, "calibrate")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    events = parse_events("".join(lines) + out)
    assert proc.returncode == 130
    assert events[-1]["event"] == "error" and events[-1]["error_type"] == "Cancelled"
    assert signal.Signals(sig).name in events[-1]["message"]
    assert not partial_files(setup["cache"]) and not _engine_dirs(setup["cache"])


def test_two_builds_of_one_engine_do_the_work_once(setup):
    assert _build(setup, "--precision", "fp32")[0] == 0  # export and calibration cached: race the build
    first, second = _start_build(setup), _start_build(setup)
    results = [parse_events(proc.communicate(timeout=300)[0]) for proc in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [r[-1] for r in results]
    assert sorted(r[-1]["data"]["engine"]["cache"] for r in results) == ["built", "hit"]
    assert len(_engine_dirs(setup["cache"])) == 2  # the fp32 and the int8 engine
    _assert_clean_cache(setup["cache"])


def test_stale_write_sweep_survives_folders_that_another_process_renames(tmp_path):
    """A build starts by sweeping stale temporary writes while another build renames its own temporary
    folders into place; a folder vanishing mid-walk must be skipped, never raised (it once failed a
    concurrent build with FileNotFoundError)."""
    engines = tmp_path / "engines"
    names = [engines / f"{TMP_PREFIX}key.{os.getpid()}.{suffix}" for suffix in ("one", "two")]
    (names[0] / "inner" / "deeper").mkdir(parents=True)
    (names[0] / "inner" / f"{TMP_PREFIX}nested.{os.getpid()}.x").touch()
    stop, renames = threading.Event(), [0]

    def rename_back_and_forth() -> None:
        while not stop.is_set():
            os.replace(names[renames[0] % 2], names[(renames[0] + 1) % 2])
            renames[0] += 1

    worker = threading.Thread(target=rename_back_and_forth)
    worker.start()
    try:
        sweeps = [partial_artifacts(tmp_path) for _ in range(2000)]
        removed = [remove_stale_partials(tmp_path) for _ in range(200)]
    finally:
        stop.set()
        worker.join()
    assert renames[0] > 100  # the folders really moved during the sweeps
    assert all(len(found) <= 1 and set(found) <= set(names) for found in sweeps)  # never inside one
    assert not any(removed)  # a live process's writes are left alone
    assert partial_artifacts(tmp_path) == [names[renames[0] % 2]]


def test_builds_killed_at_random_points_never_poison_the_cache(setup):
    """20 builds SIGKILLed at random moments: half after a random event of a build's stream (export,
    calibration, quantization, guard, the final rename), half at a random moment of the engine write.
    Afterwards every build succeeds, nothing stale stays and no reused engine fails its hash."""
    rng = random.Random(20)
    code, events = _build(setup, "--rebuild")
    assert code == 0
    timeline = len(events)  # kill points are spread over a whole build's events
    interrupted = 0
    for trial in range(20):
        proc = _start_build(setup, "--rebuild", "--seed", str(trial % 3))
        stop_after = rng.randrange(1, timeline)
        for seen, line in enumerate(proc.stdout, start=1):
            # odd trials: a random moment of the engine write (quantization to the final rename)
            if seen >= stop_after if trial % 2 == 0 else '"stage": "quantize"' in line:
                break
        time.sleep(rng.uniform(0.0, 0.3 if trial % 2 == 0 else 1.0))
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
        interrupted += bool(partial_files(setup["cache"]))
        if trial % 5 == 4:  # the next build after kills succeeds and reuses only verified artifacts
            code, events = _build(setup, "--seed", str(trial % 3))
            assert code == 0, events[-1]
            _assert_clean_cache(setup["cache"])
    code, events = _build(setup)
    assert code == 0 and events[-1]["data"]["engine"]["cache"] in ("hit", "built")
    _assert_clean_cache(setup["cache"])
    assert interrupted >= 3, f"only {interrupted} of 20 kills interrupted a cache write"


def test_stale_partial_writes_are_removed_and_live_ones_kept(tmp_path):
    import os
    import tempfile

    from engine_tools.cache import remove_stale_partials

    gone = subprocess.Popen(["true"])  # a process id that has ended
    gone.wait()
    engines = tmp_path / "engines"
    engines.mkdir()
    of_gone = Path(tempfile.mkdtemp(prefix=f".partial-key1.{gone.pid}.", dir=engines))
    (of_gone / "model.bin").write_bytes(b"half")
    of_live = Path(tempfile.mkdtemp(prefix=f".partial-key2.{os.getpid()}.", dir=engines))
    old_live = Path(tempfile.mkdtemp(prefix=f".partial-key3.{os.getpid()}.", dir=engines))
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old_live, (two_days_ago, two_days_ago))
    removed = remove_stale_partials(tmp_path)
    assert sorted(removed) == sorted([of_gone, old_live])
    assert of_live.exists() and not of_gone.exists() and not old_live.exists()


def test_changed_calibration_cache_is_sampled_again(setup, monkeypatch):
    from engine_tools.calibration import collect_windows
    from engine_tools.registry import get_card

    monkeypatch.setenv("MEDQUANT_CACHE_DIR", str(setup["cache"]))
    card = get_card(str(setup["card"]))
    first = collect_windows(setup["calibration"], card, num_windows=4)
    stored = sorted((setup["cache"] / "calibration").glob("*/sample-*.npy"))[0]
    _flip_byte(stored)
    again = collect_windows(setup["calibration"], card, num_windows=4)
    assert not again.from_cache
    assert (again.windows == first.windows).all()
    assert collect_windows(setup["calibration"], card, num_windows=4).from_cache


_COMPILE_ONE = """
import numpy as np, openvino as ov, openvino.opset13 as ops
from engine_tools.engines.openvino.engine import compile_with_blob_cache
w = np.random.default_rng(0).normal(size=(3, 2, 3, 3, 3)).astype(np.float32)
p = ops.parameter([1, 2, 8, 8, 8], np.float32)
model = ov.Model([ops.convolution(p, w, [1] * 3, [1] * 3, [1] * 3, [1] * 3).output(0)], [p])
compile_with_blob_cache(model, {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
print("compiled", flush=True)
"""


def test_a_second_process_compiles_only_once_the_first_has_written_its_blob(tmp_path):
    """OpenVINO writes a compiled blob in place: a process holding the blob cache's compile lock
    (as one compiling does) keeps a second, real process from compiling, and so from importing a
    blob still being written, until it lets go; then the second compiles and writes its blob."""
    pytest.importorskip("openvino", reason="OpenVINO not installed (pip install openvino nncf)")
    from filelock import FileLock

    from engine_tools.engines.openvino.engine import COMPILE_LOCK

    blobs = tmp_path / "cache" / "openvino-compiled"
    blobs.mkdir(parents=True)
    env = {**os.environ, "MEDQUANT_CACHE_DIR": str(tmp_path / "cache")}
    with FileLock(str(blobs / COMPILE_LOCK)):
        second = subprocess.Popen(
            [sys.executable, "-c", _COMPILE_ONE], env=env, stdout=subprocess.PIPE, text=True
        )
        time.sleep(4.0)  # a compile of this model takes well under a second
        assert second.poll() is None and not list(blobs.glob("*.blob"))
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 0 and "compiled" in out
    assert len(list(blobs.glob("*.blob"))) == 1
