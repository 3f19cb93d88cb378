"""Dilated convolutions run as ordinary convolutions on interleaved sub-grids (exact, at compile time).

A convolution with dilation ``d``, stride 1 and padding ``d * (k - 1) / 2`` combines, for each output
voxel, only input voxels whose coordinates are congruent to it modulo ``d``. So splitting the volume
into its ``d**3`` interleaved sub-grids (space to batch), convolving every sub-grid with dilation 1 and
padding ``(k - 1) / 2``, and interleaving the results back (batch to space) gives the same numbers.
A volume whose size is not a multiple of ``d`` is zero-padded at its end first (exactly the zeros the
convolution's own padding would read) and cropped back after.

Why: on CPUs with AMX, oneDNN's INT8 and BF16 convolution kernels lose most of their speed at large
dilations. Measured for brainchop MeshNet (21 channels, 192^3 window, 2 threads of an Intel Xeon with
AMX, OpenVINO 2026.4): INT8 layers of dilation 8 and 16 took 2.2x and 7x the time of the dilation-1
to -4 layers of the same size, BF16 ones 3.5x and 11x; FP32 kernels do not slow down, so FP32 is
left as it is (``bench/results/dilated_conv_cpu.md`` has the measurements). The interleaving costs
two passes over the data per run of layers, so ``auto`` rewrites a run only where its slowest layer
gains more than that: INT8 runs holding a dilation of 16 or more, BF16 runs of 8 or more (a lone
INT8 dilation-8 layer of brainchop's model11 ran slower rewritten).

The rewrite is applied to a clone of the model just before compiling; the saved engine stays the
model as built. Batch to space is placed after the convolution's per-channel bias and activation
(elementwise, so they commute with the interleaving), so the CPU plugin still fuses them into the
convolution; in an INT8 model it goes after the next layer's per-tensor quantizer too, so the
convolution writes bytes and both interleavings move one byte per value. It applies to models of
static shape (reshape a dynamic one first): the CPU plugin's low-precision transformations keep the
sub-grid convolutions INT8 only when every shape, pad and crop around them is a constant.

``MEDQUANT_DILATED_CONVOLUTIONS`` = ``auto`` (default), ``subgrid`` (always) or ``direct`` (never).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from engine_tools.machine import cpu_model_and_flags

#: dilation from which a convolution is rewritten (dilations 1, 2 and 4 ran at full kernel speed)
MIN_DILATION = 8
#: in ``auto`` mode, the largest dilation a run of layers needs before it is rewritten
AUTO_LARGEST_DILATION = {"int8": 16, "bf16": 8}
#: elementwise ops that may sit between the convolution and batch to space (with constant operands)
_ELEMENTWISE = {
    "Add",
    "Multiply",
    "Subtract",
    "Elu",
    "Relu",
    "Clamp",
    "Swish",
    "PRelu",
    "Sigmoid",
    "Tanh",
    "Gelu",
}
MODES = ("auto", "subgrid", "direct")


def subgrid_mode() -> str:
    """The mode asked for through ``MEDQUANT_DILATED_CONVOLUTIONS`` (``auto`` when unset)."""
    mode = os.environ.get("MEDQUANT_DILATED_CONVOLUTIONS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"MEDQUANT_DILATED_CONVOLUTIONS={mode!r}: use one of {', '.join(MODES)}")
    return mode


def subgrid_precision(model: Any, hint: str) -> str | None:
    """``"int8"`` or ``"bf16"`` where ``auto`` considers the rewrite (AMX CPUs, a quantized model or
    BF16 inference), else None."""
    if not cpu_model_and_flags()[1] & {"amx_int8", "amx_bf16"}:
        return None
    if any(op.get_type_name() == "FakeQuantize" for op in model.get_ops()):
        return "int8"
    return "bf16" if hint == "bf16" else None


def rewritable_dilations(conv: Any, min_dilation: int = MIN_DILATION) -> list[int] | None:
    """The per-axis dilations of a convolution the rewrite applies to, else None (stride 1, symmetric
    'same' padding a multiple of the dilation, every dilation >= ``min_dilation``)."""
    if conv.get_type_name() != "Convolution":
        return None
    attrs = conv.get_attributes()
    dilations = [int(d) for d in attrs["dilations"]]
    begin, end = list(attrs["pads_begin"]), list(attrs["pads_end"])
    if attrs.get("auto_pad", "explicit").lower() not in ("explicit", "notset"):
        return None
    if len(dilations) != 3 or min(dilations) < min_dilation or any(int(s) != 1 for s in attrs["strides"]):
        return None
    if begin != end or any(p % d for p, d in zip(begin, dilations, strict=True)):
        return None
    if not conv.get_input_partial_shape(0).is_static:  # shapes are constants: INT8 kernels need that
        return None
    return dilations


def rewrite_dilated_convolutions(
    model: Any, min_dilation: int = MIN_DILATION, largest_at_least: int = MIN_DILATION
) -> list[str]:
    """Rewrite the eligible dilated convolutions of ``model`` in place; returns the names rewritten.

    Consecutive eligible convolutions (joined only by elementwise ops and INT8 quantizers) share one
    sub-grid split, by the greatest common divisor of their dilations (MeshNet's 8, 16, 8 run as 1,
    2, 1 on one split), so the interleaving is paid once per run of layers, not once per layer. A run
    is rewritten only when one of its dilations reaches ``largest_at_least``."""
    rewritten = []
    for chain, block in _chains(model, min_dilation):
        if max(int(d) for conv in chain for d in conv.get_attributes()["dilations"]) < largest_at_least:
            continue
        _rewrite_chain(chain, block)
        rewritten += [conv.get_friendly_name() for conv in chain]
    if rewritten:
        model.validate_nodes_and_infer_types()
    return rewritten


def _chains(model: Any, min_dilation: int) -> list[tuple[list[Any], list[int]]]:
    """Runs of consecutive eligible convolutions with the block (per-axis gcd of their dilations)."""
    chains: list[tuple[list[Any], list[int]]] = []
    seen: set[str] = set()
    for conv in model.get_ordered_ops():
        block = rewritable_dilations(conv, min_dilation)
        if block is None or conv.get_friendly_name() in seen:
            continue
        chain = [conv]
        while (following := _next_convolution(_elementwise_tail(chain[-1], validate=False))) is not None:
            dilations = rewritable_dilations(following, min_dilation)
            if dilations is None:
                break
            joint = [math.gcd(a, b) for a, b in zip(block, dilations, strict=True)]
            if min(joint) < min_dilation:
                break
            chain.append(following)
            block = joint
        seen.update(c.get_friendly_name() for c in chain)
        chains.append((chain, block))
    return chains


def _next_convolution(tail: Any) -> Any | None:
    """The convolution fed by ``tail`` alone, directly or through a single-consumer quantizer."""
    targets = list(tail.output(0).get_target_inputs())
    if len(targets) != 1:
        return None
    node = targets[0].get_node()
    if node.get_type_name() == "FakeQuantize":
        targets = list(node.output(0).get_target_inputs())
        if len(targets) != 1:
            return None
        node = targets[0].get_node()
    return node if node.get_type_name() == "Convolution" and targets[0].get_index() == 0 else None


def prepare_for_cpu(model: Any, hint: str) -> tuple[Any, list[str]]:
    """``model`` ready to compile: a rewritten clone where the mode (and, for ``auto``, the CPU,
    the precision and the dilations) call for it, else ``model`` itself."""
    mode = subgrid_mode()
    if mode == "direct":
        return model, []
    largest = MIN_DILATION
    if mode == "auto":
        precision = subgrid_precision(model, hint)
        if precision is None:
            return model, []
        largest = AUTO_LARGEST_DILATION[precision]
    clone = model.clone()
    _freeze_shapes(clone)
    rewritten = rewrite_dilated_convolutions(clone, largest_at_least=largest)
    return (clone, rewritten) if rewritten else (model, [])


def _freeze_shapes(model: Any) -> None:
    """Replace each ``ShapeOf`` of a static shape by that shape as a constant (an ONNX import reshapes
    each bias through a ``ShapeOf`` of the convolution's output, which would otherwise split the
    convolution from its bias and activation, and would read the sub-grid batch's shape)."""
    import openvino.opset13 as ops

    for node in list(model.get_ordered_ops()):
        if node.get_type_name() == "ShapeOf" and node.get_input_partial_shape(0).is_static:
            dtype = np.int32 if node.get_output_element_type(0).get_type_name() == "i32" else np.int64
            shape = np.array(list(node.get_input_partial_shape(0).to_shape()), dtype=dtype)
            node.output(0).replace(ops.constant(shape).output(0))


def _rewrite_chain(chain: list[Any], block: list[int]) -> None:
    import openvino.opset13 as ops

    shape = [int(n) for n in chain[0].get_input_partial_shape(0).to_shape()]
    remainder, grid = _split_sizes(shape[2:], block)
    data = _space_to_batch(ops, chain[0].input_value(0), block, shape)
    for index, conv in enumerate(chain):
        attrs = conv.get_attributes()
        dilations = [int(d) // b for d, b in zip(attrs["dilations"], block, strict=True)]
        pads = [int(p) // b for p, b in zip(attrs["pads_begin"], block, strict=True)]
        if index:  # the quantizer in between now carries the sub-grid batch
            data = conv.input_value(0)
            data.get_node().validate_and_infer_types()
        subgrid_conv = ops.convolution(data, conv.input_value(1), [1, 1, 1], pads, pads, dilations)
        subgrid_conv.set_friendly_name(conv.get_friendly_name())
        conv.output(0).replace(subgrid_conv.output(0))
        tail = _elementwise_tail(subgrid_conv)
        consumers = list(tail.output(0).get_target_inputs())
        if index < len(chain) - 1:
            if not any(remainder):
                continue
            # the padding voxels must read as zeros again for the next convolution
            restored = ops.multiply(tail.output(0), _valid_mask(shape, block, grid)).output(0)
        else:
            quantizer = _per_tensor_quantizer(consumers)
            if quantizer is not None:  # interleave back the INT8 data, not the float
                tail, consumers = quantizer, list(quantizer.output(0).get_target_inputs())
                tail.validate_and_infer_types()
            restored = _batch_to_space(ops, tail.output(0), block, shape)
        for consumer in consumers:
            consumer.replace_source_output(restored)


def _per_tensor_quantizer(consumers: list[Any]) -> Any | None:
    """The FakeQuantize that alone reads a run's last output, when its ranges are scalars: it then
    commutes with batch to space (a reshape, transpose and crop), so it can go first, where the CPU
    plugin fuses it into the convolution and the interleaving moves one byte per value, not four."""
    if len(consumers) != 1 or consumers[0].get_node().get_type_name() != "FakeQuantize":
        return None
    quantizer = consumers[0].get_node()
    ranges = [quantizer.input_value(i).get_node() for i in range(1, 5)]
    scalar = all(
        _constant_valued(r) and int(np.prod(list(r.get_output_shape(0)) or [1])) == 1 for r in ranges
    )
    return quantizer if scalar else None


def _split_sizes(spatial: list[int], block: list[int]) -> tuple[list[int], list[int]]:
    """Per axis, the zeros appended to reach a multiple of the block, and the sub-grid size."""
    remainder = [(-size) % b for size, b in zip(spatial, block, strict=True)]
    grid = [(size + r) // b for size, r, b in zip(spatial, remainder, block, strict=True)]
    return remainder, grid


def _valid_mask(shape: list[int], block: list[int], grid: list[int]) -> np.ndarray:
    """``d^3 N, 1, D', H', W'``: 1 where a sub-grid voxel lies inside the volume, 0 in the padding."""
    m0, m1, m2 = (
        np.arange(g)[None, :] * b + np.arange(b)[:, None] < size  # b, grid
        for size, b, g in zip(shape[2:], block, grid, strict=True)
    )
    g0, g1, g2 = grid
    mask = (
        m0[:, None, None, :, None, None] & m1[None, :, None, None, :, None] & m2[None, None, :, None, None, :]
    )
    mask = np.repeat(mask.reshape(-1, 1, 1, g0, g1, g2), shape[0], axis=1)  # d0 d1 d2, N, ...
    return mask.reshape(-1, 1, g0, g1, g2).astype(np.float32)


def _elementwise_tail(start: Any, validate: bool = True) -> Any:
    """The last node of the single-consumer chain of elementwise ops with constant other operands."""
    node = start
    while True:
        targets = list(node.output(0).get_target_inputs())
        if len(targets) != 1:
            return node
        nxt = targets[0].get_node()
        if nxt.get_type_name() not in _ELEMENTWISE or nxt.get_output_size() != 1:
            return node
        others = [nxt.input_value(i).get_node() for i in range(nxt.get_input_size())]
        if any(o is not node and not (_constant_valued(o) and _per_channel(o)) for o in others):
            return node
        if validate:
            nxt.validate_and_infer_types()  # its input is now the sub-grid batch
        node = nxt


def _constant_valued(node: Any) -> bool:
    """Whether ``node`` computes from constants alone (a constant, or e.g. a reshaped bias)."""
    if node.get_type_name() == "Constant":
        return True
    if node.get_type_name() == "Parameter" or node.get_input_size() == 0:
        return False
    return all(_constant_valued(node.input_value(i).get_node()) for i in range(node.get_input_size()))


def _per_channel(constant: Any) -> bool:
    """A constant that broadcasts over the spatial axes (scalar or ``1, C, 1, 1, 1``)."""
    shape = list(constant.get_output_shape(0))
    return (
        len(shape) <= 1
        and int(np.prod(shape or [1])) == 1
        or (len(shape) == 5 and shape[0] == 1 and shape[2:] == [1, 1, 1])
    )


def _i64(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _space_to_batch(ops: Any, data: Any, dilations: list[int], shape: list[int]) -> Any:
    """``N, C, D, H, W`` -> ``d^3 N, C, D', H', W'``, zero-padded at the end to multiples of ``d``."""
    batch, channels = shape[0], shape[1]
    remainder, grid = _split_sizes(shape[2:], dilations)
    if any(remainder):
        data = _zero_pad_end(ops, data, remainder)
    interleaved = [n for axis in range(3) for n in (grid[axis], dilations[axis])]
    x = ops.reshape(data, _i64([batch, channels, *interleaved]), False)  # N, C, D', d0, H', d1, W', d2
    x = ops.transpose(x, _i64([3, 5, 7, 0, 1, 2, 4, 6]))  # d0, d1, d2, N, C, D', H', W'
    return ops.reshape(x, _i64([-1, channels, *grid]), False)


def _zero_pad_end(ops: Any, data: Any, remainder: list[int]) -> Any:
    """Zeros appended to the spatial axes. Behind a FakeQuantize (an INT8 layer's input) the pad goes
    in front of it, in the float domain: the quantizer maps 0 to 0 (NNCF keeps zero exactly on the
    grid) and the CPU plugin only keeps the convolution INT8 when no pad sits between the two."""
    source = data.get_node()
    pads = (_i64([0] * 5), _i64([0, 0, *remainder]))
    if source.get_type_name() == "FakeQuantize" and len(data.get_target_inputs()) == 1:
        padded = ops.pad(source.input_value(0), *pads, "constant")
        ranges = [source.input_value(i) for i in range(1, 5)]
        attrs = source.get_attributes()
        return ops.fake_quantize(padded, *ranges, attrs["levels"], attrs["auto_broadcast"]).output(0)
    return ops.pad(data, *pads, "constant").output(0)


def _batch_to_space(ops: Any, value: Any, dilations: list[int], shape: list[int]) -> Any:
    """Inverse of :func:`_space_to_batch` for ``K`` output channels: -> ``N, K, D, H, W``."""
    batch, spatial = shape[0], shape[2:]
    channels, *grid = (int(n) for n in value.get_partial_shape().to_shape()[1:])
    y = ops.reshape(value, _i64([*dilations, batch, channels, *grid]), False)
    y = ops.transpose(y, _i64([3, 4, 5, 0, 6, 1, 7, 2]))  # N, K, D', d0, H', d1, W', d2
    padded = [g * d for g, d in zip(grid, dilations, strict=True)]
    y = ops.reshape(y, _i64([batch, channels, *padded]), False)
    if padded != list(spatial):
        y = ops.slice(y, _i64([0] * 5), _i64([batch, channels, *spatial]), _i64([1] * 5))
    return y.output(0)
