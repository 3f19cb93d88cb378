"""TensorFlow.js *Layers* models (Keras topology + weights manifest) as PyTorch modules.

The brainchop MeshNet models are published in this format: ``model.json`` holds the Keras functional
topology and a ``weightsManifest`` whose groups list weights in the byte order of their shard files
(``*.bin``, concatenated in ``paths`` order). Only sequential graphs are supported (each layer feeds
the next), which covers every MeshNet.

Layout: TF.js tensors are channels-last ``N, D, H, W, C``; the PyTorch module is ``N, C, D, H, W`` with
the same spatial axes in the same order (TF.js axis 1 is PyTorch axis 2, ...). A TF ``Conv3D`` kernel
``[kd, kh, kw, in, out]`` becomes the PyTorch weight ``[out, in, kd, kh, kw]``.

Name-encoded normalisation: files written by brainchop's PyTorch exporter (``generatedBy`` mentions
``name-encoding``, e.g. mindgrab) carry no GroupNorm layer in the topology; a ``Conv3D`` whose name
ends in ``_gn`` is followed by a non-affine GroupNorm with one group per channel (instance
normalisation over the whole input), then its activation. brainchop's runtime applies it the same way.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

#: Manifest dtypes and the numpy dtype of their bytes (little-endian, as TF.js writes them).
_MANIFEST_DTYPES = {"float32": "<f4", "int32": "<i4"}
_QUANTIZED_DTYPES = {"uint8": "<u1", "uint16": "<u2", "float16": "<f2"}


class TfjsFormatError(ValueError):
    """The model.json or its weight shards cannot be turned into a network; the message says where."""


def _activation(name: str, where: str) -> nn.Module | None:
    """PyTorch module for a Keras activation name (``None`` for ``linear``)."""
    name = name.lower()
    table: dict[str, Any] = {
        "linear": None,
        "relu": nn.ReLU,
        "relu6": nn.ReLU6,
        "elu": nn.ELU,  # Keras alpha = 1.0
        "gelu": nn.GELU,  # exact (erf) form, as TF.js implements 'gelu'
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "swish": nn.SiLU,
        "silu": nn.SiLU,
        "selu": nn.SELU,
        "softplus": nn.Softplus,
        "softmax": lambda: nn.Softmax(dim=1),
    }
    if name not in table:
        raise TfjsFormatError(f"{where}: unsupported activation {name!r} (supported: {', '.join(table)})")
    factory = table[name]
    return None if factory is None else factory()


def _module_name(keras_name: str, taken: set[str]) -> str:
    """A PyTorch child name from a Keras layer name (valid identifier, unique, no dots)."""
    name = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in keras_name)
    if not name or not (name[0].isalpha() or name[0] == "_"):
        name = f"layer_{name}"
    base, index = name, 1
    while name in taken:
        index += 1
        name = f"{base}_{index}"
    taken.add(name)
    return name


def read_weights(model_json: Path, shard_files: dict[str, Path] | None = None) -> dict[str, np.ndarray]:
    """All weights of a TF.js manifest by name, as float32 arrays in their manifest shapes.

    ``shard_files`` maps a manifest path (``"model.bin"``) to where the file is; by default shards are
    looked up beside ``model_json``. Each shard is read as little-endian bytes and groups are sliced in
    manifest order; a size mismatch raises :class:`TfjsFormatError` naming the shard.
    """
    spec = _load_json(model_json)
    if "weightsManifest" not in spec:
        raise TfjsFormatError(f"{model_json}: no 'weightsManifest' (not a TF.js Layers model?)")
    weights: dict[str, np.ndarray] = {}
    for group in spec["weightsManifest"]:
        paths = [
            Path(shard_files[p]) if shard_files and p in shard_files else model_json.parent / p
            for p in group["paths"]
        ]
        for path in paths:
            if not path.is_file():
                raise TfjsFormatError(f"{model_json}: weight shard {path.name} not found at {path}")
        blob = b"".join(path.read_bytes() for path in paths)
        offset = 0
        for entry in group["weights"]:
            shape = [int(s) for s in entry["shape"]]
            count = int(np.prod(shape)) if shape else 1
            quant = entry.get("quantization")
            if quant:
                qtype = quant["dtype"]
                if qtype not in _QUANTIZED_DTYPES:
                    raise TfjsFormatError(
                        f"{model_json}: {entry['name']} has unsupported quantization {qtype}"
                    )
                dtype = np.dtype(_QUANTIZED_DTYPES[qtype])
            else:
                if entry["dtype"] not in _MANIFEST_DTYPES:
                    raise TfjsFormatError(
                        f"{model_json}: {entry['name']} has unsupported dtype {entry['dtype']}"
                    )
                dtype = np.dtype(_MANIFEST_DTYPES[entry["dtype"]])
            nbytes = count * dtype.itemsize
            if offset + nbytes > len(blob):
                raise TfjsFormatError(
                    f"{model_json}: shards {', '.join(p.name for p in paths)} hold {len(blob)} bytes, "
                    f"too few for weight {entry['name']} (truncated download?)"
                )
            values = np.frombuffer(blob, dtype=dtype, count=count, offset=offset).astype(np.float32)
            if quant and qtype != "float16":
                values = values * np.float32(quant["scale"]) + np.float32(quant["min"])
            weights[entry["name"]] = values.reshape(shape)
            offset += nbytes
        if offset != len(blob):
            raise TfjsFormatError(
                f"{model_json}: shards {', '.join(p.name for p in paths)} hold {len(blob)} bytes but the "
                f"manifest describes {offset}"
            )
    return weights


def _load_json(model_json: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(model_json).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TfjsFormatError(f"{model_json}: cannot read TF.js model.json ({exc})") from exc


def _layers(spec: dict[str, Any], where: Path) -> list[dict[str, Any]]:
    topology = spec.get("modelTopology")
    if not isinstance(topology, dict):
        raise TfjsFormatError(f"{where}: no 'modelTopology'")
    config = topology.get("model_config", topology)
    layers = config.get("config", {}).get("layers") if isinstance(config.get("config"), dict) else None
    if layers is None and isinstance(config.get("config"), list):  # Keras Sequential of old
        layers = config["config"]
    if not layers:
        raise TfjsFormatError(f"{where}: modelTopology has no layers")
    return layers


def _check_sequential(layers: list[dict[str, Any]], where: Path) -> None:
    previous = None
    for layer in layers:
        name = layer.get("name", layer.get("config", {}).get("name"))
        inbound = layer.get("inbound_nodes")
        if inbound and previous is not None:
            sources = [node[0] for group in inbound for node in group if isinstance(node, list)]
            if sources != [previous]:
                raise TfjsFormatError(
                    f"{where}: layer {name!r} takes {sources}, not the previous layer {previous!r}; "
                    "only sequential TF.js models are supported"
                )
        previous = name


def build_tfjs_module(
    model_json: str | Path, shard_files: dict[str, Path] | None = None, random_weights: bool = False
) -> nn.Module:
    """PyTorch ``nn.Sequential`` equivalent of a sequential TF.js Layers 3-D model (eval mode, float32).

    Supported layers: InputLayer, Conv3D (any kernel, dilation, ``same``/``valid`` padding at stride 1,
    built-in activation, bias), Activation, ReLU/ELU/Softmax layers, BatchNormalization, Dropout (no-op
    at inference). ``random_weights`` keeps PyTorch's initialisation (structure-only tests).
    """
    model_json = Path(model_json)
    spec = _load_json(model_json)
    layers = _layers(spec, model_json)
    _check_sequential(layers, model_json)
    weights = {} if random_weights else read_weights(model_json, shard_files)
    used: set[str] = set()

    def take(layer_name: str, suffix: str, shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
        key = f"{layer_name}/{suffix}"
        if random_weights:
            return None
        if key not in weights:
            raise TfjsFormatError(f"{model_json}: weight {key!r} missing from the manifest")
        used.add(key)
        value = weights[key]
        if shape is not None and tuple(value.shape) != shape:
            raise TfjsFormatError(f"{model_json}: weight {key!r} has shape {value.shape}, expected {shape}")
        return torch.from_numpy(np.ascontiguousarray(value))

    name_encoded_norm = "name-encoding" in str(spec.get("generatedBy", ""))
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    taken: set[str] = set()
    channels: int | None = None
    for layer in layers:
        kind = layer["class_name"]
        config = layer.get("config", {})
        name = layer.get("name", config.get("name", kind))
        where = f"{model_json} layer {name!r} ({kind})"
        if kind == "InputLayer":
            shape = config.get("batch_input_shape") or config.get("batch_shape")
            if not shape or len(shape) != 5:
                raise TfjsFormatError(f"{where}: expected a 5-D input (N, D, H, W, C), got {shape}")
            channels = int(shape[-1])
            continue
        if channels is None:
            raise TfjsFormatError(f"{where}: the model has no InputLayer with a channel count")
        if config.get("data_format", "channels_last") != "channels_last":
            raise TfjsFormatError(f"{where}: only channels_last layers are supported")
        if kind == "Conv3D":
            conv = _conv3d(config, channels, name, where, take)
            filters = conv.out_channels
            modules[_module_name(name, taken)] = conv
            channels = filters
            if name_encoded_norm and name.endswith("_gn"):
                modules[_module_name(f"{name}_norm", taken)] = nn.GroupNorm(filters, filters, affine=False)
            act = _activation(config.get("activation", "linear"), where)
            if act is not None:
                modules[_module_name(f"{name}_act", taken)] = act
        elif kind in ("Activation", "ReLU", "ELU", "Softmax", "LeakyReLU"):
            act = _activation_layer(kind, config, where)
            if act is not None:
                modules[_module_name(name, taken)] = act
        elif kind == "BatchNormalization":
            norm = _batch_norm(config, channels, name, where, take, random_weights)
            modules[_module_name(name, taken)] = norm
        elif kind in ("Dropout", "SpatialDropout3D", "GaussianNoise"):
            continue  # inactive at inference
        else:
            raise TfjsFormatError(f"{where}: unsupported layer type {kind!r}")
    unused = sorted(set(weights) - used)
    if unused:
        raise TfjsFormatError(
            f"{model_json}: manifest weights not used by any layer: {', '.join(unused[:5])}"
        )
    module = nn.Sequential(modules)
    return module.float().eval()


def _conv3d(
    config: dict[str, Any], channels: int, name: str, where: str, take: Callable[..., torch.Tensor | None]
) -> nn.Conv3d:
    """A Conv3D layer with its TF.js kernel (``D, H, W, in, out``) and bias."""
    kernel = tuple(int(k) for k in config["kernel_size"])
    dilation = tuple(int(d) for d in config.get("dilation_rate", (1, 1, 1)))
    stride = tuple(int(s) for s in config.get("strides", (1, 1, 1)))
    groups = int(config.get("groups", 1))
    filters = int(config["filters"])
    padding_mode = config.get("padding", "valid")
    if padding_mode == "same":
        if stride != (1, 1, 1) or any(k % 2 == 0 for k in kernel):
            raise TfjsFormatError(f"{where}: 'same' padding only with stride 1 and odd kernels")
        padding: tuple[int, ...] = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
    elif padding_mode == "valid":
        padding = (0, 0, 0)
    else:
        raise TfjsFormatError(f"{where}: unsupported padding {padding_mode!r}")
    use_bias = bool(config.get("use_bias", True))
    conv = nn.Conv3d(channels, filters, kernel, stride, padding, dilation, groups, bias=use_bias)
    tf_kernel = take(name, "kernel", (*kernel, channels // groups, filters))
    if tf_kernel is not None:
        conv.weight.data.copy_(tf_kernel.permute(4, 3, 0, 1, 2))
    if use_bias:
        bias = take(name, "bias", (filters,))
        if bias is not None:
            conv.bias.data.copy_(bias)
    return conv


def _activation_layer(kind: str, config: dict[str, Any], where: str) -> nn.Module | None:
    """The module of a standalone activation layer (``None`` for a linear one)."""
    if kind == "Activation":
        return _activation(config["activation"], where)
    if kind == "ReLU":
        return nn.ReLU()
    if kind == "ELU":
        return nn.ELU(alpha=float(config.get("alpha", 1.0)))
    if kind == "LeakyReLU":
        return nn.LeakyReLU(float(config.get("alpha", 0.3)))
    return nn.Softmax(dim=1)


def _batch_norm(
    config: dict[str, Any],
    channels: int,
    name: str,
    where: str,
    take: Callable[..., torch.Tensor | None],
    random_weights: bool,
) -> nn.BatchNorm3d:
    """A BatchNormalization layer over the channel axis with its moving statistics."""
    axis = config.get("axis", -1)
    axis = axis[0] if isinstance(axis, list) else axis
    if axis not in (-1, 4):
        raise TfjsFormatError(f"{where}: BatchNormalization over axis {axis} (channels are axis -1)")
    norm = nn.BatchNorm3d(
        channels,
        eps=float(config.get("epsilon", 1e-3)),
        affine=bool(config.get("scale", True) or config.get("center", True)),
    )
    if not random_weights:
        if config.get("scale", True):
            norm.weight.data.copy_(take(name, "gamma", (channels,)))
        elif norm.weight is not None:
            norm.weight.data.fill_(1.0)
        if config.get("center", True):
            norm.bias.data.copy_(take(name, "beta", (channels,)))
        elif norm.bias is not None:
            norm.bias.data.zero_()
        norm.running_mean.copy_(take(name, "moving_mean", (channels,)))
        norm.running_var.copy_(take(name, "moving_variance", (channels,)))
    return norm


def describe_tfjs(model_json: str | Path) -> dict[str, Any]:
    """Input shape, number of classes and receptive field of a sequential TF.js 3-D model."""
    model_json = Path(model_json)
    layers = _layers(_load_json(model_json), model_json)
    input_shape = None
    classes = None
    receptive = 1
    for layer in layers:
        config = layer.get("config", {})
        if layer["class_name"] == "InputLayer":
            input_shape = config.get("batch_input_shape") or config.get("batch_shape")
        elif layer["class_name"] == "Conv3D":
            classes = int(config["filters"])
            kernel = int(config["kernel_size"][0])
            dilation = int(config.get("dilation_rate", [1])[0])
            receptive += (kernel - 1) * dilation
    spec = _load_json(model_json)
    whole_volume_norm = "name-encoding" in str(spec.get("generatedBy", "")) and any(
        layer.get("config", {}).get("name", layer.get("name", "")).endswith("_gn") for layer in layers
    )
    return {
        "input_shape": input_shape,
        "num_classes": classes,
        "receptive_field": receptive,
        "instance_norm": whole_volume_norm,
    }
