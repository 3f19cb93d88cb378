"""WorkerProcess: JSON-lines parsing, outcomes, and cancel that kills the whole process tree.

The synthetic workers below are real processes that speak the real protocol (they use
``engine_tools.progress.JsonLinesProgress`` and ``engine_tools.cache.atomic_directory``) and spawn a
grandchild, so the tree kill and the clean-up of half-written artifacts are tested for real.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
from MedQuantSlicerLib import paths
from MedQuantSlicerLib.process import CANCELLED, FAILED, SUCCEEDED, EventParser, ThreadWorkerProcess

WORKER = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    from pathlib import Path
    from engine_tools.cache import atomic_directory
    from engine_tools.progress import JsonLinesProgress

    stubborn = sys.argv[1] == "stubborn"
    cache, pid_file = Path(sys.argv[2]), Path(sys.argv[3])
    if stubborn:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(300)"])
    pid_file.write_text(str(child.pid))
    progress = JsonLinesProgress()
    print("some library chatter on stdout", flush=True)
    sys.stderr.write("a warning on stderr\\n"); sys.stderr.flush()
    progress.log("starting", "info")
    try:
        with atomic_directory(cache / "engines" / "demo-int8") as tmp:
            for i in range(600):
                (tmp / f"part{i}.bin").write_bytes(b"x" * 10)
                progress.update("build", i / 600, f"step {i}")
                time.sleep(0.05)
    finally:
        child.kill()
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as dead
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _start(tmp_path: Path, mode: str, grace: float) -> tuple[ThreadWorkerProcess, Path, list, list]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cache, pid_file = tmp_path / "cache", tmp_path / "child.pid"
    events, logs = [], []
    worker = ThreadWorkerProcess(
        [sys.executable, str(script), mode, str(cache), str(pid_file)],
        on_progress=lambda f, s, m: events.append((f, s, m)),
        on_log=lambda level, msg: logs.append((level, msg)),
        cancel_grace_s=grace,
        cleanup_dirs=[cache],
    )
    worker.start()
    deadline = time.monotonic() + 60
    while len(events) < 5 and time.monotonic() < deadline:
        worker.process_events(0.1)
    assert len(events) >= 5, f"no progress from the worker; log: {logs}"
    return worker, cache, events, logs


@pytest.mark.skipif(os.name == "nt", reason="process-group semantics tested on POSIX")
@pytest.mark.parametrize("mode", ["graceful", "stubborn"])
def test_cancel_kills_tree_and_leaves_no_partial(tmp_path, mode):
    from engine_tools.cache import partial_artifacts

    worker, cache, events, logs = _start(tmp_path, mode, grace=1.0)
    child_pid = int((tmp_path / "child.pid").read_text())
    assert _alive(child_pid)
    assert partial_artifacts(cache), "the worker should be writing a temporary engine directory"
    fractions = [f for f, _, _ in events]
    assert fractions == sorted(fractions) and 0.0 <= fractions[0] < fractions[-1] < 1.0
    assert ("output", "some library chatter on stdout") in logs
    assert ("stderr", "a warning on stderr") in logs
    started = time.monotonic()
    worker.cancel()
    outcome = worker.wait(30)
    assert outcome.status == CANCELLED
    assert time.monotonic() - started < 15
    deadline = time.monotonic() + 5
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid), "grandchild survived the cancel"
    assert partial_artifacts(cache) == []
    assert not (cache / "engines" / "demo-int8").exists()
    if mode == "stubborn":  # SIGINT ignored: killed by SIGKILL, leftovers removed by the runner
        assert outcome.removed_partials
        assert outcome.exit_code == -9
    else:  # SIGINT: Python unwound and atomic_directory cleaned up itself
        assert outcome.exit_code != 0


def test_real_worker_error_is_readable(tmp_path):
    command = paths.worker_command(
        "segment",
        "no-such-model",
        "--input",
        str(tmp_path / "missing.nrrd"),
        "--output",
        str(tmp_path / "o.nrrd"),
    )
    worker = ThreadWorkerProcess(command)
    worker.start()
    outcome = worker.wait(120)
    assert outcome.status == FAILED
    assert outcome.exit_code == 1
    assert "missing.nrrd" in outcome.error and outcome.error_type == "FileNotFoundError"
    assert "missing.nrrd" in outcome.message()


def test_real_worker_lists_models():
    worker = ThreadWorkerProcess(paths.worker_command("models"))
    worker.start()
    outcome = worker.wait(120)
    if outcome.error_type == "NotImplementedError":
        pytest.skip(f"`medquant models` not implemented yet: {outcome.error}")
    assert outcome.status == SUCCEEDED, outcome.message()
    entries = outcome.result.get("models", outcome.result)
    assert entries, "no model cards listed"


def test_parser_splits_partial_lines_and_keeps_noise():
    parser = EventParser()
    line = b'{"event": "progress", "stage": "build", "fraction": 0.5, "message": "half", "elapsed": 1.0}\n'
    assert parser.feed(line[:10]) == []
    events = parser.feed(line[10:] + b"plain text\n" + b'{"event": "progress", "fraction": 3}\n')
    assert events[0]["fraction"] == 0.5
    assert events[1] == {"event": "log", "level": "output", "message": "plain text"}
    assert events[2]["level"] == "warning" and "bad worker event" in events[2]["message"]
    assert parser.feed(b'{"event": "result", "data": {"a": 1}, "elapsed": 2}') == []
    assert parser.flush()[0]["data"] == {"a": 1}


def test_failed_to_start(tmp_path):
    worker = ThreadWorkerProcess([str(tmp_path / "no-such-python")])
    with pytest.raises(FileNotFoundError):
        worker.start()


@pytest.mark.skipif(os.name == "nt", reason="process-group semantics tested on POSIX")
def test_qprocess_runner_cancels_tree_through_launcher(tmp_path):
    """The QProcess runner (used by the panel) starts the worker via launcher.py in a new session."""
    pytest.importorskip("PySide6")
    from MedQuantSlicerLib.qt_process import QtWorkerProcess
    from pyside_host import PySideHost, application, spin

    from engine_tools.cache import partial_artifacts

    application()  # QProcess signals need a running Qt application, as in Slicer
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cache, pid_file = tmp_path / "cache", tmp_path / "child.pid"
    progress = []
    worker = QtWorkerProcess(
        PySideHost(None).qt,
        [sys.executable, str(script), "stubborn", str(cache), str(pid_file)],
        on_progress=lambda f, s, m: progress.append(f),
        cancel_grace_s=1.0,
        cleanup_dirs=[cache],
    )
    worker.start()
    assert spin(lambda: len(progress) >= 5, 60), worker.outcome and worker.outcome.message()
    assert worker._pgid is not None and worker._pgid != os.getpgid(0)
    child_pid = int(pid_file.read_text())
    worker.cancel()
    assert spin(lambda: worker.outcome is not None, 30)
    assert worker.outcome.status == CANCELLED
    assert spin(lambda: not _alive(child_pid), 5), "grandchild survived"
    assert partial_artifacts(cache) == []
