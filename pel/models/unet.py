"""A small 2D U-Net for semantic segmentation, configured by a JSON-friendly dataclass."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pel.config import NormKind, UNetConfig

__all__ = ["UNet", "UNetConfig"]


def _norm(kind: NormKind, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    # Groups of 8 channels where possible: GroupNorm needs the channel count to be divisible by the groups.
    groups = max(1, channels // 8)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class ConvBlock(nn.Sequential):
    """Two 3x3 conv → norm → ReLU layers; the conv bias is dropped because the norm removes it anyway."""

    def __init__(self, in_channels: int, out_channels: int, norm: NormKind) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net: ``(B, in_channels, H, W)`` → logits ``(B, out_channels, H, W)`` for any H, W ≥ 1.

    Inputs whose sides are not multiples of ``2**depth`` are padded (edge replication, so no artificial dark
    border appears in normalised microscopy images) and the logits are cropped back to ``H × W``.
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else UNetConfig()
        c = self.config
        widths = [c.width * 2**level for level in range(c.depth + 1)]
        self.encoders = nn.ModuleList()
        in_ch = c.in_channels
        for w in widths[:-1]:
            self.encoders.append(ConvBlock(in_ch, w, c.norm))
            in_ch = w
        self.bottleneck = ConvBlock(in_ch, widths[-1], c.norm)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(c.depth)):
            self.upsamplers.append(nn.ConvTranspose2d(widths[level + 1], widths[level], kernel_size=2, stride=2))
            self.decoders.append(ConvBlock(2 * widths[level], widths[level], c.norm))
        self.head = nn.Conv2d(widths[0], c.out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"UNet expects input (B, {self.config.in_channels}, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        multiple = 2**self.config.depth
        pad_h, pad_w = -h % multiple, -w % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips), strict=True):
            x = decoder(torch.cat([upsample(x), skip], dim=1))
        logits = self.head(x)
        return logits[..., :h, :w]
