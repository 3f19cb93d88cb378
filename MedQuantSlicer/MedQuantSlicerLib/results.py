"""Result rows shown in the panel table and stored in the MRML table node (no Qt, no MRML).

Rows come from the ``result`` event of ``engine_tools segment`` (one row) or ``engine_tools compare``
(one row per precision).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

COLUMNS: tuple[tuple[str, str], ...] = (
    ("precision", "Precision"),
    ("engine", "Engine"),
    ("size_mb", "Size (MB)"),
    ("latency_ms", "Latency / window (ms)"),
    ("total_s", "Total (s)"),
    ("dice_vs_fp32", "Dice vs FP32"),
    ("dice_vs_reference", "Dice vs reference"),
    ("volume_change_pct", "Largest label volume change vs FP32 (%)"),
)
TEXT_COLUMNS = ("precision", "engine")
MB = 2**20


@dataclass
class ResultRow:
    precision: str
    engine: str
    size_mb: float | None = None
    latency_ms: float | None = None
    total_s: float | None = None
    dice_vs_fp32: float | None = None
    dice_vs_reference: float | None = None
    #: the label whose voxel count moved most against FP32's, in percent (signed)
    volume_change_pct: float | None = None
    note: str = ""
    #: the INT8 accuracy guard ended below its target (built with --allow-below-target): show in red
    below_target: bool = False

    def cells(self) -> list[str]:
        """Texts for the panel table (``–`` where a value is missing)."""
        out = []
        for key, _ in COLUMNS:
            value = getattr(self, key)
            if key in TEXT_COLUMNS:
                out.append(str(value))
            elif value is None:
                out.append("–")
            elif key.startswith("dice"):
                out.append(f"{value:.4f}")
            elif key == "size_mb":
                out.append(f"{value:.2f}")
            elif key == "volume_change_pct":
                out.append(f"{value:+.2f}")
            else:
                out.append(f"{value:.1f}" if key == "latency_ms" else f"{value:.2f}")
        return out


def _number(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _mean(block: Any) -> float | None:
    return _number(block.get("mean")) if isinstance(block, dict) else _number(block)


def _largest_change_pct(block: Any) -> float | None:
    """``agreement_vs_fp32["largest_volume_change"]`` (``[label, change]``) in percent."""
    change = (block.get("largest_volume_change") or [None, None])[1] if isinstance(block, dict) else None
    return None if _number(change) is None else 100.0 * float(change)


def _engine_name(engine: dict[str, Any] | None) -> str:
    if not engine:
        return "?"
    name = f"{engine.get('backend', '?')} ({engine.get('device', 'cpu')})"
    if engine.get("cache") == "hit":
        name += ", cached"
    return name


def _latency_from_timings(timings: dict[str, Any]) -> float | None:
    for key in ("ms_per_window", "latency_ms_per_window", "median_ms_per_window"):
        if key in timings:
            return _number(timings[key])
    median_s = _number(timings.get("median_window_latency_s"))
    if median_s is not None:
        return 1000.0 * median_s
    windows, seconds = _number(timings.get("windows")), _number(timings.get("inference_s"))
    if windows and seconds is not None:
        return 1000.0 * seconds / windows
    return None


def _below_target(engine: dict[str, Any] | None) -> bool:
    return bool(((engine or {}).get("accuracy_guard") or {}).get("below_target"))


def row_from_segment(result: dict[str, Any]) -> ResultRow:
    """One row from a ``segment`` result (``engine``, ``timings``)."""
    engine = result.get("engine") or {}
    timings = result.get("timings") or {}
    return ResultRow(
        precision=str(engine.get("precision", "?")).upper(),
        engine=_engine_name(engine),
        size_mb=(_number(engine.get("bytes_on_disk")) or 0.0) / MB
        if engine.get("bytes_on_disk") is not None
        else None,
        latency_ms=_latency_from_timings(timings),
        total_s=_number(timings.get("total_s")),
        below_target=bool(result.get("below_target")) or _below_target(engine),
    )


def rows_from_compare(report: dict[str, Any]) -> list[ResultRow]:
    """One row per precision from a ``compare`` report (``rows``: precision → measurements)."""
    rows = report.get("rows") or {}
    items = rows.items() if isinstance(rows, dict) else ((r.get("precision", "?"), r) for r in rows)
    out = []
    for precision, row in items:
        if row.get("status", "ok") != "ok":
            out.append(
                ResultRow(str(precision).upper(), "unavailable", note=str(row.get("reason", ""))[:200])
            )
            continue
        engine = dict(row.get("engine") or {})
        engine.setdefault("backend", report.get("backend", "?"))
        if row.get("cache"):
            engine["cache"] = row["cache"]
        size = _number(row.get("bytes_on_disk", engine.get("bytes_on_disk")))
        total = _number(row.get("segment_seconds"))
        if total is None:
            total = _number(row.get("total_seconds"))
        dice_fp32 = 1.0 if str(precision).lower() == "fp32" else _mean(row.get("agreement_vs_fp32"))
        out.append(
            ResultRow(
                precision=str(precision).upper(),
                engine=_engine_name(engine),
                size_mb=None if size is None else size / MB,
                latency_ms=_number(row.get("latency_ms_per_window")),
                total_s=total,
                dice_vs_fp32=dice_fp32,
                dice_vs_reference=_mean(row.get("dice_vs_reference")),
                volume_change_pct=_largest_change_pct(row.get("agreement_vs_fp32")),
                below_target=_below_target(engine),
            )
        )
    return out


def row_values(row: ResultRow) -> dict[str, Any]:
    return {f.name: getattr(row, f.name) for f in fields(row)}
