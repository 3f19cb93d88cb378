"""The Apply ↔ Cancel state machine of the panel (no Qt: testable on its own).

``IDLE → RUNNING → (CANCELLING →) IDLE``. One task runs at a time; the button that started it turns
into **Cancel**, every other action is disabled; while cancelling nothing can be pressed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum


class State(Enum):
    IDLE = "idle"
    RUNNING = "running"
    CANCELLING = "cancelling"


CANCEL_TEXT = "Cancel"


@dataclass(frozen=True)
class ButtonState:
    text: str
    enabled: bool


class TaskController:
    """Tracks which task runs and what each action button shows."""

    def __init__(self, action_labels: dict[str, str]) -> None:
        """``action_labels`` maps an action (``"build"``) to its idle button text (``"Build engine"``)."""
        self.action_labels = dict(action_labels)
        self.state = State.IDLE
        self.action: str | None = None
        self.status = "Ready."
        self._listeners: list[Callable[[TaskController], None]] = []

    def add_listener(self, listener: Callable[[TaskController], None]) -> None:
        self._listeners.append(listener)

    def clear_listeners(self) -> None:
        self._listeners.clear()

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener(self)

    @property
    def busy(self) -> bool:
        return self.state is not State.IDLE

    def start(self, action: str, status: str = "") -> None:
        if action not in self.action_labels:
            raise KeyError(f"unknown action {action!r}")
        if self.busy:
            raise RuntimeError(f"cannot start {action!r}: {self.action!r} is {self.state.value}")
        self.state, self.action = State.RUNNING, action
        self.status = status or f"{self.action_labels[action]}..."
        self._changed()

    def request_cancel(self) -> bool:
        """RUNNING → CANCELLING; False (and no change) in any other state."""
        if self.state is not State.RUNNING:
            return False
        self.state = State.CANCELLING
        self.status = "Cancelling..."
        self._changed()
        return True

    def finish(self, status: str) -> None:
        """Back to IDLE with a final status line (done, failed: ..., cancelled)."""
        self.state, self.action = State.IDLE, None
        self.status = status
        self._changed()

    def set_status(self, status: str) -> None:
        self.status = status
        self._changed()

    def button(self, action: str, available: bool = True) -> ButtonState:
        """What the button of ``action`` shows; ``available`` is whether its inputs are complete."""
        label = self.action_labels[action]
        if self.state is State.IDLE:
            return ButtonState(label, available)
        if self.action == action:
            return ButtonState(CANCEL_TEXT, self.state is State.RUNNING)
        return ButtonState(label, False)

    def pressed(self, action: str) -> str:
        """Interpret a click: ``"start"``, ``"cancel"`` or ``"ignore"``."""
        if self.state is State.IDLE:
            return "start"
        if self.action == action and self.state is State.RUNNING:
            return "cancel"
        return "ignore"
