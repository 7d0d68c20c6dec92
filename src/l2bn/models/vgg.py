"""VGG-11/16 with a norm layer after every conv, for 32x32 inputs (Simonyan & Zisserman 2015)."""

from __future__ import annotations

from typing import List, Union

import torch
from torch import Tensor, nn

from ..factory import get_norm_layer
from .registry import register_model

_CFG = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(
        self, depth: int, num_classes: int = 10, in_channels: int = 3, norm: str = "bn"
    ) -> None:
        super().__init__()
        norm_layer = get_norm_layer(norm, 2)
        layers: List[nn.Module] = []
        cin = in_channels
        spec: List[Union[int, str]] = _CFG[depth]
        for v in spec:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(cin, int(v), 3, padding=1, bias=False),
                    norm_layer(int(v)),
                    nn.ReLU(inplace=True),
                ]
                cin = int(v)
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.body(x), 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


@register_model("vgg11")
def vgg11(num_classes: int = 10, in_channels: int = 3, norm: str = "bn") -> nn.Module:
    """VGG-11 with norm layers."""
    return VGG(11, num_classes, in_channels, norm)


@register_model("vgg16")
def vgg16(num_classes: int = 10, in_channels: int = 3, norm: str = "bn") -> nn.Module:
    """VGG-16 with norm layers."""
    return VGG(16, num_classes, in_channels, norm)
