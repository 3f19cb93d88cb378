"""The comparison report for people: ratios, findings in plain sentences, markdown tables and a chart.

Input is the JSON-ready report of :func:`engine_tools.compare.compare_precisions`;
:func:`write_report` writes ``report.json``, ``report.md`` and ``chart.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from engine_tools.cache import atomic_file, write_json_atomic


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def _ok(rows: dict[str, dict[str, Any]], precision: str) -> dict[str, Any] | None:
    row = rows.get(precision)
    return row if row and row.get("status") == "ok" else None


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Size and latency of each precision relative to FP32 and of INT8 relative to BF16 (<1 = smaller/faster)."""
    found: dict[str, Any] = {}
    base = _ok(rows, "fp32")
    for precision in rows:
        row = _ok(rows, precision)
        if not row or precision == "fp32" or not base:
            continue
        found[f"{precision}_vs_fp32"] = {
            "size": _ratio(row["bytes_on_disk"], base["bytes_on_disk"]),
            "latency": _ratio(row["latency_ms_per_window"], base["latency_ms_per_window"]),
            "speedup": _ratio(base["latency_ms_per_window"], row["latency_ms_per_window"]),
            "segment_seconds": _ratio(row.get("segment_seconds"), base.get("segment_seconds")),
        }
    int8, bf16 = _ok(rows, "int8"), _ok(rows, "bf16")
    if int8 and bf16:
        found["int8_vs_bf16"] = {
            "size": _ratio(int8["bytes_on_disk"], bf16["bytes_on_disk"]),
            "latency": _ratio(int8["latency_ms_per_window"], bf16["latency_ms_per_window"]),
            "speedup": _ratio(bf16["latency_ms_per_window"], int8["latency_ms_per_window"]),
        }
    return found


def findings(report: dict[str, Any]) -> list[str]:
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
            value, change = agreement.get("largest_volume_change") or [None, None]
            if change is not None:
                name = report["labels"].get(str(value), value)
                out.append(f"{precision.upper()}'s largest label volume change vs FP32: {name} {change:+.2%}.")
        guard = row.get("accuracy_guard") or {}
        if precision == "int8" and guard.get("met_target") is False:
            out.append(
                f"The INT8 accuracy guard did NOT reach its target mean Dice {guard.get('target')} on "
                f"{guard.get('validated_on', 'held-out samples')} (reached {guard.get('final_mean_dice')})."
            )
        if precision == "int8" and "optimistic" in str(guard.get("validated_on", "")):
            out.append(f"The INT8 accuracy guard validated on {guard['validated_on']}.")
        if precision == "int8" and guard.get("sample_mean_dice"):
            each = ", ".join(f"{value:.4f}" for value in guard["sample_mean_dice"])
            out.append(f"Its agreement per validation sample, in that order: {each}.")
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
def build_stage_lines(row: dict[str, Any]) -> list[str]:
    """One line of build seconds per stage (empty for an engine taken from the cache)."""
    stages = row.get("build_stage_seconds")
    if not stages or row.get("cache") == "hit":
        return []
    parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in stages.items())
    return [f"Build seconds per stage: {parts} (total {sum(stages.values()):.1f}).", ""]


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
        "end to end (s)",
        "peak RSS (MiB)",
        "mean Dice vs FP32",
        "worst label Dice",
        "largest volume change",
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
            _fmt((row.get("end_to_end") or {}).get("total_s"), ".2f"),
            _fmt(row["memory"]["peak_rss_mib"], ".0f"),
            "(baseline)" if precision == "fp32" else _fmt(agreement.get("mean"), ".4f"),
            "" if precision == "fp32" else _fmt(worst, ".4f"),
            "" if precision == "fp32" else _volume_change(agreement, report["labels"]),
            "" if precision == "fp32" else _fmt(row.get("sqnr_db_window"), ".1f"),
        ]
        if has_ref:
            cells.append(_fmt((row.get("dice_vs_reference") or {}).get("mean"), ".4f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _volume_change(agreement: dict[str, Any], labels: dict[str, str]) -> str:
    """``+1.20% (Grey Matter)``: the label whose voxel count changed most against FP32's."""
    value, change = agreement.get("largest_volume_change") or [None, None]
    return "" if change is None else f"{change:+.2%} ({labels.get(str(value), f'label {value}')})"


def per_label_table(report: dict[str, Any]) -> str:
    """Dice and volume change per label versus FP32 (and Dice versus the reference) for every precision."""
    rows = {p: r for p, r in _ordered_rows(report).items() if r.get("status") == "ok"}
    columns: list[tuple[str, str, str, str]] = []
    for p in rows:
        if p != "fp32":
            columns.append((p, "agreement_vs_fp32", "per_label", f"{p.upper()} vs FP32"))
            columns.append((p, "agreement_vs_fp32", "volume_change", f"{p.upper()} volume vs FP32"))
    columns += [
        (p, "dice_vs_reference", "per_label", f"{p.upper()} vs ref")
        for p in rows
        if "dice_vs_reference" in rows[p]
    ]
    if not columns:
        return ""
    lines = [
        "| label | " + " | ".join(c[3] for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for value, name in report["labels"].items():
        cells = [
            _fmt((rows[p].get(key) or {}).get(part, {}).get(value), ".4f" if part == "per_label" else "+.2%")
            for p, key, part, _ in columns
        ]
        lines.append(f"| {value} {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def end_to_end_lines(report: dict[str, Any]) -> list[str]:
    """End to end per precision (stages) and the PyTorch FP32 eager baseline, as markdown lines."""
    lines = [
        "End to end = worker start-up + cached engine load + preprocessing + inference + resampling + "
        "writing the labelmap (command start to labelmap written, engine cached):",
        "",
    ]
    for precision, row in _ordered_rows(report).items():
        stages = row.get("end_to_end")
        if stages:
            parts = ", ".join(f"{k[:-2]} {_fmt(v, '.2f')}" for k, v in stages.items() if k.endswith("_s"))
            lines.append(f"- {precision.upper()} ({stages.get('mode') or 'windows'}): {parts} s")
    torch = report.get("pytorch_fp32_eager") or {}
    if "one_pass_s" in torch:
        int8 = (report["rows"].get("int8") or {}).get("end_to_end") or {}
        versus = (
            f"; INT8 end to end is {torch['one_pass_s'] / int8['total_s']:.1f}x faster"
            if int8.get("total_s")
            else ""
        )
        lines.append(
            f"- PyTorch FP32 eager, one pass over {'x'.join(map(str, torch['shape']))} voxels (network "
            f"call only, {torch['threads']} threads): {torch['one_pass_s']:.2f} s{versus}"
        )
    elif torch:
        lines.append(f"- PyTorch FP32 eager baseline: {torch.get('skipped')}")
    return [*lines, ""]


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
        *end_to_end_lines(report),
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
            *build_stage_lines(int8),
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
