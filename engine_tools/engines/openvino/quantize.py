"""NNCF post-training quantization of an OpenVINO model, as the accuracy guard's OpenVINO adapter.

:class:`NNCFAdapter` implements :class:`engine_tools.guard_adapter.QuantizationAdapter`: ``quantize`` runs
:func:`nncf.quantize` with an ignored scope, ``keep_layers`` bypasses the FakeQuantize of a layer and
restores its FP32 weights (no re-calibration), ``run`` compiles a candidate with the kept layers in
``fallback`` precision. Whole cropped volumes (one sample per scan, shapes differing) are handled on a
clone of the model reshaped to ``[1, C, ?, ?, ?]``: NNCF collects its statistics over any spatial
shape, and the result is reshaped back to the window (:meth:`NNCFAdapter.to_static`) before saving.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine_tools.accuracy import LogitsDigest, sqnr_stride
from engine_tools.engines.base import as_samples
from engine_tools.engines.openvino.class_outputs import with_digest_outputs
from engine_tools.engines.openvino.runtime import compile_model, run_compiled
from engine_tools.engines.openvino.statistics_order import statistics_in_execution_order
from engine_tools.engines.openvino.weight_rounding import layer_hessians, round_weights
from engine_tools.machine import cpu_has_bf16
from engine_tools.sensitivity import centred_crop

#: Calibration methods → NNCF activation range estimators.
CALIBRATION_METHODS = ("minmax", "mean_minmax", "percentile", "histogram")

#: Centred cube of each whole-volume calibration sample whose activations set the GPTQ codes.
WEIGHT_ROUNDING_CROP = 96
#: At most this many calibration samples (evenly spread) set them: one FP32 pass each.
WEIGHT_ROUNDING_SAMPLES = 8

#: Op types that NNCF quantizes in these networks (their inputs get FakeQuantize).
QUANTIZABLE_TYPES = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul")


def default_int8_fallback() -> str:
    """Precision of the layers an INT8 model keeps unquantized: bf16 where native, else f32."""
    return "bf16" if cpu_has_bf16() else "f32"


def default_overflow_fix() -> str:
    """NNCF overflow fix (7-bit weights against u8*s8 saturation on CPUs without VNNI): off.

    Measured on brainchop model18cls, 96^3 windows, an AVX2 CPU without VNNI: 8-bit weights gave logits
    SQNR 26.1 dB / agreement Dice 0.91 against 23.2 dB / 0.86 with 7-bit weights; the guard tries the
    other setting when agreement falls short.
    """
    return "disable"


def quantizable_layers(model: Any) -> list[str]:
    """Friendly names of the ops NNCF quantizes (convolutions), in execution order."""
    return [
        op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in QUANTIZABLE_TYPES
    ]


def multiply_accumulates(op: Any) -> float:
    """Multiply-accumulates of one convolution / matrix product (weights where shapes are dynamic)."""
    kind = op.get_type_name()
    weights = op.input(1).get_partial_shape()
    output = op.output(0).get_partial_shape()
    if not weights.is_static:
        return 0.0
    w = [int(d) for d in weights.to_shape()]
    if not output.is_static:
        return float(np.prod(w))
    out = [int(d) for d in output.to_shape()]
    if kind == "Convolution":
        return float(np.prod(out) * np.prod(w[1:]))
    if kind == "GroupConvolution":
        return float(np.prod(out) * np.prod(w[2:]))
    if kind == "ConvolutionBackpropData":
        return float(np.prod([int(d) for d in op.input(0).get_shape()]) * np.prod(w[1:]))
    inner = [int(d) for d in op.input(0).get_shape()][-1]
    return float(np.prod(out) * inner)


def advanced_parameters(recipe: dict[str, Any], transformer: bool = False) -> Any:
    """NNCF's advanced parameters for a recipe (:meth:`NNCFAdapter.recipe`'s keys; a recipe may also
    set ``bias_correction_threshold`` (apply bias correction to layers NNCF skips) and ``weights_mode``
    ``"asymmetric"``, both studied in ``bench/int8_recipes.py``). ``smooth_quant_alpha`` smooths the
    convolutions, and MatMuls too (NNCF's default alpha) only for a ``transformer`` model."""
    from nncf.quantization.advanced_parameters import (
        AdvancedBiasCorrectionParameters,
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
        QuantizationMode,
        QuantizationParameters,
    )
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    estimators = {
        "minmax": RangeEstimatorParametersSet.MINMAX,
        "mean_minmax": RangeEstimatorParametersSet.MEAN_MINMAX,
        "percentile": RangeEstimatorParametersSet.MEAN_QUANTILE,
        "histogram": RangeEstimatorParametersSet.HISTOGRAM,
    }
    method = recipe["calibration_method"]
    if method not in estimators:
        raise ValueError(
            f"calibration_method must be one of {', '.join(CALIBRATION_METHODS)}, not {method!r}"
        )
    weights_mode = recipe.get("weights_mode", "symmetric")
    if weights_mode not in ("symmetric", "asymmetric"):
        raise ValueError(f"weights_mode must be symmetric or asymmetric, not {weights_mode!r}")
    advanced = AdvancedQuantizationParameters(
        activations_range_estimator_params=estimators[method],
        overflow_fix=OverflowFix(recipe["overflow_fix"]),
        disable_channel_alignment=not recipe.get("channel_alignment", False),
    )
    if weights_mode == "asymmetric":
        advanced.weights_quantization_params = QuantizationParameters(mode=QuantizationMode.ASYMMETRIC)
    if recipe.get("bias_correction_threshold") is not None:
        advanced.bias_correction_params = AdvancedBiasCorrectionParameters(
            threshold=float(recipe["bias_correction_threshold"])
        )
    if recipe.get("smooth_quant_alpha") is not None:
        matmul = AdvancedSmoothQuantParameters().matmul if transformer else -1
        advanced.smooth_quant_alphas = AdvancedSmoothQuantParameters(
            convolution=float(recipe["smooth_quant_alpha"]), matmul=matmul
        )
    return advanced


def dequantize_layers(quantized: Any, original: Any, names: Sequence[str]) -> Any:
    """A copy of ``quantized`` where the named layers take float input and their FP32 weights again.

    The activation FakeQuantize before each layer is bypassed (other consumers keep it) and the
    compressed INT8 weights are replaced by the original FP32 constant of the same layer.
    """
    from openvino import opset13

    edited = quantized.clone()
    originals = {op.get_friendly_name(): op for op in original.get_ordered_ops()}
    ops = {op.get_friendly_name(): op for op in edited.get_ordered_ops()}
    for name in names:
        if name not in ops or name not in originals:
            raise KeyError(f"layer {name!r} not found in the model")
        layer = ops[name]
        source = layer.input_value(0).get_node()
        if source.get_type_name() == "FakeQuantize":
            layer.input(0).replace_source_output(source.input_value(0))
        weights = originals[name].input_value(1).get_node()
        if weights.get_type_name() == "Constant":
            layer.input(1).replace_source_output(opset13.constant(weights.get_data().copy()).output(0))
    edited.validate_nodes_and_infer_types()
    return edited


class NNCFAdapter:
    """The accuracy guard's view of one OpenVINO model quantized by NNCF."""

    compute_measure = "multiply-accumulates"

    def __init__(
        self,
        model: Any,
        calibration: np.ndarray | Sequence[np.ndarray],
        options: dict[str, Any],
        validation: np.ndarray | Sequence[np.ndarray] | None = None,
    ) -> None:
        self.static_model = model
        self.calibration = as_samples(calibration)
        self.options = options
        self.fallback = str(options.get("int8_fallback", default_int8_fallback()))
        self.model = model
        self._hessians: dict[str, np.ndarray] | None = None  # GPTQ's, from the FP32 model (once)
        #: whole cropped volumes (shapes other than the model's window): calibrate, validate and keep
        #: layers on a clone of dynamic spatial shape; :meth:`to_static` fixes a result to the window
        self.dynamic = any(
            tuple(s.shape) != tuple(model.input(0).get_shape()[1:])
            for s in [*self.calibration, *as_samples(validation if validation is not None else [])]
        )
        if self.dynamic:
            from openvino import PartialShape

            self.model = model.clone()
            channels = int(model.input(0).get_shape()[1])
            self.model.reshape({self.model.input(0): PartialShape([1, channels, -1, -1, -1])})

    def to_static(self, candidate: Any) -> Any:
        """``candidate`` reshaped to the window of the model given (a no-op when it already is)."""
        if self.dynamic:
            candidate.reshape({candidate.input(0): self.static_model.input(0).get_partial_shape()})
        return candidate

    def layers(self) -> list[str]:
        return quantizable_layers(self.model)

    def layer_costs(self) -> dict[str, float]:
        """Multiply-accumulates per layer at the window's shape (the dynamic clone has none)."""
        return {
            op.get_friendly_name(): multiply_accumulates(op)
            for op in self.static_model.get_ordered_ops()
            if op.get_type_name() in QUANTIZABLE_TYPES
        }

    def recipe(self, options: dict[str, Any]) -> dict[str, Any]:
        return {
            "calibration_method": str(options.get("calibration_method", "minmax")),
            "preset": str(options.get("preset", "mixed")),
            "fast_bias_correction": bool(options.get("fast_bias_correction", True)),
            "overflow_fix": str(options.get("overflow_fix", default_overflow_fix())),
            "channel_alignment": bool(options.get("channel_alignment", False)),
            "smooth_quant_alpha": options.get("smooth_quant_alpha"),
            "weight_rounding": str(options.get("weight_rounding", "gptq")),
        }

    def better_recipes(self, recipe: dict[str, Any]) -> list[dict[str, Any]]:
        """Measured on the brainchop MeshNets: global min/max beats percentile/histogram ranges (the
        networks use their large activations) and asymmetric activations (mixed preset) matter most,
        so only two candidates: full bias correction with mean min/max, and the other overflow fix."""
        other_fix = "enable" if recipe["overflow_fix"] == "disable" else "disable"
        candidates = [
            {**recipe, "calibration_method": "mean_minmax", "fast_bias_correction": False},
            {**recipe, "overflow_fix": other_fix},
        ]
        return [candidate for candidate in candidates if candidate != recipe]

    def quantize(self, excluded: Sequence[str], recipe: dict[str, Any]) -> Any:
        import nncf

        dataset = nncf.Dataset([sample[None] for sample in self.calibration])
        patterns = list(self.options.get("keep_higher_precision_patterns", []))
        scope = None
        if excluded or patterns:
            scope = nncf.IgnoredScope(names=list(excluded), patterns=patterns, validate=False)
        # NNCF runs SmoothQuant only for ModelType.TRANSFORMER; on the MeshNets that type alone
        # changes nothing else (bench/results/int8_recipes_recipes.md), so a convolution alpha uses it
        transformer = self.options.get("model_type") == "transformer"
        smoothed = recipe.get("smooth_quant_alpha") is not None
        outputs = frozenset(name for output in self.model.outputs for name in output.get_names())
        with statistics_in_execution_order(drop_outputs=outputs):
            quantized = nncf.quantize(
                self.model.clone(),
                dataset,
                preset=nncf.QuantizationPreset(recipe["preset"]),
                subset_size=len(self.calibration),
                fast_bias_correction=recipe["fast_bias_correction"],
                model_type=nncf.ModelType.TRANSFORMER if transformer or smoothed else None,
                ignored_scope=scope,
                advanced_parameters=advanced_parameters(recipe, transformer),
            )
        rounding = recipe.get("weight_rounding", "nearest")
        if rounding == "gptq":  # data-aware INT8 weight codes (weight_rounding.py)
            if self._hessians is None:  # a window-shaped model keeps its shape (transformers need it)
                picked = np.unique(np.linspace(0, len(self.calibration) - 1, WEIGHT_ROUNDING_SAMPLES).round())
                samples = [self.calibration[int(i)] for i in picked]
                if self.dynamic:
                    samples = [centred_crop(s, WEIGHT_ROUNDING_CROP) for s in samples]
                self._hessians = layer_hessians(self.model, samples)
            round_weights(quantized, self.model, self._hessians)
        elif rounding != "nearest":
            raise ValueError(f"weight_rounding must be gptq or nearest, not {rounding!r}")
        return quantized

    def keep_layers(self, candidate: Any, layers: Sequence[str]) -> Any:
        """``candidate`` with ``layers`` back in float; all layers: the FP32 model itself (no
        FakeQuantize left on other ops either, so a fully higher-precision engine really is one)."""
        if set(self.layers()) <= set(layers):
            return self.model.clone()
        return dequantize_layers(candidate, self.model, layers)

    #: taps run on a clone reshaped to the sample (a sub-crop of a whole volume, or the window)
    any_spatial_shape = True

    def layer_taps(
        self, candidate: Any | None, sample: np.ndarray, layers: Sequence[str]
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per layer, its float input (for an INT8 layer the FakeQuantize's input) and its output, from
        one pass of a clone with those tensors added as outputs (``candidate`` None: strict FP32)."""
        from openvino import PartialShape

        model = (self.model if candidate is None else candidate).clone()
        ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
        taps = []
        for name in layers:
            source = ops[name].input_value(0)
            if source.get_node().get_type_name() == "FakeQuantize":
                source = source.get_node().input_value(0)
            taps += [source, ops[name].output(0)]
        first = len(model.outputs)
        model.add_outputs(taps)
        model.reshape({model.input(0): PartialShape([1, *sample.shape])})
        compiled = compile_model(model, "f32" if candidate is None else self.fallback)
        result = compiled.create_infer_request().infer({0: np.ascontiguousarray(sample[None])})
        values = [result[compiled.outputs[first + i]] for i in range(len(taps))]
        return {name: (values[2 * i], values[2 * i + 1]) for i, name in enumerate(layers)}

    def quantized_layers(self, candidate: Any) -> list[str]:
        return [
            op.get_friendly_name()
            for op in candidate.get_ordered_ops()
            if op.get_type_name() in QUANTIZABLE_TYPES
            and op.input_value(0).get_node().get_type_name() == "FakeQuantize"
        ]

    def run(
        self,
        candidate: Any | None,
        windows: np.ndarray | Sequence[np.ndarray],
        timings: list[float] | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        """Run samples through strict FP32 (``candidate`` None) or a candidate, compiled once per
        sample shape at that static shape (dilated convolutions then run on sub-grids where faster,
        see :mod:`engine_tools.engines.openvino.dilated`)."""
        requests: dict[tuple[int, ...], Any] = {}
        outputs = []
        for sample in as_samples(windows):
            shape = (1, *sample.shape)
            if shape not in requests:
                compiled = compile_model(self._static(candidate, shape), self._hint(candidate))
                requests[shape] = compiled.create_infer_request()
            # each sample's logits land in an array of its own (a new request's first run writes
            # straight into it: no copy of a whole volume's logits)
            outputs.append(run_compiled(requests[shape], sample[None], timings=timings, write_in_place=True))
        return np.concatenate(outputs, axis=0) if isinstance(windows, np.ndarray) else outputs

    def run_digests(
        self,
        candidate: Any | None,
        samples: np.ndarray | Sequence[np.ndarray],
        timings: list[float] | None = None,
    ) -> list[LogitsDigest]:
        """What :meth:`run` gives, as the guard's digests (:class:`~engine_tools.accuracy.LogitsDigest`)
        computed in the graph (:func:`~engine_tools.engines.openvino.class_outputs.with_digest_outputs`):
        a whole volume's logits are never held, in OpenVINO's memory or in ours."""
        requests: dict[tuple[int, ...], tuple[Any, int, int]] = {}
        found = []
        for sample in as_samples(samples):
            shape = (1, *sample.shape)
            if shape not in requests:
                model = self._static(candidate, shape)
                logits = tuple(model.output(0).get_shape())
                stride = sqnr_stride(logits)
                compiled = compile_model(with_digest_outputs(model, stride), self._hint(candidate))
                requests[shape] = (compiled.create_infer_request(), stride, int(logits[1]))
            request, stride, classes = requests[shape]
            start = time.perf_counter()
            result = request.infer({0: np.ascontiguousarray(sample[None])})
            labels, sampled = (np.array(result[port]) for port in request.model_outputs)
            if timings is not None:
                timings.append(time.perf_counter() - start)
            found.append(LogitsDigest(labels[:, 0], sampled.astype(np.float32), stride, classes))
        return found

    def _hint(self, candidate: Any | None) -> str:
        """Inference precision: strict FP32 for the FP32 model, the fallback for a candidate's kept layers."""
        return "f32" if candidate is None else self.fallback

    def _static(self, candidate: Any | None, shape: tuple[int, ...]) -> Any:
        """A clone of ``candidate`` (None: the FP32 model) reshaped to the static ``shape``."""
        from openvino import PartialShape

        model = (self.model if candidate is None else candidate).clone()
        model.reshape({model.input(0): PartialShape(list(shape))})
        return model
