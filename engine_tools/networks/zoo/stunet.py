"""STU-Net (Huang et al., "STU-Net: Scalable and Transferable Medical Image Segmentation Models Empowered
by Large-Scale Supervised Pre-training", 2023): an nnU-Net whose stages are residual blocks
(conv-IN-LeakyReLU, conv-IN, skip with a 1x1x1 projection when the shape changes), downsampling by the
first block's stride, and decoder upsampling by nearest-neighbour interpolation plus a 1x1x1 conv (which
avoids transposed-convolution artefacts and lets the published sizes S/B/L/H scale width and depth).

No PyPI package provides it, so it is written here following the paper and the authors' repository;
parameter names match the authors' nnU-Net checkpoints. Deep-supervision heads are kept (so checkpoints
load strictly) but inference returns only the full-resolution logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Published sizes (depth per stage, widths per stage), TotalSegmentator-trained, 128^3 crops.
STUNET_SIZES: dict[str, tuple[list[int], list[int]]] = {
    "small": ([1] * 6, [16, 32, 64, 128, 256, 256]),
    "base": ([1] * 6, [32, 64, 128, 256, 512, 512]),
    "large": ([2] * 6, [64, 128, 256, 512, 1024, 1024]),
    "huge": ([3] * 6, [96, 192, 384, 768, 1536, 1536]),
}


class BasicResBlock(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, stride: Sequence[int] | int = 1, project: bool = False
    ):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act1 = nn.LeakyReLU(inplace=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act2 = nn.LeakyReLU(inplace=True)
        self.conv3 = nn.Conv3d(in_channels, out_channels, 1, stride=stride) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        skip = self.conv3(x) if self.conv3 is not None else x
        return self.act2(y + skip)


class UpsampleLayerNearest(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, scale: Sequence[int]) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=1)
        self.scale = tuple(float(s) for s in scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=self.scale, mode="nearest"))


def _stage(in_channels: int, out_channels: int, depth: int, stride: Sequence[int] | int = 1) -> nn.Sequential:
    blocks = [BasicResBlock(in_channels, out_channels, stride, project=True)]
    blocks += [BasicResBlock(out_channels, out_channels) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class STUNet(nn.Module):
    """STU-Net with ``len(dims)`` stages and ``len(dims) - 1`` downsamplings."""

    def __init__(
        self,
        input_channels: int = 1,
        num_classes: int = 105,
        depth: Sequence[int] = (1, 1, 1, 1, 1, 1),
        dims: Sequence[int] = (32, 64, 128, 256, 512, 512),
        pool_op_kernel_sizes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        num_pool = len(dims) - 1
        pools = [list(p) for p in (pool_op_kernel_sizes or [[2, 2, 2]] * num_pool)]
        if len(pools) != num_pool or len(depth) != len(dims):
            raise ValueError("STUNet: need len(depth) == len(dims) and len(dims) - 1 pooling steps")
        self.conv_blocks_context = nn.ModuleList([_stage(input_channels, dims[0], depth[0])])
        for d in range(1, num_pool + 1):
            self.conv_blocks_context.append(_stage(dims[d - 1], dims[d], depth[d], pools[d - 1]))
        self.upsample_layers = nn.ModuleList(
            UpsampleLayerNearest(dims[-1 - u], dims[-2 - u], pools[-1 - u]) for u in range(num_pool)
        )
        self.conv_blocks_localization = nn.ModuleList(
            _stage(2 * dims[-2 - u], dims[-2 - u], depth[-2 - u]) for u in range(num_pool)
        )
        self.seg_outputs = nn.ModuleList(nn.Conv3d(dims[-2 - u], num_classes, 1) for u in range(num_pool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for stage in self.conv_blocks_context[:-1]:
            x = stage(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)
        for u, (up, stage) in enumerate(
            zip(self.upsample_layers, self.conv_blocks_localization, strict=True)
        ):
            x = stage(torch.cat((up(x), skips[-(u + 1)]), dim=1))
        return self.seg_outputs[-1](x)


def stunet(
    in_channels: int = 1,
    num_classes: int = 105,
    size: str = "base",
    depth: Sequence[int] | None = None,
    dims: Sequence[int] | None = None,
) -> STUNet:
    """Builder used by the ``stunet-totalseg`` card: a published ``size`` or explicit ``depth``/``dims``."""
    if size not in STUNET_SIZES:
        raise ValueError(f"STU-Net size {size!r} unknown; choose one of {', '.join(STUNET_SIZES)}")
    default_depth, default_dims = STUNET_SIZES[size]
    return STUNet(in_channels, num_classes, depth or default_depth, dims or default_dims)
