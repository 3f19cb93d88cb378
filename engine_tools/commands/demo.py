"""`medquant demo`: FP32 vs BF16 vs INT8 of a real model on a real scan, on the CPU."""

from __future__ import annotations

import argparse
from typing import Any

from engine_tools import demo
from engine_tools.commands._options import add_engine_arguments
from engine_tools.commands.compare import parse_precisions
from engine_tools.commands.compare import render as render_compare
from engine_tools.progress import Progress


def register(
    subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        parents=[common],
        help="the embedded default: FP32/BF16/INT8 table for a real brainchop model on a real T1 (CPU)",
        description="Runs `medquant compare` with the embedded defaults: "
        f"{demo.DEFAULT_MODEL} on brainchop's sample T1 (t1_crop.nii.gz) with OpenVINO on the CPU, calibrated "
        "on another subject (the MNI152 2009 template). The scans (Resources/DataCards/demo.json) and the "
        "weights are read from ../shared ($MEDQUANT_SHARED) or --weights-dir when present, else from the "
        "cache, else downloaded once from their published URLs with SHA-256 checks.",
    )
    parser.add_argument(
        "--model", default=demo.DEFAULT_MODEL, help=f"model id (default {demo.DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--output-dir", "-o", default="medquant-demo", help="report folder (default ./medquant-demo)"
    )
    parser.add_argument("--input", "-i", help="scan to segment (default: the demo T1, t1_crop.nii.gz)")
    parser.add_argument(
        "--precisions",
        type=parse_precisions,
        default=list(demo.DEFAULT_PRECISIONS),
        help="default fp32,bf16,int8",
    )
    add_engine_arguments(parser, precision_default=None)
    parser.add_argument("--repeats", type=int, default=demo.DEFAULT_REPEATS)
    parser.add_argument("--warmup", type=int, default=demo.DEFAULT_WARMUP)
    parser.set_defaults(
        func=run,
        render=render_compare,
        reference=None,
        backend=demo.DEFAULT_BACKEND,
        windows=demo.DEFAULT_CALIBRATION_WINDOWS,
    )
    return parser


def run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    from engine_tools.commands.compare import compare_from_args

    roles = {"scan"} if args.input is None else set()
    if args.calibration is None and "int8" in args.precisions:
        roles.add("calibration")
    if args.weights_dir is None:
        mirror = demo.default_weights_dir()
        args.weights_dir = str(mirror) if mirror else None
    with progress.span(0.0, 0.05):
        files = demo.demo_files(roles, args.weights_dir, progress) if roles else {}
    if "scan" in files:
        args.input = str(files["scan"][0])
    if "calibration" in files:
        args.calibration = str(demo.calibration_folder(files["calibration"]))
    progress.log(
        f"demo: {args.model} on {args.input}, {args.backend}, calibration {args.calibration}, "
        f"weights {args.weights_dir or 'from the card URLs'}"
    )
    with progress.span(0.05, 1.0):
        return compare_from_args(args, progress)
