"""Build a zoo card's network (published or reduced configuration) and export it to ONNX.

``engine_tools.networks.build_network``/``export_onnx`` are the product's entry points; these helpers
serve the zoo's CI test and benchmark, which need the *reduced* configuration a card declares
(``network.reduced_kwargs`` / ``network.reduced_window``: reduced width, random weights, for CI only).
"""

from __future__ import annotations

import copy
import importlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine_tools.networks.zoo.checkpoints import load_checkpoint
from engine_tools.registry import ModelCard


def resolve_builder(dotted: str) -> Any:
    """``"package.module.callable"`` → the callable."""
    module_name, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"network builder {dotted!r} cannot be imported: {exc}") from exc


def reduced_card(card: ModelCard) -> ModelCard:
    """A copy of ``card`` whose network and window are the card's reduced CI configuration."""
    data = copy.deepcopy(card.raw)
    network = data["network"]
    if "reduced_kwargs" not in network:
        raise KeyError(f"{card.id}: card has no network.reduced_kwargs")
    network["kwargs"] = network["reduced_kwargs"]
    data["window"]["size"] = network.get("reduced_window", data["window"]["size"])
    data["id"] = f"{card.id}-reduced"
    data["title"] = f"{card.title} [reduced width, random weights: CI only]"
    return ModelCard.from_dict(data, card.path)


def build_zoo_network(card: ModelCard, checkpoint: str | Path | None = None, seed: int = 0) -> nn.Module:
    """The card's network in eval mode; random weights (seeded) unless ``checkpoint`` is given."""
    torch.manual_seed(seed)
    from engine_tools.networks.loaders import builder_kwargs

    module = resolve_builder(card.network["builder"])(**builder_kwargs(card, None))
    if checkpoint is not None:
        spec = card.network.get("checkpoint", {})
        target = module.get_submodule(spec["submodule"]) if spec.get("submodule") else module
        load_checkpoint(target, checkpoint, spec.get("key"), spec.get("strip_prefix", "module."))
    return module.eval()


def export_module_onnx(
    module: nn.Module, path: str | Path, in_channels: int, window: tuple[int, int, int]
) -> Path:
    """Export to ONNX (opset 17, TorchScript exporter): input ``input``, output ``logits``, dynamic batch."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, in_channels, *window)
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(
            module,
            (dummy,),
            str(tmp),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    tmp.replace(path)
    return path


def openvino_engines(
    card: ModelCard, onnx_path: Path, windows: Any, precisions: tuple[str, ...], workdir: Path
) -> Iterator[tuple[str, Any, float]]:
    """OpenVINO engines of a zoo export at each precision, built from one request with the guard off
    (random weights: agreement with FP32 would measure noise). Yields ``(precision, loaded engine,
    build seconds)``; calibration windows are ``windows``, the first one is the check window."""
    from engine_tools.engines.base import BuildRequest
    from engine_tools.engines.openvino import OpenVINOEngine
    from engine_tools.pipeline import card_build_options

    request = BuildRequest(
        card.id,
        onnx_path,
        card.window_size,
        card.in_channels,
        card.num_classes,
        calibration=windows,
        validation=windows[:1],
        options=card_build_options(card, {"guard": False}),
    )
    for precision in precisions:
        engine = OpenVINOEngine(precision)
        folder = Path(workdir) / f"{card.id}-{precision}"
        folder.mkdir()
        started = time.perf_counter()
        engine.build(request, folder)
        engine.load(folder)
        yield precision, engine, time.perf_counter() - started
