"""Reading, writing and preprocessing volumes: formats, bad inputs, orientation codes, geometry."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from phantoms import LIA, LPS, OBLIQUE, RAS, dice, make_phantom, world_centroid
from shared_data import shared_path

from engine_tools.cache import partial_artifacts
from engine_tools.volumes import (
    VolumeError,
    VolumeWarning,
    ijk_array,
    modality_mismatch,
    orientation_code,
    preprocess,
    ras_affine,
    read_image,
    to_input_geometry,
    write_image,
)


def _same_geometry(a: sitk.Image, b: sitk.Image, atol: float = 1e-4) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=atol)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=atol)


# ----------------------------------------------------------------------------------- formats and I/O


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".mgz"])
@pytest.mark.parametrize("direction", [RAS, OBLIQUE], ids=["ras", "oblique"])
def test_write_read_round_trip_keeps_values_and_geometry(tmp_path, suffix, direction):
    phantom = make_phantom(
        spacing=(0.9, 1.1, 2.5), direction=direction, inside=300, outside=-20, pixel=sitk.sitkInt16
    )
    path = write_image(phantom.image, tmp_path / f"scan{suffix}")
    back = read_image(path)
    _same_geometry(back, phantom.image)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(phantom.image))
    assert partial_artifacts(tmp_path) == []


def test_mgz_written_by_nibabel_reads_with_its_affine(tmp_path):
    """An MGZ from another tool (nibabel, RAS affine) lands in the same LPS world as SimpleITK sees it."""
    phantom = make_phantom(direction=OBLIQUE, spacing=(1.0, 1.2, 1.5))
    nifti = tmp_path / "ref.nii.gz"
    sitk.WriteImage(phantom.image, str(nifti))
    reference = nib.load(str(nifti))
    mgz = tmp_path / "from_nibabel.mgz"
    nib.save(nib.MGHImage(np.asarray(reference.dataobj, dtype=np.float32), reference.affine), str(mgz))
    image = read_image(mgz)
    _same_geometry(image, phantom.image)
    np.testing.assert_allclose(ras_affine(image), reference.affine, atol=1e-4)
    np.testing.assert_allclose(world_centroid(image), world_centroid(phantom.mask), atol=1e-3)


def test_write_refuses_to_overwrite_unless_asked(tmp_path):
    phantom = make_phantom()
    target = tmp_path / "labels.nrrd"
    target.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="labels.nrrd"):
        write_image(phantom.image, target)
    assert target.read_bytes() == b"user data"
    write_image(phantom.image, target, overwrite=True)
    _same_geometry(read_image(target), phantom.image)
    assert partial_artifacts(tmp_path) == []


def test_dicom_folder_reads_real_ct_series(shared):
    folder = shared_path("data", "ct", "example_ct_dicom")
    image = read_image(folder)
    assert image.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(image.GetSpacing(), (0.9765625, 0.9765625, 2.0))
    assert orientation_code(image) == "LPS"
    values = sitk.GetArrayViewFromImage(image)
    assert values.min() <= -1000 and values.max() > 500  # Hounsfield units, rescale applied
    assert modality_mismatch(image, "CT") is None
    assert "CT" in modality_mismatch(image, "MR")


def test_dicom_folder_with_two_series_reads_the_largest_and_warns(tmp_path, shared):
    import pydicom

    source = sorted(shared_path("data", "ct", "example_ct_dicom").iterdir())
    folder = tmp_path / "two_series"
    folder.mkdir()
    for uid, files in (("1.2.826.0.1.3680043.8.498.1", source), ("1.2.826.0.1.3680043.8.498.2", source[:5])):
        for number, path in enumerate(files):
            data = pydicom.dcmread(path)
            data.SeriesInstanceUID = uid
            data.SOPInstanceUID = f"{uid}.{number + 1}"
            data.save_as(folder / f"{uid[-1]}_{number:03d}.dcm")
    with pytest.warns(VolumeWarning, match=r"2 DICOM series.*\.498\.1 \(20 files\).*\.498\.2 \(5 files\)"):
        image = read_image(folder)
    assert image.GetSize() == (512, 512, 20)
    assert read_image(folder, series_uid="1.2.826.0.1.3680043.8.498.2").GetSize() == (512, 512, 5)
    with pytest.raises(VolumeError, match="no DICOM series 'nope'"):
        read_image(folder, series_uid="nope")


# ------------------------------------------------------------------------------------------ bad inputs


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.nii.gz"):
        read_image(tmp_path / "absent.nii.gz")


@pytest.mark.parametrize("name", ["broken.nii.gz", "broken.nrrd", "broken.mgz", "broken.mha"])
def test_unreadable_file_is_named(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image" * 10)
    with pytest.raises(VolumeError, match=f"{name}: cannot read as an image"):
        read_image(path)


def test_folder_without_dicom_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(VolumeError, match="no DICOM series"):
        read_image(tmp_path)


def test_two_d_images_are_rejected(tmp_path):
    slice_2d = sitk.GetImageFromArray(np.ones((20, 30), np.float32))
    sitk.WriteImage(slice_2d, str(tmp_path / "slice.nrrd"))
    with pytest.raises(VolumeError, match="slice.nrrd: 2-D image"):
        read_image(tmp_path / "slice.nrrd")
    one_slice = sitk.GetImageFromArray(np.ones((1, 20, 30), np.float32))
    sitk.WriteImage(one_slice, str(tmp_path / "one.nii.gz"))
    with pytest.raises(VolumeError, match="one.nii.gz: 2-D image"):
        read_image(tmp_path / "one.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((20, 30), np.float32), np.eye(4)), str(tmp_path / "flat.nii"))
    with pytest.raises(VolumeError, match="flat.nii: 2-D image"):
        read_image(tmp_path / "flat.nii")


def test_four_d_images_are_rejected_with_a_fix_and_single_volume_is_squeezed(tmp_path):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(np.ones((10, 11, 12, 3), np.float32), affine), str(tmp_path / "fmri.nii.gz"))
    with pytest.raises(VolumeError, match=r"fmri.nii.gz: 4-D image with 3 volumes.*pick one volume"):
        read_image(tmp_path / "fmri.nii.gz")
    nib.save(nib.MGHImage(np.ones((10, 11, 12, 3), np.float32), affine), str(tmp_path / "multi.mgz"))
    with pytest.raises(VolumeError, match="multi.mgz: 4-D image with 3 volumes"):
        read_image(tmp_path / "multi.mgz")
    nib.save(nib.Nifti1Image(np.ones((10, 11, 12, 1), np.float32), affine), str(tmp_path / "single.nii.gz"))
    image = read_image(tmp_path / "single.nii.gz")
    assert image.GetDimension() == 3 and image.GetSize() == (10, 11, 12)
    np.testing.assert_allclose(image.GetSpacing(), (2.0, 2.0, 3.0))


def test_non_scalar_images_are_rejected(tmp_path):
    rgb = sitk.GetImageFromArray(np.zeros((8, 9, 10, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "colour.nrrd"))
    with pytest.raises(VolumeError, match="colour.nrrd: non-scalar image \\(3 components"):
        read_image(tmp_path / "colour.nrrd")


def test_bad_orientation_code_is_explained():
    with pytest.raises(VolumeError, match="'RAL' is not an axis code"):
        preprocess(make_phantom().image, {"preprocessing": {"orientation": "RAL"}})


# ------------------------------------------------------------------------------- orientation codes


@pytest.mark.parametrize("code", ["RAS", "LPS", "LIA", "AIL", "PSR"])
@pytest.mark.parametrize("direction", [LPS, RAS, LIA], ids=["lps", "ras", "lia"])
def test_orientation_codes_match_nibabel_and_simpleitk(code, direction):
    """nibabel-style codes (+axis direction); SimpleITK's DICOMOrient uses the same letters here."""
    phantom = make_phantom(direction=direction, spacing=(1.0, 2.0, 3.0))
    prep = preprocess(phantom.image, {"preprocessing": {"orientation": code}})
    assert "".join(nib.aff2axcodes(prep.affine)) == code
    oriented = sitk.DICOMOrient(phantom.image, code)
    np.testing.assert_array_equal(prep.array[0], ijk_array(oriented))
    np.testing.assert_allclose(prep.affine, ras_affine(oriented), atol=1e-5)


