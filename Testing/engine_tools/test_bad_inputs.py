"""Bad inputs and outputs through `medquant ... --progress jsonl`, as a new user would try them.

Each case checks the error or warning text, the exit status, the single final event, that the input
file is unchanged (SHA-256 before/after) and that no partial file remains. Engine-cache cases (changed
or truncated artifacts, signals, concurrent builds, killed builds) are in test_cache_integrity.py.
"""

from __future__ import annotations

import argparse
import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bad_input_helpers import (
    WEIGHTS,
    build_args,
    calibration_folder,
    head_like,
    partial_files,
    run_cli,
    segment_args,
    sha256,
    tiny_card,
    warnings_of,
    write_volume,
)

from engine_tools import cli
from engine_tools.progress import SilentProgress


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    return {"card": tiny_card(root), "cache": root / "cache", "root": root}


def _truncated(tmp_path, name: str):
    good = write_volume(tmp_path / "good.nii.gz", head_like())
    path = tmp_path / name
    data = good.read_bytes() if name.endswith(".gz") else gzip.decompress(good.read_bytes())
    path.write_bytes(data[: len(data) // 2])
    return path


def _segment_fails(env, tmp_path, source, expected: str, *extra: str, output=None):
    output = output or tmp_path / "labels.nii.gz"
    before = sha256(source)
    code, events = run_cli(*segment_args(env["card"], source, output, *extra), cache=env["cache"])
    assert code == 1, events[-1]
    assert events[-1]["event"] == "error" and expected in events[-1]["message"], events[-1]
    assert sha256(source) == before
    assert not partial_files(tmp_path, env["cache"])
    return events


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii"])
def test_truncated_input_is_an_error_in_segment_and_compare(env, tmp_path, name):
    source = _truncated(tmp_path, name)
    expected = "truncated" if name.endswith(".nii") else "truncated or corrupt"
    _segment_fails(env, tmp_path, source, expected)
    assert not (tmp_path / "labels.nii.gz").exists()
    code, events = run_cli(
        "compare", str(env["card"]), "-i", str(source), "-o", str(tmp_path / "report"),
        "--precisions", "fp32", "--weights-dir", str(WEIGHTS), "--backend", "openvino", cache=env["cache"],
    )  # fmt: skip
    assert code == 1 and expected in events[-1]["message"]
    assert not (tmp_path / "report" / "report.json").exists()


def test_truncated_calibration_scan_is_skipped_by_name_or_fails_the_run(env, tmp_path):
    folder = calibration_folder(tmp_path / "calibration", 2)
    broken = _truncated(tmp_path, "broken.nii.gz")
    os.replace(broken, folder / "broken.nii.gz")
    code, events = run_cli(*build_args(env["card"], "--calibration", str(folder)), cache=env["cache"])
    assert code == 0, events[-1]
    assert any("broken.nii.gz: skipped" in w and "truncated" in w for w in warnings_of(events))
    assert "broken.nii.gz" not in str(events[-1]["data"]["build_report"].get("calibration", ""))
    only_broken = tmp_path / "only_broken"
    only_broken.mkdir()
    os.replace(folder / "broken.nii.gz", only_broken / "broken.nii.gz")
    code, events = run_cli(*build_args(env["card"], "--calibration", str(only_broken)), cache=env["cache"])
    assert code == 1 and "broken.nii.gz" in events[-1]["message"] and "truncated" in events[-1]["message"]
    assert not partial_files(tmp_path, env["cache"])


def _segment_warns(env, tmp_path, source, expected: str) -> Path:
    before = sha256(source)
    output = tmp_path / "labels.nii.gz"
    code, events = run_cli(*segment_args(env["card"], source, output), cache=env["cache"])
    assert code == 0, events[-1]
    assert any(expected in w for w in warnings_of(events)), warnings_of(events)
    assert sha256(source) == before and not partial_files(tmp_path, env["cache"])
    return output


def _t1_block(size: int = 32) -> np.ndarray:
    """A real T1 block from the brain's centre (``k, j, i``), where the MeshNet finds grey and white matter."""
    import SimpleITK as sitk
    from shared_data import shared_path

    t1 = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_path("data", "mri", "t1_crop.nii.gz"))))
    centre = [n // 2 for n in t1.shape]
    return t1[tuple(slice(c - size // 2, c + size // 2) for c in centre)].astype(np.float32)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_nan_and_inf_voxels_are_replaced_and_counted(env, tmp_path, suffix):
    clean = _t1_block()
    bad_voxels = [(8, 9, 10), (16, 16, 16), (22, 20, 12)]
    array = clean.copy()
    for voxel, value in zip(bad_voxels, (np.nan, np.inf, -np.inf), strict=True):
        array[voxel] = value

    def save(path: Path, values: np.ndarray) -> Path:
        if suffix == ".nii.gz":  # written by nibabel: ITK's NIfTI reader would turn NaN into 0 unseen
            nib.save(nib.Nifti1Image(values.transpose(2, 1, 0), np.eye(4)), str(path))
            return path
        return write_volume(path, values)

    reference_dir = tmp_path / "clean"
    reference_dir.mkdir()
    reference = reference_dir / "labels.nii.gz"
    code, events = run_cli(
        *segment_args(env["card"], save(reference_dir / f"clean{suffix}", clean), reference),
        cache=env["cache"],
    )
    assert code == 0 and not any("NaN" in w for w in warnings_of(events)), events[-1]
    labels = _segment_warns(
        env,
        tmp_path,
        save(tmp_path / f"nan{suffix}", array),
        f"3 of {array.size} voxels were NaN or infinite",
    )
    expected = np.asarray(nib.load(str(reference)).dataobj)
    got = np.asarray(nib.load(str(labels)).dataobj)
    assert set(np.unique(expected)) >= {1, 2}  # grey and white matter: a real segmentation to compare
    # three replaced voxels barely move the segmentation (MeshNet's dilations reach far, so not exact)
    assert (got == expected).mean() >= 0.99
    for label in (1, 2):
        dice = (
            2
            * ((got == label) & (expected == label)).sum()
            / ((got == label).sum() + (expected == label).sum())
        )
        assert dice >= 0.98, (label, dice)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.zeros((24, 24, 24), np.float32), "the volume is constant"),
        (head_like(size=8), "smaller than the model's receptive field (12 voxels)"),
        (head_like() - 1000, "intensities look like CT"),
    ],
    ids=["all-zero", "8x8x8", "CT-like-for-MR"],
)
def test_suspicious_volumes_are_warned(env, tmp_path, array, expected):
    _segment_warns(env, tmp_path, write_volume(tmp_path / "odd.nii.gz", array), expected)


def test_sheared_input_gives_labels_on_exactly_its_grid(env, tmp_path):
    affine = np.array([[1.0, 0.3, 0, 10], [0, 1.2, 0, -5], [0.1, 0, 0.9, 3], [0, 0, 0, 1]])
    source = tmp_path / "sheared.nii.gz"
    nib.save(nib.Nifti1Image(head_like().transpose(2, 1, 0), affine), str(source))
    _segment_warns(env, tmp_path, source, "not orthogonal")
    written = nib.load(str(tmp_path / "labels.nii.gz"))
    np.testing.assert_allclose(written.affine, nib.load(str(source)).affine, atol=1e-6)
    direction = written.affine[:3, :3] / np.linalg.norm(written.affine[:3, :3], axis=0)
    np.testing.assert_allclose(direction, affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0), atol=1e-6)
    assert written.shape == (24, 24, 24)


