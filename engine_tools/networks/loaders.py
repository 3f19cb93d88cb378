"""Networks from model cards as PyTorch modules (the ONNX side is :mod:`engine_tools.networks.export`).

``card.network["format"]`` picks a loader:

``tfjs``
    TensorFlow.js Layers model (``file``: the model.json among the weight files), see
    :mod:`engine_tools.networks.tfjs`.
``torchscript``
    ``torch.jit.load`` of ``file``. TorchScript is code, so it is only loaded from a file whose
    SHA-256 the card pins (a published model) or that the user added themselves
    (``medquant models add``, which pins it too).
``monai`` / ``torch``
    ``builder`` (dotted path of a callable) called with ``kwargs``; the state dict comes from the
    weights file (``checkpoint.file`` or the first weights entry) read with
    ``torch.load(weights_only=True)``, optionally under ``checkpoint.key`` (or ``state_dict_key``)
    with ``checkpoint.strip_prefix`` (or ``strip_prefix``) removed, into ``checkpoint.submodule`` when
    the builder wraps the published network (e.g. with its input normalisation). A kwargs value
    ``{"weights_file": NAME}`` is replaced by the path of that weights file (e.g. nnU-Net's plans).
``onnx``
    Bring-your-own ONNX: no PyTorch module; :func:`engine_tools.networks.export.export_onnx`
    validates it (``onnx.checker``, one rank-5 input) and returns it, with its input/output renamed
    to ``input``/``logits`` if needed.

An optional ``network.input_transform`` (``{"zscore": true, "scale": a, "shift": b}``) is applied
inside the module (so it is part of every engine): per sample, ``x ← (x - mean) / std`` then
``x ← a * x + b`` (deepbet's normalisation). New formats: :func:`register_format`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine_tools.networks.files import NetworkError, _where, card_file, network_files
from engine_tools.registry import ModelCard
from engine_tools.weights import weight_entries

#: (card, weight files by name or None when random, random_weights) -> nn.Module
Loader = Callable[[ModelCard, dict[str, Path] | None, bool], nn.Module]

_LOADERS: dict[str, Loader] = {}


def register_format(name: str, loader: Loader) -> None:
    """Add a network format: ``loader(card, files, random_weights) -> nn.Module``."""
    _LOADERS[name] = loader


def network_formats() -> list[str]:
    return sorted([*_LOADERS, "onnx"])


class InputTransform(nn.Module):
    """Per-sample z-score and/or affine scaling in front of a network (part of its graph)."""

    def __init__(self, network: nn.Module, zscore: bool, scale: float, shift: float) -> None:
        super().__init__()
        self.network = network
        self.zscore = zscore
        self.scale = float(scale)
        self.shift = float(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.zscore:  # over C, D, H, W of each sample (rank-5 input)
            mean = x.mean(dim=[1, 2, 3, 4], keepdim=True)
            std = x.std(dim=[1, 2, 3, 4], keepdim=True).clamp_min(1e-6)
            x = (x - mean) / std
        return self.network(x * self.scale + self.shift)


def _load_tfjs(card: ModelCard, files: dict[str, Path] | None, random_weights: bool) -> nn.Module:
    from engine_tools.networks.tfjs import build_tfjs_module

    if files is None:
        raise NetworkError(f"{_where(card)}: a TF.js network needs its model.json even for random weights")
    return build_tfjs_module(card_file(card, files), shard_files=files, random_weights=random_weights)


def _pinned(card: ModelCard, name: str) -> bool:
    for entry in weight_entries(card):
        if entry["name"] == name:
            return (
                bool(entry.get("member_sha256") or entry.get("sha256"))
                if entry.get("member")
                else bool(entry.get("sha256"))
            )
    return False


def _load_torchscript(card: ModelCard, files: dict[str, Path] | None, random_weights: bool) -> nn.Module:
    if random_weights or files is None:
        raise NetworkError(f"{_where(card)}: a TorchScript network has no random-weight form")
    name = card.network.get("file")
    if not _pinned(card, name):
        raise NetworkError(
            f"{_where(card)}: TorchScript file {name!r} is not pinned by SHA-256 in the card. TorchScript is "
            "code: add it with `medquant models add` (which pins it) or give the publisher's SHA-256."
        )
    path = card_file(card, files)
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # corrupt or not TorchScript
        raise NetworkError(f"{path}: not a loadable TorchScript file ({exc})") from exc
    return scripted  # kept scripted: the ONNX exporter can then trace it (a Python wrapper cannot)


def _resolve(dotted: str, where: str) -> Callable[..., nn.Module]:
    module_name, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise NetworkError(f"{where}: network.builder {dotted!r} cannot be imported ({exc})") from exc


def _checkpoint_file(card: ModelCard, files: dict[str, Path]) -> Path:
    spec = card.network.get("checkpoint") or {}
    if spec.get("file"):
        return files[spec["file"]] if spec["file"] in files else card_file(card, files, "checkpoint_file")
    published = (card.network.get("published_onnx") or {}).get("file")
    candidates = [name for name in files if name != published and not name.endswith(".onnx")]
    if not candidates:
        raise NetworkError(
            f"{_where(card)}: the card's weights hold no PyTorch checkpoint "
            f"({', '.join(files)}); only an ONNX export can be used (export_onnx)"
        )
    return files[candidates[0]]


def builder_kwargs(card: ModelCard, files: dict[str, Path] | None) -> dict[str, Any]:
    """``network.kwargs`` with each ``{"weights_file": NAME}`` value replaced by that file's path
    (``None`` without weight files: random-weight runs, where the builder uses its explicit arguments)."""
    kwargs = dict(card.network.get("kwargs", {}))
    for key, value in kwargs.items():
        if isinstance(value, dict) and set(value) == {"weights_file"}:
            kwargs[key] = (
                None if files is None else card_file(card, files, f"kwargs.{key}", value["weights_file"])
            )
    return kwargs


def _load_builder(card: ModelCard, files: dict[str, Path] | None, random_weights: bool) -> nn.Module:
    from engine_tools.networks.zoo.checkpoints import load_checkpoint

    builder = card.network.get("builder")
    if not builder:
        raise NetworkError(f"{_where(card)}: format {card.network['format']!r} needs network.builder")
    torch.manual_seed(0)
    try:
        module = _resolve(builder, _where(card))(**builder_kwargs(card, files))
    except TypeError as exc:
        raise NetworkError(f"{_where(card)}: network.kwargs do not fit {builder} ({exc})") from exc
    except (ValueError, OSError) as exc:  # the builder refused its configuration or files
        raise NetworkError(f"{_where(card)}: {builder}: {exc}") from exc
    if random_weights:
        return module
    assert files is not None
    spec = card.network.get("checkpoint") or {}
    key = spec.get("key", card.network.get("state_dict_key"))
    prefix = spec.get("strip_prefix", card.network.get("strip_prefix", "module."))
    target = module.get_submodule(spec["submodule"]) if spec.get("submodule") else module
    load_checkpoint(target, _checkpoint_file(card, files), key, prefix)
    return module.eval()


register_format("tfjs", _load_tfjs)
register_format("torchscript", _load_torchscript)
register_format("monai", _load_builder)
register_format("torch", _load_builder)


def _loader(card: ModelCard) -> Loader:
    fmt = card.network.get("format")
    if fmt not in _LOADERS:
        raise NetworkError(
            f"{_where(card)}: unknown network.format {fmt!r} (known: {', '.join(network_formats())})"
        )
    return _LOADERS[fmt]


def module_from_files(card: ModelCard, files: dict[str, Path] | None, random_weights: bool) -> nn.Module:
    """The eval-mode float32 module of ``card`` from resolved weight ``files`` (see :func:`network_files`)."""
    module = _loader(card)(card, files, random_weights)
    transform = card.network.get("input_transform")
    if transform:
        wrapped = InputTransform(
            module,
            bool(transform.get("zscore", False)),
            float(transform.get("scale", 1.0)),
            float(transform.get("shift", 0.0)),
        )
        # around a TorchScript network the wrapper must be scripted too, or ONNX export cannot trace it
        module = torch.jit.script(wrapped) if isinstance(module, torch.jit.ScriptModule) else wrapped
    return module.float().eval()


def _onnx_only(card: ModelCard, random_weights: bool) -> bool:
    """The publisher's weights are an FP32 ONNX only (no PyTorch checkpoint among the files)."""
    spec = card.network.get("published_onnx")
    if not spec or random_weights:
        return False
    names = [entry["name"] for entry in weight_entries(card)]
    return not (card.network.get("checkpoint") or {}).get("file") and names == [spec["file"]]


