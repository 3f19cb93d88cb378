"""nnU-Net v2 networks built by ``dynamic-network-architectures`` from an nnU-Net plans file.

TotalSegmentator ships ``plans.json`` inside each weights archive; when it is present (``plans_file``)
the architecture is read from it, so the exact published configuration is used. Without it the card's
``arch`` kwargs (nnU-Net v2's ``PlainConvUNet`` defaults for 3 mm whole-body CT) are used.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn


def _plain_conv_unet(
    in_channels: int,
    num_classes: int,
    features_per_stage: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    n_conv_per_stage: Sequence[int],
    n_conv_per_stage_decoder: Sequence[int],
) -> nn.Module:
    try:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "nnU-Net models need `dynamic-network-architectures` "
            "(pip install --no-deps dynamic-network-architectures)"
        ) from exc
    return PlainConvUNet(
        input_channels=in_channels,
        n_stages=len(features_per_stage),
        features_per_stage=list(features_per_stage),
        conv_op=nn.Conv3d,
        kernel_sizes=[list(k) for k in kernel_sizes],
        strides=[list(s) for s in strides],
        n_conv_per_stage=list(n_conv_per_stage),
        num_classes=num_classes,
        n_conv_per_stage_decoder=list(n_conv_per_stage_decoder),
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=False,
    )


def arch_from_plans(plans_file: str | Path, configuration: str = "3d_fullres") -> dict[str, Any]:
    """The PlainConvUNet arguments of ``configuration`` in an nnU-Net v2 ``plans.json``."""
    plans = json.loads(Path(plans_file).read_text(encoding="utf-8"))
    try:
        config = plans["configurations"][configuration]
    except KeyError as exc:
        raise ValueError(f"{plans_file}: no configuration {configuration!r}") from exc
    arch = config.get("architecture", {}).get("arch_kwargs")
    if arch:  # nnU-Net >= 2.4 layout
        return {
            "features_per_stage": arch["features_per_stage"],
            "strides": arch["strides"],
            "kernel_sizes": arch["kernel_sizes"],
            "n_conv_per_stage": arch["n_conv_per_stage"],
            "n_conv_per_stage_decoder": arch["n_conv_per_stage_decoder"],
        }
    kernels = config["conv_kernel_sizes"]
    n_stages = len(kernels)
    base, cap = config.get("UNet_base_num_features", 32), config.get("unet_max_num_features", 320)
    return {
        "features_per_stage": [min(base * 2**i, cap) for i in range(n_stages)],
        "strides": config["pool_op_kernel_sizes"],
        "kernel_sizes": kernels,
        "n_conv_per_stage": config.get("n_conv_per_stage_encoder", [2] * n_stages),
        "n_conv_per_stage_decoder": config.get("n_conv_per_stage_decoder", [2] * (n_stages - 1)),
    }


def nnunet_plain_conv_unet(
    in_channels: int = 1,
    num_classes: int = 118,
    features_per_stage: Sequence[int] = (32, 64, 128, 256, 320, 320),
    strides: Sequence[Sequence[int]] = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
    kernel_sizes: Sequence[Sequence[int]] = ((3, 3, 3),) * 6,
    n_conv_per_stage: Sequence[int] = (2, 2, 2, 2, 2, 2),
    n_conv_per_stage_decoder: Sequence[int] = (2, 2, 2, 2, 2),
    plans_file: str | Path | None = None,
    configuration: str = "3d_fullres",
) -> nn.Module:
    """nnU-Net v2 ``PlainConvUNet`` (no deep supervision); ``plans_file`` overrides the architecture."""
    if plans_file is not None and Path(plans_file).is_file():
        arch = arch_from_plans(plans_file, configuration)
    else:
        arch = {
            "features_per_stage": features_per_stage,
            "strides": strides,
            "kernel_sizes": kernel_sizes,
            "n_conv_per_stage": n_conv_per_stage,
            "n_conv_per_stage_decoder": n_conv_per_stage_decoder,
        }
    return _plain_conv_unet(in_channels, num_classes, **arch)
