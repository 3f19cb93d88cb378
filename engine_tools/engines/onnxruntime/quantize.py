"""Static QDQ quantization with ONNX Runtime, as the accuracy guard's ONNX Runtime adapter.

:class:`QDQAdapter` implements :class:`engine_tools.guard_adapter.QuantizationAdapter` on ONNX files:
``quantize`` runs :func:`onnxruntime.quantization.quantize_static` with ``nodes_to_exclude``,
``keep_layers`` quantizes again with more layers excluded, ``run`` executes a candidate on the CPU provider. Candidates are ONNX files in a scratch
folder owned by the adapter.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine_tools.engines.base import as_samples
from engine_tools.machine import cpu_has_vnni
from engine_tools.progress import Progress

#: ONNX op types the QDQ quantizer turns into integer kernels.
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


class WindowReader:
    """A ``CalibrationDataReader`` over ``N, C, D, H, W`` windows or a list of ``C, D, H, W`` samples
    of differing shapes (one sample per batch; the min/max calibrators reduce each tensor per batch)."""

    def __init__(
        self, input_name: str, windows: np.ndarray | Sequence[np.ndarray], progress: Progress
    ) -> None:
        self.input_name = input_name
        self.windows = as_samples(windows)
        self.progress = progress
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.windows):
            return None
        self.progress.update("calibrate", self.index / len(self.windows), f"window {self.index + 1}")
        window = self.windows[self.index][None]
        self.index += 1
        return {self.input_name: window}

    def rewind(self) -> None:
        self.index = 0


def session(model: str | Path | bytes, optimized_path: Path | None = None) -> Any:
    """A CPU inference session with every graph optimisation (optionally saving the optimised graph)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # the optimised-graph dump warns that it is machine specific: known
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_session(
    session: Any, windows: np.ndarray | Sequence[np.ndarray], timings: list[float] | None = None
) -> np.ndarray | list[np.ndarray]:
    """Logits of ``N, C, D, H, W`` windows (one array) or of a list of samples (a list of
    ``1, K, D, H, W`` logits), one sample per call; seconds per sample into ``timings``."""
    import time

    name = session.get_inputs()[0].name
    outputs = []
    for window in as_samples(windows):
        start = time.perf_counter()
        outputs.append(session.run(None, {name: window[None]})[0].astype(np.float32, copy=False))
        if timings is not None:
            timings.append(time.perf_counter() - start)
    return np.concatenate(outputs, axis=0) if isinstance(windows, np.ndarray) else outputs


def _shape(info: Any) -> list[int] | None:
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in info.type.tensor_type.shape.dim]
    return dims if dims and all(d > 0 for d in dims) else None


