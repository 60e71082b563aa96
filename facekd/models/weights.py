"""Weight initialisation shared by the convolutional trunks."""

from __future__ import annotations

from torch import nn


def init_conv_bn(module: nn.Module) -> None:
    """Kaiming-normal (fan-out) convolutions with zero bias, unit/zero batch norms (insightface,
    torchvision MobileNetV3)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