@pytest.mark.parametrize("link", ["same-path", "hard-link"])
def test_output_equal_to_input_is_refused_even_with_overwrite(env, tmp_path, link):
    source = write_volume(tmp_path / "scan.nii.gz", head_like())
    output = source if link == "same-path" else tmp_path / "alias.nii.gz"
    if link == "hard-link":
        os.link(source, output)
    _segment_fails(env, tmp_path, source, "is the input", "--overwrite", output=output)


def test_unwritable_folder_and_unknown_ending_fail_before_any_work(env, tmp_path):
    source = write_volume(tmp_path / "scan.nii.gz", head_like())
    if os.geteuid() == 0:  # permissions do not stop root: use a folder the kernel refuses files in
        folder = "/sys"
    else:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
    for output, expected in (
        (f"{folder}/labels.nii.gz", "cannot write in"),
        (tmp_path / "o.txt", "not an image"),
    ):
        events = _segment_fails(env, tmp_path, source, expected, output=output)
        assert not [e for e in events if e["event"] == "progress"], "refused before any work"


def test_argparse_error_under_jsonl_is_one_error_event(env, tmp_path):
    code, events = run_cli(*build_args(env["card"], "--windows", "abc"), cache=env["cache"])
    assert code == 2 and len(events) == 1
    assert events[0]["error_type"] == "UsageError" and "--windows" in events[0]["message"]


def test_dicom_series_choice_and_itk_warnings_reach_the_event_stream(tmp_path):
    import pydicom
    from shared_data import shared_path

    from engine_tools.volumes import read_image

    source = sorted(shared_path("data", "ct", "example_ct_dicom").iterdir())
    folder = tmp_path / "dicom"
    folder.mkdir()
    series = (
        ("1.2.826.0.1.3680043.8.498.1", [*source[:8], *source[9:]]),
        ("1.2.826.0.1.3680043.8.498.2", source[:3]),
    )
    for uid, files in series:  # the first series misses a slice: ITK warns about non-uniform sampling
        for number, path in enumerate(files):
            data = pydicom.dcmread(path)
            data.SeriesInstanceUID, data.SOPInstanceUID = uid, f"{uid}.{number + 1}"
            data.save_as(folder / f"{uid[-1]}_{number:03d}.dcm")
    progress = SilentProgress()
    args = argparse.Namespace(
        func=lambda _args, _progress: {"size": read_image(folder).GetSize()}, progress="none"
    )
    assert cli._run(args, progress) == 0
    messages = [e["message"] for e in progress.events if e["event"] == "log" and e["level"] == "warning"]
    assert any("2 DICOM series" in m for m in messages), messages
    assert any("ITK warning" in m and "uniform" in m.lower() for m in messages), messages
    assert progress.events[-1]["event"] == "result"


def test_models_add_checks_output_channels_by_running_the_network(env, monkeypatch):
    from engine_tools.networks import export_onnx
    from engine_tools.registry import get_card

    monkeypatch.setenv("MEDQUANT_CACHE_DIR", str(env["cache"]))
    onnx_path = export_onnx(get_card(str(env["card"])), WEIGHTS)  # a fixed 3-class ONNX
    before = sha256(onnx_path)
    common = ["models", "add", "--file", str(onnx_path), "--id", "three-class"]
    code, events = run_cli(*common, "--num-classes", "5", cache=env["cache"])
    assert code == 1 and "outputs 3 channels" in events[-1]["message"] and "5 labels" in events[-1]["message"]
    assert sha256(onnx_path) == before
