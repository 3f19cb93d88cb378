"""Run an ``engine_tools`` worker out of process and read its JSON-lines progress without blocking.

Three runners share one event parser (:mod:`.events`) and one cancel procedure:

* :class:`ThreadWorkerProcess` (here) uses ``subprocess`` and reader threads (no Qt; scripts and
  tests); callbacks run in the thread that calls :meth:`WorkerProcess.poll` / ``wait``;
* :class:`~.qt_process.QtWorkerProcess` uses ``QProcess``, started through ``launcher.py`` so the
  worker leads its own session (POSIX);
* :class:`~.qt_process.PolledWorkerProcess` is the ``subprocess`` runner polled by a ``QTimer`` on the
  GUI thread: used on Windows, where ``subprocess`` can start the worker without a console window.

Cancel sends SIGINT to the worker's process group (Python unwinds, ``atomic_directory`` removes its
temporary output), then SIGKILL after a grace period, and keeps the outcome open until no process of
the group is left: the direct child may be a CTK launcher that dies at once without forwarding the
signal (:mod:`.process_tree`). Only then are ``.partial-*`` leftovers in ``cleanup_dirs`` removed.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from MedQuantSlicerLib import paths, process_tree
from MedQuantSlicerLib.events import (
    CANCELLED,
    FAILED,
    MAX_LOG_LINES,
    SUCCEEDED,
    EventParser,
    LogCallback,
    ProgressCallback,
    WorkerOutcome,
)

LAUNCHER = Path(__file__).resolve().parent / "launcher.py"
PARTIAL_PREFIX = ".partial-"  # engine_tools.cache.atomic_directory's temporary names


class WorkerProcess:
    """Common part of the runners: event dispatch, outcome, tree kill and cleanup."""

    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        on_progress: ProgressCallback | None = None,
        on_log: LogCallback | None = None,
        on_finished: Callable[[WorkerOutcome], None] | None = None,
        cancel_grace_s: float = 5.0,
        cleanup_dirs: Sequence[str | Path] = (),
    ) -> None:
        self.command = [str(c) for c in command]
        self.env = dict(env) if env is not None else paths.worker_environment()
        self.cwd = str(cwd) if cwd is not None else str(paths.engine_tools_root())
        self.on_progress = on_progress
        self.on_log = on_log
        self.on_finished = on_finished
        self.cancel_grace_s = cancel_grace_s
        self.cleanup_dirs = [Path(d) for d in cleanup_dirs]
        self.outcome: WorkerOutcome | None = None
        self.last_progress: tuple[float | None, str, str] | None = None
        self._stdout = EventParser("stdout")
        self._stderr = EventParser("stderr")
        self._result: dict[str, Any] | None = None
        self._error: tuple[str, str] | None = None
        self._log: list[str] = []
        self._pgid: int | None = None
        self._cancel_requested = False
        self._kill_at: float | None = None
        self._exited = False  # the direct child ended (its group may live on after a cancel)
        self._exit_code: int | None = None
        self._started_wall = 0.0
        self._started = 0.0

    # -- state ----------------------------------------------------------------------------------------
    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    @property
    def pgid(self) -> int | None:
        return self._pgid

    def is_running(self) -> bool:
        return self._started > 0 and self.outcome is None

    def detach(self) -> None:
        """Stop delivering callbacks (module reload, panel closed); the process is not touched."""
        self.on_progress = self.on_log = self.on_finished = None

    # -- events ---------------------------------------------------------------------------------------
    def _dispatch(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            kind = event["event"]
            if kind == "launcher":
                self._pgid = int(event["pgid"])
                if self._cancel_requested:  # cancel came before the group was known
                    process_tree.signal_group(self._pgid, force=self._kill_due())
            elif kind == "progress":
                self.last_progress = (event["fraction"], event["stage"], event["message"])
                if self.on_progress:
                    self.on_progress(event["fraction"], event["stage"], event["message"])
            elif kind == "log":
                self._remember(f"[{event['level']}] {event['message']}")
                if self.on_log:
                    self.on_log(event["level"], event["message"])
            elif kind == "result":
                self._result = event["data"]
            elif kind == "error":
                self._error = (event["message"], event["error_type"])
                self._remember(f"[error] {event['error_type']}: {event['message']}")
                if self.on_log:
                    self.on_log("error", f"{event['error_type']}: {event['message']}")

    def _remember(self, line: str) -> None:
        self._log.append(line)
        if len(self._log) > MAX_LOG_LINES:
            del self._log[: len(self._log) - MAX_LOG_LINES]

    # -- ending ---------------------------------------------------------------------------------------
    def _child_exited(self, exit_code: int | None) -> None:
        """The direct child ended. After a cancel, wait for the rest of its group before finishing."""
        self._exited, self._exit_code = True, exit_code
        self._settle()

    def _settle(self) -> bool:
        """Finish once the child exited and (after a cancel) its group is gone; escalate when due."""
        if self.outcome is not None or not self._exited:
            return self.outcome is not None
        if self._cancel_requested and process_tree.group_alive(self._pgid):
            if self._kill_due():
                process_tree.signal_group(self._pgid, force=True)
            return False
        self._finish(self._exit_code)
        return True

    def _kill_due(self) -> bool:
        return self._kill_at is not None and time.monotonic() >= self._kill_at

    def _finish(self, exit_code: int | None) -> WorkerOutcome:
        self._dispatch(self._stdout.flush() + self._stderr.flush())
        if self._result is not None and exit_code == 0:
            status = SUCCEEDED
        elif self._cancel_requested or (self._error and self._error[1] == "Cancelled"):
            status = CANCELLED
        else:
            status = FAILED
        removed = self._remove_partials() if status != SUCCEEDED else []
        error, error_type = self._error if self._error else (None, None)
        self.outcome = WorkerOutcome(
            status=status,
            command=self.command,
            result=self._result if status == SUCCEEDED else None,
            error=error,
            error_type=error_type,
            exit_code=exit_code,
            seconds=round(time.monotonic() - self._started, 3),
            log=list(self._log),
            removed_partials=[str(p) for p in removed],
        )
        if self.on_finished:
            self.on_finished(self.outcome)
        return self.outcome

    def _remove_partials(self) -> list[Path]:
        """Delete ``.partial-*`` leftovers written since this worker started (a killed worker cannot)."""
        removed: list[Path] = []
        for root in self.cleanup_dirs:
            if not root.is_dir():
                continue
            for path in sorted(root.rglob(PARTIAL_PREFIX + "*"), key=lambda p: len(p.parts)):
                try:
                    if path.lstat().st_mtime < self._started_wall - 1.0:
                        continue  # older than this worker: not ours to judge
                except FileNotFoundError:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    # -- cancelling -----------------------------------------------------------------------------------
    def cancel(self) -> None:
        """SIGINT to the worker's group now, SIGKILL to whatever of it is left after the grace period."""
        if not self.is_running() or self._cancel_requested:
            return
        self._cancel_requested = True
        self._kill_at = time.monotonic() + self.cancel_grace_s
        if os.name == "nt":
            self._interrupt_windows()
        else:
            process_tree.signal_group(self._pgid, force=False)
        self._schedule_force_kill()

    def force_kill(self) -> None:
        """SIGKILL to the worker's group if any of it still exists, even after the child has exited."""
        if os.name == "nt":
            process_tree.kill_windows_tree(self.pid)
        elif process_tree.group_alive(self._pgid):
            process_tree.signal_group(self._pgid, force=True)
        self._kill_child()
        self._settle()

    @property
    def pid(self) -> int | None:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    def _interrupt_windows(self) -> None:
        process_tree.kill_windows_tree(self.pid)

    def _kill_child(self) -> None:
        """Kill the direct child too (it may be outside the group: the outer launcher)."""

    def _schedule_force_kill(self) -> None:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    def start(self) -> None:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    def poll(self, timeout: float = 0.05) -> bool:  # pragma: no cover - implemented by subclasses
        """Deliver pending events (and let the GUI breathe); True once the worker has finished."""
        raise NotImplementedError

    def wait(self, timeout: float | None = None) -> WorkerOutcome:
        """Poll until the worker ends; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll(0.05):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"worker still running after {timeout} s: {paths.quote_command(self.command)}"
                )
        assert self.outcome is not None
        return self.outcome


class ThreadWorkerProcess(WorkerProcess):
    """``subprocess`` runner; call :meth:`poll` periodically or :meth:`wait`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def start(self) -> None:
        self._started, self._started_wall = time.monotonic(), time.time()
        self._popen = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.cwd,
            **process_tree.new_group_options(),
        )
        self._pgid = self._popen.pid if os.name != "nt" else None
        readers = [
            threading.Thread(target=self._read, args=(self._popen.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._read, args=(self._popen.stderr, "stderr"), daemon=True),
        ]
        for reader in readers:
            reader.start()

        def wait_exit() -> None:
            assert self._popen is not None
            code = self._popen.wait()
            for reader in readers:
                reader.join()
            self._queue.put(("exit", code))

        threading.Thread(target=wait_exit, daemon=True).start()

    def _read(self, stream: Any, name: str) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):
            self._queue.put((name, chunk))

    def process_events(self, timeout: float = 0.0) -> bool:
        """Deliver pending events to the callbacks; True once the worker has finished."""
        deadline = time.monotonic() + timeout
        while self.outcome is None:
            remaining = deadline - time.monotonic()
            try:
                kind, payload = (
                    self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if kind == "stdout":
                self._dispatch(self._stdout.feed(payload))
            elif kind == "stderr":
                self._dispatch(self._stderr.feed(payload))
            else:
                self._child_exited(payload)
        return self._settle()

    def poll(self, timeout: float = 0.05) -> bool:
        return self.process_events(timeout)

    def _interrupt_windows(self) -> None:
        try:
            os.kill(self.pid, signal.CTRL_BREAK_EVENT)  # type: ignore[arg-type, attr-defined]
        except OSError:
            pass

    def _kill_child(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self._popen.kill()

    def _schedule_force_kill(self) -> None:
        # a timer thread, so the kill happens even when nobody polls; never cancelled after a cancel
        timer = threading.Timer(self.cancel_grace_s, self._kill_group_only)
        timer.daemon = True
        timer.start()

    def _kill_group_only(self) -> None:
        if os.name == "nt":
            process_tree.kill_windows_tree(self.pid)
        elif process_tree.group_alive(self._pgid):
            process_tree.signal_group(self._pgid, force=True)
        self._kill_child()


__all__ = [
    "CANCELLED",
    "FAILED",
    "SUCCEEDED",
    "EventParser",
    "ThreadWorkerProcess",
    "WorkerOutcome",
    "WorkerProcess",
]
