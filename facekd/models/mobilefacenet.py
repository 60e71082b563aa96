"""MobileFaceNet trunk (Chen et al., 2018) in the insightface block layout.

Stem conv3×3/2 (64) → depthwise conv3×3 (64) → bottlenecks [expansion t, channels c,
repeats n, stride s] = [2, 64, 5, 2], [4, 128, 1, 2], [2, 128, 6, 1], [4, 128, 1, 2],
[2, 128, 2, 1] → conv1×1 to 512 (PReLU). Output stride 16 (512×7×7 at 112×112). The global
depthwise (GDC) embedding head is `facekd.models.heads.GDCHead`.

`width_mult=1` is the paper's network (about 1.2 M parameters and 0.23 G multiply-adds with
a 512-d GDC head). `width_mult` scales every width (stage channels and expansions) alike;
`stage_scale` is arcface_torch's `scale`: it widens only the stage channels (64·s, 128·s),
the expansions keep their widths (128, 128, 256, 256, 512, 256) and the first depthwise conv
its 64 groups. arcface_torch's `mbf` is `stage_scale=2`, its `mbf_large` `stage_scale=4` with
`blocks=(2, 8, 12, 4)`; `facekd import insightface` maps their weights onto this network.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from facekd.models.weights import init_conv_bn

DEFAULT_BLOCKS = (1, 4, 6, 2)


def make_divisible(value: float, divisor: int = 8, minimum: int | None = None) -> int:
    """Round a channel count to a multiple of `divisor`, never more than 10 % below `value`."""
    minimum = divisor if minimum is None else minimum
    rounded = max(minimum, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBlock(nn.Module):
    """Conv (no bias) → BN → optional PReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 activation: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act: nn.Module = nn.PReLU(out_ch) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DepthWiseBottleneck(nn.Module):
    """Inverted bottleneck: 1×1 expand (PReLU) → 3×3 depthwise (PReLU) → 1×1 linear project."""

    def __init__(self, in_ch: int, out_ch: int, hidden: int, stride: int = 1, residual: bool = False):
        super().__init__()
        if residual and (stride != 1 or in_ch != out_ch):
            raise ValueError("a residual bottleneck keeps the shape")
        self.residual = residual
        self.expand = ConvBlock(in_ch, hidden, 1)
        self.depthwise = ConvBlock(hidden, hidden, 3, stride=stride, groups=hidden)
        self.project = ConvBlock(hidden, out_ch, 1, activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


def _residual_stage(channels: int, hidden: int, repeats: int) -> nn.Sequential:
    return nn.Sequential(*[DepthWiseBottleneck(channels, channels, hidden, residual=True)
                           for _ in range(repeats)])


class MobileFaceNet(nn.Module):
    """MobileFaceNet trunk: returns the (B, 512, H/16, W/16) map before the GDC head."""

    stride = 16

    def __init__(self, width_mult: float = 1.0, blocks: Sequence[int] = DEFAULT_BLOCKS,
                 out_channels: int = 512, stage_scale: int = 1):
        super().__init__()
        if len(blocks) != 4 or any(int(b) < 1 for b in blocks):
            raise ValueError("blocks needs four positive repeat counts")
        if stage_scale != 1 and width_mult != 1:
            raise ValueError("stage_scale (arcface_torch's scale) and width_mult cannot be combined")
        p64, p128 = make_divisible(64 * width_mult), make_divisible(128 * width_mult)  # expansion bases
        c64, c128 = p64 * stage_scale, p128 * stage_scale  # stage channels
        b0, b1, b2, b3 = (int(b) for b in blocks)
        layers: list[nn.Module] = [ConvBlock(3, c64, 3, stride=2)]
        if b0 == 1:
            layers.append(ConvBlock(c64, c64, 3, groups=p64))
        else:
            layers.append(_residual_stage(c64, 2 * p64, b0))
        layers += [
            DepthWiseBottleneck(c64, c64, 2 * p64, stride=2),
            _residual_stage(c64, 2 * p64, b1),
            DepthWiseBottleneck(c64, c128, 4 * p64, stride=2),
            _residual_stage(c128, 2 * p128, b2),
            DepthWiseBottleneck(c128, c128, 4 * p128, stride=2),
            _residual_stage(c128, 2 * p128, b3),
            ConvBlock(c128, out_channels, 1),
        ]
        self.layers = nn.Sequential(*layers)
        self.out_channels = out_channels
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _register() -> None:
    from facekd.errors import ConfigError
    from facekd.models.heads import GDCHead
    from facekd.models.registry import register_arch

    @register_arch("mobilefacenet", "recognition", 112,
                   "MobileFaceNet (Chen et al. 2018), global depthwise conv (GDC) embedding head", stride=16)
    def _build(input_size: int, *, embedding_size: int = 512, dropout: float = 0.0, width_mult: float = 1.0,
               blocks: Sequence[int] = DEFAULT_BLOCKS, stage_scale: int = 1):
        if stage_scale != 1 and width_mult != 1:
            raise ConfigError("mobilefacenet: give stage_scale (arcface_torch's scale) or width_mult, not both")
        backbone = MobileFaceNet(width_mult=width_mult, blocks=blocks, stage_scale=stage_scale)
        head = GDCHead(backbone.out_channels, input_size // backbone.stride, embedding_size, dropout)
        return backbone, head


_register()