def layer_costs(model: Any, window_shape: Sequence[int]) -> dict[str, float]:
    """Multiply-accumulates of every compute node at batch 1 (weights where a shape is unknown)."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, [1, int(dims[1].dim_value or 1), *window_shape], strict=False):
        dim.ClearField("dim_param")
        dim.dim_value = value
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        i.name: _shape(i) for i in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
    }
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    costs = {}
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        w = weights.get(node.input[1]) or [0]
        out, inp = shapes.get(node.output[0]), shapes.get(node.input[0])
        if node.op_type == "Conv" and out:
            costs[node.name] = float(np.prod(out) * np.prod(w[1:]))
        elif node.op_type == "ConvTranspose" and inp:
            costs[node.name] = float(np.prod(inp) * np.prod(w[1:]))
        elif out and inp:
            costs[node.name] = float(np.prod(out) * inp[-1])
        else:
            costs[node.name] = float(np.prod(w))
    return costs


class QDQAdapter:
    """The accuracy guard's view of an FP32 ONNX model quantized by ``quantize_static`` (QDQ, U8S8)."""

    compute_measure = "multiply-accumulates"
    fallback = "f32"

    def __init__(
        self,
        onnx_path: Path,
        calibration: np.ndarray | Sequence[np.ndarray],
        window_shape: Sequence[int],
        scratch: Path,
        progress: Progress,
    ) -> None:
        import onnx

        self.onnx_path = Path(onnx_path)
        self.model = onnx.load(str(onnx_path))
        self.calibration = calibration
        self.window_shape = tuple(window_shape)
        self.scratch = Path(scratch)
        self.progress = progress
        self._numbers = itertools.count()
        self._sessions: dict[str, Any] = {}
        self._made: dict[Path, tuple[list[str], dict[str, Any]]] = {}

    def _next_path(self, stem: str) -> Path:
        return self.scratch / f"{stem}-{next(self._numbers)}.onnx"

    def layers(self) -> list[str]:
        return [node.name for node in self.model.graph.node if node.op_type in COMPUTE_OPS]

    def layer_costs(self) -> dict[str, float]:
        return layer_costs(self.model, self.window_shape)

    def recipe(self, options: dict[str, Any]) -> dict[str, Any]:
        method = str(options.get("calibration_method", "minmax"))
        if method not in ("minmax", "percentile"):
            raise ValueError(f"ONNX Runtime calibration_method must be minmax or percentile, not {method!r}")
        # Without VNNI the AVX2 u8*s8 dot product saturates: ONNX Runtime's remedy is 7-bit weights.
        recipe = {
            "calibration_method": method,
            "format": "QDQ U8S8 per-channel",
            "reduce_range": bool(options.get("reduce_range", not cpu_has_vnni())),
        }
        if method == "percentile":
            recipe["percentile"] = float(options.get("percentile", 99.999))
        return recipe

    def better_recipes(self, recipe: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**recipe, "reduce_range": not recipe["reduce_range"]}]

    def quantize(self, excluded: Sequence[str], recipe: dict[str, Any]) -> Path:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
        extra: dict[str, Any] = {"ActivationSymmetric": False, "WeightSymmetric": True}
        if "percentile" in recipe:
            extra["CalibPercentile"] = recipe["percentile"]
        destination = self._next_path("int8")
        self._made[destination] = (list(excluded), dict(recipe))
        self.progress.update(
            "quantize", 0.0, f"ONNX Runtime static QDQ quantization ({recipe['calibration_method']})"
        )
        quantize_static(
            str(self.onnx_path),
            str(destination),
            WindowReader(self.model.graph.input[0].name, self.calibration, self.progress),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=recipe["reduce_range"],
            calibrate_method=methods[recipe["calibration_method"]],
            nodes_to_exclude=list(excluded),
            extra_options={**extra, "CalibTensorRangeSymmetric": False},
            calibration_providers=["CPUExecutionProvider"],
            use_external_data_format=False,
        )
        return destination

    def keep_layers(self, candidate: Path, layers: Sequence[str]) -> Path:
        """Quantize again with ``layers`` (added to the candidate's) excluded; all layers: the FP32 model.

        Editing the Q/DQ graph instead would be wrong: the quantizer drops a ``Relu`` whose output is
        an unsigned 8-bit tensor (the zero point clips it), so bypassing that pair changes the network.
        """
        excluded, recipe = self._made[Path(candidate)]
        kept = list(dict.fromkeys([*excluded, *layers]))
        if set(self.layers()) <= set(kept):
            return self.onnx_path
        return self.quantize(kept, recipe)

    @property
    def any_spatial_shape(self) -> bool:
        """Whether the ONNX input's spatial dimensions are symbolic (then taps may run on a sub-crop)."""
        dims = self.model.graph.input[0].type.tensor_type.shape.dim[2:]
        return bool(dims) and all(not d.HasField("dim_value") for d in dims)

    def layer_taps(
        self, candidate: Path | None, sample: np.ndarray, layers: Sequence[str]
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per layer, its float input (for a QDQ layer the ``QuantizeLinear``'s input) and its output,
        from one run of a copy of the model with those tensors added as graph outputs."""
        import onnx

        model = self.model if candidate is None else onnx.load(str(candidate))
        model = onnx.ModelProto.FromString(model.SerializeToString())
        producers = {out: node for node in model.graph.node for out in node.output}
        float_producers = {out: node for node in self.model.graph.node for out in node.output}
        float_nodes = {node.name: node for node in self.model.graph.node}
        nodes = {node.name: node for node in model.graph.node}
        names, relu_folded = [], {}
        for layer in layers:
            tensor = nodes[layer].input[0]
            while tensor in producers and producers[tensor].op_type in ("DequantizeLinear", "QuantizeLinear"):
                tensor = producers[tensor].input[0]
            float_input = float_producers.get(float_nodes[layer].input[0])
            # the quantizer drops a Relu whose output it quantizes to u8 (the zero point clips it)
            relu_folded[layer] = (
                tensor != float_nodes[layer].input[0] and getattr(float_input, "op_type", None) == "Relu"
            )
            names += [tensor, nodes[layer].output[0]]
        existing = {output.name for output in model.graph.output}
        for name in dict.fromkeys(names):
            if name not in existing:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
        tapped = session(model.SerializeToString())
        values = dict(zip(names, tapped.run(names, {tapped.get_inputs()[0].name: sample[None]}), strict=True))
        taps = {}
        for i, layer in enumerate(layers):
            tensor_in = values[names[2 * i]]
            taps[layer] = (
                np.maximum(tensor_in, 0) if relu_folded[layer] else tensor_in,
                values[names[2 * i + 1]],
            )
        return taps

    def quantized_layers(self, candidate: Path) -> list[str]:
        """Compute nodes whose weights come quantized (an excluded node may still read a Q/DQ input
        produced for its neighbours, but runs float weights: not an INT8 kernel)."""
        import onnx

        model = onnx.load(str(candidate))
        dequantized = {
            o for node in model.graph.node if node.op_type == "DequantizeLinear" for o in node.output
        }
        return [
            node.name
            for node in model.graph.node
            if node.op_type in COMPUTE_OPS and len(node.input) > 1 and node.input[1] in dequantized
        ]

    def run(
        self,
        candidate: Path | None,
        windows: np.ndarray | Sequence[np.ndarray],
        timings: list[float] | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        path = str(self.onnx_path if candidate is None else candidate)
        if path not in self._sessions:
            # strict FP32 stays loaded; of the candidates only the latest one
            self._sessions = {k: v for k, v in self._sessions.items() if k == str(self.onnx_path)}
            self._sessions[path] = session(path)
        return run_session(self._sessions[path], windows, timings=timings)
