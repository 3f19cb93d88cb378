"""nnU-Net v2 networks built by ``dynamic-network-architectures`` from the published ``plans.json``.

TotalSegmentator ships ``plans.json`` beside ``checkpoint_final.pth`` in each weights archive (the card
lists both as ``weights.files`` members). With real weights the builder reads from it the architecture
(features, strides, kernels, convolutions per stage), checks the patch size and spacing against the
card (a mismatch is refused, naming the value to put in the card), and puts nnU-Net's
``CTNormalization`` (clip to the training foreground's 0.5/99.5 percentiles, then z-score with its mean
and std, from ``foreground_intensity_properties_per_channel``) in front of the network, so every engine
takes Hounsfield units. The card's explicit arguments serve random-weight runs only (no plans file).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


class CTNormalization(nn.Module):
    """nnU-Net's ``CTNormalization`` inside the graph: ``(clip(x, lower, upper) - mean) / max(std, 1e-8)``."""

    def __init__(self, network: nn.Module, mean: float, std: float, lower: float, upper: float) -> None:
        super().__init__()
        self.network = network
        self.mean, self.std = float(mean), max(float(std), 1e-8)
        self.lower, self.upper = float(lower), float(upper)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network((x.clamp(self.lower, self.upper) - self.mean) / self.std)


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


def read_plans(plans_file: str | Path, configuration: str = "3d_fullres") -> dict[str, Any]:
    """Architecture, patch size, spacing and CT intensity statistics of one nnU-Net v2 configuration."""
    plans = json.loads(Path(plans_file).read_text(encoding="utf-8"))
    config = plans.get("configurations", {}).get(configuration)
    if config is None:
        raise ValueError(f"{plans_file}: no configuration {configuration!r}")
    schemes = config.get("normalization_schemes", ["CTNormalization"])
    if schemes != ["CTNormalization"]:
        raise ValueError(
            f"{plans_file}: normalization {schemes}; this builder implements CTNormalization only"
        )
    try:
        stats = plans["foreground_intensity_properties_per_channel"]["0"]
        intensity = {
            "mean": stats["mean"],
            "std": stats["std"],
            "lower": stats["percentile_00_5"],
            "upper": stats["percentile_99_5"],
        }
    except KeyError as exc:
        raise ValueError(f"{plans_file}: no foreground intensity properties for channel 0 ({exc})") from exc
    return {
        "arch": arch_from_plans(plans_file, configuration),
        "patch_size": [int(v) for v in config["patch_size"]],
        "spacing": [float(v) for v in config["spacing"]],
        "intensity": intensity,
    }


def _check_against_card(plans: dict[str, Any], patch_size: Any, spacing: Any, plans_file: Any) -> None:
    for name, published, card in (
        ("patch_size", plans["patch_size"], patch_size),
        ("spacing", plans["spacing"], spacing),
    ):
        if card is not None and [float(v) for v in published] != [float(v) for v in card]:
            raise ValueError(
                f"{plans_file}: {name} is {published}, the card says {list(card)}; set the card's "
                f"network.kwargs.{name} (and window.size / preprocessing.spacing) to the published value"
            )


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
    patch_size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    ct_normalization: dict[str, float] | None = None,
) -> nn.Module:
    """nnU-Net v2 ``PlainConvUNet`` (no deep supervision) behind ``CTNormalization``.

    With ``plans_file`` everything comes from it (``patch_size``/``spacing`` are the card's values,
    checked); without it the explicit arguments and ``ct_normalization`` (``mean``, ``std``, ``lower``,
    ``upper``) are used: random-weight runs. A ``plans_file`` that does not exist is an error.
    """
    if plans_file is not None:
        if not Path(plans_file).is_file():
            raise FileNotFoundError(f"nnU-Net plans file {plans_file} does not exist")
        plans = read_plans(plans_file, configuration)
        _check_against_card(plans, patch_size, spacing, plans_file)
        arch, intensity = plans["arch"], plans["intensity"]
    else:
        arch = {
            "features_per_stage": features_per_stage,
            "strides": strides,
            "kernel_sizes": kernel_sizes,
            "n_conv_per_stage": n_conv_per_stage,
            "n_conv_per_stage_decoder": n_conv_per_stage_decoder,
        }
        intensity = ct_normalization
    network = _plain_conv_unet(in_channels, num_classes, **arch)
    return CTNormalization(network, **intensity) if intensity else network
