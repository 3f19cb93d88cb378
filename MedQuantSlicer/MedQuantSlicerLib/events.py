"""The worker's side of the conversation: JSON-lines events in, one :class:`WorkerOutcome` out.

The event schema is ``engine_tools/progress.py``, loaded on its own (:func:`.paths.light_module`) so
the GUI process never imports the ``engine_tools`` package and its NNCF/OpenVINO settings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from MedQuantSlicerLib import paths

SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
MAX_LOG_LINES = 2000

ProgressCallback = Callable[["float | None", str, str], None]
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
    return paths.light_module("progress").validate_event


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
