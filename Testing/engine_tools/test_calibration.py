"""Calibration windows from folders of unlabeled scans: foreground, seeding, caching, bad inputs."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from phantoms import OBLIQUE, RAS, make_phantom
from shared_data import shared_path

from engine_tools.cache import cache_dir, partial_artifacts
from engine_tools.calibration import CalibrationError, collect_windows
from engine_tools.calibration_store import in_memory
from engine_tools.progress import SilentProgress
from engine_tools.registry import ModelCard
from engine_tools.scans import find_scans


def make_card(modality="CT", window=(12, 12, 12), **preprocessing) -> ModelCard:
    return ModelCard.from_dict(
        {
            "id": "calibration-test",
            "title": "t",
            "task": "t",
            "modality": modality,
            "labels": [{"value": 0, "name": "background"}, {"value": 1, "name": "ball"}],
            "preprocessing": {
                "orientation": "RAS",
                "spacing": [1.0, 1.0, 1.0],
                "intensity": {"rule": "window", "a_min": -175, "a_max": 250},
                **preprocessing,
            },
            "window": {"size": list(window)},
            "network": {"format": "onnx", "num_classes": 2},
            "weights": {"files": []},
        }
    )


def small_ball_scan(path, direction=RAS, offset=(0.0, 0.0, 0.0), inside=1075, outside=-1000):
    """A 48^3 scan of air with a 9 mm ball (about 2.5% of the voxels): random windows are mostly air."""
    phantom = make_phantom(
        size=(48, 48, 48), direction=direction, radius=9.0, offset_mm=offset, inside=inside, outside=outside
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.Cast(phantom.image, sitk.sitkInt16), str(path))
    return phantom


@pytest.fixture
def scans(tmp_path):
    folder = tmp_path / "scans"
    small_ball_scan(folder / "a.nii.gz", offset=(5, 0, 0))
    small_ball_scan(folder / "nested" / "b.nrrd", direction=OBLIQUE, offset=(-4, 3, 2))
    small_ball_scan(folder / "nested" / "deeper" / "c.mha", offset=(0, -6, 3))
    (folder / "nested" / "notes.txt").write_text("not a scan")
    return folder


def test_windows_are_foreground_spread_and_reproducible(scans):
    progress = SilentProgress()
    card = make_card()
    result = collect_windows(scans, card, num_windows=7, seed=3, progress=progress, use_cache=False)
    assert result.windows.shape == (7, 1, 12, 12, 12) and result.windows.dtype == np.float32
    # round-robin over scans in sorted order: 3 + 2 + 2 windows
    assert result.sources[:3] == ["a.nii.gz", "nested/b.nrrd", "nested/deeper/c.mha"]
    assert sorted(result.sources.count(s) for s in set(result.sources)) == [2, 2, 3]
    # never mostly air: the ball is ~2.5% of each scan, yet every window is at least half ball
    ball = result.windows > 0.5
    assert ball.reshape(7, -1).mean(axis=1).min() >= 0.5
    assert min(result.foreground) >= 0.5
    assert len({tuple(c) for c in result.corners}) == 7
    assert result.warnings == []
    again = collect_windows(scans, card, num_windows=7, seed=3, use_cache=False)
    np.testing.assert_array_equal(again.windows, result.windows)
    assert again.fingerprint == result.fingerprint
    other = collect_windows(scans, card, num_windows=7, seed=4, use_cache=False)
    assert other.fingerprint != result.fingerprint and other.corners != result.corners
    fractions = [e["fraction"] for e in progress.events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_fingerprint_follows_content_not_timestamps(scans):
    card = make_card()
    first = collect_windows(scans, card, num_windows=3, use_cache=False).fingerprint
    target = scans / "a.nii.gz"
    os.utime(target, (1_000_000, 1_000_000))
    assert collect_windows(scans, card, num_windows=3, use_cache=False).fingerprint == first
    assert collect_windows(scans, card, num_windows=4, use_cache=False).fingerprint != first
    wider = make_card(window=(14, 14, 14))
    assert collect_windows(scans, wider, num_windows=3, use_cache=False).fingerprint != first
    small_ball_scan(target, offset=(6, 0, 0))
    assert collect_windows(scans, card, num_windows=3, use_cache=False).fingerprint != first


def test_cache_round_trip_is_atomic_and_identical(scans, isolated_cache):
    card = make_card()
    built = collect_windows(scans, card, num_windows=5)
    assert not built.from_cache
    assert len(list((cache_dir("calibration") / built.fingerprint).glob("sample-*.npy"))) == 5
    cached = collect_windows(scans, card, num_windows=5)
    assert cached.from_cache
    np.testing.assert_array_equal(cached.windows, built.windows)
    assert cached.sources == built.sources and cached.corners == built.corners
    assert partial_artifacts(isolated_cache) == []


def test_split_holds_out_windows_from_several_scans(scans):
    result = collect_windows(scans, make_card(), num_windows=9, use_cache=False)
    calibration, holdout = result.split(3)
    assert len(calibration) == 6 and len(holdout) == 3
    assert len(set(holdout.sources)) == 3
    np.testing.assert_array_equal(np.concatenate([calibration.windows, holdout.windows]), result.windows)
    assert len({calibration.fingerprint, holdout.fingerprint, result.fingerprint}) == 3
    for bad in (0, 9, 12):
        with pytest.raises(ValueError, match="hold out"):
            result.split(bad)


def test_subject_holdout_never_mixes_scans(scans, tmp_path):
    small_ball_scan(scans / "d.nii.gz", offset=(2, 2, -3))
    result = collect_windows(scans, make_card(), num_windows=12, seed=5, use_cache=False)
    assert len(result.subjects) == 4
    calibration, holdout = result.split_subjects(seed=5)
    assert len(holdout.subjects) == 1  # a quarter of 4 scans
    assert not set(holdout.sources) & set(calibration.sources)
    assert len(calibration) + len(holdout) == 12 and len(holdout) == 3
    assert set(calibration.scan_sha256) == set(calibration.subjects)
    # reproducible for one seed; other seeds hold out other scans
    assert result.split_subjects(seed=5)[1].subjects == holdout.subjects
    held = {tuple(result.split_subjects(seed=s)[1].subjects) for s in range(12)}
    assert len(held) > 1
    single = collect_windows(scans / "nested" / "deeper", make_card(), num_windows=4, use_cache=False)
    assert single.split_subjects() is None


def test_whole_cropped_volumes_are_ragged_and_cached(scans, isolated_cache):
    """A fully convolutional card gets one sample per scan: its volume cropped to the tissue box plus the
    receptive-field margin (grown to a multiple of 8); the crops differ in shape and round-trip through
    the cache."""
    big = make_phantom(size=(48, 48, 48), radius=15.0, inside=1075, outside=-1000)  # a larger box
    sitk.WriteImage(sitk.Cast(big.image, sitk.sitkInt16), str(scans / "big.nii.gz"))
    card = make_card(window=(12, 12, 12))
    raw = {**card.raw, "network": {**card.raw["network"], "fully_convolutional": True, "receptive_field": 5}}
    card = ModelCard.from_dict(raw)
    built = collect_windows(scans, card, num_windows=8)
    assert built.whole_volumes and isinstance(built.windows, list) and len(built) == 4
    shapes = [s.shape for s in built.samples]
    assert len(set(shapes)) > 1 and all(s[0] == 1 and max(s[1:]) < 48 for s in shapes)
    assert built.describe()["samples"] == "whole cropped volumes"
    assert built.describe()["sample_shapes"] == [list(s) for s in shapes]
    cached = collect_windows(scans, card, num_windows=8)
    assert cached.from_cache and [s.shape for s in cached.samples] == shapes
    # mapped from the verified files, not read: finding a cached engine needs only the fingerprint
    assert not any(s.flags.writeable or s.flags.owndata for s in cached.samples)
    one = cached.subset([1], "one-scan")
    assert not (one.windows.flags.writeable or one.windows.flags.owndata)  # a view, not a copy
    copied = in_memory(one.windows)
    assert copied.flags.writeable and not isinstance(copied, np.memmap)
    np.testing.assert_array_equal(copied[0], built.samples[1])
    assert all(a.flags.writeable for a in in_memory(cached.windows))
    windows = cached.to_windows((12, 12, 12), per_sample=2)
    assert windows.windows.shape == (8, 1, 12, 12, 12) and not windows.whole_volumes  # 2 per scan
    assert (
        windows.sources[: len(cached.sources)] == cached.sources and windows.fingerprint != cached.fingerprint
    )


def test_validation_scans_must_be_other_subjects(scans, tmp_path):
    from engine_tools.calibration import check_disjoint

    other = tmp_path / "validation"
    other.mkdir()
    (other / "copy_of_b.nrrd").write_bytes((scans / "nested" / "b.nrrd").read_bytes())
    small_ball_scan(other / "new.nii.gz", offset=(1, 1, 1))
    calibration = collect_windows(scans, make_card(), num_windows=6, use_cache=False)
    validation = collect_windows(other, make_card(), num_windows=4, use_cache=False)
    with pytest.raises(CalibrationError, match="validation copy_of_b.nrrd = calibration nested/b.nrrd"):
        check_disjoint(calibration, validation)
    (other / "copy_of_b.nrrd").unlink()
    check_disjoint(calibration, collect_windows(other, make_card(), num_windows=4, use_cache=False))


def test_whole_volume_mode_for_conformed_cards(scans):
    card = make_card(window=(40, 40, 40), shape=[40, 40, 40])
    result = collect_windows(scans, card, num_windows=2, whole_volume=True, use_cache=False)
    assert result.windows.shape == (2, 1, 40, 40, 40)
    assert len(set(result.sources)) == 2 and result.corners == [(0, 0, 0), (0, 0, 0)]
    again = collect_windows(scans, card, num_windows=2, whole_volume=True, use_cache=False)
    assert again.sources == result.sources


# ------------------------------------------------------------------------------------------ bad inputs


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        collect_windows(tmp_path / "nowhere", make_card())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="empty: no scans found"):
        collect_windows(empty, make_card())
    (empty / "readme.md").write_text("only notes here")
    with pytest.raises(CalibrationError, match="no scans found"):
        collect_windows(empty, make_card())


def test_bad_files_are_named_and_skipped_and_the_rest_is_used(scans):
    (scans / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((30, 30), np.float32)), str(scans / "slice.nrrd"))
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20, 4), np.int16), np.eye(4)), str(scans / "series4d.nii.gz"))
    (scans / "scan.xyz").write_bytes(b"unknown format")
    result = collect_windows(scans, make_card(), num_windows=6, use_cache=False)
    skipped = {s["file"]: s["reason"] for s in result.skipped}
    assert set(skipped) == {"corrupt.nii.gz", "slice.nrrd", "series4d.nii.gz"}
    assert "cannot read" in skipped["corrupt.nii.gz"]
    assert "2-D image" in skipped["slice.nrrd"]
    assert "4-D image with 4 volumes" in skipped["series4d.nii.gz"]
    text = "\n".join(result.warnings)
    for name in ("corrupt.nii.gz", "slice.nrrd", "series4d.nii.gz", "scan.xyz"):
        assert name in text
    assert len(result) == 6 and set(result.sources) == {"a.nii.gz", "nested/b.nrrd", "nested/deeper/c.mha"}


def test_folder_with_nothing_usable_is_an_error_naming_every_file(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.mha").write_bytes(b"garbage")
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20, 2), np.int16), np.eye(4)), str(folder / "y.nii"))
    small_ball_scan(folder / "air.nii.gz", inside=-1000)  # nothing but air
    with pytest.raises(CalibrationError) as info:
        collect_windows(folder, make_card(), use_cache=False)
    message = str(info.value)
    assert "no usable scan" in message
    assert "x.mha" in message and "y.nii: " in message and "air.nii.gz: no window with tissue" in message


def test_modality_mismatch_is_warned_with_the_file_name(tmp_path):
    folder = tmp_path / "mixed"
    small_ball_scan(folder / "ct.nii.gz")
    small_ball_scan(folder / "mr_like.nii.gz", inside=900, outside=0)
    ct = collect_windows(folder, make_card(), num_windows=4, use_cache=False)
    assert [w for w in ct.warnings if "Hounsfield" in w] and all(
        w.startswith("mr_like.nii.gz") for w in ct.warnings
    )
    assert set(ct.sources) == {"ct.nii.gz", "mr_like.nii.gz"}  # warned, still used
    mr_card = make_card(modality="MR", intensity={"rule": "quantile", "lower": 0.01, "upper": 0.99})
    mr = collect_windows(folder, mr_card, num_windows=4, use_cache=False)
    assert len(mr.warnings) == 1 and mr.warnings[0].startswith("ct.nii.gz") and "expects MR" in mr.warnings[0]


def test_invalid_arguments(scans):
    with pytest.raises(ValueError, match="num_windows"):
        collect_windows(scans, make_card(), num_windows=0)
    with pytest.raises(ValueError, match="min_foreground"):
        collect_windows(scans, make_card(), min_foreground=0)


# ------------------------------------------------------------------------------------------- real data


def test_real_dicom_folder_and_nifti_ct(tmp_path, shared):
    folder = tmp_path / "ct"
    folder.mkdir()
    (folder / "series").symlink_to(shared_path("data", "ct", "example_ct_dicom"), target_is_directory=True)
    (folder / "small.nii.gz").symlink_to(shared_path("data", "ct", "example_ct_sm.nii.gz"))
    card = make_card(window=(32, 32, 16), spacing=[1.5, 1.5, 2.0])
    candidates, _ = find_scans(folder)
    assert [c.relative for c in candidates] == ["series/", "small.nii.gz"]
    result = collect_windows(folder, card, num_windows=6, use_cache=False)
    assert result.windows.shape == (6, 1, 32, 32, 16)
    assert set(result.sources) == {"series/", "small.nii.gz"} and result.warnings == []
    # body, not air: most voxels are above -100 HU (window value 0.18)
    assert (result.windows > 0.15).reshape(6, -1).mean(axis=1).min() >= 0.5


def test_windows_larger_than_the_anatomy_take_the_most_tissue(tmp_path):
    """A 40^3 window around a 14 mm ball can hold at most ~18% tissue: the fullest windows are used."""
    phantom = make_phantom(size=(48, 48, 48), radius=14.0, offset_mm=(3, 0, 0), inside=1075, outside=-1000)
    sitk.WriteImage(sitk.Cast(phantom.image, sitk.sitkInt16), str(tmp_path / "big_window.nii.gz"))
    result = collect_windows(tmp_path, make_card(window=(40, 40, 40)), num_windows=4, use_cache=False)
    ball_voxels = int(sitk.GetArrayViewFromImage(phantom.mask).sum())
    best_possible = ball_voxels / 40**3
    assert 0.1 < best_possible < 0.5
    assert min(result.foreground) >= 0.8 * best_possible * 0.95
    assert ((result.windows > 0.5).reshape(4, -1).mean(axis=1) >= 0.75 * best_possible).all()


def test_a_window_as_large_as_the_scan_is_one_sample_not_copies(tmp_path):
    """deepbet's 256^3 window on a conformed 256^3 head has one position: 32 copies of it added no
    range information and cost 2 GB to store and load on every segmentation's cache lookup."""
    folder = tmp_path / "one"
    folder.mkdir()
    head = make_phantom(size=(48, 48, 48), direction=RAS, radius=20.0, inside=1075, outside=-1000)
    sitk.WriteImage(sitk.Cast(head.image, sitk.sitkInt16), str(folder / "head.nii.gz"))
    whole = collect_windows(folder, make_card(window=(48, 48, 48)), num_windows=8, use_cache=False)
    assert whole.windows.shape == (1, 1, 48, 48, 48) and whole.corners == [(0, 0, 0)]
    # a window one voxel smaller has 2 positions per axis on its 1-voxel grid: 8 distinct, never repeated
    near = collect_windows(folder, make_card(window=(47, 47, 47)), num_windows=8, use_cache=False)
    assert len(near) == len(set(near.corners)) >= 2
    # one scan, one window: the guard validates on it and says so (no held-out window to take)
    from engine_tools.build_samples import calibration_samples
    from engine_tools.engines.openvino.engine import OpenVINOEngine
    from engine_tools.spec import EngineSpec

    progress = SilentProgress()
    card = make_card(window=(48, 48, 48))
    spec = EngineSpec(calibration=whole, options={"scanner_variations": False})
    cal, val, info = calibration_samples(spec, OpenVINOEngine("int8"), card, progress)
    assert len(cal) == 1 and val is None and info["holdout"] == "none"
    assert "which calibration also used" in info["validation_note"]


