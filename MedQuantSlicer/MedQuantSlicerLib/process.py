"""Run an ``engine_tools`` worker out of process and read its JSON-lines progress without blocking.

Two runners share one event parser and one outcome:

* :class:`QtWorkerProcess` uses ``QProcess`` (Slicer's PythonQt ``qt`` module or ``PySide6.QtCore``):
  events arrive on the GUI thread through Qt signals, so the GUI never freezes.
* :class:`ThreadWorkerProcess` uses ``subprocess`` and reader threads (no Qt; library use and tests);
  callbacks run in the thread that calls :meth:`ThreadWorkerProcess.process_events` / ``wait``.

:meth:`WorkerProcess.cancel` stops the whole process tree: the worker is started as the leader of its
own session (POSIX) and first receives SIGINT (Python unwinds, ``atomic_directory`` removes its
temporary output), then SIGKILL after a grace period; on Windows ``taskkill /T /F``. Temporary
``.partial-*`` artifacts the killed worker left in ``cleanup_dirs`` are then removed.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from MedQuantSlicerLib import paths

SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
LAUNCHER = Path(__file__).resolve().parent / "launcher.py"
PARTIAL_PREFIX = ".partial-"
MAX_LOG_LINES = 2000

ProgressCallback = Callable[[float | None, str, str], None]
LogCallback = Callable[[str, str], None]


@dataclass
class WorkerOutcome:
    """How a worker ended: ``status`` is ``succeeded``, ``failed`` or ``cancelled``."""

    status: str
    command: list[str]
    result: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    exit_code: int | None = None
    seconds: float = 0.0
    log: list[str] = field(default_factory=list)
    removed_partials: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCEEDED

    def message(self) -> str:
        """One readable sentence for the status line / error dialog."""
        if self.status == SUCCEEDED:
            return f"done in {self.seconds:.1f} s"
        if self.status == CANCELLED:
            return "cancelled"
        tail = "\n".join(self.log[-8:])
        what = self.error or f"the worker exited with code {self.exit_code} without a result"
        return f"{what}\n\nLast log lines:\n{tail}" if tail and not self.error else what


def _validator() -> Callable[[dict[str, Any]], None]:
    paths.ensure_engine_tools_importable()
    from engine_tools.progress import validate_event

    return validate_event


class EventParser:
    """Splits a byte stream into lines and turns each line into a protocol event.

    Valid events are returned as they are; anything else (library chatter on stdout, a malformed event)
    becomes a ``log`` event so nothing the worker said is lost.
    """

    def __init__(self, stream_name: str = "stdout") -> None:
        self.stream_name = stream_name
        self._buffer = b""
        self._validate = _validator()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        return [event for line in lines if (event := self._parse(line)) is not None]

    def flush(self) -> list[dict[str, Any]]:
        rest, self._buffer = self._buffer, b""
        event = self._parse(rest)
        return [event] if event is not None else []

    def _parse(self, raw: bytes) -> dict[str, Any] | None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        if not text.strip():
            return None
        if self.stream_name == "stdout" and text.startswith("{"):
            try:
                event = json.loads(text)
            except json.JSONDecodeError:
                event = None
            if isinstance(event, dict):
                if event.get("event") == "launcher":
                    return event
                try:
                    self._validate(event)
                    return event
                except ValueError as exc:
                    return {
                        "event": "log",
                        "level": "warning",
                        "message": f"bad worker event ({exc}): {text}",
                    }
        level = "stderr" if self.stream_name == "stderr" else "output"
        return {"event": "log", "level": level, "message": text}


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
        self._started_wall = 0.0
        self._started = 0.0

    # -- state ----------------------------------------------------------------------------------------
    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    def is_running(self) -> bool:
        return self._started > 0 and self.outcome is None

    # -- events ---------------------------------------------------------------------------------------
    def _dispatch(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            kind = event["event"]
            if kind == "launcher":
                self._pgid = int(event["pgid"])
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

    # -- killing --------------------------------------------------------------------------------------
    def _signal_tree(self, pid: int | None, force: bool) -> None:
        """SIGINT (graceful) or SIGKILL to the worker's process group; ``taskkill /T`` on Windows."""
        if os.name == "nt":
            if pid is not None:
                subprocess.run(["taskkill", "/PID", str(pid), "/T", "/F"], capture_output=True, check=False)
            return
        group = self._pgid if self._pgid is not None else pid
        if group is None:
            return
        try:
            os.killpg(group, signal.SIGKILL if force else signal.SIGINT)
        except (ProcessLookupError, PermissionError):
            pass

    def start(self) -> None:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    def cancel(self) -> None:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError


