"""What a whole volume's logits are needed for, computed in the graph slab by slab: the arg-max
labels of a segmentation, and the digest the accuracy guard compares (labels plus sampled logits).

A segmentation network ends in a *pointwise head*: a 1x1x1 convolution (in an INT8 model reading its
input quantizer's output; the split comes after the quantizer), a bias, perhaps an activation or a
softmax over classes. Each of its output voxels
reads one input voxel, so the head can run on slabs of the first spatial axis with the same result.
Its input has the few channels of the last hidden layer; its output, the logits, has one channel per
class: 104 classes over a 256^3 head are 7 GB of logits, which the CPU plugin would hold whole (and
write out, for the guard). Run slab by slab, each slab's logits go straight into its arg-max, and the
whole volume needs the memory of the hidden layers only (brainchop model21, 256^3 voxels, strict FP32
on 2 cores: 120 s and 14 GB peak memory with the logits whole, 21 s and 3.2 GB slab by slab).

The guard's sampled logits (every ``stride``-th voxel, see :class:`engine_tools.accuracy.LogitsDigest`)
come from the same head applied to the sampled head input: pointwise, so they equal the logits
sampled. Networks without a pointwise head take the arg-max over slabs of their logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine_tools.engines.base import SLAB_BYTES

#: Ops a pointwise head is made of (a convolution only with a 1x1x1 kernel, stride 1, no padding). Not
#: a quantizer: the CPU plugin fuses it into the layer before, which a split between them would undo.
POINTWISE_OPS = frozenset(
    "Convolution Add Subtract Multiply Divide Convert Relu Elu Sigmoid Clamp Softmax".split()
)


@dataclass
class PointwiseHead:
    """The tensor a network's pointwise head reads (``source``) and the head's ops from there to the
    logits (``ops``, in execution order; each reads ``source``-shaped data on one input)."""

    source: Any
    ops: list[Any]


def _spatial_input(node: Any) -> int | None:
    """Index of the one input of ``node`` with a spatial extent (the data; the others are per-channel
    parameters or weights of size 1 along every spatial axis), or None."""
    found = []
    for index, port in enumerate(node.inputs()):
        shape = port.get_partial_shape()
        if shape.rank.is_dynamic:
            return None
        if shape.rank.get_length() >= 3 and any(
            dim.is_dynamic or dim.get_length() != 1 for dim in list(shape)[2:]
        ):
            found.append(index)
    return found[0] if len(found) == 1 else None


def _is_pointwise(node: Any) -> bool:
    kind = node.get_type_name()
    if kind not in POINTWISE_OPS or _spatial_input(node) != 0:
        return False
    if kind == "Softmax":
        return int(node.get_attributes()["axis"]) == 1
    if kind == "Convolution":
        attributes = node.get_attributes()
        kernel = node.input(1).get_partial_shape()
        return (
            kernel.is_static
            and all(k == 1 for k in list(kernel.to_shape())[2:])
            and all(s == 1 for s in attributes["strides"])
            and not any(attributes["pads_begin"])
            and not any(attributes["pads_end"])
        )
    return True


def _readers(node: Any) -> int:
    """Ops that read ``node``'s values (a ``ShapeOf`` reads only its shape, static here: folded away)."""
    return sum(
        port.get_node().get_type_name() != "ShapeOf"
        for output in node.outputs()
        for port in output.get_target_inputs()
    )


def pointwise_head(model: Any) -> PointwiseHead | None:
    """The pointwise head of ``model``'s first output (ops walked back from it while pointwise and
    read by nothing else), or None when its last op is not pointwise."""
    ops: list[Any] = []
    node = model.get_results()[0].input_value(0).get_node()
    while _is_pointwise(node) and _readers(node) == 1:
        ops.insert(0, node)
        if node.get_type_name() == "Convolution":
            break  # what feeds it stays fused with the layer before (a quantizer, an activation)
        node = node.input_value(0).get_node()
    if not ops:
        return None
    return PointwiseHead(ops[0].input_value(0), ops)


