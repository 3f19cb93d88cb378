"""Reading, compiling and running OpenVINO models on the CPU, and proving which kernels ran."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine_tools.engines.base import as_samples


def _ov() -> Any:
    import openvino as ov

    return ov


def read_static_model(onnx_path: str | Path, in_channels: int, window: tuple[int, int, int]) -> Any:
    """The ONNX model as an OpenVINO model fixed to ``1, C, D, H, W`` (batch loops in :func:`run_compiled`)."""
    ov = _ov()
    model = ov.Core().read_model(str(onnx_path))
    if len(model.inputs) != 1:
        raise ValueError(f"{onnx_path}: expected one input, found {len(model.inputs)}")
    model.reshape({model.input(0): ov.PartialShape([1, in_channels, *window])})
    return model


def compile_model(model: Any, hint: str) -> Any:
    """Compile for the CPU at a latency hint (see :func:`compile_on_cpu`)."""
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    return compile_on_cpu(model, config)[0]


def compile_on_cpu(model: Any, config: dict[str, str], core: Any = None) -> tuple[Any, list[str]]:
    """Compile ``model`` for the CPU; where faster, its dilated convolutions run on sub-grids
    (:mod:`engine_tools.engines.openvino.dilated`, exact). Returns the compiled model and the
    names of the rewritten convolutions."""
    from engine_tools.engines.openvino.dilated import prepare_for_cpu

    prepared, rewritten = prepare_for_cpu(model, config.get("INFERENCE_PRECISION_HINT", "f32"))
    return (core or _ov().Core()).compile_model(prepared, "CPU", config), rewritten


def run_compiled(
    request: Any,
    windows: np.ndarray | Sequence[np.ndarray],
    input_shape: tuple[int, ...] | None = None,
    timings: list[float] | None = None,
    write_in_place: bool = False,
) -> np.ndarray | list[np.ndarray]:
    """Run samples one at a time through an infer request (batch 1): an ``N, C, D, H, W`` array gives
    ``N, K, D, H, W`` logits; a list of ``C, D, H, W`` samples of differing shapes (whole cropped
    volumes, on a model of dynamic spatial shape) a list of ``1, K, D, H, W`` logits. Seconds per
    sample are appended to ``timings`` when given. ``write_in_place`` (for a new request that runs
    once: a whole volume) has the request write its logits straight into the returned array."""
    samples = as_samples(windows)
    if input_shape is not None and any(tuple(s.shape) != tuple(input_shape[1:]) for s in samples):
        raise ValueError(
            f"window shape {samples[0].shape} differs from the engine's {tuple(input_shape[1:])}"
        )
    outputs = []
    for sample in samples:
        start = time.perf_counter()
        infer = _infer_into_new_array if write_in_place else _infer_and_copy
        outputs.append(infer(request, sample[None]))
        if timings is not None:
            timings.append(time.perf_counter() - start)
    return np.concatenate(outputs, axis=0) if isinstance(windows, np.ndarray) else outputs


def _infer_into_new_array(request: Any, batch: np.ndarray) -> np.ndarray:
    """One inference whose output lands in a new array the caller owns: the request writes into it
    directly where the output shape is static (no copy of a whole volume's logits, 1.2 GB for 18
    classes over 256^3 voxels), else its output is copied. Only for a request's first run: given a
    new output tensor later, the request computes into its own buffer and copies."""
    port = request.model_outputs[0]
    dtype = {"f32": np.float32, "i32": np.int32}.get(port.get_element_type().get_type_name())
    if port.get_partial_shape().is_static and dtype is not None:
        output = np.empty(tuple(port.get_shape()), dtype=dtype)
        request.set_output_tensor(0, _ov().Tensor(output, shared_memory=True))
        request.infer({0: batch})
        return output
    return _infer_and_copy(request, batch)


def _infer_and_copy(request: Any, batch: np.ndarray) -> np.ndarray:
    """One inference; its output (float32 logits, or int32 labels) copied once out of the request's
    own buffer (reused by the next run)."""
    result = request.infer({0: batch}, share_outputs=True)
    output = result[request.model_outputs[0]]
    return np.array(output, dtype=np.int32 if output.dtype.kind in "iu" else np.float32, copy=True)


def executed_kernels(compiled: Any) -> dict[str, Any]:
    """Count the kernels the CPU plugin chose for each executed op type, split INT8 versus float.

    Returns ``{"int8": n, "float": n, "by_primitive": {primitiveType: n},
    "convolutions": {"int8": n, "float": n}}``.
    """
    by_primitive: dict[str, int] = {}
    totals = {"int8": 0, "float": 0}
    convs = {"int8": 0, "float": 0}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = _rt_value(info, "layerType")
        primitive = _rt_value(info, "primitiveType")
        if not primitive or primitive in ("undef", "unknown") or layer in ("Parameter", "Result", "Const"):
            continue
        by_primitive[primitive] = by_primitive.get(primitive, 0) + 1
        kind = "int8" if re.search(r"(^|_)(i8|u8)($|_)", primitive, re.IGNORECASE) else "float"
        totals[kind] += 1
        if layer.lower().startswith("convolution") or "conv" in primitive:
            convs[kind] += 1
    return {**totals, "convolutions": convs, "by_primitive": by_primitive}


def _rt_value(info: Any, key: str) -> str:
    if key not in info:
        return ""
    value = info[key]
    return str(value.astype(str)) if hasattr(value, "astype") else str(value)