class ThreadWorkerProcess(WorkerProcess):
    """``subprocess`` runner; call :meth:`process_events` periodically or :meth:`wait`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._popen: subprocess.Popen[bytes] | None = None
        self._kill_timer: threading.Timer | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def start(self) -> None:
        self._started, self._started_wall = time.monotonic(), time.time()
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        else:
            kwargs["start_new_session"] = True
        self._popen = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.cwd,
            **kwargs,
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
                if self._kill_timer:
                    self._kill_timer.cancel()
                self._finish(payload)
        return self.outcome is not None

    def wait(self, timeout: float | None = None) -> WorkerOutcome:
        """Process events until the worker ends; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.process_events(0.05):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"worker still running after {timeout} s: {paths.quote_command(self.command)}"
                )
        assert self.outcome is not None
        return self.outcome

    def cancel(self) -> None:
        if not self.is_running() or self._cancel_requested:
            return
        self._cancel_requested = True
        if os.name == "nt":
            try:
                os.kill(self.pid, signal.CTRL_BREAK_EVENT)  # type: ignore[arg-type, attr-defined]
            except OSError:
                pass
        else:
            self._signal_tree(self.pid, force=False)
        self._kill_timer = threading.Timer(
            self.cancel_grace_s, lambda: self._signal_tree(self.pid, force=True)
        )
        self._kill_timer.daemon = True
        self._kill_timer.start()


def _to_bytes(data: Any) -> bytes:
    """``QByteArray`` (PySide6 or PythonQt) → ``bytes``."""
    try:
        return bytes(data.data())
    except (AttributeError, TypeError):
        return bytes(data)


class QtWorkerProcess(WorkerProcess):
    """``QProcess`` runner; ``qt_core`` is Slicer's ``qt`` module or ``PySide6.QtCore``."""

    def __init__(self, qt_core: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.qt = qt_core
        self.process: Any = None
        self._exit_handled = False

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
        if os.name == "nt":
            program, arguments = self.command[0], self.command[1:]
        else:  # new session so that cancel reaches every descendant
            program, arguments = self.command[0], [str(LAUNCHER), *self.command]
        process.start(program, arguments)

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
        self._finish(code)

    def cancel(self) -> None:
        if not self.is_running() or self._cancel_requested:
            return
        self._cancel_requested = True
        self._signal_tree(self.pid, force=False)
        self.qt.QTimer.singleShot(int(self.cancel_grace_s * 1000), self._force_kill)

    def _force_kill(self) -> None:
        if self.outcome is not None:
            return
        self._signal_tree(self.pid, force=True)
        if self.process is not None:
            self.process.kill()

    def wait_for_finished(self, timeout_s: float, process_events: Callable[[], None]) -> WorkerOutcome | None:
        """Spin ``process_events`` (the application's) until the worker ends (tests, scripted use)."""
        deadline = time.monotonic() + timeout_s
        while self.outcome is None and time.monotonic() < deadline:
            process_events()
            time.sleep(0.01)
        return self.outcome


def python_version_of(python: str) -> str:
    """``X.Y.Z`` of another interpreter (for the dependency check), or ``""``."""
    try:
        done = subprocess.run(
            [python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


__all__ = [
    "CANCELLED",
    "FAILED",
    "SUCCEEDED",
    "EventParser",
    "QtWorkerProcess",
    "ThreadWorkerProcess",
    "WorkerOutcome",
    "WorkerProcess",
]
