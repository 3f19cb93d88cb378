"""3-D TransUNet of the hrlblab/PTQ (MedPTQ) study.

A convolutional encoder (five levels of two conv-BN-ReLU, widths ``base * (1, 2, 4, 8, 16)``, stride-2
downsampling) feeds its 1/16-resolution map through a 1x1x1 projection to a ViT (learned position
embeddings, post-norm transformer layers with multi-head self-attention and a GELU MLP); the tokens are
folded back into a volume and decoded by transposed convolutions and conv blocks with the encoder skips.
MONAI has no TransUNet (``UNETR`` patch-embeds the raw image and has no CNN stem), so it is written here.
Attribute names follow the published code so its checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ConvBlock(nn.Module):
    """Two conv-BN-ReLU; the first may have stride 2."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, scale: int = 2) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=scale, stride=scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class TransformerBlock(nn.Module):
    """Post-norm encoder layer on sequence-first tokens ``(L, N, E)``."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.linear1 = nn.Linear(embed_dim, mlp_dim)
        self.activation = nn.GELU()
        self.linear2 = nn.Linear(mlp_dim, embed_dim)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        attended = self.self_attn(tokens, tokens, tokens, need_weights=False)[0]
        tokens = self.norm1(tokens + self.dropout1(attended))
        return self.norm2(tokens + self.dropout2(self.linear2(self.activation(self.linear1(tokens)))))


class TransUNet3D(nn.Module):
    """TransUNet for ``img_size`` windows (each side divisible by 16)."""

    def __init__(
        self,
        img_size: Sequence[int] = (96, 96, 96),
        in_channels: int = 1,
        num_classes: int = 14,
        base_channels: int = 16,
        embed_dim: int = 768,
        mlp_dim: int = 3072,
        num_heads: int = 12,
        num_layers: int = 12,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if any(int(s) % 16 for s in img_size):
            raise ValueError(f"TransUNet3D: every side of img_size {tuple(img_size)} must be divisible by 16")
        c = base_channels
        self.conv1 = ConvBlock(in_channels, c)
        self.conv2 = ConvBlock(c, 2 * c, stride=2)
        self.conv3 = ConvBlock(2 * c, 4 * c, stride=2)
        self.conv4 = ConvBlock(4 * c, 8 * c, stride=2)
        self.conv5 = ConvBlock(8 * c, 16 * c, stride=2)
        self.embed_conv = nn.Conv3d(16 * c, embed_dim, kernel_size=1)
        num_tokens = 1
        for side in img_size:
            num_tokens *= int(side) // 16
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(embed_dim, num_heads, mlp_dim, dropout) for _ in range(num_layers)
        )
        self.upconv4, self.dec4 = UpConv(embed_dim, 8 * c), ConvBlock(16 * c, 8 * c)
        self.upconv3, self.dec3 = UpConv(8 * c, 4 * c), ConvBlock(8 * c, 4 * c)
        self.upconv2, self.dec2 = UpConv(4 * c, 2 * c), ConvBlock(4 * c, 2 * c)
        self.upconv1, self.dec1 = UpConv(2 * c, c), ConvBlock(2 * c, c)
        self.final_conv = nn.Conv3d(c, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.conv1(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        grid = self.embed_conv(self.conv5(c4))
        batch, channels, depth, height, width = grid.shape
        tokens = grid.flatten(2).permute(2, 0, 1) + self.position_embeddings.permute(1, 0, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens)
        grid = tokens.permute(1, 2, 0).reshape(batch, channels, depth, height, width)
        d4 = self.dec4(torch.cat((self.upconv4(grid), c4), dim=1))
        d3 = self.dec3(torch.cat((self.upconv3(d4), c3), dim=1))
        d2 = self.dec2(torch.cat((self.upconv2(d3), c2), dim=1))
        d1 = self.dec1(torch.cat((self.upconv1(d2), c1), dim=1))
        return self.final_conv(d1)


#: The builder the ``transunet-btcv`` card names: the class itself (dropout only matters in training).
transunet3d = TransUNet3D
