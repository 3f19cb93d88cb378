"""The GUI's worker runners: ``QProcess`` (POSIX) or a ``QTimer``-polled ``subprocess`` (Windows).

``qt_core`` is Slicer's PythonQt ``qt`` module or ``PySide6.QtCore`` (a namespace with ``QProcess``,
``QProcessEnvironment``, ``QTimer``, ``QEventLoop``). Events reach the callbacks on the GUI thread, and
:meth:`~.process.WorkerProcess.wait` runs Qt's event loop, so the GUI stays responsive while a script
or the self-test blocks on a worker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from MedQuantSlicerLib.events import WorkerOutcome
from MedQuantSlicerLib.process import LAUNCHER, ThreadWorkerProcess, WorkerProcess


class PolledWorkerProcess(ThreadWorkerProcess):
    """:class:`ThreadWorkerProcess` whose events a ``QTimer`` delivers on the GUI thread."""

    def __init__(self, qt_core: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.qt = qt_core
        self._timer: Any = None

    def start(self) -> None:
        super().start()
        self._timer = self.qt.QTimer()
        self._timer.timeout.connect(self._tick)
        self._timer.start(50)

    def _tick(self) -> None:
        if self.process_events(0.0) and self._timer is not None:
            self._timer.stop()

    def poll(self, timeout: float = 0.05) -> bool:
        return _qt_poll(self.qt, timeout, lambda: self.outcome is not None)


def _to_bytes(data: Any) -> bytes:
    """``QByteArray`` (PySide6 or PythonQt) → ``bytes``."""
    try:
        return bytes(data.data())
    except (AttributeError, TypeError):
        return bytes(data)


def _qt_poll(qt: Any, timeout: float, done: Callable[[], bool]) -> bool:
    """Run the application's event loop for up to ``timeout`` s (the GUI stays responsive)."""
    loop = qt.QEventLoop()
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        loop.processEvents(qt.QEventLoop.AllEvents, 20)
        time.sleep(0.005)
    return done()


class QtWorkerProcess(WorkerProcess):
    """``QProcess`` runner; ``qt_core`` is Slicer's ``qt`` module or ``PySide6.QtCore``."""

    def __init__(self, qt_core: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.qt = qt_core
        self.process: Any = None
        self._exit_handled = False
        self._settle_timer: Any = None

    @property
    def pid(self) -> int | None:
        if self.process is None:
            return None
        pid = int(self.process.processId())
        return pid or None

    def start(self) -> None:
        qt = self.qt
        self._started, self._started_wall = time.monotonic(), time.time()
        process = qt.QProcess()
        environment = qt.QProcessEnvironment()
        for key, value in self.env.items():
            environment.insert(key, value)
        process.setProcessEnvironment(environment)
        process.setWorkingDirectory(self.cwd)
        process.readyReadStandardOutput.connect(self._on_stdout)
        process.readyReadStandardError.connect(self._on_stderr)
        process.finished.connect(self._on_finished)
        process.errorOccurred.connect(self._on_error)
        self.process = process
        # launcher.py: the worker leads a new session, so one killpg reaches all of it
        process.start(self.command[0], [str(LAUNCHER), *self.command])

    def _on_stdout(self) -> None:
        self._dispatch(self._stdout.feed(_to_bytes(self.process.readAllStandardOutput())))

    def _on_stderr(self) -> None:
        self._dispatch(self._stderr.feed(_to_bytes(self.process.readAllStandardError())))

    def _on_error(self, *args: Any) -> None:
        if self.process is None or self._exit_handled:
            return
        if self.process.state() == self.qt.QProcess.NotRunning and self.outcome is None:
            # FailedToStart: no finished() signal follows
            self._exit_handled = True
            self._error = (
                f"could not start {self.command[0]}: {self.process.errorString()}",
                "FailedToStart",
            )
            self._finish(None)

    def _on_finished(self, *args: Any) -> None:
        if self._exit_handled:
            return
        self._exit_handled = True
        self._on_stdout()
        self._on_stderr()
        code = int(self.process.exitCode())
        if self.process.exitStatus() != self.qt.QProcess.NormalExit:
            code = -1
        self._child_exited(code)
        if self.outcome is None:  # the launcher is gone but its group lives on: watch it
            self._settle_timer = self.qt.QTimer()
            self._settle_timer.timeout.connect(self._on_settle_tick)
            self._settle_timer.start(100)

    def _on_settle_tick(self) -> None:
        if self._settle() and self._settle_timer is not None:
            self._settle_timer.stop()

    def _kill_child(self) -> None:
        if self.process is not None and self.process.state() != self.qt.QProcess.NotRunning:
            self.process.kill()

    def _schedule_force_kill(self) -> None:
        self.qt.QTimer.singleShot(int(self.cancel_grace_s * 1000), self.force_kill)

    def poll(self, timeout: float = 0.05) -> bool:
        return _qt_poll(self.qt, timeout, lambda: self.outcome is not None)

    def wait_for_finished(self, timeout_s: float, process_events: Callable[[], None]) -> WorkerOutcome | None:
        """Spin ``process_events`` (the application's) until the worker ends (tests, scripted use)."""
        deadline = time.monotonic() + timeout_s
        while self.outcome is None and time.monotonic() < deadline:
            process_events()
            time.sleep(0.01)
        return self.outcome


def qt_worker_factory(qt_core: Any) -> Callable[..., WorkerProcess]:
    """The runner the GUI uses: ``QProcess`` on POSIX, the hidden-window ``subprocess`` runner on Windows."""

    def make(command: Sequence[str], **kwargs: Any) -> WorkerProcess:
        if os.name == "nt":
            return PolledWorkerProcess(qt_core, command, **kwargs)
        return QtWorkerProcess(qt_core, command, **kwargs)

    return make


__all__ = ["PolledWorkerProcess", "QtWorkerProcess", "qt_worker_factory"]
