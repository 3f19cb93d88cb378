"""SwinUNETR as the MONAI model-zoo bundles trained it (MONAI <= 1.4 patch merging).

The ``swin_unetr_btcv_segmentation`` bundle declares MONAI 1.4. In MONAI <= 1.4 the default ("merging")
``PatchMerging`` of SwinUNETR concatenates the eight 2x2x2 neighbours in an order that repeats two of
them (slices 5 and 6 equal slices 2 and 3; the voxels (0,1,1) and (1,1,0) are never used). MONAI 1.5
corrected the order, so the published weights run under MONAI >= 1.5 give different logits. This
builder passes a ``PatchMergingV2`` subclass with the old order as ``downsample=``, which reproduces
MONAI 1.4's output with the same state dict (key names and shapes are unchanged).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets.swin_unetr import PatchMergingV2, SwinUNETR
from torch.nn import functional

#: (depth, height, width) offsets of the eight slices, in MONAI <= 1.4's concatenation order.
MONAI14_MERGING_ORDER = (
    (0, 0, 0),
    (1, 0, 0),
    (0, 1, 0),
    (0, 0, 1),
    (1, 0, 1),
    (0, 1, 0),
    (0, 0, 1),
    (1, 1, 1),
)


class PatchMergingMonai14(PatchMergingV2):
    """MONAI <= 1.4 ``PatchMerging`` for 3-D input ``(B, D, H, W, C)`` → ``(B, D/2, H/2, W/2, 2C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            return super().forward(x)
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = functional.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in MONAI14_MERGING_ORDER], -1)
        return self.reduction(self.norm(x))


def swinunetr_monai14(**kwargs: Any) -> SwinUNETR:
    """``monai.networks.nets.SwinUNETR(**kwargs)`` with MONAI 1.4's patch merging.

    ``img_size`` (in the bundle's config, removed in MONAI 1.5) is accepted and ignored.
    """
    kwargs.pop("img_size", None)
    return SwinUNETR(downsample=PatchMergingMonai14, **kwargs)