def _apply(head: PointwiseHead, data: Any) -> Any:
    """The head's ops rebuilt on ``data`` (a slab or a sampled grid of ``head.source``); their
    parameter inputs (weights, bias, quantizer ranges) are shared with the original ops."""
    from openvino.utils.node_factory import NodeFactory

    for op in head.ops:
        inputs = [data, *op.input_values()[1:]]
        factory = NodeFactory(op.get_type_info().version_id)
        data = factory.create(op.get_type_name(), inputs, op.get_attributes()).output(0)
    return data


def _slab_sizes(logits: Any, max_bytes: int) -> list[int]:
    """Depths of the slabs (first spatial axis) that keep each slab's float logits under ``max_bytes``;
    one slab where the shape is not static."""
    shape = logits.get_partial_shape()
    if not shape.is_static:
        return [-1]
    sizes = list(shape.to_shape())
    depth = int(sizes[2])
    slabs = min(depth, max(1, -(-int(np.prod(sizes)) * 4 // max_bytes)))
    return [depth // slabs + (i < depth % slabs) for i in range(slabs)]


def _argmax(value: Any) -> Any:
    """Index of the largest class per voxel (``N, 1, ...`` int32; ties to the first, as NumPy)."""
    import openvino as ov
    from openvino import opset11

    return opset11.topk(value, np.int64(1), 1, "max", "value", ov.Type.i32, True).output(1)


def _labels(logits: Any, head: PointwiseHead | None, max_bytes: int | None) -> Any:
    """The arg-max over classes of ``logits``, slab by slab (through ``head`` where there is one)."""
    from openvino import opset11

    sizes = _slab_sizes(logits, SLAB_BYTES if max_bytes is None else max_bytes)
    if len(sizes) == 1:
        return _argmax(logits)
    source = logits if head is None else head.source
    parts = opset11.variadic_split(source, np.int64(2), np.array(sizes, np.int64)).outputs()
    slabs = [_argmax(part if head is None else _apply(head, part)) for part in parts]
    return opset11.concat(slabs, 2).output(0)


def with_argmax_output(model: Any, max_bytes: int | None = None) -> Any:
    """``model`` (changed in place) giving the index of the largest of its logits per voxel (``N, 1, D,
    H, W`` int32; among equal logits the first, as NumPy's ``argmax``) instead of the logits, slab by
    slab of the first spatial axis where the logits exceed ``max_bytes`` (default :data:`SLAB_BYTES`;
    see the module doc)."""
    result = model.get_results()[0]
    result.input(0).replace_source_output(_labels(result.input_value(0), pointwise_head(model), max_bytes))
    model.validate_nodes_and_infer_types()
    return model


def with_digest_outputs(model: Any, stride: int, max_bytes: int | None = None) -> Any:
    """``model`` (changed in place, static shape) giving two outputs instead of its logits: the arg-max
    labels (``N, 1, ...``; uint8, uint16 above 256 classes) and the logits on every ``stride``-th voxel
    along each spatial axis (float32), the two parts of :class:`engine_tools.accuracy.LogitsDigest`."""
    import openvino as ov
    from openvino import opset11

    result = model.get_results()[0]
    logits = result.input_value(0)
    head = pointwise_head(model)
    source = logits if head is None else head.source
    rank = source.get_partial_shape().rank.get_length()
    steps = np.array([1, 1] + [stride] * (rank - 2), np.int64)
    zeros = np.zeros(rank, np.int64)
    sampled = opset11.strided_slice(source, zeros, zeros, steps, [1] * rank, [1] * rank).output(0)
    if head is not None:
        sampled = _apply(head, sampled)
    classes = logits.get_partial_shape()[1].get_length()
    labels = opset11.convert(_labels(logits, head, max_bytes), ov.Type.u8 if classes <= 256 else ov.Type.u16)
    result.input(0).replace_source_output(labels.output(0))
    model.add_outputs([opset11.convert(sampled, ov.Type.f32).output(0)])
    model.validate_nodes_and_infer_types()
    return model
