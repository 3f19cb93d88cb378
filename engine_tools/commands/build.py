"""``medquant build MODEL --calibration FOLDER``: build (or reuse) an engine and print what it is."""

from __future__ import annotations

import argparse
from typing import Any

from engine_tools.commands._options import add_engine_arguments, check_engine_arguments, warn_random_weights
from engine_tools.engines.tensorrt.modelopt_qdq import RECIPES
from engine_tools.progress import Progress


def register(
    subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "build",
        parents=[common],
        help="build an engine (INT8 with calibration + accuracy guard, or FP32/BF16/FP16) and cache it",
        description=(
            "Export MODEL, calibrate on a folder of unlabeled scans, quantize, check INT8 against FP32 on "
            "held-out windows (accuracy guard) and cache the engine. Prints describe() and the build report."
        ),
    )
    parser.add_argument("model", help="model id (see `medquant models`) or path to a model card JSON")
    add_engine_arguments(parser)
    parser.add_argument("--no-guard", action="store_true", help="skip the accuracy guard (not recommended)")
    parser.add_argument("--device", help="device (cpu, cuda:0, ...); default: the backend's")
    parser.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default=None,
        help="TensorRT INT8 recipe: medquant (layers left unquantized run FP16; default) or medptq "
        "(the MedPTQ paper's: they run FP32, slower)",
    )
    parser.set_defaults(func=run, render=render)
    return parser


def run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    from engine_tools.pipeline import prepare_engine

    check_engine_arguments(args)
    warn_random_weights(args, progress)
    engine = prepare_engine(
        args.model,
        backend=args.backend,
        precision=args.precision,
        calibration=args.calibration,
        calibration_method=args.calibration_method,
        target_dice=args.target_dice,
        device=args.device,
        weights_dir=args.weights_dir,
        rebuild=args.rebuild,
        progress=progress,
        num_windows=args.windows,  # None: the card's default
        seed=args.seed,
        random_weights=args.random_weights,
        options=build_options(args),
    )
    return {"model": args.model, "engine": engine.describe(), "build_report": engine.build_report}


def build_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """Backend options given on the command line (``None``: the card's own)."""
    options: dict[str, Any] = {}
    if args.no_guard:
        options["guard"] = False
    if args.recipe:
        if args.backend not in ("tensorrt", "auto"):
            raise ValueError(f"--recipe is a TensorRT INT8 recipe; --backend {args.backend} has none")
        options["tensorrt_recipe"] = args.recipe
    return options or None


def render(result: dict[str, Any]) -> str:
    engine = result["engine"]
    lines = [
        f"{result['model']}: {engine['backend']} {engine['precision']} on {engine['device']}"
        f" ({engine['bytes_on_disk'] / 1e6:.2f} MB, cache {engine.get('cache')})",
        f"  artifact: {engine['artifact_dir']}",
    ]
    kernels = engine.get("kernels")
    if kernels:
        convs = kernels.get("convolutions", {})
        lines.append(f"  convolution kernels: {convs.get('int8', 0)} int8, {convs.get('float', 0)} float")
    guard = engine.get("accuracy_guard")
    if guard:
        lines.append(
            f"  accuracy guard: mean agreement Dice {guard['initial_mean_dice']:.4f} -> "
            f"{guard['final_mean_dice']:.4f} (target {guard['target']}, "
            f"{'met' if guard['met_target'] else 'NOT met'})"
        )
        kept = guard.get("kept_in_higher_precision") or []
        lines.append(f"  kept in higher precision: {', '.join(kept) if kept else 'none'}")
    return "\n".join(lines)
