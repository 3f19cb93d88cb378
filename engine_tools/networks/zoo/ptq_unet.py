"""The hrlblab/PTQ (MedPTQ) 3-D U-Net: five resolution levels, widths ``base * (1, 2, 4, 8, 16)``.

Every level is two 3x3x3 convolutions with BatchNorm and ReLU; the encoder halves the resolution with a
stride-2 first convolution, the decoder doubles it with a 2x2x2 transposed convolution and concatenates
the skip. Neither ``monai.networks.nets.UNet`` (residual units, instance norm, PReLU) nor ``BasicUNet``
(max-pool downsampling, six feature sizes) has this layout, so it is written here. Attribute names
follow the published training code so its ``model_state_dict`` checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
    ]


class DoubleConv(nn.Module):
    """Two conv-BN-ReLU at one resolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            *_conv_bn_relu(in_channels, out_channels), *_conv_bn_relu(out_channels, out_channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """Stride-2 conv-BN-ReLU followed by conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.down_conv = nn.Sequential(
            *_conv_bn_relu(in_channels, out_channels, stride=2), *_conv_bn_relu(out_channels, out_channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_conv(x)


class Up(nn.Module):
    """2x transposed convolution, concatenation with the skip (skip first), then :class:`DoubleConv`."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class OutConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PTQUNet3D(nn.Module):
    """U-Net of the MedPTQ study (``base_features=16``: widths 16, 32, 64, 128, 256; input divisible by 16)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 14, base_features: int = 16) -> None:
        super().__init__()
        widths = [base_features * 2**i for i in range(5)]
        self.inc = DoubleConv(in_channels, widths[0])
        self.down1, self.down2, self.down3, self.down4 = (Down(widths[i], widths[i + 1]) for i in range(4))
        self.up1, self.up2, self.up3, self.up4 = (Up(widths[i], widths[i - 1]) for i in range(4, 0, -1))
        self.outc = OutConv(widths[0], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x = self.down4(x4)
        x = self.up1(x, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)


def ptq_unet3d(in_channels: int = 1, num_classes: int = 14, base_features: int = 16) -> PTQUNet3D:
    """Builder used by the ``unet-btcv`` model card."""
    return PTQUNet3D(in_channels, num_classes, base_features)