def test_lia_conformed_t1_is_unchanged_by_its_own_card(shared):
    """The brainchop sample is already 256^3 1 mm LIA: preprocessing only rescales intensities."""
    path = shared_path("data", "mri", "t1_crop.nii.gz")
    prep = preprocess(
        path,
        {
            "preprocessing": {
                "orientation": "LIA",
                "spacing": [1, 1, 1],
                "shape": [256, 256, 256],
                "intensity": {"rule": "none"},
            }
        },
    )
    reference = nib.load(str(path))
    np.testing.assert_allclose(prep.affine, reference.affine, atol=1e-4)
    np.testing.assert_array_equal(prep.array[0], np.asarray(reference.dataobj, dtype=np.float32))


# ------------------------------------------------------------------------------------ intensity rules


def test_intensity_rules():
    ramp = make_phantom(size=(20, 20, 20), inside=250, outside=-1000)
    window = preprocess(
        ramp.image, {"preprocessing": {"intensity": {"rule": "window", "a_min": -175, "a_max": 250}}}
    ).array
    assert window.min() == 0.0 and window.max() == 1.0
    values = make_phantom(size=(20, 20, 20), inside=100, outside=10).image
    noisy = sitk.GetArrayFromImage(values) + np.random.default_rng(0).normal(0, 5, (20, 20, 20)).astype(
        np.float32
    )
    image = sitk.GetImageFromArray(noisy)
    quantile = preprocess(
        image, {"preprocessing": {"intensity": {"rule": "quantile", "lower": 0.02, "upper": 0.98}}}
    )
    assert quantile.array.min() == 0.0 and quantile.array.max() == 1.0
    lo, hi = np.quantile(noisy, [0.02, 0.98])
    assert quantile.steps["intensity"]["a_min"] == pytest.approx(lo, rel=1e-5)
    assert np.mean(quantile.array == 1.0) == pytest.approx(0.02, abs=0.005)
    masked = noisy.copy()
    masked[:5] = 0
    z = preprocess(
        sitk.GetImageFromArray(masked), {"preprocessing": {"intensity": {"rule": "zscore"}}}
    ).array[0]
    inside = z.transpose(2, 1, 0)[5:]
    assert abs(inside.mean()) < 1e-4 and inside.std() == pytest.approx(1.0, abs=1e-3)
    assert np.all(z.transpose(2, 1, 0)[:5] == 0)
    scaled = preprocess(
        sitk.GetImageFromArray(masked),
        {"preprocessing": {"intensity": {"rule": "zscore", "then_scale": {"b_min": -1.0, "b_max": 1.0}}}},
    ).array
    assert scaled.min() == pytest.approx(-1.0) and scaled.max() == pytest.approx(1.0)
    with pytest.raises(VolumeError, match="unknown intensity rule 'gamma'"):
        preprocess(image, {"preprocessing": {"intensity": {"rule": "gamma"}}})


