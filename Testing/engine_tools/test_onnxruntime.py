"""ONNX Runtime engine: FP32 and static QDQ INT8 on a real brainchop MeshNet and real T1 windows."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from engine_helpers import calibration_set, foreground_windows, small_card
from shared_data import shared_path

pytest.importorskip("onnxruntime", reason="ONNX Runtime not installed (pip install onnxruntime)")

from engine_tools.accuracy import logits_agreement  # noqa: E402
from engine_tools.guard import GuardReport  # noqa: E402
from engine_tools.pipeline import prepare_engine  # noqa: E402

WINDOW = 48


def test_int8_qdq_runs_quantized_convolutions() -> None:
    brainchop = shared_path("models", "brainchop")
    card = small_card("brainchop-model11_gw_ae", WINDOW)
    calibration = calibration_set(shared_path("data", "mri", "t1_crop.nii.gz"), card, 5, seed=0)
    unseen = foreground_windows(shared_path("data", "mri", "mni152_2009_t1.nii.gz"), card, 1, seed=1)
    fp32 = prepare_engine(card, backend="onnxruntime", precision="fp32", weights_dir=brainchop)
    int8 = prepare_engine(  # a target plain INT8 reaches, so that the engine keeps its INT8 kernels
        card,
        backend="onnxruntime",
        precision="int8",
        calibration=calibration,
        weights_dir=brainchop,
        target_dice=0.9,
    )
    described = int8.describe()
    ops = described["kernels"]["by_op_type"]
    # ONNX Runtime fused the Q/DQ pairs into integer convolutions in the graph it runs
    assert ops.get("QLinearConv", 0) >= 1, ops
    assert described["kernels"]["int8"] >= described["kernels"]["float"], ops
    assert fp32.describe()["kernels"]["int8"] == 0
    assert described["bytes_on_disk"] < fp32.describe()["bytes_on_disk"]
    assert Path(described["artifact_dir"], "model.onnx").is_file()
    guard = described["accuracy_guard"]
    assert set(guard) == {f.name for f in fields(GuardReport)}  # the report every backend shares
    assert guard["met_target"] and 0.9 <= guard["final_mean_dice"] <= 1.0 and guard["per_label"]
    assert guard["int8_layers"] == guard["quantizable_layers"] and guard["int8_compute_fraction"] == 1.0

    reference = fp32.run(unseen)
    logits = int8.run(unseen)
    assert logits.shape == reference.shape == (1, 3, WINDOW, WINDOW, WINDOW)
    agreement = logits_agreement(reference, logits)
    assert agreement["mean"] > 0.5, agreement  # real segmentation, not noise (ORT is the secondary engine)
    assert np.isfinite(agreement["sqnr_db"])


def test_guard_adapter_keeps_a_layer_float_and_all_layers_is_fp32(tmp_path: Path) -> None:
    """The ONNX Runtime adapter of the accuracy guard: a kept layer is re-quantized out of the QDQ
    graph (its Relu survives), and keeping every layer is the FP32 model itself."""
    from engine_tools.engines.onnxruntime.quantize import QDQAdapter
    from engine_tools.networks import export_onnx
    from engine_tools.progress import SilentProgress

    card = small_card("brainchop-model11_gw_ae", WINDOW)
    windows = foreground_windows(shared_path("data", "mri", "t1_crop.nii.gz"), card, 3, seed=0)
    onnx_path = Path(export_onnx(card, shared_path("models", "brainchop")))
    adapter = QDQAdapter(onnx_path, windows[:2], card.window_size, tmp_path, SilentProgress())
    plain = adapter.quantize([], adapter.recipe({}))
    layers = adapter.quantized_layers(plain)
    assert layers == adapter.layers()  # every convolution takes INT8 input
    kept = adapter.keep_layers(plain, layers[-1:])
    assert adapter.quantized_layers(kept) == layers[:-1]
    reference = adapter.run(None, windows[2:])
    agreement = logits_agreement(reference, adapter.run(kept, windows[2:]))
    assert agreement["mean"] > 0.9, agreement  # a dropped Relu would break the segmentation
    assert adapter.keep_layers(plain, layers) == onnx_path
