"""Networks from model cards: PyTorch modules and their FP32 ONNX export.

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
    with ``checkpoint.strip_prefix`` (or ``strip_prefix``) removed.
``onnx``
    Bring-your-own ONNX: no PyTorch module; :func:`export_onnx` validates it (``onnx.checker``, one
    rank-5 input) and returns it, with its input/output renamed to ``input``/``logits`` if needed.

An optional ``network.input_transform`` (``{"zscore": true, "scale": a, "shift": b}``) is applied
inside the module (so it is part of every engine): per sample, ``x ← (x - mean) / std`` then
``x ← a * x + b`` (deepbet's normalisation). New formats: :func:`register_format`.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine_tools.cache import atomic_file, cache_dir, sha256_file, sha256_json
from engine_tools.progress import Progress, SilentProgress
from engine_tools.registry import ModelCard
from engine_tools.weights import ensure_weights, weight_entries

#: (card, weight files by name or None when random, random_weights) -> nn.Module
Loader = Callable[[ModelCard, dict[str, Path] | None, bool], nn.Module]

ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
_LOADERS: dict[str, Loader] = {}


class NetworkError(ValueError):
    """The card's network cannot be built or exported; the message names the card and the field."""


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


def _where(card: ModelCard) -> str:
    return str(card.path or card.id)


def _file(card: ModelCard, files: dict[str, Path], key: str = "file") -> Path:
    name = card.network.get(key)
    if not name:
        raise NetworkError(f"{_where(card)}: network.{key} must name one of the weights files")
    if name not in files:
        raise NetworkError(
            f"{_where(card)}: network.{key} {name!r} is not among weights.files ({', '.join(files)})"
        )
    return files[name]


def _load_tfjs(card: ModelCard, files: dict[str, Path] | None, random_weights: bool) -> nn.Module:
    from engine_tools.networks.tfjs import build_tfjs_module

    if files is None:
        raise NetworkError(f"{_where(card)}: a TF.js network needs its model.json even for random weights")
    return build_tfjs_module(_file(card, files), shard_files=files, random_weights=random_weights)


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
    path = _file(card, files)
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
        return files[spec["file"]] if spec["file"] in files else _file(card, files, "checkpoint_file")
    published = (card.network.get("published_onnx") or {}).get("file")
    candidates = [name for name in files if name != published and not name.endswith(".onnx")]
    if not candidates:
        raise NetworkError(
            f"{_where(card)}: the card's weights hold no PyTorch checkpoint "
            f"({', '.join(files)}); only an ONNX export can be used (export_onnx)"
        )
    return files[candidates[0]]


def _load_builder(card: ModelCard, files: dict[str, Path] | None, random_weights: bool) -> nn.Module:
    from engine_tools.networks.zoo.checkpoints import load_checkpoint

    builder = card.network.get("builder")
    if not builder:
        raise NetworkError(f"{_where(card)}: format {card.network['format']!r} needs network.builder")
    torch.manual_seed(0)
    try:
        module = _resolve(builder, _where(card))(**card.network.get("kwargs", {}))
    except TypeError as exc:
        raise NetworkError(f"{_where(card)}: network.kwargs do not fit {builder} ({exc})") from exc
    if random_weights:
        return module
    assert files is not None
    spec = card.network.get("checkpoint") or {}
    key = spec.get("key", card.network.get("state_dict_key"))
    prefix = spec.get("strip_prefix", card.network.get("strip_prefix", "module."))
    return load_checkpoint(module, _checkpoint_file(card, files), key, prefix)


register_format("tfjs", _load_tfjs)
register_format("torchscript", _load_torchscript)
register_format("monai", _load_builder)
register_format("torch", _load_builder)


def _needs_files(card: ModelCard, random_weights: bool) -> bool:
    return not random_weights or card.network["format"] == "tfjs"


def build_network(
    card: ModelCard, weights_dir: str | Path | None = None, random_weights: bool = False
) -> nn.Module:
    """The card's network as an eval-mode float32 ``nn.Module`` (``N,C,D,H,W`` → logits ``N,K,D,H,W``).

    Weights come from :func:`engine_tools.weights.ensure_weights` (mirror, cache, download).
    ``random_weights`` skips the checkpoint (structure-only tests). ONNX-only cards raise
    :class:`NetworkError`.
    """
    fmt = card.network.get("format")
    if fmt == "onnx":
        raise NetworkError(f"{card.id}: an ONNX network has no PyTorch module; use export_onnx(card)")
    if fmt not in _LOADERS:
        raise NetworkError(
            f"{_where(card)}: unknown network.format {fmt!r} (known: {', '.join(network_formats())})"
        )
    files = ensure_weights(card, weights_dir) if _needs_files(card, random_weights) else None
    return _finish(card, _LOADERS[fmt](card, files, random_weights))


def _finish(card: ModelCard, module: nn.Module) -> nn.Module:
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


def torch_factory(
    card: ModelCard, weights_dir: str | Path | None = None, random_weights: bool = False
) -> Callable[[], nn.Module] | None:
    """A callable that builds the network (weights resolved once, now); ``None`` for ONNX-only cards."""
    fmt = card.network.get("format")
    if fmt == "onnx":
        return None
    if fmt not in _LOADERS:
        raise NetworkError(
            f"{_where(card)}: unknown network.format {fmt!r} (known: {', '.join(network_formats())})"
        )
    files = ensure_weights(card, weights_dir) if _needs_files(card, random_weights) else None
    loader = _LOADERS[fmt]

    def factory() -> nn.Module:
        return _finish(card, loader(card, files, random_weights))

    return factory


