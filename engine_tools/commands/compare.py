"""`medquant compare MODEL --input IMG --output-dir D`: FP32 vs BF16 vs INT8 on one engine."""

from __future__ import annotations

import argparse
from typing import Any

from engine_tools.commands._options import add_engine_arguments, engine_spec, require_input
from engine_tools.progress import Progress


def parse_precisions(text: str) -> list[str]:
    from engine_tools.engines.base import PRECISIONS

    values = [p.strip().lower() for p in text.split(",") if p.strip()]
    unknown = [p for p in values if p not in PRECISIONS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(
            f"--precisions {text!r}: choose from {', '.join(PRECISIONS)} (comma-separated)"
        )
    return values


def register(
    subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare",
        parents=[common],
        help="compare precisions of one engine on a volume (size, latency, memory, agreement)",
        description="Segment one volume with FP32, BF16 and INT8 engines of the same backend and report "
        "engine size, latency per window, end-to-end time, peak memory, agreement Dice with FP32 and logits "
        "SQNR; with --reference, Dice against reference labels. Writes report.json, report.md and chart.png.",
    )
    parser.add_argument("model", metavar="MODEL", help="model id (see `medquant models`) or a card .json")
    parser.add_argument("--input", "-i", required=True, help="volume file or DICOM series folder")
    parser.add_argument("--reference", metavar="LABELS", help="reference labelmap (card label values)")
    parser.add_argument(
        "--precisions", type=parse_precisions, default=["fp32", "bf16", "int8"], help="default fp32,bf16,int8"
    )
    add_engine_arguments(parser, precision_default=None)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of one window (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--output-dir", "-o", required=True, help="folder for report.json/.md and chart.png")
    parser.set_defaults(func=run, render=render)
    return parser


def compare_from_args(args: argparse.Namespace, progress: Progress, card: Any = None) -> dict[str, Any]:
    """Shared by ``compare`` and ``demo``: read inputs, run the comparison, write the report."""
    from engine_tools.checks import check_writable_folder
    from engine_tools.compare import compare_precisions
    from engine_tools.registry import get_card
    from engine_tools.report import write_report
    from engine_tools.volumes import read_image

    input_path = require_input(args.input)
    reference_path = require_input(args.reference, "--reference") if args.reference else None
    check_writable_folder(args.output_dir)
    card = card or get_card(args.model)
    image = read_image(input_path)
    reference = read_image(reference_path) if reference_path else None
    spec = engine_spec(args, card, progress, precision="fp32")
    with progress.span(0.2, 0.98):
        report = compare_precisions(
            card,
            image,
            spec,
            precisions=args.precisions,
            reference=reference,
            progress=progress,
            warmup=args.warmup,
            repeats=args.repeats,
            input_path=str(input_path),
        )
    paths = write_report(report, args.output_dir)
    report["files"] = {kind: str(path) for kind, path in paths.items()}
    return report


def run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    return compare_from_args(args, progress)


def render(report: dict[str, Any]) -> str:
    from engine_tools.report import summary_table

    machine = report["machine"]
    lines = [
        f"{report['model']['id']} on {report['backend']} — {machine['cpu']}, {machine['cores']} cores",
        "",
        summary_table(report),
        "",
        *[f"- {line}" for line in report["findings"]],
        "",
        *(f"{kind}: {path}" for kind, path in report.get("files", {}).items()),
    ]
    return "\n".join(lines)


__all__ = ["compare_from_args", "parse_precisions", "register", "render", "run"]
