"""Preprocessing and window padding equal each publisher's MONAI bundle transform chain.

Each reference is built from the transforms the bundle's ``configs/inference.json`` lists (MONAI
model zoo: ``vista3d``, ``wholeBrainSeg_Large_UNEST_segmentation``, ``wholeBody_ct_segmentation``)
and applied to a real scan; the product's :func:`engine_tools.volumes.preprocess` /
:func:`engine_tools.segment.segment_image` must give the same arrays.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from engine_tools.registry import ModelCard, get_card
from engine_tools.segment import segment_image
from engine_tools.volumes import preprocess


def test_vista3d_crops_the_foreground_like_its_bundle(shared: Path) -> None:
    from monai import transforms as mt

    card = get_card("vista3d")
    scan = shared / "data" / "ct" / "example_ct_sm.nii.gz"
    bundle = mt.Compose(
        [
            mt.LoadImaged("image", image_only=True),
            mt.EnsureChannelFirstd("image"),
            mt.Spacingd("image", pixdim=[1.5, 1.5, 1.5], mode="bilinear"),
            mt.CropForegroundd("image", source_key="image", margin=10, allow_smaller=True),
            mt.ScaleIntensityRanged(
                "image", a_min=-963.8247715525971, a_max=1053.678477684517, b_min=0, b_max=1, clip=True
            ),
            mt.Orientationd("image", axcodes="RAS"),
        ]
    )
    expected = bundle({"image": str(scan)})["image"]
    prep = preprocess(scan, card)
    full = preprocess(
        scan,
        ModelCard.from_dict({**card.raw, "preprocessing": {**card.preprocessing, "crop_foreground": None}}),
    )
    assert prep.array.shape == tuple(expected.shape) and prep.array.shape != full.array.shape
    np.testing.assert_allclose(prep.array, expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(prep.affine, expected.affine.numpy(), atol=1e-4)


def test_unest_feeds_the_scan_unresampled_like_its_bundle(shared: Path) -> None:
    from monai import transforms as mt

    scan = shared / "data" / "mri" / "mni152_2009_t1.nii.gz"
    bundle = mt.Compose(
        [
            mt.LoadImage(image_only=True),
            mt.EnsureChannelFirst(),
            mt.NormalizeIntensity(nonzero=True, channel_wise=True),
        ]
    )
    expected = bundle(str(scan))
    prep = preprocess(scan, get_card("unest-wholebrain"))
    assert prep.array.shape == tuple(expected.shape)
    np.testing.assert_allclose(prep.array, expected.numpy(), atol=1e-4)


def _smoothing_classifier(num_classes: int):
    """A predictor with spatial context (3x3x3 mean), so that the padding of small volumes matters."""

    def predict(batch: torch.Tensor) -> torch.Tensor:
        smooth = torch.nn.functional.avg_pool3d(batch, 3, stride=1, padding=1, count_include_pad=False)
        centres = torch.linspace(-1, 1, num_classes).view(1, -1, 1, 1, 1)
        return -((smooth - centres) ** 2)

    return predict


def test_segresnet_pads_small_volumes_by_edge_replication() -> None:
    from monai.inferers import SlidingWindowInferer

    card = get_card("segresnet-wholebody")
    data = copy.deepcopy(card.raw)
    data["window"]["size"] = [16, 16, 16]
    small = ModelCard.from_dict(data, card.path)
    values = np.random.default_rng(4).normal(0, 300, (12, 14, 10)).astype(np.float32)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((1.5, 1.5, 1.5))
    prep = preprocess(image, small)
    predictor = _smoothing_classifier(small.num_classes)

    result = segment_image(None, small, prep, predictor=predictor)  # type: ignore[arg-type]
    inferer = SlidingWindowInferer(
        roi_size=[16, 16, 16], sw_batch_size=1, overlap=0.25, padding_mode="replicate", mode="gaussian"
    )
    with torch.no_grad():
        expected = torch.argmax(inferer(torch.from_numpy(prep.array[None]), predictor)[0], dim=0).numpy()
    np.testing.assert_array_equal(result.network_labels, expected)
    data["window"]["padding_mode"] = "constant"
    zeros = segment_image(None, ModelCard.from_dict(data, card.path), prep, predictor=predictor)  # type: ignore[arg-type]
    assert (zeros.network_labels != expected).any(), "zero padding must change the border labels"
