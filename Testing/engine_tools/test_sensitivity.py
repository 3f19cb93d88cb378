"""One-pass layer sensitivity of the INT8 accuracy guard on a real network with one damaged layer:
OpenVINO (NNCF) and ONNX Runtime rank it first from one tapped FP32 and one tapped INT8 pass; the
TensorRT (ModelOpt) adapter, which cannot tap, falls back to keeping each layer alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine_tools import sensitivity
from engine_tools.guard import AccuracyGuard
from engine_tools.progress import SilentProgress

torch = pytest.importorskip("torch")

WINDOW = (16, 16, 16)
#: the scale of the outlier channel: its activations dwarf the other channels of conv 3's input
OUTLIER = 300.0


def _damaged_onnx(path: Path) -> tuple[Path, str]:
    """A 4-convolution ReLU network whose second convolution's channel 0 is scaled by ``OUTLIER`` (and
    the third's weights of that input channel by ``1 / OUTLIER``: same function in FP32). Per-tensor
    INT8 of the third convolution's input then has almost no resolution left for the other channels."""
    torch.manual_seed(0)
    convs = [
        torch.nn.Conv3d(1, 8, 3, padding=1),
        torch.nn.Conv3d(8, 8, 3, padding=1),
        torch.nn.Conv3d(8, 8, 3, padding=1),
        torch.nn.Conv3d(8, 3, 1),
    ]
    with torch.no_grad():
        convs[1].weight[0] *= OUTLIER
        convs[1].bias[0] *= OUTLIER
        convs[2].weight[:, 0] /= OUTLIER
    layers = [m for conv in convs[:-1] for m in (conv, torch.nn.ReLU())] + [convs[-1]]
    network = torch.nn.Sequential(*layers).eval()
    torch.onnx.export(
        network,
        torch.zeros(1, 1, *WINDOW),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamo=False,
    )
    return path, "/4/Conv"  # the third convolution (Sequential index 4)


def _samples(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, size=(count, 1, *WINDOW)).astype(np.float32)


def _ranked(adapter: object) -> tuple[AccuracyGuard, list[str]]:
    guard = AccuracyGuard(
        adapter, _samples(1, 1), _samples(3, 0), {"target_dice": 1.0, "recipe_margin": 0.0}, SilentProgress()
    )
    return guard, guard.rank(guard.calibrate())


def test_openvino_one_pass_ranks_the_damaged_layer_first(tmp_path: Path) -> None:
    pytest.importorskip("nncf")
    from openvino import Core

    from engine_tools.engines.openvino.quantize import NNCFAdapter

    onnx_path, damaged = _damaged_onnx(tmp_path / "damaged.onnx")
    adapter = NNCFAdapter(Core().read_model(str(onnx_path)), _samples(3, 0), {"int8_fallback": "f32"})
    damaged = next(n for n in adapter.layers() if n.startswith(damaged))  # "/4/Conv/WithoutBiases"
    guard, ranked = _ranked(adapter)
    assert ranked[0] == damaged, guard.sensitivity
    assert guard.sensitivity_method.startswith("one pass") and guard.quantize_calls == 1
    entry = next(e for e in guard.sensitivity if e["layer"] == damaged)
    upstream = [e for e in guard.sensitivity[: guard.sensitivity.index(entry)]]
    assert entry["delta_db"] > 10 and all(e["output_sqnr_db"] > 30 for e in upstream), guard.sensitivity
    assert guard.attempts[-1]["step"] == "sensitivity" and "one FP32" in guard.attempts[-1]["passes"]


def test_onnxruntime_one_pass_ranks_the_damaged_layer_first(tmp_path: Path) -> None:
    from engine_tools.engines.onnxruntime.quantize import QDQAdapter

    onnx_path, damaged = _damaged_onnx(tmp_path / "damaged.onnx")
    adapter = QDQAdapter(onnx_path, _samples(3, 0), WINDOW, tmp_path, SilentProgress())
    guard, ranked = _ranked(adapter)
    assert ranked[0] == damaged, guard.sensitivity
    assert guard.sensitivity_method.startswith("one pass") and guard.quantize_calls == 1
    entry = next(e for e in guard.sensitivity if e["layer"] == damaged)
    assert entry["delta_db"] > 10, guard.sensitivity


