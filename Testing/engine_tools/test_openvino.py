"""OpenVINO engine on real brainchop MeshNets and real T1 windows: INT8 kernels really run, the
artifact shrinks, INT8 agrees with strict FP32 on an unseen subject, and the accuracy guard works."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_helpers import calibration_set, foreground_windows, small_card
from shared_data import shared_path

pytest.importorskip("openvino", reason="OpenVINO not installed (pip install openvino nncf)")
pytest.importorskip("nncf", reason="NNCF not installed (pip install nncf)")

from engine_tools.accuracy import logits_agreement  # noqa: E402
from engine_tools.pipeline import prepare_engine  # noqa: E402

WINDOW = 64


@pytest.fixture(scope="session")
def brainchop() -> Path:
    return shared_path("models", "brainchop")


@pytest.fixture(scope="session")
def three_class(brainchop: Path, session_cache: Path) -> dict:
    """model11_gw_ae at 64^3: strict FP32, BF16 and INT8 engines (INT8 calibrated on t1_crop)."""
    import os

    os.environ["MEDQUANT_CACHE_DIR"] = str(session_cache)
    card = small_card("brainchop-model11_gw_ae", WINDOW)
    calibration = calibration_set(shared_path("data", "mri", "t1_crop.nii.gz"), card, 8, seed=0)
    unseen = foreground_windows(shared_path("data", "mri", "mni152_2009_t1.nii.gz"), card, 2, seed=1)
    engines = {
        precision: prepare_engine(
            card,
            backend="openvino",
            precision=precision,
            calibration=calibration if precision == "int8" else None,
            weights_dir=brainchop,
        )
        for precision in ("fp32", "bf16", "int8")
    }
    return {"card": card, "engines": engines, "unseen": unseen}


def test_int8_kernels_run_and_artifact_shrinks(three_class: dict) -> None:
    fp32, int8 = three_class["engines"]["fp32"], three_class["engines"]["int8"]
    described = int8.describe()
    convs = described["kernels"]["convolutions"]
    # proof from the compiled runtime model: the CPU plugin picked INT8 convolution primitives
    assert convs["int8"] >= 1, described["kernels"]
    assert any("i8" in name.lower() or "u8" in name.lower() for name in described["kernels"]["by_primitive"])
    assert fp32.describe()["kernels"]["convolutions"]["int8"] == 0
    assert described["bytes_on_disk"] < fp32.describe()["bytes_on_disk"]
    assert fp32.describe()["compile_config"]["INFERENCE_PRECISION_HINT"] == "f32"
    guard = described["accuracy_guard"]
    assert guard["attempts"]
    # calibrated on windows of one scan only: the report says the estimate is optimistic and why
    assert guard["validated_on"].startswith(
        "8 samples: 2 window(s) held out of the only calibration scan (t1_crop.nii.gz)"
    )
    assert "optimistic because no unseen subject was available" in guard["validated_on"]
    assert "--validation FOLDER" in guard["validated_on"]
    report = int8.build_report
    assert report["calibration"]["subjects"] == report["validation"]["subjects"] == ["t1_crop.nii.gz"]
    # ... and also validated on copies of its held-out windows with scanner variations
    assert report["validation"]["holdout"] == "windows of the only scan and its scanner variations"
    assert "copies with scanner variations (gamma 0.7, gamma 1.4, blurred 1 voxel)" in guard["validated_on"]
    assert report["validation_windows"] == 2 + 2 * 3


def test_int8_agrees_with_strict_fp32_on_unseen_subject(three_class: dict) -> None:
    unseen = three_class["unseen"]
    reference = three_class["engines"]["fp32"].run(unseen)
    assert reference.shape == (len(unseen), 3, WINDOW, WINDOW, WINDOW)
    for precision in ("bf16", "int8"):
        logits = three_class["engines"][precision].run(unseen)
        agreement = logits_agreement(reference, logits)
        assert agreement["mean"] >= 0.95, (precision, agreement)
        assert agreement["sqnr_db"] > 10.0  # inf where BF16 is not native and OpenVINO runs f32


@pytest.fixture(scope="module")
def eighteen_class() -> tuple[dict, object]:
    card = small_card("brainchop-model18cls", 48)
    calibration = calibration_set(shared_path("data", "mri", "t1_crop.nii.gz"), card, 5, seed=0)
    return card, calibration


def _guarded(brainchop: Path, eighteen_class: tuple, allow_below_target: bool) -> object:
    """The 18-class model's INT8 engine, target 0.995 (above plain INT8), at most 2 kept layers before
    escalating."""
    card, calibration = eighteen_class
    return prepare_engine(
        card,
        backend="openvino",
        precision="int8",
        calibration=calibration,
        weights_dir=brainchop,
        target_dice=0.995,
        allow_below_target=allow_below_target,
        options={"max_kept_layers": 2, "calibration_budget_s": 0},
    )


def test_guard_on_18_class_model_keeps_layers_and_reports(brainchop: Path, eighteen_class: tuple) -> None:
    """The 18-class MeshNet, calibrated on one subject, with a target above what plain INT8 reaches
    and at most 2 kept layers allowed below target: the guard measures per-layer sensitivity, keeps
    the top-ranked layers in higher precision, never ends below where it started, and reports the
    layers, attempts, INT8 share of compute and speed against strict FP32."""
    engine = _guarded(brainchop, eighteen_class, allow_below_target=True)
    card_id = eighteen_class[0].id
    guard = engine.describe()["accuracy_guard"]
    steps = [attempt["step"] for attempt in guard["attempts"]]
    assert steps[0] == "initial" and "sensitivity" in steps and "keep-1" in steps, steps
    assert not any(step.startswith("escalate") for step in steps), steps
    assert guard["final_mean_dice"] >= guard["initial_mean_dice"]
    assert guard["below_target"] is (guard["final_mean_dice"] < 0.995) and guard["allow_below_target"]
    assert len(guard["sensitivity"]) == guard["quantizable_layers"] == 10
    kept = guard["kept_in_higher_precision"]  # none when neither keep step raised agreement
    assert len(kept) <= 2 and set(kept) <= {entry["layer"] for entry in guard["sensitivity"]}
    assert guard["sensitivity_method"].startswith(("one pass", "each layer alone in INT8"))
    assert guard["quantize_calls"] <= 2
    stages, total = engine.build_report["stage_seconds"], engine.build_report["build_seconds"]
    assert {"export", "quantize", "reference_fp32", "sensitivity", "guard_keep", "compile"} <= set(stages)
    assert 0.8 * total <= sum(stages.values()) <= total + 0.05, (stages, total)
    from engine_tools.commands.build import render

    labels = {str(entry["value"]): entry["name"] for entry in eighteen_class[0].label_table()}
    shown = render(
        {"model": card_id, "engine": engine.describe(), "build_report": engine.build_report, "labels": labels}
    )
    assert f"build seconds {total:.1f}: export" in shown and "sensitivity" in shown, shown
    value, change = guard["largest_volume_change"]  # named, signed, in percent
    assert f"largest label volume change vs FP32: {labels[str(value)]} {change:+.2%}" in shown, shown
    assert guard["int8_layers"] == 10 - len(kept) and 0.0 < guard["int8_compute_fraction"] <= 1.0
    assert engine.describe()["kept_in_higher_precision"] == kept
    assert guard["latency"]["fp32_strict_median_s"] > 0 and guard["latency"]["int8_median_s"] > 0
    convs = engine.describe()["kernels"]["convolutions"]
    assert convs["int8"] >= 10 - len(kept) and convs["float"] >= len(kept)


def test_guard_escalates_until_the_target_is_met(brainchop: Path, eighteen_class: tuple) -> None:
    """The same model and target without ``allow_below_target``: two kept layers are not enough, so
    the guard keeps more until the held-out agreement reaches the target, and says how much of the
    compute stays INT8."""
    engine = _guarded(brainchop, eighteen_class, allow_below_target=False)
    guard = engine.describe()["accuracy_guard"]
    steps = [attempt["step"] for attempt in guard["attempts"]]
    assert any(step.startswith("escalate") for step in steps), steps
    assert guard["met_target"] and not guard["below_target"] and guard["final_mean_dice"] >= 0.995
    kept = guard["kept_in_higher_precision"]
    assert len(kept) > 2 and guard["int8_layers"] == 10 - len(kept)
    assert 0.0 <= guard["int8_compute_fraction"] < 1.0
    convs = engine.describe()["kernels"]["convolutions"]
    assert convs["float"] >= len(kept)
