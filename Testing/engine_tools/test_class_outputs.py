"""A whole volume's class outputs computed in the graph, slab by slab through the network's pointwise
head: labels equal to the arg-max of the whole logits, sampled logits equal to the logits sampled,
no op left that writes the whole logits, and the guard's in-graph digests equal to its digests of
the logits (strict FP32 exactly; a real NNCF INT8 network on a real MRI equal whether split or not)."""

from __future__ import annotations

import numpy as np
import pytest
from shared_data import shared_path

from engine_tools import accuracy

ov = pytest.importorskip("openvino", reason="OpenVINO not installed (pip install openvino nncf)")
import openvino.opset13 as ops  # noqa: E402

from engine_tools.engines.openvino import class_outputs  # noqa: E402
from engine_tools.engines.openvino.class_outputs import (  # noqa: E402
    pointwise_head,
    with_argmax_output,
    with_digest_outputs,
)

SHAPE = (1, 2, 12, 10, 11)
CLASSES = 7


def _network(head: bool = True) -> object:
    """3x3x3 convolution, ReLU, then (``head``) a 1x1x1 convolution to ``CLASSES`` plus a bias, or
    (not ``head``) a second 3x3x3 convolution straight to the classes."""
    rng = np.random.default_rng(0)
    param = ops.parameter(list(SHAPE), np.float32)
    hidden = ops.relu(
        ops.convolution(
            param, rng.normal(size=(5, 2, 3, 3, 3)).astype(np.float32), [1] * 3, [1] * 3, [1] * 3, [1] * 3
        )
    )
    if head:
        weights = rng.normal(size=(CLASSES, 5, 1, 1, 1)).astype(np.float32)
        conv = ops.convolution(hidden, weights, [1] * 3, [0] * 3, [0] * 3, [1] * 3)
        logits = ops.add(conv, rng.normal(size=(1, CLASSES, 1, 1, 1)).astype(np.float32))
    else:
        weights = rng.normal(size=(CLASSES, 5, 3, 3, 3)).astype(np.float32)
        logits = ops.convolution(hidden, weights, [1] * 3, [1] * 3, [1] * 3, [1] * 3)
    return ov.Model([logits.output(0)], [param])


def _run(model: object, volume: np.ndarray) -> list[np.ndarray]:
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled({0: volume})
    return [np.array(result[port]) for port in compiled.outputs]


def _full_logit_writers(model: object) -> list[str]:
    """Ops other than the result whose output has the whole logits' shape."""
    return [
        op.get_type_name()
        for op in model.get_ordered_ops()
        if op.get_type_name() != "Result"
        and op.get_output_size() == 1
        and tuple(op.get_output_partial_shape(0)) == (1, CLASSES, *SHAPE[2:])
    ]


@pytest.mark.parametrize("head", [True, False])
def test_slabs_give_the_whole_arg_max_and_sampled_logits(head: bool) -> None:
    volume = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    (logits,) = _run(_network(head), volume)
    assert (pointwise_head(_network(head)) is not None) == head
    slab = 4 * CLASSES * 10 * 11 * 3  # logits of three slices: 12 slices -> 4 slabs
    split = with_argmax_output(_network(head), slab)
    splits = [op for op in split.get_ops() if op.get_type_name() == "VariadicSplit"]
    assert len(splits) == 1 and len(splits[0].outputs()) == 4
    # with a pointwise head the split comes before it: no op writes the whole logits
    assert (_full_logit_writers(split) == []) == head, _full_logit_writers(split)
    (labels,) = _run(split, volume)
    assert np.array_equal(labels[:, 0], logits.argmax(axis=1))

    for stride in (1, 3):
        labels, sampled = _run(with_digest_outputs(_network(head), stride, slab), volume)
        assert labels.dtype == np.uint8 and np.array_equal(labels[:, 0], logits.argmax(axis=1))
        np.testing.assert_allclose(sampled, logits[:, :, ::stride, ::stride, ::stride], rtol=1e-5, atol=1e-5)


def test_guard_digests_in_the_graph_equal_digests_of_the_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """brainchop model18cls on a crop of the real T1: strict FP32 and its NNCF INT8 candidate (kept
    layers in BF16 where native). FP32: the in-graph digest is the logits' digest, split or not. INT8:
    split or not, the same digest (what the engine's segmentation computes, :func:`with_argmax_output`),
    within a few label flips of the digest of its whole logits (the CPU plugin rounds those, written out,
    to the fallback precision)."""
    pytest.importorskip("nncf")
    import SimpleITK as sitk

    from engine_tools.engines.openvino.quantize import NNCFAdapter, default_int8_fallback
    from engine_tools.networks import export_onnx
    from engine_tools.registry import get_card

    image = sitk.ReadImage(str(shared_path("data", "mri", "t1_crop.nii.gz")))
    array = sitk.GetArrayFromImage(image).astype(np.float32)[::3, ::3, ::3]
    volume = ((array - array.min()) / (array.max() - array.min()))[None, 8:48, 10:52, 8:50].copy()
    card = get_card("brainchop-model18cls")
    onnx_path = export_onnx(card, weights_dir=shared_path("models", "brainchop", "model18cls"))
    model = ov.Core().read_model(str(onnx_path))
    model.reshape({model.input(0): ov.PartialShape([1, 1, 32, 32, 32])})
    options = {"fully_convolutional": True, "int8_fallback": default_int8_fallback()}
    adapter = NNCFAdapter(model, [volume], options, [volume])
    candidate = adapter.quantize([], adapter.recipe(options))
    assert [op.get_type_name() for op in pointwise_head(candidate).ops] == ["Convolution", "Add"]

    reference = accuracy.digests(adapter.run(None, [volume]))
    whole_int8 = accuracy.digests(adapter.run(candidate, [volume]))
    found = {}
    for slab in (2**30, 4 * 18 * volume[0, 0].size // 10):  # one slab, ten slabs
        monkeypatch.setattr(class_outputs, "SLAB_BYTES", slab)
        timings: list[float] = []
        found[slab] = [adapter.run_digests(None, [volume]), adapter.run_digests(candidate, [volume], timings)]
        assert len(timings) == 1 and timings[0] > 0
        fp32 = found[slab][0][0]
        assert np.array_equal(fp32.labels, reference[0].labels) and fp32.stride == reference[0].stride
        np.testing.assert_allclose(fp32.sampled, reference[0].sampled, rtol=1e-5, atol=1e-4)
    one, ten = found.values()
    assert np.array_equal(one[1][0].labels, ten[1][0].labels)
    assert accuracy.digest_agreement(whole_int8, one[1])["mean"] > 0.99
    agreement = accuracy.digest_agreement(reference, ten[1], min_voxels=100)
    assert 0.8 < agreement["mean"] < 1.0 and 15 < agreement["sqnr_db"] < 40  # INT8 noise, not FP32
