"""Seconds per build stage, measured with :func:`time.perf_counter`, each second counted once.

Stages nest (the accuracy guard's FP32 reference pass runs inside its calibration step): the clock
charges time to the innermost open stage only, so the stages of one build add up to its wall time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageClock:
    """Exclusive seconds per named stage; :meth:`stage` is a context manager and may nest."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: list[str] = []
        self._mark = 0.0

    def _charge(self, now: float) -> None:
        if self._open:
            name = self._open[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._mark
        self._mark = now

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._charge(time.perf_counter())
        self._open.append(name)
        try:
            yield
        finally:
            self._charge(time.perf_counter())
            self._open.pop()

    def add(self, seconds: dict[str, float]) -> None:
        """Add stages measured elsewhere (an engine's or the guard's own clock)."""
        for name, value in seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + float(value)

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 2) for name, value in self.seconds.items()}