def test_one_scan_is_also_validated_on_its_scanner_variations(tmp_path) -> None:
    """With every scan used for calibration, the guard also validates on contrast and blur copies of
    the scan (engine_tools.scanner_variations): windows keep their shape, the scan is not changed."""
    from engine_tools.build_samples import calibration_samples, with_copies
    from engine_tools.engines.openvino.engine import OpenVINOEngine
    from engine_tools.spec import EngineSpec

    folder = tmp_path / "one"
    folder.mkdir()
    head = make_phantom(size=(48, 48, 48), direction=RAS, radius=20.0, inside=1075, outside=-1000)
    sitk.WriteImage(sitk.Cast(head.image, sitk.sitkInt16), str(folder / "head.nii.gz"))
    card = make_card(window=(48, 48, 48))
    whole = collect_windows(folder, card, num_windows=8, use_cache=False)
    before = whole.windows.copy()
    spec = EngineSpec(calibration=whole, options={"scanner_variations": True})
    cal, val, info = calibration_samples(spec, OpenVINOEngine("int8"), card, SilentProgress())
    assert len(cal) == 1 and val is not None and len(val) == 4
    assert info["holdout"] == "none and its scanner variations" and info["validation_copies"] == 3
    assert info["validation_note"].startswith("samples: 1 window(s) of the only calibration scan")
    assert "gamma 0.7, gamma 1.4, blurred 1 voxel" in info["validation_note"]
    assert "optimistic because no unseen subject was available" in info["validation_note"]
    np.testing.assert_array_equal(val.windows[0], before[0])  # the scan itself comes first, unchanged
    np.testing.assert_array_equal(whole.windows, before)
    assert val.windows.shape == (4, 1, 48, 48, 48) and val.subjects == whole.subjects
    assert len({val.fingerprint, whole.fingerprint}) == 2
    assert not np.array_equal(val.windows[3], before[0])  # blurred (a two-level phantom keeps its gamma)
    # to find a cached engine the copies are only described: the same count, note and fingerprint
    deferred_cal, deferred, described = calibration_samples(
        spec, OpenVINOEngine("int8"), card, SilentProgress(), make_copies=False
    )
    assert deferred is None and described["validation_fingerprint"] == val.fingerprint
    assert {k: described[k] for k in ("validation_note", "validation_copies")} == {
        k: info[k] for k in ("validation_note", "validation_copies")
    }
    made = with_copies(deferred_cal, deferred, described)
    assert made.fingerprint == val.fingerprint and np.array_equal(made.windows, val.windows)
    assert described["validation"] == info["validation"]
    # the option turns it off
    spec = EngineSpec(calibration=whole, options={"scanner_variations": False})
    assert calibration_samples(spec, OpenVINOEngine("int8"), card, SilentProgress())[1] is None
