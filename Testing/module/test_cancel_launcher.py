"""Cancel kills the whole tree when the worker hides behind a launcher that does not forward signals.

Inside Slicer the worker command is ``PythonSlicer ...``: a CTK launcher that starts the real Python as
its child and dies on SIGINT without passing it on. The fake launcher below does the same (a parent
process that starts its arguments as a child, never forwards a signal, exits when the child does or
when interrupted). The worker ignores SIGINT (as one stuck in native code would), keeps writing into a
``.partial-*`` folder and has a helper child. After Cancel no process of the tree may survive and no
partial file may remain.
"""

from __future__ import annotations

import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import pytest
from MedQuantSlicerLib.events import CANCELLED
from MedQuantSlicerLib.process import ThreadWorkerProcess

pytestmark = pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX; Windows uses taskkill /T")

FAKE_LAUNCHER = textwrap.dedent(
    """\
    #!{python}
    import os, subprocess, sys
    with open(os.environ["TREE_PIDS"], "a") as pids:
        pids.write(f"{{os.getpid()}}\\n")
    child = subprocess.Popen([sys.executable, *sys.argv[1:]])
    sys.exit(child.wait())  # SIGINT: KeyboardInterrupt here, the child is neither told nor waited for
    """
)

STUCK_WORKER = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    from pathlib import Path
    from engine_tools.progress import JsonLinesProgress

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # stuck in native code: SIGINT changes nothing
    cache = Path(sys.argv[1])
    helper = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(300)"])
    with open(os.environ["TREE_PIDS"], "a") as pids:
        pids.write(f"{os.getpid()}\\n{helper.pid}\\n")
    progress = JsonLinesProgress()
    partial = cache / "engines" / ".partial-engine-int8"
    for step in range(100000):
        try:  # keeps (re)writing its temporary engine folder until it is killed
            partial.mkdir(parents=True, exist_ok=True)
            (partial / f"part{step % 20}.bin").write_bytes(b"x" * 100)
        except OSError:
            pass
        progress.update("build", min(step / 2000, 0.99), f"step {step}")
        time.sleep(0.05)
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _tree(tmp_path: Path, monkeypatch) -> tuple[Path, Path, Path, Path]:
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(FAKE_LAUNCHER.format(python=sys.executable))
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    worker = tmp_path / "worker.py"
    worker.write_text(STUCK_WORKER)
    pids = tmp_path / "pids.txt"
    monkeypatch.setenv("TREE_PIDS", str(pids))
    return launcher, worker, tmp_path / "cache", pids


def _assert_tree_gone_and_clean(pids: Path, cache: Path, expected_processes: int) -> None:
    from engine_tools.cache import partial_artifacts

    tree = [int(line) for line in pids.read_text().split()]
    assert len(tree) >= expected_processes, tree
    survivors = [pid for pid in tree if _alive(pid)]
    assert not survivors, f"processes of the worker tree survived the cancel: {survivors}"
    time.sleep(0.5)  # a survivor would write again
    assert partial_artifacts(cache) == [], "partial files remain after the cancel"


def _wait_for_progress(poll, worker, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while (worker.last_progress is None or worker.last_progress[0] < 0.005) and time.monotonic() < deadline:
        poll()
    assert worker.last_progress is not None, worker.outcome and worker.outcome.message()


def test_qprocess_runner_behind_a_launcher(tmp_path, monkeypatch):
    """Panel path: QProcess → launcher → launcher.py (new session) → launcher → worker → helper."""
    pytest.importorskip("PySide6")
    from MedQuantSlicerLib.qt_process import QtWorkerProcess
    from pyside_host import PySideHost, application, spin

    application()
    launcher, script, cache, pids = _tree(tmp_path, monkeypatch)
    worker = QtWorkerProcess(
        PySideHost(None).qt,
        [str(launcher), str(script), str(cache)],
        cancel_grace_s=1.0,
        cleanup_dirs=[cache],
    )
    worker.start()
    _wait_for_progress(lambda: spin(lambda: False, 0.1), worker)
    assert (cache / "engines" / ".partial-engine-int8").is_dir()
    worker.cancel()
    assert spin(lambda: worker.outcome is not None, 30), "cancel never finished"
    assert worker.outcome.status == CANCELLED
    assert worker.outcome.removed_partials, "the killed worker's partial folder was not removed"
    _assert_tree_gone_and_clean(pids, cache, expected_processes=4)


def test_thread_runner_behind_a_launcher(tmp_path, monkeypatch):
    """Script path: subprocess (new session) → launcher → worker → helper."""
    launcher, script, cache, pids = _tree(tmp_path, monkeypatch)
    worker = ThreadWorkerProcess(
        [str(launcher), str(script), str(cache)], cancel_grace_s=1.0, cleanup_dirs=[cache]
    )
    worker.start()
    _wait_for_progress(lambda: worker.poll(0.1), worker)
    worker.cancel()
    outcome = worker.wait(30)
    assert outcome.status == CANCELLED
    _assert_tree_gone_and_clean(pids, cache, expected_processes=3)
