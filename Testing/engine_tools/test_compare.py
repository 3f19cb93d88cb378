"""`medquant segment` and `medquant compare` end to end on a real brainchop MeshNet and a real T1.

The published 18-class MeshNet (model18cls) runs on a 64^3 crop of the shared T1 with 48^3 windows (a
card derived from the real one, so the test stays short); INT8 is calibrated on another subject (a crop of
the MNI152 template). Both commands run as subprocesses with ``--progress jsonl`` and share one cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from shared_data import shared_path
from test_cli import run_cli

from engine_tools.registry import get_card


@pytest.fixture(scope="session")
def small_case(tmp_path_factory, session_cache) -> dict[str, Path]:
    """A 48^3-window card of the real model18cls, a real T1 crop and a calibration folder."""
    weights = shared_path("models", "brainchop")
    t1 = sitk.ReadImage(str(shared_path("data", "mri", "t1_crop.nii.gz")))
    mni = sitk.ReadImage(str(shared_path("data", "mri", "mni152_2009_t1.nii.gz")))
    root = tmp_path_factory.mktemp("compare-case")
    raw = dict(get_card("brainchop-model18cls").raw)
    raw["id"] = "test-brainchop-model18cls-w48"
    raw["preprocessing"] = {**raw["preprocessing"], "shape": None}
    raw["window"] = {**raw["window"], "size": [48, 48, 48], "overlap": 0.25}
    card_path = root / "card.json"
    card_path.write_text(json.dumps(raw))
    scan = root / "t1_crop_small.nii.gz"
    sitk.WriteImage(t1[96:160, 96:160, 96:160], str(scan))
    calibration = root / "calibration"
    calibration.mkdir()
    sitk.WriteImage(mni[48:144, 64:160, 48:144], str(calibration / "mni_crop.nii.gz"))
    return {"card": card_path, "scan": scan, "calibration": calibration, "weights": weights, "root": root}


@pytest.fixture(scope="session")
def segmented(small_case, session_cache) -> tuple[Path, list[dict]]:
    """FP32 labels written by `medquant segment` (also the reference for `compare`)."""
    output = small_case["root"] / "fp32_labels.nii.gz"
    code, events = run_cli(
        "segment", str(small_case["card"]), "--input", str(small_case["scan"]), "--output", str(output),
        "--precision", "fp32", "--backend", "openvino", "--weights-dir", str(small_case["weights"]),
        cache=session_cache,
    )  # fmt: skip
    assert code == 0, events[-1]
    return output, events


def test_segment_writes_labels_in_input_geometry_and_a_label_table(small_case, segmented):
    output, events = segmented
    result = events[-1]
    assert result["event"] == "result"
    data = result["data"]
    assert {"output", "label_table", "timings", "engine"} <= set(data)
    assert data["engine"]["precision"] == "fp32" and data["engine"]["backend"] == "openvino"
    # MeshNet is fully convolutional: one pass over the head's box instead of 8 windows of 48^3
    assert data["timings"]["mode"] == "whole_volume" and data["timings"]["num_windows"] == 1
    labels, scan = sitk.ReadImage(str(output)), sitk.ReadImage(str(small_case["scan"]))
    assert labels.GetSize() == scan.GetSize()
    np.testing.assert_allclose(labels.GetOrigin(), scan.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(labels.GetDirection(), scan.GetDirection(), atol=1e-6)
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    assert len(values) >= 3 and values.max() < 18, values  # background and tissue classes at least
    table = json.loads(Path(data["label_table"]).read_text())
    assert [entry["value"] for entry in table["labels"]] == list(range(18))
    assert any(e["event"] == "progress" for e in events)


def test_compare_reports_int8_smaller_with_per_label_agreement(
    small_case, segmented, session_cache, tmp_path
):
    reference, _ = segmented
    out = tmp_path / "report"
    code, events = run_cli(
        "compare", str(small_case["card"]), "--input", str(small_case["scan"]), "--reference", str(reference),
        "--calibration", str(small_case["calibration"]), "--windows", "8", "--backend", "openvino",
        "--weights-dir", str(small_case["weights"]), "--repeats", "2", "--output-dir", str(out),
        "--allow-below-target", cache=session_cache,
    )  # fmt: skip
    assert code == 0, events[-1]
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    fp32, int8 = rows["fp32"], rows["int8"]
    assert fp32["status"] == "ok" and int8["status"] == "ok", int8.get("reason")
    assert int8["engine"]["precision"] == "int8"
    assert 0 < int8["bytes_on_disk"] < fp32["bytes_on_disk"]
    for row in (fp32, int8):
        assert row["latency_ms_per_window"] > 0 and row["segment_seconds"] > 0
        assert row["memory"]["peak_rss_mib"] > 0
    # agreement per label with FP32, computed on the real INT8 output
    per_label = int8["agreement_vs_fp32"]["per_label"]
    assert set(per_label) == {str(v) for v in range(18)}
    scored = [d for d in per_label.values() if d is not None]
    assert len(scored) >= 3 and all(0.0 <= d <= 1.0 for d in scored)
    assert 0.0 < int8["agreement_vs_fp32"]["mean"] <= 1.0
    # the volume each label gains or loses against FP32: a shift that a high Dice can hide
    changes = int8["agreement_vs_fp32"]["volume_change"]
    assert set(changes) <= {label for label, dice in per_label.items() if dice is not None} and changes
    value, change = int8["agreement_vs_fp32"]["largest_volume_change"]
    assert abs(change) == max(abs(c) for c in changes.values()) and changes[str(value)] == change
    assert "INT8 volume vs FP32" in (out / "report.md").read_text()
    assert int8["sqnr_db_window"] is not None and int8["sqnr_db_window"] > 0
    assert int8["kept_in_higher_precision"] is not None  # the accuracy guard reported its decision
    # one calibration scan, no --validation: the report says the guard's estimate is optimistic
    assert report["calibration"]["subjects"] == ["mni_crop.nii.gz"] and report["validation"] is None
    assert any("optimistic because no unseen subject" in finding for finding in report["findings"])
    # the reference is the FP32 segmentation written by `segment`: FP32 matches it exactly, INT8 as above
    assert fp32["dice_vs_reference"]["mean"] == pytest.approx(1.0)
    assert int8["dice_vs_reference"]["mean"] == pytest.approx(int8["agreement_vs_fp32"]["mean"], abs=1e-4)
    # end to end: start-up + cached load + segmentation stages + writing, beside the window latency
    for row in (fp32, int8):
        stages = row["end_to_end"]
        assert stages["startup_s"] > 0 and stages["engine_load_s"] > 0 and stages["write_s"] > 0
        parts = [v for k, v in stages.items() if k.endswith("_s") and k != "total_s"]
        assert stages["total_s"] == pytest.approx(sum(parts), abs=0.01)
        assert stages["total_s"] > row["segment_timings"]["inference_s"]
    torch_pass = report["pytorch_fp32_eager"]  # the card's MeshNet is fully convolutional: one pass
    assert torch_pass["one_pass_s"] > 0 and len(torch_pass["shape"]) == 3
    # BF16 is either measured or skipped with the reason (CPUs without native BF16)
    assert rows["bf16"]["status"] == "ok" or "BF16" in rows["bf16"]["reason"]
    markdown = (out / "report.md").read_text()
    assert "| INT8 |" in markdown and "| FP32 |" in markdown and report["machine"]["cpu"] in markdown
    assert "end to end (s)" in markdown and "PyTorch FP32 eager, one pass" in markdown
    png = (out / "chart.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cpu_bench_smoke_writes_a_table_for_a_real_model(session_cache, tmp_path):
    """`bench/cpu_bench.py --smoke`: the real model5_gw_ae, 64^3 windows, OpenVINO FP32 and INT8."""
    import os
    import subprocess
    import sys

    shared_path("models", "brainchop", "model5_gw_ae")
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [
            sys.executable,
            str(repo / "bench" / "cpu_bench.py"),
            "--smoke",
            "--quiet",
            "--output-dir",
            str(tmp_path),
        ],
        env={**os.environ, "MEDQUANT_CACHE_DIR": str(session_cache)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "cpu_smoke.json").read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["libraries"]["openvino"]
    (model,) = report["models"]
    assert model["model"] == "brainchop-model5_gw_ae-w64" and model["window"] == [1, 1, 64, 64, 64]
    rows = {(r["backend"], r["precision"]): r for r in model["rows"]}
    fp32, int8 = rows[("openvino", "fp32")], rows[("openvino", "int8")]
    assert fp32["status"] == "ok" and int8["status"] == "ok", int8.get("reason")
    assert fp32["latency_ms_per_window"] > 0 and int8["latency_ms_per_window"] > 0
    assert int8["kernels"]["convolutions"]["int8"] > 0  # INT8 kernels really ran
    assert 0.0 < int8["agreement_vs_fp32"]["mean"] <= 1.0
    assert (
        "| brainchop-model5_gw_ae-w64 | 64x64x64* | openvino | int8 |"
        in (tmp_path / "cpu_smoke.md").read_text()
    )
