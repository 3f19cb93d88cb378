"""Bring-your-own models: a user's ONNX or TorchScript file becomes a model card.

The card pins the file by absolute path, size and SHA-256 (a later change to the file is refused,
never silently used) and is written atomically into the user cards folder
(:func:`engine_tools.registry.user_cards_dir`), which :func:`engine_tools.registry.load_cards` reads.
The user's file itself is never copied, moved or modified.
"""

from __future__ import annotations

import colorsys
import re
from pathlib import Path
from typing import Any

from engine_tools.cache import sha256_file, write_json_atomic
from engine_tools.registry import CardError, ModelCard, default_card_dirs, load_cards, user_cards_dir

_FORMATS = {
    ".onnx": "onnx",
    ".pt": "torchscript",
    ".pth": "torchscript",
    ".ts": "torchscript",
    ".jit": "torchscript",
}


def _colour(index: int) -> list[int]:
    if index == 0:
        return [0, 0, 0]
    hue = (index * 0.618033988749895) % 1.0
    return [int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 0.65, 0.95)]


def _labels(labels: Any, num_classes: int | None, where: str) -> list[dict[str, Any]]:
    """Label entries from names, dicts, a count, or the network's class count."""
    if labels is None:
        if not num_classes:
            raise CardError(
                f"{where}: give --labels (names) or --num-classes; the model does not tell its class count"
            )
        labels = num_classes
    if isinstance(labels, int):
        return [
            {"value": i, "name": "background" if i == 0 else f"class {i}", "color": _colour(i)}
            for i in range(labels)
        ]
    if isinstance(labels, str):
        labels = [name.strip() for name in labels.split(",") if name.strip()]
    entries = []
    for index, item in enumerate(labels):
        if isinstance(item, dict):
            entries.append(
                {
                    "value": int(item.get("value", index)),
                    "name": str(item["name"]),
                    "color": list(item.get("color", _colour(index))),
                }
            )
        else:
            entries.append({"value": index, "name": str(item), "color": _colour(index)})
    if num_classes and len(entries) != num_classes:
        raise CardError(f"{where}: {len(entries)} labels given but the network outputs {num_classes} classes")
    return entries


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "model"


def make_user_card(
    model_file: str | Path,
    model_id: str | None = None,
    labels: Any = None,
    title: str | None = None,
    task: str = "segmentation (user model)",
    modality: str = "MR",
    preprocessing: dict[str, Any] | None = None,
    window: list[int] | int | None = None,
    overlap: float = 0.5,
    num_classes: int | None = None,
    licence: str = "user-supplied",
) -> dict[str, Any]:
    """The card dict for a user's ``.onnx`` / TorchScript file (validated, pinned by SHA-256)."""
    path = Path(model_file).expanduser().resolve()
    if not path.is_file():
        raise CardError(f"{path}: model file not found")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise CardError(
            f"{path}: unknown model file type {path.suffix!r} (use .onnx or a TorchScript .pt/.pth/.ts)"
        )
    where = str(path)
    network: dict[str, Any] = {"format": fmt, "file": path.name, "in_channels": 1}
    if fmt == "onnx":
        from engine_tools.networks import validate_onnx

        info = validate_onnx(path)
        network.update(onnx_input=info["input"], onnx_outputs=info["outputs"])
        in_channels, *spatial = info["input_shape"][1:]
        if isinstance(in_channels, int) and in_channels > 0:
            network["in_channels"] = in_channels
        out_channels = info["output_shape"][1] if len(info["output_shape"]) == 5 else None
        if num_classes is None and isinstance(out_channels, int) and out_channels > 0:
            num_classes = out_channels
        if window is None and all(isinstance(s, int) and s > 0 for s in spatial):
            window = list(spatial)  # a fixed-shape network: the window is its input
        elif window is not None and all(isinstance(s, int) and s > 0 for s in spatial):
            if list(window if isinstance(window, list) else [window] * 3) != list(spatial):
                raise CardError(f"{where}: the network's input is fixed at {spatial}; --window must match")
    else:
        import torch

        try:
            torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise CardError(f"{path}: not a loadable TorchScript file ({exc})") from exc
    if window is None:
        raise CardError(f"{where}: give --window (the network's input size, e.g. 96 or 96,96,96)")
    size = [int(window)] * 3 if isinstance(window, int) else [int(s) for s in window]
    entries = _labels(labels, num_classes, where)
    network["num_classes"] = len(entries)
    if fmt == "onnx":
        check_output_channels(path, network.get("in_channels", 1), size, len(entries))
    model_id = model_id or f"user-{slug(path.stem)}"
    return {
        "id": model_id,
        "title": title or f"{path.name} (user model)",
        "task": task,
        "modality": modality,
        "architecture": f"user {fmt.upper() if fmt == 'onnx' else 'TorchScript'} network",
        "description": f"Added from {path} with medquant models add.",
        "labels": entries,
        "preprocessing": preprocessing
        or {
            "orientation": None,
            "spacing": None,
            "intensity": {"rule": "quantile", "lower": 0.02, "upper": 0.98},
        },
        "window": {"size": size, "overlap": float(overlap), "blend": "gaussian", "batch": 1},
        "network": network,
        "weights": {
            "files": [
                {
                    "name": path.name,
                    "path": str(path),
                    "sha256": sha256_file(path),
                    "size": path.stat().st_size,
                }
            ],
            "licence": licence,
            "source": str(path),
        },
        "quantization": {},
    }


