"""Measuring an engine: latency of a fixed batch, and peak resident memory over a block of work."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class PeakMemory:
    """Peak resident memory of this process over a block of work.

    On Linux the kernel's high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` so
    each block gets its own peak (native libraries' allocations included, unlike ``tracemalloc``);
    elsewhere ``ru_maxrss`` is used and the peak is cumulative since the process started.
    """

    def __init__(self) -> None:
        self.start_kib: int | None = None
        self.resettable = False

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        self.start_kib = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def result(self) -> dict[str, Any]:
        peak = _status_kib("VmHWM")
        method = "VmHWM reset per precision" if self.resettable else "ru_maxrss (cumulative)"
        if peak is None or not self.resettable:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        start = self.start_kib or 0
        return {
            "peak_rss_mib": round(peak / 1024, 1),
            "rss_before_mib": round(start / 1024, 1),
            "peak_increase_mib": round(max(peak - start, 0) / 1024, 1),
            "method": method,
        }


# --------------------------------------------------------------------------------------------- windows
def centre_window(volume: np.ndarray, window: Sequence[int]) -> np.ndarray:
    """The centred ``C, *window`` block of a ``C, D, H, W`` volume, zero-padded where it is smaller."""
    out = np.zeros((volume.shape[0], *window), dtype=np.float32)
    src, dst = [slice(None)], [slice(None)]
    for size, win in zip(volume.shape[1:], window, strict=True):
        if size >= win:
            start = (size - win) // 2
            src.append(slice(start, start + win))
            dst.append(slice(None))
        else:
            start = (win - size) // 2
            src.append(slice(None))
            dst.append(slice(start, start + size))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def time_engine(engine: Any, batch: np.ndarray, warmup: int = 1, repeats: int = 5) -> dict[str, Any]:
    """Median (and spread) of ``engine.run(batch)`` wall time after ``warmup`` untimed runs."""
    for _ in range(warmup):
        engine.run(batch)
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        engine.run(batch)
        times.append(time.perf_counter() - t0)
    per_window = [t / batch.shape[0] for t in times]
    return {
        "batch": int(batch.shape[0]),
        "warmup": warmup,
        "repeats": len(times),
        "median_ms_per_window": round(1000 * statistics.median(per_window), 3),
        "min_ms_per_window": round(1000 * min(per_window), 3),
        "max_ms_per_window": round(1000 * max(per_window), 3),
    }


# -------------------------------------------------------------------------------------------- compare