# --------------------------------------------------------------------------- geometry round trips


GEOMETRIES = {
    "lps": dict(direction=LPS, spacing=(1.0, 1.0, 1.0)),
    "ras": dict(direction=RAS, spacing=(1.0, 1.0, 1.0)),
    "oblique": dict(direction=OBLIQUE, spacing=(1.0, 1.0, 1.0)),
    "anisotropic": dict(direction=RAS, spacing=(0.7, 1.3, 2.6), size=(56, 30, 14)),
    "oblique_anisotropic": dict(direction=OBLIQUE, spacing=(1.4, 0.8, 2.2), size=(30, 50, 20)),
}


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize(
    "spec",
    [
        {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5]},
        {"orientation": "LIA", "spacing": [1.0, 1.0, 1.0], "shape": [48, 48, 48]},
        {"orientation": None, "spacing": None},
    ],
    ids=["ras_1.5mm", "lia_conformed", "native"],
)
def test_thresholded_network_space_lands_on_the_shape_in_world(geometry, spec):
    phantom = make_phantom(**GEOMETRIES[geometry], offset_mm=(6.0, -5.0, 4.0))
    prep = preprocess(phantom.image, {"preprocessing": {**spec, "intensity": {"rule": "none"}}})
    if spec.get("orientation"):
        assert "".join(nib.aff2axcodes(prep.affine)) == spec["orientation"]
    if spec.get("shape"):
        assert prep.spatial_shape == tuple(spec["shape"])
    labels = to_input_geometry((prep.array[0] > 0.5).astype(np.uint8), prep)
    _same_geometry(labels, phantom.image, atol=1e-6)
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert dice(labels, phantom.mask) > 0.8
    # a flip or shift moves the centroid by >= 5 mm (the shape sits off the grid centre)
    tolerance = 0.75 * max(*GEOMETRIES[geometry]["spacing"], *(spec.get("spacing") or [1.0]))
    error = np.abs(world_centroid(labels) - world_centroid(phantom.mask))
    assert np.all(error <= tolerance), error


def test_labels_outside_the_network_grid_become_background():
    """A conform crop smaller than the input: the cropped-away input voxels get label 0."""
    phantom = make_phantom(size=(40, 36, 32), offset_mm=(0, 0, 0), radius=30, shape="box")
    prep = preprocess(phantom.image, {"preprocessing": {"orientation": "RAS", "shape": [20, 20, 20]}})
    labels = sitk.GetArrayFromImage(to_input_geometry(np.ones(prep.spatial_shape, np.uint8), prep))
    assert labels.sum() == 20**3
    assert labels[16, 18, 20] == 1 and labels[0, 0, 0] == 0


def test_labels_above_255_use_uint16():
    phantom = make_phantom()
    prep = preprocess(phantom.image, {"preprocessing": {"orientation": "RAS"}})
    labels = to_input_geometry(np.full(prep.spatial_shape, 300, np.int64), prep)
    assert labels.GetPixelID() == sitk.sitkUInt16 and sitk.GetArrayViewFromImage(labels).max() == 300


def test_dicom_ct_window_preprocessing_round_trip(shared):
    image = read_image(shared_path("data", "ct", "example_ct_dicom"))
    card = {
        "preprocessing": {
            "orientation": "RAS",
            "spacing": [1.5, 1.5, 2.0],
            "intensity": {"rule": "window", "a_min": -175, "a_max": 250},
        }
    }
    prep = preprocess(image, card)
    assert prep.array.shape == (1, 334, 334, 20) and prep.array.dtype == np.float32
    assert 0.0 == prep.array.min() and prep.array.max() == 1.0
    bone = to_input_geometry((prep.array[0] > 0.99).astype(np.uint8), prep)
    _same_geometry(bone, image)
    truth = sitk.GetArrayViewFromImage(image) > 250
    assert dice(bone, truth) > 0.8


def test_no_warnings_for_plain_reads(tmp_path):
    phantom = make_phantom()
    path = write_image(phantom.image, tmp_path / "plain.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_image(path)
    shutil.rmtree(tmp_path)
    assert not Path(path).exists()