def test_guarded_build_quantizes_a_bounded_number_of_times(tmp_path: Path) -> None:
    """A target no INT8 model reaches and a slow calibration: the whole guard (rank, keep, escalate)
    quantizes once on OpenVINO (keeping layers edits the quantized model), and times its stages."""
    pytest.importorskip("nncf")
    from openvino import Core

    from engine_tools.engines.openvino.quantize import NNCFAdapter

    class Counting(NNCFAdapter):
        calls = 0

        def quantize(self, excluded, recipe):  # noqa: ANN001, ANN202
            Counting.calls += 1
            return super().quantize(excluded, recipe)

    onnx_path, _ = _damaged_onnx(tmp_path / "damaged.onnx")
    adapter = Counting(Core().read_model(str(onnx_path)), _samples(3, 0), {"int8_fallback": "f32"})
    # budgets of a slow calibration (a whole head): no recipe search, no confirmation re-quantization
    options = {"target_dice": 1.0, "max_kept_layers": 1, "calibration_budget_s": 0, "confirm_budget_s": 0}
    # a fully convolutional network: keep/escalate choices on 8^3 proxy crops, the result on the whole
    options.update(fully_convolutional=True, keep_proxy_crop=8)
    guard = AccuracyGuard(adapter, _samples(2, 1), _samples(3, 0), options, SilentProgress())
    _, report = guard.run()
    assert report.met_target and report.final_mean_dice == 1.0  # escalation ends fully in FP32
    assert Counting.calls == report.quantize_calls == 1
    assert {"quantize", "reference_fp32", "sensitivity", "guard_keep", "guard_escalate"} <= set(
        report.stage_seconds
    )
    assert report.latency["int8_median_s"] > 0 and report.latency["fp32_strict_median_s"] > 0
    measured = [a.get("measured_on", "whole samples") for a in report.attempts if "mean_dice" in a]
    assert "proxy crops" in measured and measured[-1] == "whole samples", report.attempts


def test_tensorrt_adapter_falls_back_to_keeping_each_layer(tmp_path: Path) -> None:
    pytest.importorskip("modelopt")
    from engine_tools.engines.tensorrt.quantize import ModelOptAdapter

    onnx_path, damaged = _damaged_onnx(tmp_path / "damaged.onnx")
    adapter = ModelOptAdapter(onnx_path, _samples(3, 0), WINDOW, tmp_path, SilentProgress())
    guard, ranked = _ranked(adapter)
    assert guard.sensitivity_method.startswith("each layer alone")
    assert {e["layer"] for e in guard.sensitivity} == set(ranked) and "dice_gain" in guard.sensitivity[0]
    assert guard.attempts[-1]["step"] == "sensitivity" and guard.attempts[-1]["windows"] == 1


def test_openvino_smooth_quant_alpha_reaches_nncf(tmp_path: Path) -> None:
    """``smooth_quant_alpha`` runs NNCF's SmoothQuant on the convolutions (NNCF applies it only for the
    transformer model type, which the adapter then selects): per-channel scales are inserted and the
    outlier channel no longer swamps the third convolution's INT8 input."""
    pytest.importorskip("nncf")
    from openvino import Core

    from engine_tools.accuracy import logits_agreement
    from engine_tools.engines.openvino.quantize import NNCFAdapter

    onnx_path, _ = _damaged_onnx(tmp_path / "damaged.onnx")
    adapter = NNCFAdapter(Core().read_model(str(onnx_path)), _samples(3, 0), {"int8_fallback": "f32"})
    plain, smoothed = (
        adapter.quantize([], adapter.recipe({"weight_rounding": "nearest", **options}))
        for options in ({}, {"smooth_quant_alpha": 0.5})
    )
    assert adapter.recipe({"smooth_quant_alpha": 0.5})["smooth_quant_alpha"] == 0.5

    def multiplies(model: object) -> int:
        return sum(op.get_type_name() == "Multiply" for op in model.get_ordered_ops())

    assert multiplies(smoothed) > multiplies(plain)
    held_out = _samples(2, 5)
    reference = adapter.run(None, held_out)
    sqnr = [
        float(logits_agreement(reference, adapter.run(m, held_out))["sqnr_db"]) for m in (plain, smoothed)
    ]
    assert sqnr[1] > sqnr[0] + 3, sqnr


