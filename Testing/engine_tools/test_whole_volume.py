"""One pass over the whole (cropped) volume for fully convolutional MeshNets: the sliding windows'
labels wherever no window border cuts a voxel's receptive field, exact to a direct PyTorch pass, crop-invariant, and the
OpenVINO engine runs it reshaped with its compiled blobs cached."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from shared_data import shared_path

from engine_tools.accuracy import agreement_dice
from engine_tools.engines.torch_engine import TorchEngine
from engine_tools.pipeline import prepare_engine
from engine_tools.registry import ModelCard, get_card
from engine_tools.segment import segment_image
from engine_tools.volumes import preprocess, read_image
from engine_tools.whole_volume import (
    Crop,
    aligned,
    foreground_crop,
    plan_crop,
    receptive_radius,
    whole_volume_applies,
)

SPACING = 2.5  # mm: the real T1 becomes ~103^3 voxels, small enough for a quick CPU test
WINDOW = 80


def coarse_card(**window: object) -> ModelCard:
    """The real model11_gw_ae card (receptive field 49) on a coarser grid with a smaller window."""
    card = get_card("brainchop-model11_gw_ae")
    prep = {k: v for k, v in card.raw["preprocessing"].items() if k != "shape"}
    raw = {
        **card.raw,
        "preprocessing": {**prep, "spacing": [SPACING] * 3},
        "window": {**card.raw["window"], "size": [WINDOW] * 3, **window},
    }
    return ModelCard.from_dict(raw, card.path)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import os

    os.environ["MEDQUANT_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    card = coarse_card()
    torch_engine = prepare_engine(
        card, backend="torch", precision="fp32", weights_dir=shared_path("models", "brainchop")
    )
    image = read_image(shared_path("data", "mri", "t1_crop.nii.gz"))
    # 60 mm of air around the head, as a scanner's field of view leaves it, for the crop to remove
    prep = preprocess(sitk.ConstantPad(image, (60,) * 3, (60,) * 3, 0), card)
    # native 1 mm, a 112^3 block from the middle of the head (tissue up to its faces: the hardest
    # case for sliding windows, whose borders otherwise lie in air)
    block = image[72:184, 72:184, 72:184]
    native = get_card("brainchop-model11_gw_ae").raw
    native = {**native, "preprocessing": {k: v for k, v in native["preprocessing"].items() if k != "shape"}}
    prep_native = preprocess(block, ModelCard.from_dict(native))
    return {"card": card, "torch": torch_engine, "prep": prep, "native": prep_native}


def context_complete(shape: tuple[int, ...], card: ModelCard) -> np.ndarray:
    """Voxels that every sliding window covering them sees with its whole receptive field (a window
    border on the volume's own face is no border: the one pass pads there with the same zeros)."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    roi = tuple(card.window_size)
    radius = receptive_radius(card)
    interval = _get_scan_interval(shape, roi, 3, (float(card.window["overlap"]),) * 3)
    starts = {tuple(s.start for s in window) for window in dense_patch_slices(shape, roi, interval)}
    masks = []
    for axis, (size, width) in enumerate(zip(shape, roi, strict=True)):
        free = np.ones(size, dtype=bool)
        for start in {s[axis] for s in starts}:
            offsets = np.arange(size) - start
            inside = (offsets >= 0) & (offsets < width)
            left_ok = (offsets >= radius) | (start == 0)
            right_ok = (width - 1 - offsets >= radius) | (start + width == size)
            free &= ~inside | (left_ok & right_ok)
        masks.append(free)
    return masks[0][:, None, None] & masks[1][None, :, None] & masks[2][None, None, :]


def labels(result) -> np.ndarray:
    return np.asarray(result.network_labels)


def test_cards_say_which_networks_run_whole(case: dict) -> None:
    assert whole_volume_applies(get_card("brainchop-model18cls"), case["torch"])
    assert whole_volume_applies(get_card("brainchop-model21_104class"), case["torch"])
    # per-window GroupNorm statistics (mindgrab) and whole-input z-scoring (deepbet) are not crop-invariant
    assert not whole_volume_applies(get_card("brainchop-mindgrab"), case["torch"])
    assert not whole_volume_applies(get_card("deepbet-brain"), case["torch"])


def test_whole_volume_matches_windows_and_a_direct_torch_pass(
    case: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    card, engine, prep = case["card"], case["torch"], case["native"]
    assert isinstance(engine, TorchEngine) and prep.spatial_shape == (112, 112, 112)
    whole = segment_image(engine, coarse_card(crop_foreground=False), prep, whole_volume=True)
    windows = segment_image(engine, card, prep, whole_volume=False)
    assert whole.timings["mode"] == "whole_volume" and whole.timings["num_windows"] == 1
    assert windows.timings["num_windows"] == 8
    # a window's outer voxels (the receptive-field radius) see zeros instead of their context where
    # the window border lies inside the volume: the blend mixes those in. Wherever every window
    # covering a voxel sees its full context, the sliding windows must give the one pass's labels
    free = context_complete(prep.spatial_shape, card)
    assert 0.05 < free.mean() < 1.0, free.mean()
    agreement = agreement_dice(labels(windows)[free], labels(whole)[free], card.num_classes)
    assert agreement["mean"] >= 0.999, agreement
    everywhere = agreement_dice(labels(windows), labels(whole), card.num_classes)
    assert everywhere["mean"] < agreement["mean"]  # the border effects are real, and only there
    with torch.inference_mode():
        direct = engine._module(torch.from_numpy(prep.array[None])).argmax(1)[0].numpy()
    np.testing.assert_array_equal(labels(whole), direct)
    # PyTorch takes the arg-max itself (no float logits leave it), the MeshNet's 1x1x1 output layer
    # slab by slab: NumPy's arg-max of its logits, in one slab or in 1-slice slabs
    from engine_tools.engines import torch_engine

    body, head = torch_engine.pointwise_split(engine._module)
    assert isinstance(head[0], torch.nn.Conv3d) and len(body) + len(head) == len(engine._module)
    expected = engine.run(prep.array[None]).argmax(axis=1)
    for slab in (torch_engine.SLAB_BYTES, 1):
        monkeypatch.setattr(torch_engine, "SLAB_BYTES", slab)
        found, channels = engine.run_labels(prep.array[None])
        assert found.dtype == np.uint8 and channels == card.num_classes
        np.testing.assert_array_equal(found, expected)


def test_foreground_crop_keeps_the_labels(case: dict) -> None:
    card, engine, prep = case["card"], case["torch"], case["prep"]
    crop = plan_crop(card, prep.array)
    assert np.prod(crop.shape) < 0.8 * np.prod(prep.spatial_shape), crop
    assert foreground_crop(prep.array, 0).shape < crop.shape
    cropped = segment_image(engine, card, prep)
    full = segment_image(engine, coarse_card(crop_foreground=False), prep, whole_volume=True)
    assert cropped.timings["crop"]["shape"] == list(crop.shape)
    agreement = agreement_dice(labels(full), labels(cropped), card.num_classes)
    assert agreement["mean"] >= 0.999, agreement


def test_crops_grow_to_a_multiple_of_eight_inside_the_grid(case: dict) -> None:
    grid = (256, 256, 40)
    grown = aligned(Crop((8, 0, 3), (247, 255, 40)), 8, grid)
    assert grown == Crop((8, 0, 0), (248, 256, 40))  # past the end where there is room, else before
    assert aligned(Crop((0, 0, 0), (37, 10, 16)), 8, (37, 12, 16)) == Crop((0, 0, 0), (37, 12, 16))
    crop = plan_crop(case["card"], case["prep"].array)
    assert all(
        size % 8 == 0 or size == full
        for size, full in zip(crop.shape, case["prep"].spatial_shape, strict=True)
    )


def test_openvino_runs_the_whole_volume_reshaped_with_cached_blobs(case: dict) -> None:
    pytest.importorskip("openvino", reason="OpenVINO not installed (pip install openvino nncf)")
    from engine_tools.cache import cache_root

    card, prep = case["card"], case["prep"]
    engine = prepare_engine(
        card, backend="openvino", precision="fp32", weights_dir=shared_path("models", "brainchop")
    )
    result = segment_image(engine, card, prep)
    reference = segment_image(case["torch"], card, prep)
    assert result.timings["mode"] == "whole_volume"
    agreement = agreement_dice(labels(reference), labels(result), card.num_classes)
    assert agreement["mean"] >= 0.999, agreement
    blobs = set(Path(cache_root(), "openvino-compiled").glob("*.blob"))
    assert blobs  # the crop-shaped compilation, ending in the arg-max (no window-shaped one needed)
    again = prepare_engine(
        card, backend="openvino", precision="fp32", weights_dir=shared_path("models", "brainchop")
    )
    assert np.array_equal(segment_image(again, card, prep).network_labels, result.network_labels)
    assert set(Path(cache_root(), "openvino-compiled").glob("*.blob")) == blobs  # loaded, not compiled


def test_engine_arg_max_equals_numpy_on_the_logits_ties_included(case: dict) -> None:
    """A whole volume's labels come from the network's own arg-max (no logits written out): equal to
    NumPy's arg-max of the same engine's logits, and the first class wins a tie, in FP32 and BF16."""
    pytest.importorskip("openvino", reason="OpenVINO not installed (pip install openvino nncf)")
    import openvino as ov
    import openvino.opset13 as ops

    from engine_tools.engines.openvino.class_outputs import with_argmax_output

    card, prep = case["card"], case["prep"]
    engine = prepare_engine(
        card, backend="openvino", precision="fp32", weights_dir=shared_path("models", "brainchop")
    )
    volume = np.ascontiguousarray(prep.array[None, :, 3:-5, 2:-4, 1:-6])  # not the window's shape
    labels, channels = engine.run_labels(volume)
    assert channels == card.num_classes and labels.shape == (1, *volume.shape[2:])
    assert np.array_equal(labels, engine.run(volume).argmax(axis=1))
    # a volume of exactly the window's shape takes the network's arg-max too: no logits written out
    window = np.ascontiguousarray(prep.array[(None, slice(None), *(slice(0, s) for s in card.window_size))])
    labels, _ = engine.run_labels(window)
    assert engine._reshaped is not None and engine._reshaped[:2] == (window.shape, True)
    assert np.array_equal(labels, engine.run(window).argmax(axis=1))
    rounded = np.round(np.random.default_rng(3).normal(size=(1, 7, 9, 10, 11)) * 2).astype(np.float32)
    # integer logits: many ties, exact in both precisions; whole, and in slabs of the first axis (as
    # logits over 1 GiB are taken, here forced by a small limit: 9 slices -> 3 slabs of 3)
    for hint, max_bytes in (("f32", 2**30), ("bf16", 2**30), ("f32", rounded.nbytes // 3 + 1)):
        param = ops.parameter(list(rounded.shape), np.float32)
        model = with_argmax_output(ov.Model([ops.relu(param).output(0)], [param]), max_bytes)
        splits = [op for op in model.get_ops() if op.get_type_name() == "VariadicSplit"]
        assert len(splits) == (max_bytes < 2**30)
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        got = compiled({0: rounded})[0][:, 0]
        assert np.array_equal(got, np.maximum(rounded, 0).argmax(axis=1)), hint
