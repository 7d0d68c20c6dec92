"""Wide residual networks for CIFAR (Zagoruyko & Komodakis 2016): WRN-16-4, WRN-28-10."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..factory import get_norm_layer
from ..io import BadInput
from .registry import register_model


class WideBlock(nn.Module):
    def __init__(
        self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module], drop: float
    ) -> None:
        super().__init__()
        self.bn1 = norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: Tensor) -> Tensor:
        o = self.relu(self.bn1(x))
        sc = self.shortcut(o) if self.shortcut is not None else x
        o = self.conv2(self.drop(self.relu(self.bn2(self.conv1(o)))))
        return o + sc


class WideResNet(nn.Module):
    def __init__(
        self,
        depth: int,
        k: int,
        num_classes: int = 10,
        in_channels: int = 3,
        norm: str = "bn",
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise BadInput(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        norm_layer = get_norm_layer(norm, 2)
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks = []
        cin = widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBlock(cin, w, 2 if (i > 0 and j == 0) else 1, norm_layer, drop))
                cin = w
        self.layers = nn.Sequential(*blocks)
        self.bn = norm_layer(cin)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(cin, num_classes)

    def features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn(self.layers(self.conv1(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


@register_model("wrn16_4")
def wrn16_4(num_classes: int = 10, in_channels: int = 3, norm: str = "bn") -> nn.Module:
    """WRN-16-4."""
    return WideResNet(16, 4, num_classes, in_channels, norm)


@register_model("wrn28_10")
def wrn28_10(num_classes: int = 10, in_channels: int = 3, norm: str = "bn") -> nn.Module:
    """WRN-28-10."""
    return WideResNet(28, 10, num_classes, in_channels, norm)
