"""UNesT: hierarchical nested-transformer encoder with a U-shaped convolutional decoder.

Follows the published architecture of the MONAI bundle ``wholeBrainSeg_Large_UNEST_segmentation``
(Yu et al., "UNesT: Local Spatial Representation Learning with Hierarchical Transformer for Efficient
Medical Segmentation", 2023): a 4^3 patch embedding, three NesT levels (local self-attention inside
non-overlapping blocks of 6^3 tokens; conv + LayerNorm + max-pool aggregation between levels) and a
UNETR-style decoder built from MONAI's ``UnetResBlock``/``UnetBasicBlock``. The network is not part of
MONAI core, so it is written here; parameter names match the bundle checkpoint so ``model.pt`` loads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetResBlock, get_conv_layer
from torch import nn


class PatchEmbed3D(nn.Module):
    """Non-overlapping ``patch_size``^3 patches projected by a strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention applied independently inside each image block ``(B, T, N, C)``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, n, c = x.shape
        qkv = self.qkv(x).reshape(b, t, n, 3, self.num_heads, c // self.num_heads).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        out = (weights @ v).permute(0, 2, 3, 4, 1).reshape(b, t, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer (stochastic depth is a training-only identity at inference)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ConvPool(nn.Module):
    """Block aggregation between levels: 3x3x3 conv, channel LayerNorm, 3x3x3 stride-2 max pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.LayerNorm(out_channels, eps=1e-6)
        self.pool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        return self.pool(x)


def blockify(x: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, D, H, W, C)`` → ``(B, T, N, C)`` with ``T`` blocks of ``N = block^3`` tokens."""
    b, d, h, w, c = x.shape
    x = x.reshape(b, d // block, block, h // block, block, w // block, block, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, -1, block**3, c)


def deblockify(x: torch.Tensor, block: int, grid: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`blockify` for a block grid ``grid`` (blocks per axis)."""
    b, _, _, c = x.shape
    gd, gh, gw = grid
    x = x.reshape(b, gd, gh, gw, block, block, block, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, gd * block, gh * block, gw * block, c)


class NestLevel(nn.Module):
    """One NesT hierarchy level: optional aggregation, block position embedding, transformer layers."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        grid: Sequence[int],
        num_heads: int,
        depth: int,
        embed_dim: int,
        prev_embed_dim: int | None,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.grid = tuple(grid)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_blocks, block_size**3, embed_dim))
        self.pool = ConvPool(prev_embed_dim, embed_dim) if prev_embed_dim is not None else nn.Identity()
        self.transformer_encoder = nn.Sequential(
            *(TransformerLayer(embed_dim, num_heads) for _ in range(depth))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x).permute(0, 2, 3, 4, 1)
        x = self.transformer_encoder(blockify(x, self.block_size) + self.pos_embed)
        return deblockify(x, self.block_size, self.grid).permute(0, 4, 1, 2, 3)


class NestTransformer3D(nn.Module):
    """NesT encoder returning the final normed map and the per-level feature maps."""

    def __init__(
        self,
        img_size: int = 96,
        in_chans: int = 1,
        patch_size: int = 4,
        embed_dims: Sequence[int] = (128, 256, 512),
        num_heads: Sequence[int] = (4, 8, 16),
        depths: Sequence[int] = (2, 2, 8),
    ) -> None:
        super().__init__()
        num_levels = len(embed_dims)
        tokens_per_side = img_size // patch_size
        blocks_per_side = 2 ** (num_levels - 1)
        if img_size % patch_size or tokens_per_side % blocks_per_side:
            raise ValueError(f"UNesT: img_size {img_size} must be divisible by patch_size*{blocks_per_side}")
        block_size = tokens_per_side // blocks_per_side
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dims[0])
        levels = []
        for i in range(num_levels):
            side = blocks_per_side // 2**i
            levels.append(
                NestLevel(
                    side**3,
                    block_size,
                    (side, side, side),
                    num_heads[i],
                    depths[i],
                    embed_dims[i],
                    embed_dims[i - 1] if i else None,
                )
            )
        self.levels = nn.ModuleList(levels)
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed(x)
        hidden = [x]
        for level in self.levels:
            x = level(x)
            hidden.append(x)
        return self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3), hidden


class UNesTConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm_name: str) -> None:
        super().__init__()
        self.layer = UnetResBlock(3, in_channels, out_channels, kernel_size=3, stride=1, norm_name=norm_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class UNestUpBlock(nn.Module):
    """2x transposed conv followed by ``num_layer`` 1x1x1 transposed convs."""

    def __init__(self, in_channels: int, out_channels: int, num_layer: int = 1) -> None:
        super().__init__()
        self.transp_conv_init = get_conv_layer(
            3, in_channels, out_channels, kernel_size=2, stride=2, conv_only=True, is_transposed=True
        )
        self.blocks = nn.ModuleList(
            get_conv_layer(
                3, out_channels, out_channels, kernel_size=1, stride=1, conv_only=True, is_transposed=True
            )
            for _ in range(num_layer)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transp_conv_init(x)
        for block in self.blocks:
            x = block(x)
        return x


class UNesTBlock(nn.Module):
    """Decoder step: 2x transposed conv, concatenation with the skip, residual conv block."""

    def __init__(self, in_channels: int, out_channels: int, norm_name: str) -> None:
        super().__init__()
        self.transp_conv = get_conv_layer(
            3, in_channels, out_channels, kernel_size=2, stride=2, conv_only=True, is_transposed=True
        )
        self.conv_block = UnetResBlock(
            3, 2 * out_channels, out_channels, kernel_size=3, stride=1, norm_name=norm_name
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat((self.transp_conv(x), skip), dim=1))


class UNesT(nn.Module):
    """UNesT for cubic windows of ``img_size`` (96 in the published whole-brain model)."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 133,
        img_size: int = 96,
        feature_size: int = 16,
        patch_size: int = 4,
        depths: Sequence[int] = (2, 2, 8),
        embed_dim: Sequence[int] = (128, 256, 512),
        num_heads: Sequence[int] = (4, 8, 16),
        norm_name: str = "instance",
    ) -> None:
        super().__init__()
        f = feature_size
        if embed_dim[2] != 32 * f:
            raise ValueError(f"UNesT: embed_dim[2] ({embed_dim[2]}) must equal 32 * feature_size ({32 * f})")
        self.nestViT = NestTransformer3D(img_size, in_channels, patch_size, embed_dim, num_heads, depths)
        self.encoder1 = UNesTConvBlock(in_channels, 2 * f, norm_name)
        self.encoder2 = UNestUpBlock(embed_dim[0], 4 * f)
        self.encoder3 = UNesTConvBlock(embed_dim[0], 8 * f, norm_name)
        self.encoder4 = UNesTConvBlock(embed_dim[1], 16 * f, norm_name)
        self.encoder10 = Convolution(3, 32 * f, 64 * f, strides=2, adn_ordering="ADN", dropout=0.0)
        self.decoder5 = UNesTBlock(2 * embed_dim[2], 32 * f, norm_name)
        self.decoder4 = UNesTBlock(embed_dim[2], 16 * f, norm_name)
        self.decoder3 = UNesTBlock(16 * f, 8 * f, norm_name)
        self.decoder2 = UNesTBlock(8 * f, 4 * f, norm_name)
        self.decoder1 = UNesTBlock(4 * f, 2 * f, norm_name)
        self.out = UnetOutBlock(3, 2 * f, out_channels)

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x, hidden = self.nestViT(x_in)
        enc0 = self.encoder1(x_in)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        enc4 = hidden[3]
        dec = self.decoder5(self.encoder10(x), enc4)
        dec = self.decoder4(dec, enc3)
        dec = self.decoder3(dec, enc2)
        dec = self.decoder2(dec, enc1)
        return self.out(self.decoder1(dec, enc0))


#: The builder the ``unest-wholebrain`` card names: the class itself.
unest = UNesT
