"""``medquant models``: list the model cards (and whether their weights are here); ``models add``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from engine_tools.progress import Progress


def register(
    subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "models",
        parents=[common],
        help="list the models (weights present locally?) or add your own ONNX/TorchScript model",
        description="Without an action: one row per model card. `models add`: register your own model file.",
    )
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    add = actions.add_parser(
        "add",
        parents=[common],
        help="add a bring-your-own ONNX or TorchScript model (writes a card pinning the file by SHA-256)",
    )
    add.add_argument("--file", help="the .onnx or TorchScript (.pt/.pth/.ts) file")
    add.add_argument("--card", help="a complete model card JSON to install instead of --file")
    add.add_argument("--id", dest="model_id", help="model id (default: user-<file name>)")
    add.add_argument("--labels", help="comma-separated label names, background first (default: class N)")
    add.add_argument("--num-classes", type=int, help="number of output classes if the file does not say")
    add.add_argument("--window", help="input window, e.g. 96 or 96,96,128 (default: the ONNX input shape)")
    add.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    add.add_argument("--title", help="title shown in lists")
    add.add_argument("--modality", default="MR", help="MR or CT (default MR)")
    add.add_argument(
        "--orientation", help="axis code the network expects (e.g. RAS, LIA); default: keep input"
    )
    add.add_argument("--spacing", help="voxel spacing in mm the network expects, e.g. 1 or 1.5,1.5,2")
    add.add_argument(
        "--intensity",
        default="quantile",
        help="intensity rule: quantile (2..98%% to 0..1), window:A_MIN,A_MAX (CT), zscore or none",
    )
    add.add_argument("--overwrite", action="store_true", help="replace a user card with the same id")
    add.set_defaults(func=run_add, render=render_add)
    parser.set_defaults(func=run, render=render)
    return parser


def run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    from engine_tools.registry import load_cards
    from engine_tools.weights import WeightsError, locate_weights

    rows = []
    cards = load_cards()
    for index, card in enumerate(cards.values()):
        progress.update("models", index / max(len(cards), 1), card.id)
        try:
            located = locate_weights(card, args.weights_dir)
            present = all(path is not None for path in located.values())
            files = {name: (str(path) if path else None) for name, path in located.items()}
            problem = None
        except WeightsError as exc:
            present, files, problem = False, {}, str(exc)
        rows.append(
            {
                **card.summary(),
                "weights_present": present,
                "weights_files": files,
                "card": str(card.path),
                **({"weights_problem": problem} if problem else {}),
            }
        )
    if args.json:
        args.render = lambda result: json.dumps(result, indent=2)
    return {"models": rows}


def render(result: dict[str, Any]) -> str:
    header = ("id", "labels", "window", "format", "weights", "licence", "title")
    lines = [header]
    for row in result["models"]:
        lines.append(
            (
                row["id"],
                str(row["num_labels"]),
                "x".join(str(s) for s in row["window"]),
                str(row["network_format"]),
                "present"
                if row["weights_present"]
                else ("manual" if row.get("weights_manual") else "download"),
                str(row["licence"])[:24],
                str(row["title"])[:60],
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _triple(text: str | None, kind: type) -> list[Any] | None:
    if text is None:
        return None
    values = [kind(v) for v in text.split(",") if v.strip()]
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise ValueError(f"expected one value or three comma-separated values, got {text!r}")
    return values


def _intensity(text: str) -> dict[str, Any]:
    if text == "quantile":
        return {"rule": "quantile", "lower": 0.02, "upper": 0.98, "b_min": 0.0, "b_max": 1.0}
    if text.startswith("window:"):
        low, high = (float(v) for v in text.split(":", 1)[1].split(","))
        return {"rule": "window", "a_min": low, "a_max": high, "b_min": 0.0, "b_max": 1.0, "clip": True}
    if text in ("zscore", "none"):
        return {"rule": text}
    raise ValueError(f"--intensity {text!r}: use quantile, window:A_MIN,A_MAX, zscore or none")


def run_add(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    from engine_tools.networks.byo import add_user_model, write_user_card
    from engine_tools.registry import ModelCard, user_cards_dir

    if bool(args.file) == bool(args.card):
        raise ValueError("give exactly one of --file MODEL_FILE or --card CARD.json")
    if args.card:
        data = json.loads(Path(args.card).read_text(encoding="utf-8"))
        ModelCard.from_dict(data, Path(args.card))
        card = write_user_card(data, user_cards_dir(), overwrite=args.overwrite)
    else:
        preprocessing = {
            "orientation": args.orientation,
            "spacing": _triple(args.spacing, float),
            "intensity": _intensity(args.intensity),
        }
        window = _triple(args.window, int)
        card = add_user_model(
            args.file,
            overwrite=args.overwrite,
            model_id=args.model_id,
            labels=args.labels,
            num_classes=args.num_classes,
            window=window,
            overlap=args.overlap,
            title=args.title,
            modality=args.modality,
            preprocessing=preprocessing,
        )
    progress.log(f"added {card.id}: card written to {card.path}")
    return {"id": card.id, "card": str(card.path), "summary": card.summary()}


def render_add(result: dict[str, Any]) -> str:
    return f"added {result['id']} (card {result['card']}); use it as: medquant segment {result['id']} ..."