def write_user_card(card: dict[str, Any], cards_dir: Path, overwrite: bool = False) -> ModelCard:
    """Validate ``card`` and write it to ``cards_dir/<id>.json`` atomically (refuses to replace one)."""
    destination = Path(cards_dir) / f"{card['id']}.json"
    ModelCard.from_dict(card, destination)  # schema check before anything is written
    if destination.exists() and not overwrite:
        raise CardError(
            f"{destination}: a card with id {card['id']!r} exists; choose another --id or --overwrite"
        )
    others = [d for d in default_card_dirs() if d.resolve() != Path(cards_dir).resolve()]
    clash = load_cards(others).get(card["id"])
    if clash is not None:
        raise CardError(f"model id {card['id']!r} is already used by {clash.path}; choose another --id")
    write_json_atomic(destination, card)
    return ModelCard.from_file(destination)


def add_user_model(
    model_file: str | Path,
    cards_dir: str | Path | None = None,
    overwrite: bool = False,
    **card_fields: Any,
) -> ModelCard:
    """Register a user's ONNX/TorchScript file: writes a card pinning it by SHA-256 into ``cards_dir``
    (default :func:`engine_tools.registry.user_cards_dir`). ``card_fields``: ``model_id``, ``labels``
    (names, dicts or a count), ``title``, ``task``, ``modality``, ``preprocessing``, ``window``,
    ``overlap``, ``num_classes``, ``licence`` (see :func:`make_user_card`)."""
    card = make_user_card(model_file, **card_fields)
    return write_user_card(card, Path(cards_dir) if cards_dir else user_cards_dir(), overwrite=overwrite)


def check_output_channels(path: Path, in_channels: int, window: list[int], num_classes: int) -> None:
    """Run the ONNX network once on a zero window and refuse it when its output channels differ from
    the labels given (``--labels`` / ``--num-classes``), so the mistake shows at registration."""
    import numpy as np
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = np.zeros((1, int(in_channels), *window), dtype=np.float32)
        output = session.run(None, {session.get_inputs()[0].name: feed})[0]
    except Exception as exc:  # onnxruntime raises its own types
        raise CardError(f"{path}: the network does not run on a {window} window ({exc})") from exc
    if output.ndim != 5 or output.shape[1] != num_classes:
        raise CardError(
            f"{path}: the network outputs {output.shape[1] if output.ndim > 1 else '?'} channels "
            f"(output shape {list(output.shape)}) but {num_classes} labels/classes were given; "
            "fix --labels / --num-classes"
        )
