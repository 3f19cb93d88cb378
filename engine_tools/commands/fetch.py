"""``medquant fetch MODEL [MODEL ...] | --all``: download (or find in the mirror) and verify weights."""

from __future__ import annotations

import argparse
from typing import Any

from engine_tools.progress import Progress


def register(
    subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "fetch",
        parents=[common],
        help="download and verify model weights into the cache ahead of time",
        description=(
            "Makes the weights of MODEL available: --weights-dir / $MEDQUANT_WEIGHTS_DIR mirror first, then "
            "the cache, then a download from the card's URL with SHA-256 and size checks. With --offline "
            "it only checks the mirror and the cache."
        ),
    )
    parser.add_argument("models", nargs="*", metavar="MODEL", help="model ids (see `medquant models`)")
    parser.add_argument("--all", action="store_true", help="every model with published weights")
    parser.add_argument(
        "--demo-data",
        action="store_true",
        help="also the scans of `medquant demo` (Resources/DataCards/demo.json), so it later runs offline",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    parser.set_defaults(func=run, render=render)
    return parser


def run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    from engine_tools.registry import get_card, load_cards
    from engine_tools.weights import WeightsError, ensure_weights

    if (args.all and args.models) or not (args.all or args.models or args.demo_data):
        raise ValueError("name one or more models, or --all (and/or --demo-data)")
    cards = list(load_cards().values()) if args.all else [get_card(m) for m in args.models]
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    steps = len(cards) + int(args.demo_data)
    for index, card in enumerate(cards):
        with progress.span(index / steps, (index + 1) / steps):
            try:
                paths = ensure_weights(
                    card,
                    args.weights_dir,
                    progress=progress,
                    allow_download=not args.offline,
                    timeout=args.timeout,
                )
                results[card.id] = {name: str(path) for name, path in paths.items()}
            except WeightsError as exc:
                if not args.all:
                    raise
                failures[card.id] = str(exc)
                progress.warning(f"{card.id}: {exc}")
    if args.demo_data:
        from engine_tools import demo

        with progress.span(len(cards) / steps, 1.0):
            files = demo.demo_files({"scan", "calibration"}, args.weights_dir, progress)
        results[demo.DATA_CARD] = {path.name: str(path) for paths in files.values() for path in paths}
    return {"fetched": results, "failed": failures}


def render(result: dict[str, Any]) -> str:
    lines = [f"{model}: {', '.join(files.values())}" for model, files in result["fetched"].items()]
    lines += [f"{model}: FAILED {why}" for model, why in result["failed"].items()]
    return "\n".join(lines)
