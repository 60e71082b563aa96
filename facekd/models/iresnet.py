"""IResNet trunks in the insightface (arcface_torch) layout.

A 3×3 stem (conv 64, BN, PReLU) at full resolution, then four stages of `IBasicBlock`
(BN → conv3×3 → BN → PReLU → conv3×3(stride) → BN, plus a conv1×1+BN shortcut when the
shape changes), widths 64/128/256/512, each stage halving the resolution: output stride 16,
so a 112×112 face gives a 512×7×7 map. The embedding head (BN–dropout–FC–BN) lives in
`facekd.models.heads.EmbeddingHead`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from facekd.models.weights import init_conv_bn

IRESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
}
IRESNET_WIDTHS = (64, 128, 256, 512)
BN_EPS = 1e-5


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block of IResNet; the stride sits on the second conv."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=BN_EPS)
        self.conv1 = _conv3x3(in_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch, stride)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        return out + identity


class IResNet(nn.Module):
    """IResNet trunk: returns the (B, 512, H/16, W/16) feature map of the last stage."""

    stride = 16

    def __init__(self, layers: Sequence[int], widths: Sequence[int] = IRESNET_WIDTHS):
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError("IResNet needs four stages")
        self.layers_per_stage = tuple(int(n) for n in layers)
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        stages = []
        in_ch = widths[0]
        for depth, width in zip(self.layers_per_stage, widths):
            blocks = [IBasicBlock(in_ch, width, stride=2)]
            blocks += [IBasicBlock(width, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = in_ch
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


def iresnet(depth: int) -> IResNet:
    """The IResNet trunk of the given depth (18, 34, 50 or 100)."""
    if depth not in IRESNET_LAYERS:
        raise ValueError(f"no IResNet of depth {depth}; choose from {sorted(IRESNET_LAYERS)}")
    return IResNet(IRESNET_LAYERS[depth])


# --------------------------------------------------------------------------------------------
# Registered architectures (costs: `facekd models`)


def _register(depth: int) -> None:
    from facekd.models.heads import EmbeddingHead, QualityHead
    from facekd.models.registry import register_arch

    @register_arch(f"iresnet{depth}", "recognition", 112,
                   f"IResNet-{depth} (insightface layout), BN–dropout–FC–BN embedding head", stride=16)
    def _build(input_size: int, *, embedding_size: int = 512, dropout: float = 0.0):
        backbone = iresnet(depth)
        head = EmbeddingHead(backbone.out_channels, input_size // backbone.stride, embedding_size, dropout)
        return backbone, head

    if depth in (18, 50):
        @register_arch(f"iresnet{depth}_quality", "quality", 224,
                       f"IResNet-{depth} trunk + quality MLP (quality teacher), trunk loadable from "
                       f"iresnet{depth}", stride=16)
        def _build_quality(input_size: int, *, head_hidden: Sequence[int] = (128,), dropout: float = 0.1,
                           head_norm: bool = True, head_activation: str = "gelu"):
            backbone = iresnet(depth)
            return backbone, QualityHead(backbone.out_channels, head_hidden, dropout, head_norm, head_activation)


for _depth in IRESNET_LAYERS:
    _register(_depth)
