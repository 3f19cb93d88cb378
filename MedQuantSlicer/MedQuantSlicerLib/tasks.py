"""One orchestration per task: a chain of worker steps with the MRML work between them.

A :class:`Task` runs worker commands one after another; each step's ``on_success`` either starts the
next step (segment → compare) or returns the final status line. Who creates the workers (``QProcess``
in the panel, ``subprocess`` in scripts and tests) and who hears about progress are injected, as in
SlicerNNUnet's ``SegmentationLogic`` (worker factory + signals): the panel and the blocking helpers of
:class:`~.logic.MedQuantLogic` run the very same task code.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from MedQuantSlicerLib import paths
from MedQuantSlicerLib.events import CANCELLED, FAILED, SUCCEEDED, WorkerOutcome
from MedQuantSlicerLib.results import ResultRow

#: ``factory(command, env=..., on_progress=..., on_log=..., on_finished=..., cleanup_dirs=...)``
WorkerFactory = Callable[..., Any]
#: returned by a step's ``on_success`` after it started the next step
CONTINUE = object()


@dataclass
class TaskCallbacks:
    """What a caller wants to hear; every field is optional."""

    on_progress: Callable[[float | None, str, str], None] | None = None
    on_log: Callable[[str, str], None] | None = None
    on_status: Callable[[str], None] | None = None
    on_segmentation: Callable[[Any, dict[str, Any]], None] | None = None
    on_rows: Callable[[list[ResultRow]], None] | None = None
    on_finished: Callable[[TaskResult], None] | None = None


@dataclass
class TaskResult:
    """How a task ended, with the last worker outcome and what it produced."""

    status: str
    message: str
    outcome: WorkerOutcome | None = None
    result: dict[str, Any] | None = None
    segmentation: Any = None
    rows: list[ResultRow] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCEEDED

    def details(self) -> str:
        return "\n".join(self.outcome.log[-40:]) if self.outcome is not None else ""


class Task:
    """A chain of worker steps; :meth:`cancel` stops the running step, :meth:`wait` blocks."""

    def __init__(
        self,
        name: str,
        factory: WorkerFactory,
        env: dict[str, str],
        cleanup_dirs: Sequence[Path],
        callbacks: TaskCallbacks | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.name = name
        self.factory = factory
        self.env = env
        self.cleanup_dirs = list(cleanup_dirs)
        self.callbacks = callbacks or TaskCallbacks()
        self.workdir = workdir
        self.worker: Any = None
        self.result: TaskResult | None = None
        self.segmentation: Any = None
        self.rows: list[ResultRow] = []
        self.context: dict[str, Any] = {}

    @property
    def done(self) -> bool:
        return self.result is not None

    def run_step(self, command: list[str], on_success: Callable[[dict[str, Any]], Any], status: str) -> None:
        """Start one worker; ``on_success(result)`` returns :data:`CONTINUE` or the final status line."""
        self._status(status)
        self._log("info", "$ " + paths.quote_command(command))
        self.worker = self.factory(
            command,
            env=self.env,
            on_progress=self.callbacks.on_progress,
            on_log=self.callbacks.on_log,
            on_finished=lambda outcome: self._step_finished(outcome, on_success),
            cleanup_dirs=self.cleanup_dirs,
        )
        self.worker.start()

    def _step_finished(self, outcome: WorkerOutcome, on_success: Callable[[dict[str, Any]], Any]) -> None:
        if outcome.succeeded and outcome.result is not None:
            try:
                step = on_success(outcome.result)
            except Exception as exc:  # importing the result failed: readable message + log
                self.end(FAILED, f"{type(exc).__name__}: {exc}", outcome)
                return
            if step is not CONTINUE:
                self.end(SUCCEEDED, str(step), outcome, outcome.result)
        elif outcome.status == CANCELLED:
            removed = len(outcome.removed_partials)
            note = f" Removed {removed} unfinished temporary item(s)." if removed else ""
            self.end(CANCELLED, "Cancelled." + note, outcome)
        else:
            self.end(FAILED, outcome.message(), outcome)

    def end(
        self,
        status: str,
        message: str,
        outcome: WorkerOutcome | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.result = TaskResult(status, message, outcome, result, self.segmentation, list(self.rows))
        if status == FAILED:
            self._log("error", message)
        if self.callbacks.on_finished:
            self.callbacks.on_finished(self.result)

    def cancel(self) -> None:
        if self.worker is not None and not self.done:
            self._log("info", "Cancelling: stopping the worker process tree...")
            self.worker.cancel()

    def detach(self) -> None:
        """Stop all callbacks (module reload): nothing of an old panel is called any more."""
        self.callbacks = TaskCallbacks()
        if self.worker is not None:
            self.worker.on_progress = self.worker.on_log = None

    def wait(self, timeout: float | None = None) -> TaskResult:
        """Block until the task ends, polling the worker (the GUI's event loop runs meanwhile)."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            self.worker.poll(0.05)
            if deadline is not None and time.monotonic() > deadline and not self.done:
                self.cancel()
                self.worker.wait(60)
                raise TimeoutError(f"{self.name} still running after {timeout} s")
        assert self.result is not None
        return self.result

    def _status(self, text: str) -> None:
        if self.callbacks.on_status:
            self.callbacks.on_status(text)

    def _log(self, level: str, text: str) -> None:
        if self.callbacks.on_log:
            self.callbacks.on_log(level, text)
