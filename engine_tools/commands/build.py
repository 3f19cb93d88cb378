"""``medquant build MODEL --calibration FOLDER``: build (or reuse) an engine and print what it is."""

from __future__ import annotations

import argparse
from typing import Any

from engine_tools.commands._options import add_engine_arguments, below_target, engine_spec
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
    from engine_tools.registry import get_card

    card = get_card(args.model)
    spec = engine_spec(args, card, progress, options=build_options(args) or {})
    with progress.span(0.2 if spec.calibration is not None else 0.0, 1.0):
        engine = prepare_engine(card, spec, progress)
    described = engine.describe()
    return {
        "model": args.model,
        "engine": described,
        "build_report": engine.build_report,
        "below_target": below_target(described),
        "labels": {str(entry["value"]): entry["name"] for entry in card.label_table()},
    }


def build_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """Backend options given on the command line (``None``: the card's own)."""
    options: dict[str, Any] = {}
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
        if guard.get("sample_mean_dice"):
            each = ", ".join(f"{value:.4f}" for value in guard["sample_mean_dice"])
            lines.append(f"  per validation sample: {each} ({guard.get('validated_on')})")
        value, change = guard.get("largest_volume_change") or [None, None]
        if change is not None:
            name = (result.get("labels") or {}).get(str(value), f"label {value}")
            lines.append(f"  largest label volume change vs FP32: {name} {change:+.2%}")
        if guard.get("int8_compute_fraction") is not None:
            lines.append(f"  INT8 share of compute: {guard['int8_compute_fraction']:.0%}")
        if guard.get("below_target"):
            lines.append("  BELOW TARGET (--allow-below-target)")
        kept = guard.get("kept_in_higher_precision") or []
        lines.append(f"  kept in higher precision: {', '.join(kept) if kept else 'none'}")
    stages = (result.get("build_report") or {}).get("stage_seconds")
    if stages:
        total = result["build_report"].get("build_seconds")
        parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in stages.items())
        lines.append(f"  build seconds{f' {total:.1f}' if total is not None else ''}: {parts}")
    return "\n".join(lines)
