"""One progress protocol between a worker process and its caller (CLI or Slicer GUI).

With ``--progress jsonl`` every line on stdout is one JSON object (UTF-8, no embedded newlines):

``{"event": "progress", "stage": str, "fraction": float|null, "message": str, "elapsed": float}``
    ``fraction`` is the overall fraction done in [0, 1] (null when unknown); ``elapsed`` is seconds
    since the worker started.
``{"event": "log", "level": "info"|"warning"|"error", "message": str, "elapsed": float}``
    Human-readable log lines (warnings about skipped files, chosen backend and why, ...).
``{"event": "result", "data": {...}, "elapsed": float}``
    Exactly one on success, last line; ``data`` is the command's JSON result.
``{"event": "error", "message": str, "error_type": str, "elapsed": float}``
    Exactly one on failure, last line; the process then exits with status 1 (2 for a command-line
    usage error, 130 when cancelled by SIGINT/SIGTERM: ``error_type`` ``"Cancelled"``).

With ``--progress human`` (default) the same events are rendered as a progress bar on stderr and the
result is printed as text. :data:`EVENT_SCHEMA` is the machine-readable form of the above and is
validated by the tests.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

PROTOCOL_VERSION = 1

EVENT_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "progress": {"stage": str, "fraction": (float, int, type(None)), "message": str, "elapsed": (float, int)},
    "log": {"level": str, "message": str, "elapsed": (float, int)},
    "result": {"data": dict, "elapsed": (float, int)},
    "error": {"message": str, "error_type": str, "elapsed": (float, int)},
}


def validate_event(event: dict[str, Any]) -> None:
    """Raise ``ValueError`` if ``event`` does not follow :data:`EVENT_SCHEMA`."""
    kind = event.get("event")
    if kind not in EVENT_SCHEMA:
        raise ValueError(f"unknown event type {kind!r}")
    for key, expected in EVENT_SCHEMA[kind].items():
        if key not in event:
            raise ValueError(f"{kind} event lacks {key!r}: {event}")
        if not isinstance(event[key], expected):
            raise ValueError(f"{kind} event field {key!r} has type {type(event[key]).__name__}")
    if kind == "progress" and event["fraction"] is not None and not 0.0 <= event["fraction"] <= 1.0:
        raise ValueError(f"fraction out of [0, 1]: {event['fraction']}")


class Cancelled(RuntimeError):
    """Raised inside long work when the caller asked to stop."""


class Progress:
    """Reports stages, fractions and logs; subclasses decide how they are rendered.

    Long-running code receives a ``Progress`` and calls :meth:`update` / :meth:`log`. Sub-tasks get a
    :meth:`span` that maps their own 0..1 onto a slice of the overall fraction.
    """

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._lo, self._hi = 0.0, 1.0
        self.should_cancel: Callable[[], bool] = lambda: False

    @property
    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def update(self, stage: str, fraction: float | None = None, message: str = "") -> None:
        """Report progress of ``stage``; ``fraction`` is local to the current span."""
        if self.should_cancel():
            raise Cancelled(f"cancelled during {stage}")
        overall = (
            None if fraction is None else self._lo + (self._hi - self._lo) * min(max(fraction, 0.0), 1.0)
        )
        self.emit({"event": "progress", "stage": stage, "fraction": overall, "message": message})

    def log(self, message: str, level: str = "info") -> None:
        self.emit({"event": "log", "level": level, "message": message})

    def warning(self, message: str) -> None:
        self.log(message, "warning")

    def result(self, data: dict[str, Any]) -> None:
        self.emit({"event": "result", "data": data})

    def error(self, exc: BaseException) -> None:
        self.emit(
            {"event": "error", "message": str(exc) or type(exc).__name__, "error_type": type(exc).__name__}
        )

    @contextmanager
    def span(self, start: float, stop: float) -> Iterator[Progress]:
        """Within the block, fractions 0..1 map onto ``start..stop`` of the current span."""
        saved = self._lo, self._hi
        width = self._hi - self._lo
        self._lo, self._hi = self._lo + width * start, self._lo + width * stop
        try:
            yield self
        finally:
            self._lo, self._hi = saved

    def emit(self, event: dict[str, Any]) -> None:  # pragma: no cover - overridden
        pass


class SilentProgress(Progress):
    """Collects events in memory (library use and tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append({**event, "elapsed": self.elapsed})


class JsonLinesProgress(Progress):
    """Writes one JSON object per line (the worker protocol read by the Slicer module)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream or sys.stdout

    def emit(self, event: dict[str, Any]) -> None:
        event = {**event, "elapsed": self.elapsed}
        self.stream.write(json.dumps(event, default=_json_default) + "\n")
        self.stream.flush()


class HumanProgress(Progress):
    """A one-line progress bar and log lines on stderr, for people at a terminal."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        super().__init__()
        self.stream = stream or sys.stderr
        self.width = width
        self._bar_open = False

    def emit(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "progress":
            fraction = event["fraction"]
            filled = 0 if fraction is None else int(round(fraction * self.width))
            pct = "   ?" if fraction is None else f"{fraction * 100:3.0f}%"
            line = (
                f"\r[{'#' * filled}{'.' * (self.width - filled)}] {pct} {event['stage']}: {event['message']}"
            )
            self.stream.write(line[:160].ljust(100))
            self._bar_open = True
        elif kind in ("log", "error"):
            self._close_bar()
            prefix = "error" if kind == "error" else event["level"]
            if kind == "error" or event["level"] != "info":
                self.stream.write(f"{prefix}: {event['message']}\n")
            else:
                self.stream.write(f"{event['message']}\n")
        elif kind == "result":
            self._close_bar()
        self.stream.flush()

    def _close_bar(self) -> None:
        if self._bar_open:
            self.stream.write("\n")
            self._bar_open = False


def make_progress(mode: str) -> Progress:
    """``"jsonl"`` → :class:`JsonLinesProgress`, ``"human"`` → :class:`HumanProgress`, ``"none"`` → silent."""
    if mode == "jsonl":
        return JsonLinesProgress()
    if mode == "human":
        return HumanProgress()
    if mode == "none":
        return SilentProgress()
    raise ValueError(f"unknown progress mode {mode!r} (choose human, jsonl or none)")


def _json_default(value: Any) -> Any:
    """Serialise numpy scalars/arrays and paths inside events."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
