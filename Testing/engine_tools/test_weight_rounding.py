"""GPTQ weight codes for NNCF's INT8 convolutions (engines/openvino/weight_rounding.py): the layer's
output error falls below round-to-nearest's, the codes stay on NNCF's grid, and a real quantized
network agrees better with FP32 on inputs calibration never saw."""

from __future__ import annotations

import copy

import numpy as np
import pytest

pytest.importorskip("nncf", reason="NNCF not installed (pip install openvino nncf)")

import openvino as ov  # noqa: E402
import openvino.opset13 as ops  # noqa: E402

from engine_tools.engines.openvino import weight_rounding  # noqa: E402
from engine_tools.engines.openvino.quantize import NNCFAdapter  # noqa: E402
from engine_tools.engines.openvino.weight_rounding import (  # noqa: E402
    _compressed_weights,
    gptq_codes,
    layer_hessians,
    sampled_columns,
)


def test_gptq_codes_lower_the_output_error_of_correlated_inputs() -> None:
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(54, 54))
    columns = mixing @ rng.normal(size=(54, 4000))  # correlated inputs, as neighbouring voxels are
    weights = rng.normal(size=(8, 54))
    scale = np.abs(weights).max(axis=1) / 127
    hessian = columns @ columns.T / columns.shape[1]
    nearest = np.clip(np.round(weights / scale[:, None]), -127, 127)
    codes = gptq_codes(weights, scale, hessian, -127, 127)
    assert codes.min() >= -127 and codes.max() <= 127 and np.array_equal(codes, np.round(codes))

    def error(c: np.ndarray) -> float:
        return float(np.sum(((weights - c * scale[:, None]) @ columns) ** 2))

    assert error(codes) < 0.7 * error(nearest)


def test_sampled_columns_are_the_convolution_inputs_and_the_graph_pools_their_hessian(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A convolution computed from the gathered columns equals OpenVINO's own at the sampled voxels,
    and the Hessian computed in the graph is those columns' ``X X^T / P``, pooled over samples."""
    rng = np.random.default_rng(1)
    activations = [rng.normal(size=(2, 9, 10, 11)).astype(np.float32) for _ in range(2)]
    weights = rng.normal(size=(3, 2, 3, 3, 3)).astype(np.float32)
    param = ops.parameter([1, 2, 9, 10, 11], np.float32)
    conv = ops.convolution(param, weights, [1] * 3, [2] * 3, [2] * 3, [2] * 3)
    model = ov.Model([conv.output(0)], [param])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    pads, expected_hessian = [(2, 2)] * 3, 0.0
    chosen = np.random.default_rng(0)
    for activation in activations:
        full = compiled({0: activation[None]})[0][0]
        replay = copy.deepcopy(chosen)  # the same random centres, to find the convolution's outputs
        index = sampled_columns((9, 10, 11), (3, 3, 3), (2, 2, 2), pads, 400, chosen)
        columns = np.pad(activation, [(0, 0), *pads]).reshape(2, -1)[:, index].reshape(2 * 27, -1)
        assert columns.shape == (54, 400)
        centres = replay.choice(full[0].size, size=400, replace=False)
        np.testing.assert_allclose(
            weights.reshape(3, -1) @ columns, full.reshape(3, -1)[:, centres], rtol=1e-4, atol=1e-4
        )
        expected_hessian = expected_hessian + columns.astype(np.float64) @ columns.T.astype(np.float64)
    monkeypatch.setattr(weight_rounding, "POSITIONS", 800)  # 400 per sample, as above
    (hessian,) = layer_hessians(model, activations, seed=0).values()
    np.testing.assert_allclose(hessian, expected_hessian / 800, rtol=1e-4, atol=1e-4)


def _chain(seed: int = 0) -> ov.Model:
    rng = np.random.default_rng(seed)
    param = ops.parameter([1, 1, 24, 24, 24], np.float32, name="input")
    x, c_in = param, 1
    for dilation in (1, 2, 4, 2, 1):
        w = (rng.standard_t(3, size=(12, c_in, 3, 3, 3)) * 0.3).astype(np.float32)  # heavy-tailed
        x = ops.convolution(x, w, [1] * 3, [dilation] * 3, [dilation] * 3, [dilation] * 3)
        x = ops.elu(ops.add(x, rng.normal(size=(1, 12, 1, 1, 1)).astype(np.float32)), 1.0)
        c_in = 12
    head = ops.convolution(
        x, rng.normal(size=(5, 12, 1, 1, 1)).astype(np.float32), [1] * 3, [0] * 3, [0] * 3, [1] * 3
    )
    return ov.Model([head.output(0)], [param])


def test_a_quantized_network_agrees_better_with_fp32_on_unseen_inputs() -> None:
    from engine_tools.accuracy import sqnr_db

    rng = np.random.default_rng(3)
    smooth = [np.cumsum(rng.normal(size=(1, 24, 24, 24)), axis=1).astype(np.float32) / 5 for _ in range(3)]
    adapter = NNCFAdapter(_chain(), smooth[:2], {"int8_fallback": "f32"})
    recipe = adapter.recipe({})
    assert recipe["weight_rounding"] == "gptq"  # the default
    nearest = adapter.quantize([], {**recipe, "weight_rounding": "nearest"})
    rounded = adapter.quantize([], recipe)
    reference = adapter.run(None, smooth[2:])
    # same grid: the same per-channel scales, other codes
    changed = 0
    for a, b in zip(nearest.get_ordered_ops(), rounded.get_ordered_ops(), strict=True):
        if a.get_type_name() == "Convolution" and _compressed_weights(a) is not None:
            (_, codes_a, scale_a), (_, codes_b, scale_b) = _compressed_weights(a), _compressed_weights(b)
            assert np.array_equal(scale_a, scale_b) and np.abs(codes_b).max() <= 127
            changed += int(not np.array_equal(codes_a, codes_b))
    assert changed >= 4
    assert sqnr_db(reference, adapter.run(rounded, smooth[2:])) > sqnr_db(
        reference, adapter.run(nearest, smooth[2:])
    )
    with pytest.raises(ValueError, match="weight_rounding"):
        adapter.quantize([], {**recipe, "weight_rounding": "stochastic"})
    assert len(layer_hessians(adapter.model, smooth[:1])) == 6


def test_weights_nncf_scaled_for_smooth_quant_keep_their_codes() -> None:
    """SmoothQuant rescales a layer's weights: their codes are not the nearest ones of the FP32
    weights, so GPTQ leaves them (its target would be the wrong weights)."""
    rng = np.random.default_rng(4)
    samples = [np.cumsum(rng.normal(size=(1, 24, 24, 24)), axis=1).astype(np.float32) / 5 for _ in range(2)]
    adapter = NNCFAdapter(_chain(), samples, {"int8_fallback": "f32"})
    recipe = {**adapter.recipe({}), "smooth_quant_alpha": 0.5}
    smoothed = adapter.quantize([], {**recipe, "weight_rounding": "nearest"})
    rounded = adapter.quantize([], recipe)
    for a, b in zip(smoothed.get_ordered_ops(), rounded.get_ordered_ops(), strict=True):
        if a.get_type_name() == "Convolution" and _compressed_weights(a) is not None:
            assert np.array_equal(_compressed_weights(a)[1], _compressed_weights(b)[1])
