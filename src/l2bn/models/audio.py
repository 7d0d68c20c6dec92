"""CNNs for acoustic scene classification on (N, 3, mels, frames) log-mel + deltas, all taking
``norm=``.

Following the structure of Hu et al., "Device-Robust Acoustic Scene Classification Based on
Two-Stage Categorization and Data Augmentation" (DCASE 2020 Task 1A), whose ResNet follows
McDonnell & Gao (2020): a **two-path frequency-split ResNet** (the mel bands split into a low
and a high half, each processed by its own residual path, joined along frequency before a 1x1
convolutional classifier with global pooling), a **fully convolutional** network (FCNN) and its
frequency-split variant (fsFCNN). Depths and widths follow the papers' descriptions; the exact
published weights/hyper-parameters beyond those in ``configs/dcase2020-1a-*.yaml`` are not
reproduced bit for bit.
"""

from __future__ import annotations

from typing import Callable, List

import torch
from torch import Tensor, nn

from ..factory import get_norm_layer
from .registry import register_model


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.bn1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.short = None if (stride == 1 and cin == cout) else nn.Sequential(
            nn.AvgPool2d(stride, stride, ceil_mode=True) if stride != 1 else nn.Identity(), nn.Conv2d(cin, cout, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        o = self.relu(self.bn1(x))
        sc = x if self.short is None else self.short(o)
        o = self.conv2(self.relu(self.bn2(self.conv1(o))))
        return o + sc


class _ResPath(nn.Module):
    """One frequency path: stem, then 4 stages (1, 2, 4, 8 x base channels), 2 blocks each."""

    def __init__(self, cin: int, base: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(cin, base, 3, (1, 2), 1, bias=False)
        blocks: List[nn.Module] = []
        c = base
        for i, w in enumerate((base, 2 * base, 4 * base, 8 * base)):
            for j in range(2):
                blocks.append(_PreActBlock(c, w, 2 if (i > 0 and j == 0) else 1, norm))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = c

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x))


class _Head(nn.Module):
    """BN-ReLU, 1x1 conv to classes, norm, global average pooling (fully convolutional)."""

    def __init__(self, cin: int, num_classes: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.bn, self.relu = norm(cin), nn.ReLU()
        self.conv = nn.Conv2d(cin, num_classes, 1, bias=False)
        self.bn_out = norm(num_classes)

    def features(self, x: Tensor) -> Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.relu(self.bn(x)), 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn_out(self.conv(self.relu(self.bn(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


class FreqSplit(nn.Module):
    """Apply ``make_path()`` to the low and the high half of the mel axis, join along frequency."""

    def __init__(self, make_path: Callable[[], nn.Module], out_channels: int, num_classes: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.low, self.high = make_path(), make_path()
        self.head = _Head(out_channels, num_classes, norm)

    def body(self, x: Tensor) -> Tensor:
        half = x.shape[2] // 2
        return torch.cat([self.low(x[:, :, :half]), self.high(x[:, :, half:])], dim=2)

    def features(self, x: Tensor) -> Tensor:
        return self.head.features(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class _ConvPath(nn.Module):
    """FCNN body: 4 blocks of (conv3x3-norm-ReLU) x 2 + max-pool; channels 1, 2, 4, 8 x base."""

    def __init__(self, cin: int, base: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        c = cin
        for i, w in enumerate((base, 2 * base, 4 * base, 8 * base)):
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, 1, 1, bias=False), norm(w), nn.ReLU()]
                c = w
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.out_channels = c

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class FCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, norm: str, base: int) -> None:
        super().__init__()
        nl = get_norm_layer(norm, 2)
        self.path = _ConvPath(in_channels, base, nl)
        self.head = _Head(self.path.out_channels, num_classes, nl)

    def features(self, x: Tensor) -> Tensor:
        return self.head.features(self.path(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.path(x))


@register_model("dcase-resnet")
def dcase_resnet(num_classes: int = 10, in_channels: int = 3, norm: str = "bn", base: int = 48) -> nn.Module:
    """Two-path frequency-split ResNet (48 base filters in the reference recipe)."""
    nl = get_norm_layer(norm, 2)
    return FreqSplit(lambda: _ResPath(in_channels, base, nl), 8 * base, num_classes, nl)


@register_model("dcase-fcnn")
def dcase_fcnn(num_classes: int = 10, in_channels: int = 3, norm: str = "bn", base: int = 36) -> nn.Module:
    """Fully convolutional CNN."""
    return FCNN(num_classes, in_channels, norm, base)


@register_model("dcase-fsfcnn")
def dcase_fsfcnn(num_classes: int = 10, in_channels: int = 3, norm: str = "bn", base: int = 36) -> nn.Module:
    """Frequency-split FCNN: the FCNN body on each mel half, joined along frequency."""
    nl = get_norm_layer(norm, 2)
    return FreqSplit(lambda: _ConvPath(in_channels, base, nl), 8 * base, num_classes, nl)


class AudioCNN(nn.Module):
    """A small CNN for the spoken-digits demo: 4 x (conv-norm-ReLU, pool), GAP, linear."""

    def __init__(self, num_classes: int, in_channels: int, norm: str, width: int = 16) -> None:
        super().__init__()
        nl = get_norm_layer(norm, 2)
        layers: List[nn.Module] = []
        c = in_channels
        for i, w in enumerate((width, 2 * width, 4 * width, 4 * width)):
            layers += [nn.Conv2d(c, w, 3, 1, 1, bias=False), nl(w), nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.body(x), 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


@register_model("audio-cnn")
def audio_cnn(num_classes: int = 10, in_channels: int = 3, norm: str = "bn", width: int = 16) -> nn.Module:
    """Small CNN for the offline spoken-digits demo."""
    return AudioCNN(num_classes, in_channels, norm, width)
