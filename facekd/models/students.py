"""Compact students for face image quality: MobileNetV3 and EdgeNeXt.

Both return the last feature map (B, C, H/32, W/32) and expose `out_channels`; the quality
head (global pooling + MLP) is `facekd.models.heads.QualityHead`.

- MobileNetV3 (Howard et al., 2019): inverted residuals with squeeze-and-excitation and
  hard-swish, in the "small" and "large" configurations of the paper, without the 1280/1024
  classifier layer (the quality head replaces it).
- EdgeNeXt (Maaz et al., 2022): convolutional encoders with growing depthwise kernels and,
  at the end of stages 2–4, split depthwise transposed attention (SDTA) blocks: multi-scale
  depthwise convolutions over channel groups followed by cross-covariance (channel)
  attention. XXS: widths 24/48/88/168, depths 2/2/6/2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

from facekd.models.mobilefacenet import make_divisible
from facekd.models.weights import init_conv_bn

# --------------------------------------------------------------------------------------------
# MobileNetV3


@dataclass(frozen=True)
class InvertedResidualConfig:
    kernel: int
    expanded: int
    out: int
    squeeze_excite: bool
    hard_swish: bool
    stride: int


def _cfg(*rows: tuple[int, int, int, bool, bool, int]) -> tuple[InvertedResidualConfig, ...]:
    return tuple(InvertedResidualConfig(*row) for row in rows)


# kernel, expanded channels, output channels, SE, hard-swish (else ReLU), stride
MOBILENETV3_SMALL = _cfg(
    (3, 16, 16, True, False, 2),
    (3, 72, 24, False, False, 2),
    (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2),
    (5, 240, 40, True, True, 1),
    (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1),
    (5, 144, 48, True, True, 1),
    (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1),
    (5, 576, 96, True, True, 1),
)
MOBILENETV3_LARGE = _cfg(
    (3, 16, 16, False, False, 1),
    (3, 64, 24, False, False, 2),
    (3, 72, 24, False, False, 1),
    (5, 72, 40, True, False, 2),
    (5, 120, 40, True, False, 1),
    (5, 120, 40, True, False, 1),
    (3, 240, 80, False, True, 2),
    (3, 200, 80, False, True, 1),
    (3, 184, 80, False, True, 1),
    (3, 184, 80, False, True, 1),
    (3, 480, 112, True, True, 1),
    (3, 672, 112, True, True, 1),
    (5, 672, 160, True, True, 2),
    (5, 960, 160, True, True, 1),
    (5, 960, 160, True, True, 1),
)
MOBILENETV3_CONFIGS = {"small": MOBILENETV3_SMALL, "large": MOBILENETV3_LARGE}


class ConvBNAct(nn.Sequential):
    """Conv (no bias) → BN → activation (or none)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 activation: type[nn.Module] | None = nn.ReLU):
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch, eps=1e-3),  # momentum 0.1: 0.01 leaves short runs with stale statistics
        ]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Channel gating: global pool → 1×1 (ReLU) → 1×1 (hard-sigmoid) → scale."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))
        return x * scale


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1×1 expand → k×k depthwise → (SE) → 1×1 linear project (+ skip)."""

    def __init__(self, in_ch: int, expanded: int, out_ch: int, kernel: int, stride: int,
                 squeeze_excite: bool, hard_swish: bool):
        super().__init__()
        act = nn.Hardswish if hard_swish else nn.ReLU
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expanded != in_ch:
            layers.append(ConvBNAct(in_ch, expanded, 1, activation=act))
        layers.append(ConvBNAct(expanded, expanded, kernel, stride=stride, groups=expanded, activation=act))
        if squeeze_excite:
            layers.append(SqueezeExcite(expanded, make_divisible(expanded // 4, 8)))
        layers.append(ConvBNAct(expanded, out_ch, 1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV3(nn.Module):
    """MobileNetV3 trunk ('small' or 'large'), output stride 32, ends with the 1×1 conv to
    6× the last block's width (576 for small, 960 for large at width 1)."""

    stride = 32

    def __init__(self, config: str = "small", width_mult: float = 1.0):
        super().__init__()
        if config not in MOBILENETV3_CONFIGS:
            raise ValueError(f"unknown MobileNetV3 config {config!r}")
        blocks = MOBILENETV3_CONFIGS[config]

        def width(c: int) -> int:
            return make_divisible(c * width_mult, 8)

        in_ch = width(16)
        layers: list[nn.Module] = [ConvBNAct(3, in_ch, 3, stride=2, activation=nn.Hardswish)]
        for cfg in blocks:
            out_ch = width(cfg.out)
            layers.append(InvertedResidual(in_ch, width(cfg.expanded), out_ch, cfg.kernel, cfg.stride,
                                           cfg.squeeze_excite, cfg.hard_swish))
            in_ch = out_ch
        last = 6 * in_ch
        layers.append(ConvBNAct(in_ch, last, 1, activation=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.out_channels = last
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


# --------------------------------------------------------------------------------------------
# EdgeNeXt


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability `p` in training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PositionalEncodingFourier(nn.Module):
    """Sine/cosine encoding of normalised (y, x) positions projected to `dim` channels."""

    def __init__(self, dim: int, hidden: int = 32, temperature: float = 10000.0):
        super().__init__()
        self.hidden = hidden
        self.temperature = temperature
        self.projection = nn.Conv2d(2 * hidden, dim, 1)

    def forward(self, height: int, width: int) -> torch.Tensor:
        device, dtype = self.projection.weight.device, self.projection.weight.dtype
        scale = 2 * math.pi
        y = torch.arange(1, height + 1, device=device, dtype=dtype) / (height + 1e-6) * scale
        x = torch.arange(1, width + 1, device=device, dtype=dtype) / (width + 1e-6) * scale
        idx = torch.arange(self.hidden, device=device, dtype=dtype)
        freq = self.temperature ** (2 * torch.div(idx, 2, rounding_mode="floor") / self.hidden)

        def encode(pos: torch.Tensor) -> torch.Tensor:  # (L,) -> (L, hidden)
            angles = pos[:, None] / freq
            return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=-1).flatten(1)

        pos_y = encode(y)[:, None, :].expand(height, width, self.hidden)
        pos_x = encode(x)[None, :, :].expand(height, width, self.hidden)
        grid = torch.cat((pos_y, pos_x), dim=-1).permute(2, 0, 1).unsqueeze(0)
        return self.projection(grid)  # (1, dim, H, W)


class LayerScaledMLP(nn.Module):
    """Channels-last LN → Linear (ratio×) → GELU → Linear → per-channel layer scale."""

    def __init__(self, dim: int, mlp_ratio: int = 4, layer_scale: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(mlp_ratio * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(x))))


