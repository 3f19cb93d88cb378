"""NNCF's statistics pass in execution order (engines/openvino/statistics_order.py): reductions added as
extra outputs run right after the tensor they read (OpenVINO's runtime order says so), outputs are
unchanged, and a real NNCF quantization gives bit-identical constants with less memory held."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

pytest.importorskip("nncf", reason="NNCF not installed (pip install openvino nncf)")

import nncf  # noqa: E402
import openvino as ov  # noqa: E402
import openvino.opset13 as ops  # noqa: E402
from nncf.openvino.engine import OVNativeEngine  # noqa: E402

from engine_tools.engines.openvino.statistics_order import (  # noqa: E402
    results_in_execution_order,
    statistics_in_execution_order,
)

SHAPE = (1, 1, 20, 22, 18)


def _conv_chain(seed: int = 0, layers: int = 4) -> ov.Model:
    """A MeshNet-like chain: convolutions (dilations 1, 2, 4, ...) with bias and ELU, then a 1x1 head."""
    rng = np.random.default_rng(seed)
    param = ops.parameter(list(SHAPE), np.float32, name="input")
    x, c_in = param, 1
    for layer in range(layers):
        dilation = 2**layer
        weights = (rng.normal(size=(4, c_in, 3, 3, 3)) * 0.4).astype(np.float32)
        x = ops.convolution(x, weights, [1] * 3, [dilation] * 3, [dilation] * 3, [dilation] * 3)
        x = ops.elu(ops.add(x, rng.normal(size=(1, 4, 1, 1, 1)).astype(np.float32)), 1.0)
        c_in = 4
    head = ops.convolution(
        x, rng.normal(size=(3, 4, 1, 1, 1)).astype(np.float32), [1] * 3, [0] * 3, [0] * 3, [1] * 3
    )
    head.output(0).set_names({"logits"})
    return ov.Model([head.output(0)], [param])


def _with_reductions(model: ov.Model) -> ov.Model:
    """As NNCF's statistics model: a min and a max of every ELU output appended after the outputs."""
    axes = np.array([0, 1, 2, 3, 4], np.int64)
    extra = []
    for index, op in enumerate(op for op in model.get_ordered_ops() if op.get_type_name() == "Elu"):
        for kind, reduce in (("min", ops.reduce_min), ("max", ops.reduce_max)):
            reduced = reduce(op.output(0), axes, True)
            reduced.output(0).set_names({f"{kind}{index}"})
            extra.append(ops.result(reduced))
    model.add_results(extra)
    return model


def _runtime_order(compiled: ov.CompiledModel) -> list[str]:
    runtime = compiled.get_runtime_model()
    order = sorted(
        (int(op.get_rt_info()["execOrder"].astype(str)), op.get_rt_info()["layerType"].astype(str))
        for op in runtime.get_ordered_ops()
    )
    return [kind for _, kind in order if kind in ("Convolution", "Reduce")]


def test_reductions_run_right_after_the_tensor_they_read_and_outputs_stay_equal() -> None:
    x = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    core = ov.Core()
    appended = core.compile_model(_with_reductions(_conv_chain()), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ordered_model = results_in_execution_order(_with_reductions(_conv_chain()))
    ordered = core.compile_model(ordered_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    # as NNCF appends them: the network runs to its end before the first reduction
    assert _runtime_order(appended) == ["Convolution"] * 5 + ["Reduce"] * 8
    # in execution order: each activation's two reductions follow the convolution that made it
    assert _runtime_order(ordered) == ["Convolution", "Reduce", "Reduce"] * 4 + ["Convolution"]
    assert ordered_model.outputs[-1].get_names() == {"logits"}  # the network's own output comes last
    expected, got = appended({0: x}), ordered({0: x})
    values = {name: got[out] for out in ordered.outputs for name in out.get_names()}
    assert len(values) == len(appended.outputs) == 9
    for out in appended.outputs:
        np.testing.assert_array_equal(expected[out], values[out.get_any_name()])


def test_model_already_in_order_is_returned_as_is() -> None:
    model = _conv_chain()
    assert results_in_execution_order(model) is model


@contextmanager
def _engines_seen() -> Iterator[tuple[list[list[str]], object]]:
    """The output names of every model NNCF compiles for inference while the block runs (and the spy
    that records them, installed as ``OVNativeEngine.__init__``)."""
    seen: list[list[str]] = []
    original = OVNativeEngine.__init__

    def spy(self, model, *args, **kwargs):
        seen.append([next(iter(out.get_names()), "") for out in model.outputs])
        original(self, model, *args, **kwargs)

    OVNativeEngine.__init__ = spy
    try:
        yield seen, spy
    finally:
        OVNativeEngine.__init__ = original


def _constants(model: ov.Model) -> list[np.ndarray]:
    return [op.get_data().copy() for op in model.get_ordered_ops() if op.get_type_name() == "Constant"]


def test_nncf_quantization_is_bit_identical_with_the_statistics_in_execution_order() -> None:
    rng = np.random.default_rng(2)
    data = nncf.Dataset([rng.normal(size=SHAPE).astype(np.float32) for _ in range(2)])
    settings = {"preset": nncf.QuantizationPreset.MIXED, "subset_size": 2, "fast_bias_correction": True}
    with _engines_seen() as (seen, spy):
        plain = nncf.quantize(_conv_chain(), data, **settings)
        appended_order, seen[:] = list(seen), []
        with statistics_in_execution_order():
            ordered = nncf.quantize(_conv_chain(), data, **settings)
            assert OVNativeEngine.__init__ is not spy
        assert OVNativeEngine.__init__ is spy  # restored after the block
    assert appended_order and appended_order[0][0] == "logits"  # NNCF appends after the output...
    assert seen and seen[0][-1] == "logits" and len(seen[0]) == len(appended_order[0])  # ...moved last
    assert sum(op.get_type_name() == "FakeQuantize" for op in ordered.get_ordered_ops()) >= 5
    for before, after in zip(_constants(plain), _constants(ordered), strict=True):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("fast_bias_correction", [True, False])
def test_the_network_output_left_out_of_the_statistics_pass_changes_no_constant(fast_bias_correction) -> None:
    """The statistics never read the network's own output: without it (a 104-class network's 4-7 GB of
    whole-volume logits, held and copied by the pass) every constant is the same, with fast or full
    bias correction (whose sub-models keep their single output)."""
    rng = np.random.default_rng(3)
    data = nncf.Dataset([rng.normal(size=SHAPE).astype(np.float32) for _ in range(2)])
    settings = {
        "preset": nncf.QuantizationPreset.MIXED,
        "subset_size": 2,
        "fast_bias_correction": fast_bias_correction,
    }
    with _engines_seen() as (seen, _):
        with statistics_in_execution_order():
            kept = nncf.quantize(_conv_chain(), data, **settings)
        with_output, seen[:] = list(seen), []
        with statistics_in_execution_order(drop_outputs=frozenset({"logits"})):
            dropped = nncf.quantize(_conv_chain(), data, **settings)
    assert "logits" in with_output[0] and len(with_output[0]) > 1  # the statistics model
    assert "logits" not in seen[0] and len(seen[0]) == len(with_output[0]) - 1
    assert dropped.outputs[0].get_names() == {"logits"}  # the quantized network keeps its output
    for before, after in zip(_constants(kept), _constants(dropped), strict=True):
        np.testing.assert_array_equal(before, after)