def _onnx_only_error(card: ModelCard) -> NetworkError:
    return NetworkError(
        f"{card.id}: the publisher's weights are an FP32 ONNX file "
        f"({card.network['published_onnx']['file']}), not a PyTorch checkpoint: use an ONNX-based backend "
        "(openvino, onnxruntime, tensorrt), or random weights for structure-only checks"
    )


def build_network(
    card: ModelCard, weights_dir: str | Path | None = None, random_weights: bool = False
) -> nn.Module:
    """The card's network as an eval-mode float32 ``nn.Module`` (``N,C,D,H,W`` → logits ``N,K,D,H,W``).

    Weights come from :func:`engine_tools.weights.ensure_weights` (mirror, cache, download).
    ``random_weights`` skips the checkpoint (structure-only tests). ONNX-only cards raise
    :class:`NetworkError`.
    """
    if card.network.get("format") == "onnx":
        raise NetworkError(f"{card.id}: an ONNX network has no PyTorch module; use export_onnx(card)")
    if _onnx_only(card, random_weights):
        raise _onnx_only_error(card)
    return module_from_files(card, network_files(card, weights_dir, random_weights), random_weights)


def torch_factory(
    card: ModelCard, weights_dir: str | Path | None = None, random_weights: bool = False
) -> Callable[[], nn.Module] | None:
    """A callable that builds the network (weights resolved once, now); ``None`` for ONNX-only cards."""
    if card.network.get("format") == "onnx":
        return None
    if _onnx_only(card, random_weights):
        raise _onnx_only_error(card)
    files = network_files(card, weights_dir, random_weights)

    def factory() -> nn.Module:
        return module_from_files(card, files, random_weights)

    return factory
