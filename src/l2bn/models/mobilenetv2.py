"""MobileNetV2 for CIFAR (Sandler et al. 2018; stride-1 stem and first stages for 32x32)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..factory import get_norm_layer
from .registry import register_model

# expansion, out channels, repeats, stride  (CIFAR variant: strides 1 in the first two stages)
_CFG = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class InvertedResidual(nn.Module):
    def __init__(
        self, cin: int, cout: int, stride: int, expand: int, norm: Callable[[int], nn.Module]
    ) -> None:
        super().__init__()
        hid = cin * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hid, 1, bias=False), norm(hid), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False),
            norm(hid),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hid, cout, 1, bias=False),
            norm(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: str = "bn") -> None:
        super().__init__()
        norm_layer = get_norm_layer(norm, 2)
        layers = [
            nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False),
            norm_layer(32),
            nn.ReLU6(inplace=True),
        ]
        cin = 32
        for t, c, n, s in _CFG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t, norm_layer))
                cin = c
        layers += [nn.Conv2d(cin, 1280, 1, bias=False), norm_layer(1280), nn.ReLU6(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(1280, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.body(x), 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int = 10, in_channels: int = 3, norm: str = "bn") -> nn.Module:
    """MobileNetV2, CIFAR variant."""
    return MobileNetV2(num_classes, in_channels, norm)