def _weights_fingerprint(files: dict[str, Path] | None) -> dict[str, str]:
    return {name: sha256_file(path) for name, path in sorted((files or {}).items())}


def export_key(card: ModelCard, files: dict[str, Path] | None, random_weights: bool) -> str:
    """Cache key of an export: network spec, window, weights content, exporter versions."""
    return sha256_json(
        {
            "network": card.network,
            "window": list(card.window_size),
            "in_channels": card.in_channels,
            "weights": _weights_fingerprint(files),
            "random_weights": random_weights,
            "torch": torch.__version__,
            "opset": ONNX_OPSET,
        }
    )


def validate_onnx(path: str | Path) -> dict[str, Any]:
    """Check an ONNX file (``onnx.checker``, one rank-5 float input); returns its I/O names and shapes."""
    import onnx

    path = Path(path)
    try:
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise NetworkError(f"{path}: not a valid ONNX model ({exc})") from exc
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]

    def dims(value: Any) -> list[int | str]:
        return [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim
        ]

    if len(inputs) != 1:
        raise NetworkError(f"{path}: expected one input (N, C, D, H, W), found {[i.name for i in inputs]}")
    shape = dims(inputs[0])
    if len(shape) != 5:
        raise NetworkError(
            f"{path}: input {inputs[0].name!r} has rank {len(shape)} {shape}; a 3-D network needs rank 5"
        )
    if not model.graph.output:
        raise NetworkError(f"{path}: the model has no output")
    return {
        "input": inputs[0].name,
        "input_shape": shape,
        "outputs": [o.name for o in model.graph.output],
        "output_shape": dims(model.graph.output[0]),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
    }


def _renamed_onnx(source: Path, destination: Path, info: dict[str, Any]) -> Path:
    """Copy of ``source`` whose input/first output are named ``input``/``logits`` (atomic write)."""
    import onnx

    model = onnx.load(str(source))
    renames = {info["input"]: INPUT_NAME, info["outputs"][0]: OUTPUT_NAME}
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        value.name = renames.get(value.name, value.name)
    onnx.checker.check_model(model)
    with atomic_file(destination) as stream:
        stream.write(model.SerializeToString())
    return destination


def _fix_spatial_dims(data: bytes, window: tuple[int, int, int]) -> bytes:
    """Set the spatial dims of input/logits to ``window`` (exported with dynamic spatial axes)."""
    import onnx

    model = onnx.load_from_string(data)
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 5:
            for axis, size in zip((2, 3, 4), window, strict=True):
                dims[axis].Clear()
                dims[axis].dim_value = int(size)
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def export_onnx(
    card: ModelCard,
    weights_dir: str | Path | None = None,
    random_weights: bool = False,
    progress: Progress | None = None,
) -> Path:
    """FP32 ONNX of the card's network, cached under ``<cache>/exports`` (atomic).

    Input ``input`` ``[batch, C, *window]``, output ``logits`` ``[batch, K, *window]``, dynamic batch,
    opset 17 (TorchScript exporter). Keyed by the network spec and the weights' SHA-256. BYO ONNX
    cards: the validated user file (a renamed copy in the cache if its I/O names differ).
    """
    progress = progress or SilentProgress()
    fmt = card.network.get("format")
    if fmt == "onnx":
        files = ensure_weights(card, weights_dir, progress=progress)
        source = _file(card, files)
        info = validate_onnx(source)
        if info["input"] == INPUT_NAME and info["outputs"][0] == OUTPUT_NAME:
            return source
        target = cache_dir("exports") / f"{card.id}-{export_key(card, files, False)[:16]}.onnx"
        return target if target.is_file() else _renamed_onnx(source, target, info)
    if fmt not in _LOADERS:
        raise NetworkError(
            f"{_where(card)}: unknown network.format {fmt!r} (known: {', '.join(network_formats())})"
        )
    progress.update("export", 0.0, f"{card.id}: preparing weights")
    files = (
        ensure_weights(card, weights_dir, progress=progress) if _needs_files(card, random_weights) else None
    )
    target = cache_dir("exports") / f"{card.id}-{export_key(card, files, random_weights)[:16]}.onnx"
    if target.is_file():
        progress.update("export", 1.0, f"{card.id}: ONNX export found in cache")
        return target
    module = _finish(card, _LOADERS[fmt](card, files, random_weights))
    window = card.window_size
    # Pure convolution stacks (TF.js MeshNets) trace identically at any size: export with a small
    # dummy (tracing runs one forward pass) and set the card's window afterwards.
    small = fmt == "tfjs"
    trace_shape = (16, 16, 16) if small else window
    dummy = torch.zeros(1, card.in_channels, *trace_shape)
    axes = {0: "batch", **({2: "depth", 3: "height", 4: "width"} if small else {})}
    progress.update("export", 0.2, f"{card.id}: exporting to ONNX (opset {ONNX_OPSET})")
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            module,
            (dummy,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    data = _fix_spatial_dims(buffer.getvalue(), window) if small else buffer.getvalue()
    with atomic_file(target) as stream:
        stream.write(data)
    progress.update("export", 1.0, f"{card.id}: exported {target.name}")
    return target


__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "NetworkError",
    "build_network",
    "export_onnx",
    "network_formats",
    "register_format",
    "torch_factory",
    "validate_onnx",
]