class ConvEncoder(nn.Module):
    """EdgeNeXt conv encoder: k×k depthwise → LN → MLP (4×, GELU) → layer scale, residual."""

    def __init__(self, dim: int, kernel: int, mlp_ratio: int = 4, drop_path: float = 0.0,
                 layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.mlp = LayerScaledMLP(dim, mlp_ratio, layer_scale)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(self.dwconv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.drop_path(out)


class CrossCovarianceAttention(nn.Module):
    """Transposed (channel) self-attention: a (C/h × C/h) attention map per head, computed from
    L2-normalised queries and keys over the token axis, scaled by a learned temperature."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, C/h, N)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        attn = attn.softmax(dim=-1)
        out = (attn @ v).permute(0, 3, 1, 2).reshape(b, n, c)
        return self.proj(out)


class SDTAEncoder(nn.Module):
    """Split depth-wise transposed attention: the channels are split into `scales` groups;
    all but the last pass through chained 3×3 depthwise convs (each adding the previous
    group's output), then cross-covariance attention and an MLP, each with layer scale."""

    def __init__(self, dim: int, scales: int, heads: int, mlp_ratio: int = 4, drop_path: float = 0.0,
                 layer_scale: float = 1e-6, positional: bool = False):
        super().__init__()
        if scales < 1:
            raise ValueError("SDTA needs at least one channel group")
        self.split = math.ceil(dim / scales)
        self.convolved = max(1, scales - 1)
        chunks = math.ceil(dim / self.split)
        if scales > 1 and chunks != scales:
            raise ValueError(f"cannot split {dim} channels into {scales} groups")
        self.convs = nn.ModuleList(
            nn.Conv2d(self.split, self.split, 3, padding=1, groups=self.split) for _ in range(self.convolved)
        )
        self.pos_embed = PositionalEncodingFourier(dim) if positional else None
        self.norm_xca = nn.LayerNorm(dim, eps=1e-6)
        self.gamma_xca = nn.Parameter(torch.full((dim,), layer_scale))
        self.xca = CrossCovarianceAttention(dim, heads)
        self.mlp = LayerScaledMLP(dim, mlp_ratio, layer_scale)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        groups = torch.split(x, self.split, dim=1)
        outs = []
        current = groups[0]
        for i, conv in enumerate(self.convs):
            current = conv(current if i == 0 else current + groups[i])
            outs.append(current)
        outs.extend(groups[self.convolved:])
        x = torch.cat(outs, dim=1)
        b, c, h, w = x.shape
        if self.pos_embed is not None:
            x = x + self.pos_embed(h, w)
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = tokens + self.drop_path(self.gamma_xca * self.xca(self.norm_xca(tokens)))
        out = self.mlp(tokens).transpose(1, 2).reshape(b, c, h, w)
        return shortcut + self.drop_path(out)


@dataclass(frozen=True)
class EdgeNeXtConfig:
    dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    sdta_blocks: tuple[int, int, int, int]
    kernels: tuple[int, int, int, int]
    scales: tuple[int, int, int, int]
    heads: int
    positional: tuple[bool, bool, bool, bool]


EDGENEXT_XXS = EdgeNeXtConfig(
    dims=(24, 48, 88, 168), depths=(2, 2, 6, 2), sdta_blocks=(0, 1, 1, 1), kernels=(3, 5, 7, 9),
    scales=(2, 2, 3, 4), heads=4, positional=(False, True, False, False),
)


class EdgeNeXt(nn.Module):
    """EdgeNeXt trunk: patchify stem (4×4/4 + LN), four stages (LN + 2×2/2 downsampling
    between them). Output stride 32; `out_channels` is the last stage width."""

    stride = 32

    def __init__(self, config: EdgeNeXtConfig = EDGENEXT_XXS, width_mult: float = 1.0, drop_path: float = 0.0):
        super().__init__()
        dims = [self._scaled(d, width_mult, config.heads) for d in config.dims]
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        total = sum(config.depths)
        rates = [drop_path * i / max(1, total - 1) for i in range(total)]
        self.downsamples = nn.ModuleList()
        self.stages = nn.ModuleList()
        block_index = 0
        for stage, (dim, depth) in enumerate(zip(dims, config.depths)):
            if stage > 0:
                self.downsamples.append(nn.Sequential(LayerNorm2d(dims[stage - 1], eps=1e-6),
                                                      nn.Conv2d(dims[stage - 1], dim, 2, stride=2)))
            blocks: list[nn.Module] = []
            for j in range(depth):
                rate = rates[block_index]
                block_index += 1
                if j >= depth - config.sdta_blocks[stage]:
                    blocks.append(SDTAEncoder(dim, config.scales[stage], config.heads, drop_path=rate,
                                              positional=config.positional[stage]))
                else:
                    blocks.append(ConvEncoder(dim, config.kernels[stage], drop_path=rate))
            self.stages.append(nn.Sequential(*blocks))
        self.out_channels = dims[-1]
        self.apply(self._init_weights)

    @staticmethod
    def _scaled(dim: int, width_mult: float, heads: int) -> int:
        divisor = max(8, heads)
        return make_divisible(dim * width_mult, divisor)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages[0](self.stem(x))
        for downsample, stage in zip(self.downsamples, self.stages[1:]):
            x = stage(downsample(x))
        return x


def mobilenetv3(config: str = "small", width_mult: float = 1.0) -> MobileNetV3:
    """A MobileNetV3 trunk ('small' or 'large')."""
    return MobileNetV3(config, width_mult)


def edgenext_xxs(width_mult: float = 1.0, drop_path: float = 0.0) -> EdgeNeXt:
    """The EdgeNeXt-XXS trunk (1.16 M parameters without a head at width 1)."""
    return EdgeNeXt(EDGENEXT_XXS, width_mult=width_mult, drop_path=drop_path)


__all__ = [
    "EdgeNeXt", "EdgeNeXtConfig", "EDGENEXT_XXS", "MobileNetV3", "InvertedResidual", "SDTAEncoder",
    "ConvEncoder", "CrossCovarianceAttention", "edgenext_xxs", "mobilenetv3"
]
