"""Networks built the way insightface's arcface_torch (`recognition/arcface_torch/backbones`)
builds them: the same modules under the same attribute names, so their `state_dict()` has the
published key layout of `backbone.pth`, and the same forward. Written for the tests, to check
`facekd import insightface` against; not facekd code."""

from __future__ import annotations

import torch
from torch import nn

IRESNET_LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}


class _IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class ReferenceIResNet(nn.Module):
    """arcface_torch's `IResNet`: stem, four stages, then bn2 → flatten → dropout → fc → features (BN1d)."""

    def __init__(self, layers, num_features: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, 2, bias=False),
                                       nn.BatchNorm2d(planes, eps=1e-05))
            stage = [_IBasicBlock(inplanes, planes, 2, downsample)]
            stage += [_IBasicBlock(planes, planes, 1, None) for _ in range(1, blocks)]
            setattr(self, f"layer{index}", nn.Sequential(*stage))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=0.0, inplace=True)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


class _ConvBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=1, stride=1, padding=0, groups=1, prelu=True):
        super().__init__()
        parts = [nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(out_c)]
        self.layers = nn.Sequential(*parts, *([nn.PReLU(out_c)] if prelu else []))

    def forward(self, x):
        return self.layers(x)


class _DepthWise(nn.Module):
    def __init__(self, in_c, out_c, residual, stride, groups):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(_ConvBlock(in_c, groups), _ConvBlock(groups, groups, 3, stride, 1, groups),
                                    _ConvBlock(groups, out_c, prelu=False))

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


class _Residual(nn.Module):
    def __init__(self, c, num_block, groups):
        super().__init__()
        self.layers = nn.Sequential(*[_DepthWise(c, c, True, 1, groups) for _ in range(num_block)])

    def forward(self, x):
        return self.layers(x)


class _GDC(nn.Module):
    def __init__(self, embedding_size):
        super().__init__()
        self.layers = nn.Sequential(_ConvBlock(512, 512, 7, 1, 0, groups=512, prelu=False), nn.Flatten(),
                                    nn.Linear(512, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))

    def forward(self, x):
        return self.layers(x)


class ReferenceMobileFaceNet(nn.Module):
    """arcface_torch's `MobileFaceNet(num_features, blocks, scale)`: `get_mbf` is scale 2,
    blocks (1, 4, 6, 2); `get_mbf_large` scale 4, blocks (2, 8, 12, 4)."""

    def __init__(self, num_features: int = 512, blocks=(1, 4, 6, 2), scale: int = 2):
        super().__init__()
        c64, c128 = 64 * scale, 128 * scale
        first = (_ConvBlock(c64, c64, 3, 1, 1, groups=64) if blocks[0] == 1 else _Residual(c64, blocks[0], 128))
        self.layers = nn.ModuleList([
            _ConvBlock(3, c64, 3, 2, 1), first,
            _DepthWise(c64, c64, False, 2, 128), _Residual(c64, blocks[1], 128),
            _DepthWise(c64, c128, False, 2, 256), _Residual(c128, blocks[2], 256),
            _DepthWise(c128, c128, False, 2, 512), _Residual(c128, blocks[3], 256),
        ])
        self.conv_sep = _ConvBlock(c128, 512)
        self.features = _GDC(num_features)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


def reference_network(arch: str, num_features: int = 512) -> nn.Module:
    """The arcface_torch network `arch` (r18, r34, r50, r100, mbf, mbf_large)."""
    if arch in IRESNET_LAYERS:
        return ReferenceIResNet(IRESNET_LAYERS[arch], num_features)
    if arch == "mbf":
        return ReferenceMobileFaceNet(num_features, (1, 4, 6, 2), 2)
    return ReferenceMobileFaceNet(num_features, (2, 8, 12, 4), 4)


def reference_embeddings(model: nn.Module, images_rgb) -> torch.Tensor:
    """arcface_torch's `inference.py` on uint8 RGB (N, 112, 112, 3): /255, −0.5, /0.5, NCHW, forward."""
    x = torch.from_numpy(images_rgb).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    with torch.no_grad():
        return model.eval()(x)
