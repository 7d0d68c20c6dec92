"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", 2016, sec. 4.2):
three stages of 16/32/64 channels (times ``width``), 6n+2 layers, option-A-free (1x1 conv
projection shortcuts), and a pre-activation ResNet-18 for CIFAR (He et al., "Identity
Mappings in Deep Residual Networks", 2016)."""

from __future__ import annotations

from typing import Callable, List

import torch
from torch import Tensor, nn

from ..factory import get_norm_layer
from ..io import BadInput
from .registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs. ``width`` scales the 16/32/64 channels."""

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        norm: str = "bn",
        width: int = 1,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise BadInput(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        norm_layer = get_norm_layer(norm, 2)
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers: List[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1, norm_layer))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (the classifier's input)."""
        x = self.relu(self.bn1(self.conv1(x)))
        return torch.flatten(self.pool(self.layers(x)), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def _make(depth: int):
    def build(num_classes: int = 10, in_channels: int = 3, norm: str = "bn", width: int = 1):
        return CifarResNet(depth, num_classes, in_channels, norm, width)

    build.__doc__ = f"ResNet-{depth} for CIFAR (He et al. 2016)."
    return build


for _d in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"resnet{_d}", takes=("width",))(_make(_d))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.bn1 = norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + sc


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 for 32x32 inputs (64-128-256-512 channels)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: str = "bn") -> None:
        super().__init__()
        norm_layer = get_norm_layer(norm, 2)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        blocks: List[nn.Module] = []
        cin = 64
        for i, w in enumerate((64, 128, 256, 512)):
            for j in range(2):
                blocks.append(PreActBlock(cin, w, 2 if (i > 0 and j == 0) else 1, norm_layer))
                cin = w
        self.layers = nn.Sequential(*blocks)
        self.bn = norm_layer(512)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(512, num_classes)

    def features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn(self.layers(self.conv1(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


@register_model("preact_resnet18")
def preact_resnet18(num_classes: int = 10, in_channels: int = 3, norm: str = "bn") -> nn.Module:
    """Pre-activation ResNet-18 for CIFAR."""
    return PreActResNet18(num_classes, in_channels, norm)
