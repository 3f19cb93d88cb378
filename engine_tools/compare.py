"""FP32 versus BF16 versus INT8 on one engine, for one volume: what INT8 bought and what it cost.

:func:`compare_precisions` builds (or loads from the cache) one engine per precision on the same
backend, segments the volume with each, times ``engine.run`` on a fixed batch apart from the
segmentation, records peak resident memory, and measures agreement with the FP32 result (Dice per label
and logits SQNR) and, when given, with reference labels. :func:`write_report` turns the report into
``report.json``, ``report.md`` and ``chart.png``.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine_tools.cache import atomic_file, write_json_atomic
from engine_tools.machine import machine_description, unsupported_reason
from engine_tools.progress import Progress, SilentProgress

if TYPE_CHECKING:
    from engine_tools.calibration import CalibrationSet
    from engine_tools.registry import ModelCard
    from engine_tools.spec import EngineSpec

MAX_KEPT_LOGITS_BYTES = 512 * 2**20


# ---------------------------------------------------------------------------------------------- memory
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
def _label_array(image: Any) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(image).astype(np.int64, copy=False)


def _reference_on_grid(reference: Any, image: Any) -> Any:
    """Reference labels resampled (nearest neighbour) onto the input grid when their grids differ."""
    import SimpleITK as sitk

    same = (
        reference.GetSize() == image.GetSize()
        and np.allclose(reference.GetSpacing(), image.GetSpacing(), atol=1e-4)
        and np.allclose(reference.GetOrigin(), image.GetOrigin(), atol=1e-3)
        and np.allclose(reference.GetDirection(), image.GetDirection(), atol=1e-4)
    )
    if same:
        return reference
    return sitk.Resample(
        reference, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, reference.GetPixelID()
    )


def _num_label_values(card: Any) -> int:
    return max([card.num_classes, *(lab.value + 1 for lab in card.labels)])


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def compare_precisions(
    card: ModelCard,
    image: Any,
    spec: EngineSpec,
    precisions: Sequence[str] = ("fp32", "bf16", "int8"),
    reference: Any = None,
    progress: Progress | None = None,
    *,
    warmup: int = 1,
    repeats: int = 5,
    overlap: float | None = None,
    input_path: str | None = None,
    skip_unsupported: bool = True,
) -> dict[str, Any]:
    """Segment ``image`` with every precision on the backend of ``spec`` and compare them.

    ``image`` and ``reference`` are ``SimpleITK.Image`` (reference labels use the card's label values);
    ``spec.calibration`` is needed for INT8 (each precision gets ``spec.for_precision``). Returns a
    JSON-ready report; precisions the backend cannot run here (or, with ``skip_unsupported``, that this
    CPU would only emulate) appear with ``"status": "unavailable"`` and the reason.
    """
    from engine_tools.accuracy import agreement_dice, json_ready, sqnr_db
    from engine_tools.engines import select_backend
    from engine_tools.pipeline import prepare_engine
    from engine_tools.segment import segment_image
    from engine_tools.volumes import preprocess

    progress = progress or SilentProgress()
    precisions = list(dict.fromkeys(precisions))
    if "fp32" not in precisions:
        precisions.insert(0, "fp32")  # the baseline everything is compared with
    precisions.sort(key=lambda p: 0 if p == "fp32" else 1)
    resolved, reason = select_backend(spec.backend)
    progress.log(f"backend: {resolved} ({reason})")

    prep = preprocess(image, card)
    for message in prep.steps.get("warnings", []):
        progress.warning(f"{card.id}: {message}")
    batch = centre_window(np.asarray(prep.array, dtype=np.float32), card.window_size)[None]
    num_values = _num_label_values(card)
    reference_labels = None
    if reference is not None:
        reference_labels = _label_array(_reference_on_grid(reference, image))

    # whole-volume logits SQNR only where FP32's logits fit comfortably in memory
    keep_logits = card.num_classes * int(np.prod(prep.array.shape[1:])) * 4 <= MAX_KEPT_LOGITS_BYTES
    rows: dict[str, dict[str, Any]] = {}
    fp32_labels: np.ndarray | None = None
    fp32_logits: np.ndarray | None = None
    fp32_volume_logits: np.ndarray | None = None
    step = 1.0 / len(precisions)
    for index, precision in enumerate(precisions):
        row: dict[str, Any] = {"precision": precision}
        rows[precision] = row
        with progress.span(index * step, (index + 1) * step):
            skip = unsupported_reason(resolved, precision) if skip_unsupported else None
            if skip:
                row.update(status="unavailable", reason=skip)
                progress.warning(f"{precision} skipped: {skip}")
                continue
            progress.update("compare", 0.0, f"{precision}: preparing the {resolved} engine")
            engine = None
            try:
                t0 = time.perf_counter()
                with progress.span(0.0, 0.5):
                    engine = prepare_engine(
                        card, replace(spec.for_precision(precision), backend=resolved), progress
                    )
                row["prepare_seconds"] = round(time.perf_counter() - t0, 2)
            except Exception as exc:  # a precision this backend/CPU cannot do is a result, not a crash
                if precision == "fp32":
                    raise
                row.update(status="unavailable", reason=f"{type(exc).__name__}: {exc}")
                progress.warning(f"{precision} on {resolved} unavailable: {exc}")
                continue
            described = engine.describe()
            row.update(
                status="ok",
                engine=described,
                bytes_on_disk=int(described.get("bytes_on_disk", 0)),
                cache=described.get("cache"),
                kept_in_higher_precision=described.get("kept_in_higher_precision"),
                accuracy_guard=described.get("accuracy_guard"),
                files=_artifact_files(described.get("artifact_dir")),
            )
            with PeakMemory() as memory:
                progress.update("compare", 0.55, f"{precision}: segmenting")
                t0 = time.perf_counter()
                with progress.span(0.55, 0.85):
                    result = segment_image(
                        engine, card, image, progress=progress, overlap=overlap, keep_logits=keep_logits
                    )
                row["segment_seconds"] = round(time.perf_counter() - t0, 3)
                row["segment_timings"] = getattr(result, "timings", None)
                progress.update("compare", 0.85, f"{precision}: timing {repeats} runs of one window")
                row["latency"] = time_engine(engine, batch, warmup=warmup, repeats=repeats)
                window_logits = np.asarray(engine.run(batch), dtype=np.float32)
            row["memory"] = memory.result()
            row["latency_ms_per_window"] = row["latency"]["median_ms_per_window"]
            labels = _label_array(result.labels)
            volume_logits = getattr(result, "logits", None)
            if precision == "fp32":
                fp32_labels, fp32_logits = labels, window_logits
                row["fp32_volume_logits"] = volume_logits is not None
                fp32_volume_logits = volume_logits
            else:
                agreement = agreement_dice(fp32_labels, labels, num_values)
                row["agreement_vs_fp32"] = json_ready(agreement)
                row["sqnr_db_window"] = _finite(sqnr_db(fp32_logits, window_logits))
                if volume_logits is not None and fp32_volume_logits is not None:
                    row["sqnr_db_volume"] = _finite(sqnr_db(fp32_volume_logits, volume_logits))
            if reference_labels is not None:
                row["dice_vs_reference"] = json_ready(agreement_dice(reference_labels, labels, num_values))
            row["label_voxels"] = {
                str(v): int(c) for v, c in enumerate(np.bincount(labels.ravel(), minlength=num_values)) if c
            }
            del engine, result, volume_logits
            gc.collect()
        progress.update("compare", (index + 1) * step, f"{precision}: done")

    report = {
        "model": {"id": card.id, "title": card.title, "num_classes": card.num_classes},
        "input": {"path": input_path, "size": list(image.GetSize()), "spacing": list(image.GetSpacing())},
        "backend": resolved,
        "backend_reason": reason,
        "precisions": precisions,
        "machine": machine_description(),
        "latency_window": list(batch.shape),
        "rows": rows,
        "labels": {str(lab.value): lab.name for lab in card.labels},
        "calibration": _calibration_summary(spec.calibration),
        "reference": None if reference is None else "given",
    }
    report["ratios"] = _ratios(rows)
    report["findings"] = _findings(report)
    return report


def _artifact_files(artifact_dir: str | None) -> dict[str, int]:
    """Bytes of each file of the engine artifact (the cache's own metadata file excluded)."""
    from engine_tools.engines.base import METADATA_FILE

    if not artifact_dir or not Path(artifact_dir).is_dir():
        return {}
    return {
        p.name: p.stat().st_size
        for p in sorted(Path(artifact_dir).iterdir())
        if p.is_file() and p.name != METADATA_FILE
    }


def _finite(value: float) -> float | None:
    return round(float(value), 3) if math.isfinite(value) else (None if math.isnan(value) else float(value))


def _calibration_summary(calibration: CalibrationSet | None) -> dict[str, Any] | None:
    return None if calibration is None else calibration.describe()


def _ok(rows: dict[str, dict[str, Any]], precision: str) -> dict[str, Any] | None:
    row = rows.get(precision)
    return row if row and row.get("status") == "ok" else None


def _ratios(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Size and latency of each precision relative to FP32 and of INT8 relative to BF16 (<1 = smaller/faster)."""
    ratios: dict[str, Any] = {}
    base = _ok(rows, "fp32")
    for precision in rows:
        row = _ok(rows, precision)
        if not row or precision == "fp32" or not base:
            continue
        ratios[f"{precision}_vs_fp32"] = {
            "size": _ratio(row["bytes_on_disk"], base["bytes_on_disk"]),
            "latency": _ratio(row["latency_ms_per_window"], base["latency_ms_per_window"]),
            "speedup": _ratio(base["latency_ms_per_window"], row["latency_ms_per_window"]),
            "segment_seconds": _ratio(row["segment_seconds"], base["segment_seconds"]),
        }
    int8, bf16 = _ok(rows, "int8"), _ok(rows, "bf16")
    if int8 and bf16:
        ratios["int8_vs_bf16"] = {
            "size": _ratio(int8["bytes_on_disk"], bf16["bytes_on_disk"]),
            "latency": _ratio(int8["latency_ms_per_window"], bf16["latency_ms_per_window"]),
            "speedup": _ratio(bf16["latency_ms_per_window"], int8["latency_ms_per_window"]),
        }
    return ratios


def _findings(report: dict[str, Any]) -> list[str]:
    """Plain sentences on what each lower precision bought versus FP32 and BF16, good or bad."""
    rows, ratios, out = report["rows"], report["ratios"], []
    caps = report["machine"].get("openvino_cpu_capabilities") or []
    if (
        report["backend"] == "openvino"
        and rows.get("bf16", {}).get("status") == "ok"
        and caps
        and "BF16" not in caps
    ):
        out.append(
            "This CPU has no native BF16 (OpenVINO CPU capabilities: "
            f"{', '.join(caps)}): a BF16 request cannot run BF16 kernels here."
        )
    for precision, row in rows.items():
        if row.get("status") != "ok":
            if precision != "fp32":
                out.append(f"{precision.upper()} could not run on {report['backend']}: {row.get('reason')}")
            continue
        if precision == "fp32":
            continue
        r = ratios.get(f"{precision}_vs_fp32", {})
        speed = r.get("speedup")
        if speed:
            times = f"({row['latency_ms_per_window']:.1f} vs {rows['fp32']['latency_ms_per_window']:.1f} ms)"
            if speed >= 1.02:
                text = f"{speed:.2f}x faster than strict FP32 per window {times}"
            elif speed <= 0.98:
                text = f"SLOWER than strict FP32 per window {times}, {1 / speed:.2f}x its latency"
            else:
                text = f"about as fast as strict FP32 per window {times}"
            out.append(
                f"{precision.upper()} is {text}; its engine is {r.get('size') or float('nan'):.2f}x FP32's size."
            )
            if (r.get("size") or 0) >= 1.0:
                before, after = rows["fp32"].get("files", {}), row.get("files", {})
                detail = ", ".join(
                    f"{name} {before.get(name, 0) / 1024:.0f} -> {after[name] / 1024:.0f} KiB"
                    for name in after
                )
                out.append(f"{precision.upper()} engine is not smaller on disk ({detail}).")
        agreement = row.get("agreement_vs_fp32")
        if agreement:
            worst = agreement.get("worst") or [None, None]
            name = report["labels"].get(str(worst[0]), worst[0])
            out.append(
                f"{precision.upper()} agrees with FP32 at mean Dice {agreement['mean']:.4f}"
                + (f" (worst label {name}: {worst[1]:.4f})" if worst[1] is not None else "")
                + (f", logits SQNR {row['sqnr_db_window']:.1f} dB" if row.get("sqnr_db_window") else "")
                + "."
            )
        guard = row.get("accuracy_guard") or {}
        if precision == "int8" and guard.get("met_target") is False:
            out.append(
                f"The INT8 accuracy guard did NOT reach its target mean Dice {guard.get('target')} on held-out "
                f"windows (reached {guard.get('final_mean_dice')})."
            )
        kept = row.get("kept_in_higher_precision")
        if precision == "int8" and kept is not None:
            out.append(
                f"Accuracy guard kept {len(kept)} layer(s) in higher precision"
                + (f": {', '.join(map(str, kept[:10]))}" + (" ..." if len(kept) > 10 else "") if kept else "")
                + "."
            )
    vs_bf16 = ratios.get("int8_vs_bf16")
    if vs_bf16 and vs_bf16.get("speedup"):
        s = vs_bf16["speedup"]
        if s >= 1.02:
            out.append(f"INT8 is {s:.2f}x faster than BF16.")
        elif s <= 0.98:
            out.append(
                f"INT8 is SLOWER than BF16 here ({1 / s:.2f}x BF16's latency): BF16 is the faster choice."
            )
        else:
            out.append("INT8 and BF16 run at about the same speed here.")
    return out


# ------------------------------------------------------------------------------------------- rendering
def _fmt(value: Any, spec: str = ".1f", missing: str = "–") -> str:
    if value is None:
        return missing
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else missing
    return format(value, spec)


def _ordered_rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rows in the order the precisions were asked for (JSON files store keys sorted)."""
    order = [p for p in report.get("precisions", []) if p in report["rows"]]
    return {p: report["rows"][p] for p in order + [p for p in report["rows"] if p not in order]}


def summary_table(report: dict[str, Any]) -> str:
    """A markdown table: one row per precision (size, latency, end-to-end time, memory, agreement)."""
    has_ref = any("dice_vs_reference" in r for r in report["rows"].values())
    header = [
        "precision",
        "engine size (MiB)",
        "size vs FP32",
        "latency / window (ms)",
        "speed-up vs FP32",
        "segmentation (s)",
        "peak RSS (MiB)",
        "mean Dice vs FP32",
        "worst label Dice",
        "logits SQNR (dB)",
    ] + (["mean Dice vs reference"] if has_ref else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ratios = report.get("ratios", {})
    for precision, row in _ordered_rows(report).items():
        if row.get("status") != "ok":
            reason = str(row.get("reason", "")).split(" (")[0].split(";")[0][:80]
            cells = [precision.upper(), "unavailable: " + reason] + [""] * (len(header) - 2)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        r = ratios.get(f"{precision}_vs_fp32", {})
        agreement = row.get("agreement_vs_fp32") or {}
        worst = (agreement.get("worst") or [None, None])[1]
        cells = [
            precision.upper(),
            _fmt(row["bytes_on_disk"] / 2**20, ".3f"),
            "1.00x" if precision == "fp32" else _fmt(r.get("size"), ".2f") + "x",
            _fmt(row["latency_ms_per_window"], ".1f"),
            "1.00x" if precision == "fp32" else _fmt(r.get("speedup"), ".2f") + "x",
            _fmt(row["segment_seconds"], ".2f"),
            _fmt(row["memory"]["peak_rss_mib"], ".0f"),
            "(baseline)" if precision == "fp32" else _fmt(agreement.get("mean"), ".4f"),
            "" if precision == "fp32" else _fmt(worst, ".4f"),
            "" if precision == "fp32" else _fmt(row.get("sqnr_db_window"), ".1f"),
        ]
        if has_ref:
            cells.append(_fmt((row.get("dice_vs_reference") or {}).get("mean"), ".4f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_label_table(report: dict[str, Any]) -> str:
    """Dice per label versus FP32 (and versus the reference) for every precision."""
    rows = {p: r for p, r in _ordered_rows(report).items() if r.get("status") == "ok"}
    columns: list[tuple[str, str, str]] = [
        (p, "agreement_vs_fp32", f"{p.upper()} vs FP32") for p in rows if p != "fp32"
    ]
    columns += [
        (p, "dice_vs_reference", f"{p.upper()} vs ref") for p in rows if "dice_vs_reference" in rows[p]
    ]
    if not columns:
        return ""
    lines = [
        "| label | " + " | ".join(c[2] for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for value, name in report["labels"].items():
        cells = [
            _fmt((rows[p].get(key) or {}).get("per_label", {}).get(value), ".4f") for p, key, _ in columns
        ]
        lines.append(f"| {value} {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    """The whole report as markdown (machine, table, findings, accuracy guard, per-label Dice)."""
    machine = report["machine"]
    flags = ", ".join(f for f, on in machine["cpu_flags"].items() if on) or "none of interest"
    libs = ", ".join(f"{k} {v}" for k, v in machine["libraries"].items())
    parts = [
        f"# {report['model']['title']} ({report['model']['id']}): precision comparison",
        "",
        f"Backend **{report['backend']}** ({report['backend_reason']}). Input: `{report['input'].get('path')}` "
        f"size {report['input']['size']}. Latency: median of `engine.run` on one fixed window "
        f"{report['latency_window'][1:]} after warm-up, timed apart from the segmentation.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; CPU flags: {flags}; "
        f"OpenVINO CPU capabilities: {', '.join(machine['openvino_cpu_capabilities']) or 'n/a'}.",
        f"Libraries: {libs}.",
        "",
        summary_table(report),
        "",
        "## Findings",
        "",
        *[f"- {line}" for line in report["findings"]],
    ]
    int8 = report["rows"].get("int8", {})
    if int8.get("status") == "ok":
        parts += [
            "",
            "## INT8 accuracy guard",
            "",
            f"Layers kept in higher precision: {int8.get('kept_in_higher_precision')}",
            "",
            "```json",
            json.dumps(int8.get("accuracy_guard"), indent=2, default=str),
            "```",
        ]
    labels = per_label_table(report)
    if labels:
        parts += ["", "## Dice per label", "", labels]
    return "\n".join(parts) + "\n"


def write_chart(report: dict[str, Any], path: str | Path) -> Path:
    """Bar chart (PNG): latency per window, engine size and mean Dice for each precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {p: r for p, r in _ordered_rows(report).items() if r.get("status") == "ok"}
    names = [p.upper() for p in rows]
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(names)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    panels = [
        ("latency / window (ms)", [r["latency_ms_per_window"] for r in rows.values()]),
        ("engine size (MiB)", [r["bytes_on_disk"] / 2**20 for r in rows.values()]),
        (
            "mean Dice vs FP32" + (" / reference" if report.get("reference") else ""),
            [
                1.0 if p == "fp32" else (r.get("agreement_vs_fp32") or {}).get("mean", 0.0)
                for p, r in rows.items()
            ],
        ),
    ]
    for ax, (title, values) in zip(axes, panels, strict=True):
        bars = ax.bar(names, values, color=colours)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title, fontsize=10)
    if report.get("reference"):
        ref = [(r.get("dice_vs_reference") or {}).get("mean", 0.0) for r in rows.values()]
        axes[2].scatter(names, ref, color="black", marker="D", zorder=3, label="vs reference")
        axes[2].legend(fontsize=8, loc="lower right")
    axes[2].set_ylim(0, 1.05)
    fig.suptitle(f"{report['model']['id']} on {report['backend']} ({report['machine']['cpu']})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path, "wb") as stream:
        fig.savefig(stream, format="png", dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``chart.png`` into ``out_dir`` (atomically, each)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "report.json",
        "markdown": out_dir / "report.md",
        "chart": out_dir / "chart.png",
    }
    write_json_atomic(paths["json"], report)
    with atomic_file(paths["markdown"], "w") as stream:
        stream.write(render_markdown(report))
    write_chart(report, paths["chart"])
    return paths