def test_a_set_kept_mostly_out_of_int8_gives_way_only_to_a_faster_network(tmp_path: Path) -> None:
    """With the check on for any kept set, the whole network in the higher precision is measured on
    the whole samples beside the kept set, and the result is the faster of the two that meet the
    target: the engine's INT8 layers follow the recorded latencies either way."""
    pytest.importorskip("nncf")
    from openvino import Core

    from engine_tools.engines.openvino.quantize import NNCFAdapter

    onnx_path, damaged = _damaged_onnx(tmp_path / "damaged.onnx")
    adapter = NNCFAdapter(Core().read_model(str(onnx_path)), _samples(3, 0), {"int8_fallback": "f32"})
    options = {"target_dice": 0.999, "recipe_margin": 0.0, "faster_check_below": 1.01, "max_kept_layers": 1}
    guard = AccuracyGuard(adapter, _samples(2, 1), _samples(3, 0), options, SilentProgress())
    model, report = guard.run()
    steps = {attempt["step"]: attempt for attempt in report.attempts}
    assert report.met_target and report.kept_in_higher_precision, report.attempts
    whole = steps["all-higher-precision"]
    kept = next(a for a in reversed(report.attempts) if a.get("median_s") and a["step"] != whole["step"])
    assert whole["mean_dice"] == 1.0 and whole["median_s"] > 0 and kept["median_s"] > 0
    if whole["median_s"] < kept["median_s"]:
        assert report.int8_layers == 0 and adapter.quantized_layers(model) == []
    else:
        assert report.kept_in_higher_precision == kept["kept_in_higher_precision"]
        assert len(report.kept_in_higher_precision) == 1 and report.kept_in_higher_precision[0].startswith(
            damaged
        )
        assert report.int8_layers == len(adapter.layers()) - 1


def test_on_proxy_crops_each_layer_alone_in_int8_ranks_the_damaged_layer_first(tmp_path: Path) -> None:
    """Whole volumes of a fully convolutional network: the guard ranks by measuring each layer alone
    left in INT8 on its proxy crops (one evaluation per layer); the damaged layer costs the most."""
    pytest.importorskip("nncf")
    from openvino import Core

    from engine_tools.engines.openvino.quantize import NNCFAdapter

    onnx_path, damaged = _damaged_onnx(tmp_path / "damaged.onnx")
    rng = np.random.default_rng(2)
    volumes = [rng.uniform(0, 1, size=(1, 24, 22, 20)).astype(np.float32) for _ in range(3)]
    options = {"int8_fallback": "f32", "weight_rounding": "nearest"}
    adapter = NNCFAdapter(Core().read_model(str(onnx_path)), volumes[:2], options, volumes[2:])
    damaged = next(n for n in adapter.layers() if n.startswith(damaged))
    guard_options = {"target_dice": 1.0, "fully_convolutional": True, "keep_proxy_crop": 16}
    guard = AccuracyGuard(adapter, volumes[2:], volumes[:2], guard_options, SilentProgress())
    assert guard.proxy is not None and guard.proxy[0].shape == (1, 16, 16, 16)
    base = guard._quantized("initial", adapter.recipe(options), [])
    ranked = guard.rank(base)
    assert guard.sensitivity_method.startswith("each layer alone in INT8")
    assert ranked[0] == damaged, guard.sensitivity
    assert len(guard.sensitivity) == len(adapter.layers()) == 4
    alone = {entry["layer"]: entry["dice_alone"] for entry in guard.sensitivity}
    assert alone[damaged] == min(alone.values()) < 1.0
    # with scanner-variation copies after the scan, the ranking measures the scan's own crop only
    copies = [np.clip(volumes[2] * 1.3, 0, 1), volumes[2] ** 2]
    varied = AccuracyGuard(
        adapter,
        volumes[2:] + copies,
        volumes[:2],
        {**guard_options, "validation_copies": 2},
        SilentProgress(),
    )
    assert varied.originals == 1 and len(varied.proxy) == 3
    assert varied.rank(base) == ranked
    assert [e["dice_alone"] for e in varied.sensitivity] == [e["dice_alone"] for e in guard.sensitivity]
    sensitivity_step = next(a for a in varied.attempts if a["step"] == "sensitivity")
    assert "not of their scanner-variation copies" in sensitivity_step["sample"]
    # ... while the other steps measure the copies too
    assert varied.evaluate(base.model, proxy=True)["mean"] != guard.evaluate(base.model, proxy=True)["mean"]
    # the whole-sample evaluation reports each sample alone (the scan, then its copies) beside the pool
    whole = varied.evaluate(base.model)
    scan_alone = varied.evaluate(base.model, windows=1)["mean"]
    assert len(whole["per_sample"]) == 3 and whole["per_sample"][0] == round(scan_alone, 5)
    assert "per_sample" not in guard.evaluate(base.model)  # one sample: nothing to split
    # copies already cut to the proxy size are their own proxies: their FP32 reference is not run twice
    cut = [sensitivity.centred_crop(copy, 16) for copy in copies]
    own = AccuracyGuard(
        adapter, volumes[2:] + cut, volumes[:2], {**guard_options, "validation_copies": 2}, SilentProgress()
    )
    own.evaluate(base.model, proxy=True)
    assert [p.shape for p in own.proxy] == [(1, 16, 16, 16)] * 3
    pairs = list(zip(own._proxy_reference, own.reference(), strict=True))
    assert [a is b for a, b in pairs] == [False, True, True]  # the scan's crop is computed, copies reused
