"""Sliding-window segmentation through a real engine: geometry, progress, cancellation, outputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from phantoms import LPS, OBLIQUE, RAS, dice, make_phantom, world_centroid
from shared_data import shared_path

from engine_tools.cache import partial_artifacts
from engine_tools.engines import BuildRequest
from engine_tools.engines.torch_engine import TorchEngine
from engine_tools.progress import Cancelled, SilentProgress
from engine_tools.registry import ModelCard
from engine_tools.segment import count_windows, label_table_paths, segment_image, write_segmentation
from engine_tools.volumes import read_image


class ThresholdNet(torch.nn.Module):
    """Two logits per voxel, class 1 where the input exceeds 0.5 (a 1x1x1 convolution)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-10.0, 10.0]).view(2, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([5.0, -5.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def make_card(window=(24, 24, 24), spacing=(1.5, 1.5, 1.5), orientation="RAS", **extra) -> ModelCard:
    return ModelCard.from_dict(
        {
            "id": "threshold-test",
            "title": "threshold",
            "task": "test",
            "modality": "CT",
            "labels": [
                {"value": 0, "name": "background", "color": [0, 0, 0]},
                {"value": 1, "name": "ball", "color": [255, 10, 20]},
            ],
            "preprocessing": {
                "orientation": orientation,
                "spacing": list(spacing) if spacing else None,
                "intensity": {"rule": "window", "a_min": -175, "a_max": 250},
                **extra,
            },
            "window": {"size": list(window), "overlap": 0.5, "blend": "gaussian", "batch": 2},
            "network": {"format": "torch", "in_channels": 1, "num_classes": 2},
            "weights": {"files": []},
        }
    )


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> TorchEngine:
    artifact = tmp_path_factory.mktemp("threshold-engine")
    built = TorchEngine("fp32")
    request = BuildRequest("threshold-test", None, (24, 24, 24), 1, 2, torch_module_factory=ThresholdNet)
    built.build(request, artifact)
    loaded = TorchEngine("fp32")
    loaded.attach_factory(ThresholdNet)
    loaded.load(artifact)
    return loaded


GEOMETRIES = {
    "lps": dict(direction=LPS, spacing=(1.0, 1.0, 1.0)),
    "ras": dict(direction=RAS, spacing=(1.0, 1.0, 1.0)),
    "oblique": dict(direction=OBLIQUE, spacing=(1.0, 1.0, 1.0)),
    "anisotropic": dict(direction=RAS, spacing=(0.7, 1.3, 2.6), size=(60, 32, 16)),
}


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_segmentation_lands_on_the_ball_in_world_coordinates(engine, geometry):
    # HU phantom: a 1075 HU ball in -1000 HU air, so the network's 0.5 threshold (37.5 HU after the
    # -175..250 window) sits half-way up the interpolated edge and does not bias the boundary
    phantom = make_phantom(**GEOMETRIES[geometry], inside=1075, outside=-1000, offset_mm=(6, -5, 4), radius=9)
    progress = SilentProgress()
    result = segment_image(engine, make_card(), phantom.image, progress=progress, keep_logits=True)
    labels = result.labels
    assert labels.GetSize() == phantom.image.GetSize()
    np.testing.assert_allclose(labels.GetOrigin(), phantom.image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(labels.GetDirection(), phantom.image.GetDirection(), atol=1e-6)
    assert dice(labels, phantom.mask) > 0.85
    error = np.abs(world_centroid(labels) - world_centroid(phantom.mask))
    assert np.all(error < 0.75 * max(1.5, *GEOMETRIES[geometry]["spacing"])), error
    # timings and progress describe the windows that really ran
    timings = result.timings
    assert timings["num_windows"] == count_windows(result.prep.spatial_shape, (24, 24, 24), 0.5)
    assert len(timings["window_latencies_s"]) == -(-timings["num_windows"] // 2)
    assert timings["median_window_latency_s"] > 0 and timings["total_s"] >= timings["inference_s"]
    fractions = [e["fraction"] for e in progress.events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert result.logits.shape == (2, *result.prep.spatial_shape) and result.logits.dtype == np.float32
    assert np.array_equal(np.argmax(result.logits, axis=0), result.network_labels)


def test_volume_smaller_than_the_window_is_padded(engine):
    phantom = make_phantom(size=(12, 14, 10), inside=100, outside=-1000, offset_mm=(1, 0, 0), radius=3)
    result = segment_image(engine, make_card(spacing=None), phantom.image)
    assert result.timings["num_windows"] == 1
    assert result.network_labels.shape == (12, 14, 10)
    assert dice(result.labels, phantom.mask) > 0.95


def test_conformed_volume_equal_to_window_runs_once(engine):
    phantom = make_phantom(size=(30, 30, 30), inside=100, outside=-1000)
    card = make_card(window=(32, 32, 32), spacing=(1, 1, 1), orientation="LIA", shape=[32, 32, 32])
    result = segment_image(engine, card, phantom.image, overlap=0.25)
    assert result.timings["num_windows"] == 1 and result.timings["overlap"] == 0.25
    assert dice(result.labels, phantom.mask) > 0.99


def test_modality_mismatch_is_warned(engine):
    mr_like = make_phantom(inside=400, outside=0)  # no air below -500: not CT in HU
    progress = SilentProgress()
    result = segment_image(engine, make_card(), mr_like.image, progress=progress)
    assert any("Hounsfield" in w for w in result.warnings)
    assert any(e["event"] == "log" and e["level"] == "warning" for e in progress.events)


def test_cancellation_stops_between_window_batches(engine):
    phantom = make_phantom(size=(60, 60, 60), inside=100, outside=-1000)
    progress = SilentProgress()
    calls = {"n": 0}

    def cancel_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    progress.should_cancel = cancel_after_two
    with pytest.raises(Cancelled):
        segment_image(engine, make_card(), phantom.image, progress=progress)


def test_bad_window_settings_are_rejected(engine):
    phantom = make_phantom()
    with pytest.raises(ValueError, match="overlap"):
        segment_image(engine, make_card(), phantom.image, overlap=1.0)
    with pytest.raises(ValueError, match="batch size"):
        segment_image(engine, make_card(), phantom.image, batch_size=0)


def test_write_segmentation_writes_labelmap_and_tables(engine, tmp_path):
    phantom = make_phantom(direction=OBLIQUE, inside=100, outside=-1000)
    result = segment_image(engine, make_card(), phantom.image)
    out = tmp_path / "case1_labels.nrrd"
    written = write_segmentation(result, out)
    assert written["label_table_json"] == label_table_paths(out)[0] == tmp_path / "case1_labels.labels.json"
    back = read_image(out)
    assert sitk.GetArrayViewFromImage(back).max() == 1
    np.testing.assert_allclose(back.GetDirection(), phantom.image.GetDirection(), atol=1e-6)
    table = json.loads(written["label_table_json"].read_text())
    assert table["model"] == "threshold-test" and table["labels"][1]["name"] == "ball"
    rows = list(csv.DictReader(written["label_table_csv"].open()))
    assert rows[1] == {"value": "1", "name": "ball", "r": "255", "g": "10", "b": "20"}
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="case1_labels"):
        write_segmentation(result, out)
    assert out.read_bytes() == before
    write_segmentation(result, tmp_path / "case1.nii.gz")
    assert (tmp_path / "case1.labels.csv").is_file()
    assert partial_artifacts(tmp_path) == []


# ------------------------------------------------------------------------------------- a real network


def test_real_brainchop_grey_white_model_on_a_t1_crop(shared):
    """The published 3-class MeshNet, OpenVINO strict FP32 engine, on a real T1 (cropped to stay fast)."""
    from dataclasses import replace

    from engine_tools.pipeline import prepare_engine
    from engine_tools.registry import get_card
    from engine_tools.volumes import ijk_array

    weights = shared_path("models", "brainchop")
    card = get_card("brainchop-model5_gw_ae")
    assert card.preprocessing["orientation"] == "LIA"
    # the card conforms to 256^3 with 192^3 windows; a 112x96x96 crop with 96^3 windows keeps this short
    card = replace(
        card,
        preprocessing={**card.preprocessing, "shape": None},
        window={**card.window, "size": [96, 96, 96], "overlap": 0.5},
    )
    t1 = read_image(shared_path("data", "mri", "t1_crop.nii.gz"))
    crop = t1[72:184, 80:176, 80:176]
    engine = prepare_engine(card, backend="openvino", precision="fp32", weights_dir=weights)

    result = segment_image(engine, card, crop, keep_logits=True, whole_volume=False)
    labels = result.labels
    assert labels.GetSize() == crop.GetSize()
    np.testing.assert_allclose(labels.GetOrigin(), crop.GetOrigin())
    assert result.timings["num_windows"] == 2  # axis 0: windows at 0 and 16
    # LIA 1 mm input and card: network grid == input grid, labels map back voxel for voxel
    network = result.network_labels
    np.testing.assert_array_equal(ijk_array(labels), network)
    # the voxels only one window covers carry exactly that window's argmax
    volume = result.prep.array[None]
    first = engine.run(np.ascontiguousarray(volume[..., :96, :, :])).argmax(1)[0]
    second = engine.run(np.ascontiguousarray(volume[..., 16:, :, :])).argmax(1)[0]
    np.testing.assert_array_equal(network[:16], first[:16])
    np.testing.assert_array_equal(network[96:], second[80:])
    # plausible anatomy: all tissues present, white matter brighter than grey matter on T1
    fractions = [float((network == k).mean()) for k in range(3)]
    assert min(fractions) > 0.1, fractions
    values = np.asarray(ijk_array(crop), dtype=np.float32)
    assert values[network == 1].mean() > values[network == 2].mean() + 10
