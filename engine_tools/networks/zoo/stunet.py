"""STU-Net (Huang et al., "STU-Net: Scalable and Transferable Medical Image Segmentation Models Empowered
by Large-Scale Supervised Pre-training", 2023): an nnU-Net whose stages are residual blocks
(conv-IN-LeakyReLU, conv-IN, skip with a 1x1x1 projection when the shape changes), downsampling by the
first block's stride, and decoder upsampling by nearest-neighbour interpolation plus a 1x1x1 conv (which
avoids transposed-convolution artefacts and lets the published sizes S/B/L/H scale width and depth).

No PyPI package provides it, so it is written here following the paper and the authors' repository;
parameter names match the authors' nnU-Net checkpoints. Deep-supervision heads are kept (so checkpoints
load strictly) but inference returns only the full-resolution logits.

The published TotalSegmentator models are nnU-Net v1 trainings (Task101): the checkpoint ``.model`` holds
numpy scalars (read by :func:`engine_tools.networks.zoo.checkpoints.safe_load`), and the CT
normalisation statistics live in nnU-Net v1's ``plans.pkl`` (or the ``plans`` entry of the
``.model.pkl`` written beside the checkpoint), a pickle read here with an allowlist of numpy
reconstructors only (:func:`read_v1_plans`).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine_tools.networks.zoo.nnunet import CTNormalization

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


class _PlansUnpickler(pickle.Unpickler):
    """Unpickles nnU-Net v1 plans: containers, numbers, strings and numpy arrays/scalars, nothing else."""

    ALLOWED = {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"plans file refers to {module}.{name}, which a plans file never needs"
            )
        return super().find_class(module, name)


def read_v1_plans(plans_file: str | Path) -> dict[str, Any]:
    """CT intensity statistics, patch size, spacing and pooling of an nnU-Net v1 ``plans.pkl``
    (or ``.model.pkl``), read without running code from the file."""
    try:
        with open(plans_file, "rb") as stream:
            plans = _PlansUnpickler(stream).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        raise ValueError(f"{plans_file}: not a readable nnU-Net v1 plans pickle ({exc})") from exc
    plans = plans.get("plans", plans) if isinstance(plans, dict) else plans
    try:
        schemes = dict(plans["normalization_schemes"])
        props = plans["dataset_properties"]["intensityproperties"][0]
        stage = plans["plans_per_stage"][max(plans["plans_per_stage"])]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{plans_file}: missing nnU-Net v1 plans entry ({exc})") from exc
    if schemes.get(0) != "CT":
        raise ValueError(
            f"{plans_file}: normalization {schemes}; this builder implements nnU-Net's 'CT' scheme"
        )
    return {
        "intensity": {
            "mean": float(props["mean"]),
            "std": float(props["sd"]),
            "lower": float(props["percentile_00_5"]),
            "upper": float(props["percentile_99_5"]),
        },
        "patch_size": [int(v) for v in stage["patch_size"]],
        "spacing": [float(v) for v in stage["current_spacing"]],
        "pool_op_kernel_sizes": [[int(v) for v in p] for p in stage["pool_op_kernel_sizes"]],
    }


def stunet(
    in_channels: int = 1,
    num_classes: int = 105,
    size: str = "base",
    depth: Sequence[int] | None = None,
    dims: Sequence[int] | None = None,
    plans_file: str | Path | None = None,
    patch_size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    ct_normalization: dict[str, float] | None = None,
) -> nn.Module:
    """Builder used by the ``stunet-totalseg`` card: a published ``size`` or explicit ``depth``/``dims``,
    behind nnU-Net's CT normalisation from ``plans_file`` (patch size and spacing checked against the
    card's) or, for random-weight runs without it, ``ct_normalization``."""
    if size not in STUNET_SIZES:
        raise ValueError(f"STU-Net size {size!r} unknown; choose one of {', '.join(STUNET_SIZES)}")
    default_depth, default_dims = STUNET_SIZES[size]
    pools = None
    intensity = ct_normalization
    if plans_file is not None:
        plans = read_v1_plans(plans_file)
        for name, card_value in (("patch_size", patch_size), ("spacing", spacing)):
            if card_value is not None and [float(v) for v in plans[name]] != [float(v) for v in card_value]:
                raise ValueError(
                    f"{plans_file}: {name} is {plans[name]}, the card says {list(card_value)}; set the card's "
                    f"network.kwargs.{name} (and window.size / preprocessing.spacing) to the published value"
                )
        pools, intensity = plans["pool_op_kernel_sizes"], plans["intensity"]
    network = STUNet(in_channels, num_classes, depth or default_depth, dims or default_dims, pools)
    return CTNormalization(network, **intensity) if intensity else network
