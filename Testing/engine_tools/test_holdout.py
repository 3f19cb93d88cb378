"""The INT8 accuracy guard validates on subjects calibration never saw: whole held-out scans, or a
separate validation folder (never overlapping the calibration scans, part of the engine key); fully
convolutional networks calibrate and validate on whole cropped volumes of differing shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shared_data import shared_path

pytest.importorskip("openvino", reason="OpenVINO not installed (pip install openvino nncf)")

from engine_tools.accuracy import agreement_dice, json_ready  # noqa: E402
from engine_tools.calibration import CalibrationError, collect_windows  # noqa: E402
from engine_tools.pipeline import prepare_engine  # noqa: E402
from engine_tools.progress import SilentProgress  # noqa: E402
from engine_tools.registry import ModelCard, get_card  # noqa: E402

SPACING = 2.0  # mm: the two real T1s become ~128^3 and ~97x115x97 voxels; grey and white matter still segment
WINDOW = 32
MRI = ("t1_crop.nii.gz", "mni152_2009_t1.nii.gz")


def coarse_card() -> ModelCard:
    """The real model11_gw_ae card (fully convolutional, receptive field 49) on a 2 mm grid."""
    card = get_card("brainchop-model11_gw_ae")
    prep = {k: v for k, v in card.raw["preprocessing"].items() if k != "shape"}
    raw = {
        **card.raw,
        "preprocessing": {**prep, "spacing": [SPACING] * 3},
        "window": {**card.raw["window"], "size": [WINDOW] * 3},
    }
    return ModelCard.from_dict(raw, card.path)


def folder_of(root: Path, name: str, *scans: str) -> Path:
    folder = root / name
    folder.mkdir()
    for scan in scans:
        (folder / scan).symlink_to(shared_path("data", "mri", scan))
    return folder


@pytest.fixture
def brainchop() -> Path:
    return shared_path("models", "brainchop")


def test_two_scans_hold_one_out_whole_and_build_real_int8(tmp_path: Path, brainchop: Path) -> None:
    card = coarse_card()
    calibration = collect_windows(folder_of(tmp_path, "both", *MRI), card, num_windows=8)
    shapes = {s.shape for s in calibration.samples}
    assert calibration.whole_volumes and len(calibration) == 2 and len(shapes) == 2  # ragged crops
    engine = prepare_engine(
        card,
        backend="openvino",
        precision="int8",
        calibration=calibration,
        weights_dir=brainchop,
        target_dice=0.8,
        allow_below_target=True,
    )
    report = engine.build_report
    (calibrated,) = report["calibration"]["subjects"]
    (held_out,) = report["validation"]["subjects"]
    assert {calibrated, held_out} == set(MRI) and report["validation"]["holdout"] == "subjects"
    assert report["calibration"]["samples"] == report["validation"]["samples"] == "whole cropped volumes"
    held_shape = report["validation"]["sample_shapes"][0]
    assert held_shape != report["calibration"]["sample_shapes"][0] and held_shape[1:] != [WINDOW] * 3
    guard = report["accuracy_guard"]
    assert guard["validated_on"] == (
        f"1 whole cropped volume(s) of held-out subject(s) never used for calibration: {held_out}"
    )
    # grey and white matter are scored (large enough), not only the background
    assert guard["per_label"]["1"] and guard["per_label"]["2"] and guard["final_mean_dice"] > 0.8, guard
    # a real INT8 engine, saved at the window's shape, that also runs the held-out crop in one pass
    assert engine.describe()["kernels"]["convolutions"]["int8"] >= 1
    assert engine._input_shape == (1, 1, WINDOW, WINDOW, WINDOW)
    held = next(s for s in calibration.samples if list(s.shape) == held_shape)
    assert engine.run(held[None]).shape == (1, card.num_classes, *held_shape[1:])
    # what the guard measured is what the saved engine segments: its labels of the held-out volume
    # against strict FP32's give the guard's own agreement
    fp32 = prepare_engine(card, backend="openvino", precision="fp32", weights_dir=brainchop)
    found = agreement_dice(
        fp32.run_labels(held[None])[0],
        engine.run_labels(held[None])[0],
        card.num_classes,
        min_voxels=guard["min_label_voxels"],
    )
    assert round(found["mean"], 5) == guard["final_mean_dice"], (found["mean"], guard["final_mean_dice"])
    assert json_ready(found)["largest_volume_change"] == guard["largest_volume_change"]
    assert guard["largest_volume_change"][0] is not None


def test_validation_folder_is_checked_keyed_and_reported(tmp_path: Path, brainchop: Path) -> None:
    card = coarse_card()
    t1_only = collect_windows(folder_of(tmp_path, "t1", MRI[0]), card, num_windows=8)
    mni_only = collect_windows(folder_of(tmp_path, "mni", MRI[1]), card, num_windows=8)
    both = collect_windows(folder_of(tmp_path, "both", *MRI), card, num_windows=8)
    common = {"backend": "openvino", "precision": "int8", "weights_dir": brainchop, "target_dice": 0.8}
    with pytest.raises(CalibrationError, match=f"validation {MRI[0]} = calibration {MRI[0]}"):
        prepare_engine(card, calibration=t1_only, validation=both, **common)

    progress = SilentProgress()
    single = prepare_engine(card, calibration=t1_only, allow_below_target=True, progress=progress, **common)
    warnings = [e["message"] for e in progress.events if e.get("level") == "warning"]
    assert any("optimistic because no unseen subject was available" in w and MRI[0] in w for w in warnings)
    validated = prepare_engine(
        card, calibration=t1_only, validation=mni_only, allow_below_target=True, **common
    )
    assert single.artifact_dir != validated.artifact_dir  # the validation set is part of the key
    keys = [
        json.loads((e.artifact_dir / "engine.json").read_text())["key_parts"] for e in (single, validated)
    ]
    # one scan: validated on it and its scanner-variation copies (a set of its own, in the key)
    assert keys[0]["validation"] not in (None, t1_only.fingerprint, mni_only.fingerprint)
    assert keys[1]["validation"] == mni_only.fingerprint
    assert keys[0]["calibration"] == keys[1]["calibration"]

    # one scan and no validation folder: validated on the scan calibration used, and said so
    note = single.build_report["accuracy_guard"]["validated_on"]
    assert note.startswith(f"4 samples: 1 whole cropped volume(s) of the only calibration scan ({MRI[0]})")
    assert "and 3 copies with scanner variations (gamma 0.7, gamma 1.4, blurred 1 voxel" in note
    assert "optimistic because no unseen subject was available" in note and "--validation FOLDER" in note
    each = single.build_report["accuracy_guard"]["sample_mean_dice"]  # the scan, then each copy
    assert len(each) == 4 and all(0.0 < value <= 1.0 for value in each)
    report = validated.build_report
    assert report["calibration"]["subjects"] == [MRI[0]] and report["validation"]["subjects"] == [MRI[1]]
    assert report["validation"]["holdout"] == "validation folder"
    assert MRI[1] in report["accuracy_guard"]["validated_on"]


def test_cli_validation_option_and_windows_for_window_engines(
    tmp_path: Path, brainchop: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--validation`` on the command line; ONNX Runtime runs windows only, so it gets windows cut
    from the whole cropped volumes, still split by subject."""
    from engine_tools.cli import main

    card_file = tmp_path / "card.json"
    card_file.write_text(json.dumps(coarse_card().raw))
    base = [
        "build",
        str(card_file),
        "--precision",
        "int8",
        "--progress",
        "jsonl",
        "--weights-dir",
        str(brainchop),
    ]
    code = main(
        [
            *base,
            "--backend",
            "onnxruntime",
            "--calibration",
            str(folder_of(tmp_path, "t1", MRI[0])),
            "--validation",
            str(folder_of(tmp_path, "mni", MRI[1])),
            "--target-dice",
            "0.8",
            "--allow-below-target",
        ]
    )
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert code == 0, events[-1]
    report = events[-1]["data"]["build_report"]
    assert report["calibration"]["subjects"] == [MRI[0]] and report["validation"]["subjects"] == [MRI[1]]
    assert report["calibration"]["samples"] == "windows"
    assert report["calibration"]["sample_shapes"] == [[1, WINDOW, WINDOW, WINDOW]]
    assert report["validation"]["num_samples"] >= 1
    code = main([*base, "--backend", "openvino", "--validation", str(tmp_path / "mni")])
    error = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert code == 1 and "--validation needs --calibration" in error["message"]
    assert np.isfinite(report["accuracy_guard"]["final_mean_dice"])
