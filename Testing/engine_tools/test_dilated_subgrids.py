"""Dilated convolutions on sub-grids (engines/openvino/dilated.py): the rewrite is exact in FP32 on
static and dynamic shapes of any size, keeps INT8 kernels running on a real NNCF-quantized network,
survives extra outputs tapped off a rewritten layer, and follows the mode the user asks for."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino", reason="OpenVINO not installed (pip install openvino nncf)")

import openvino as ov  # noqa: E402
import openvino.opset13 as ops  # noqa: E402

from engine_tools.engines.openvino.dilated import (  # noqa: E402
    prepare_for_cpu,
    rewrite_dilated_convolutions,
    subgrid_mode,
)
from engine_tools.engines.openvino.runtime import compile_on_cpu, executed_kernels  # noqa: E402

SHAPE = (1, 2, 37, 40, 29)  # no axis a multiple of 8 or 16: exercises the padding and cropping


def _dilated_net(dynamic: bool, channels: int = 2, seed: int = 0) -> ov.Model:
    """conv(d=1) -> conv(d=8) -> conv(d=16) -> conv(d=2), each with bias and ELU, like MeshNet (one
    bias reshaped through a ``ShapeOf``, as an ONNX import leaves it)."""
    rng = np.random.default_rng(seed)
    spatial = [-1, -1, -1] if dynamic else list(SHAPE[2:])
    param = ops.parameter([1, SHAPE[1], *spatial], np.float32)
    x, c_in = param, SHAPE[1]
    for dilation in (1, 8, 16, 2):
        weights = (rng.normal(size=(channels, c_in, 3, 3, 3)) * 0.3).astype(np.float32)
        x = ops.convolution(x, weights, [1] * 3, [dilation] * 3, [dilation] * 3, [dilation] * 3)
        bias = rng.normal(size=(1, channels, 1, 1, 1)).astype(np.float32)
        if dilation == 16:  # as an ONNX import does: the bias reshaped through the output's ShapeOf
            channels_of = ops.gather(ops.shape_of(x), np.array([1]), np.array(0))
            target = ops.concat([np.array([1], np.int64), channels_of, np.array([1, 1, 1], np.int64)], 0)
            bias = ops.reshape(bias.reshape(-1), target, False)
        x = ops.elu(ops.add(x, bias), 1.0)
        c_in = channels
    return ov.Model([x.output(0)], [param])


def _infer(model: ov.Model, x: np.ndarray, hint: str = "f32") -> np.ndarray:
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    return np.asarray(compiled({0: x})[compiled.outputs[0]])


def test_rewrite_is_exact_in_fp32() -> None:
    x = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    model = _dilated_net(dynamic=False)
    expected = _infer(model, x)
    rewritten = rewrite_dilated_convolutions(model)
    assert len(rewritten) == 2  # the dilation-8 and dilation-16 layers; 1 and 2 stay direct
    # one shared split by 8 (the 16 runs as dilation 2 on it): one interleave out, one back
    assert sum(op.get_type_name() == "Transpose" for op in model.get_ops()) == 2
    got = _infer(model, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_tapped_layer_output_is_restored_to_the_volume_layout() -> None:
    """A rewritten layer whose output is also a model output (sensitivity taps) gives that output in
    the original layout, equal to the unrewritten tap."""
    x = np.random.default_rng(2).normal(size=SHAPE).astype(np.float32)
    model = _dilated_net(dynamic=False)
    dilated16 = next(
        op
        for op in model.get_ordered_ops()
        if op.get_type_name() == "Convolution" and list(op.get_attributes()["dilations"]) == [16] * 3
    )
    model.add_outputs([dilated16.output(0)])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    expected = [np.asarray(v) for v in compiled({0: x}).values()]
    rewrite_dilated_convolutions(model)
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = [np.asarray(v) for v in compiled({0: x}).values()]
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(np.abs(e).max()))


def test_int8_model_keeps_int8_kernels_and_its_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    nncf = pytest.importorskip("nncf", reason="NNCF not installed (pip install nncf)")
    rng = np.random.default_rng(3)
    samples = [rng.normal(size=SHAPE).astype(np.float32) for _ in range(2)]
    quantized = nncf.quantize(
        _dilated_net(dynamic=False, channels=16),
        nncf.Dataset(samples),
        subset_size=2,
        preset=nncf.QuantizationPreset.MIXED,
    )
    monkeypatch.setenv("MEDQUANT_DILATED_CONVOLUTIONS", "direct")
    direct, none_rewritten = compile_on_cpu(quantized, {"INFERENCE_PRECISION_HINT": "f32"})
    monkeypatch.setenv("MEDQUANT_DILATED_CONVOLUTIONS", "subgrid")
    subgrid, rewritten = compile_on_cpu(quantized, {"INFERENCE_PRECISION_HINT": "f32"})
    assert none_rewritten == [] and len(rewritten) == 2
    assert (
        executed_kernels(subgrid)["convolutions"]["int8"]
        == executed_kernels(direct)["convolutions"]["int8"]
        >= 3
    )
    # both interleavings move quantized bytes: the next layer's quantizer goes before batch to space
    transposes = [
        op.get_rt_info()["runtimePrecision"].astype(str)
        for op in subgrid.get_runtime_model().get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == "Transpose"
    ]
    assert transposes == ["u8", "u8"], transposes
    expected = np.asarray(direct({0: samples[0]})[direct.outputs[0]])
    got = np.asarray(subgrid({0: samples[0]})[subgrid.outputs[0]])
    # the same integer convolutions; only float rounding of the dequantized tail may differ
    assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.995


def test_dynamic_shapes_are_left_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDQUANT_DILATED_CONVOLUTIONS", "subgrid")
    model = _dilated_net(dynamic=True)
    assert prepare_for_cpu(model, "bf16") == (model, [])


def test_mode_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _dilated_net(dynamic=False)
    monkeypatch.setenv("MEDQUANT_DILATED_CONVOLUTIONS", "direct")
    assert prepare_for_cpu(model, "bf16") == (model, [])
    monkeypatch.setenv("MEDQUANT_DILATED_CONVOLUTIONS", "subgrid")
    prepared, rewritten = prepare_for_cpu(model, "f32")
    assert prepared is not model and len(rewritten) == 2
    assert not any(op.get_type_name() == "Transpose" for op in model.get_ops())  # input untouched
    monkeypatch.setenv("MEDQUANT_DILATED_CONVOLUTIONS", "auto")
    assert prepare_for_cpu(model, "f32") == (model, [])  # FP32 kernels are not slowed by dilation
    monkeypatch.setenv("MEDQUANT_DILATED_CONVOLUTIONS", "fastest")
    with pytest.raises(ValueError, match="auto, subgrid, direct"):
        subgrid_mode()


def _lone_dilation_8_net() -> ov.Model:
    param = ops.parameter(list(SHAPE), np.float32)
    weights = np.random.default_rng(4).normal(size=(2, 2, 3, 3, 3)).astype(np.float32)
    return ov.Model([ops.convolution(param, weights, [1] * 3, [8] * 3, [8] * 3, [8] * 3).output(0)], [param])


def test_auto_mode_rewrites_where_it_was_measured_to_pay(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto``: only on AMX CPUs; BF16 from dilation 8; INT8 only runs reaching dilation 16."""
    from engine_tools.engines.openvino import dilated

    monkeypatch.setenv("MEDQUANT_DILATED_CONVOLUTIONS", "auto")
    monkeypatch.setattr(
        dilated, "cpu_model_and_flags", lambda: ("test CPU", frozenset({"amx_int8", "amx_bf16"}))
    )
    lone = _lone_dilation_8_net()
    assert len(prepare_for_cpu(lone, "bf16")[1]) == 1
    assert prepare_for_cpu(lone, "f32")[1] == []
    monkeypatch.setattr(dilated, "subgrid_precision", lambda model, hint: "int8")
    assert prepare_for_cpu(lone, "bf16")[1] == []  # as an INT8 model: a lone dilation 8 does not pay
    assert len(prepare_for_cpu(_dilated_net(dynamic=False), "bf16")[1]) == 2  # the 8-16 run does
    monkeypatch.undo()
    monkeypatch.setenv("MEDQUANT_DILATED_CONVOLUTIONS", "auto")
    monkeypatch.setattr(dilated, "cpu_model_and_flags", lambda: ("test CPU", frozenset({"avx2"})))
    assert prepare_for_cpu(_dilated_net(dynamic=False), "bf16")[1] == []
