"""A small CNN for (N, C, mels, frames) log-mel inputs, taking ``norm=``: the offline
spoken-digits demo's model (``audio-cnn``).

The DCASE 2020 Task 1A networks of the paper's acoustic experiment (``dcase-resnet``,
``dcase-fcnn``, ``dcase-fsfcnn``) are in :mod:`l2bn.models.dcase`.
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn

from ..factory import get_norm_layer
from .registry import register_model


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
def audio_cnn(
    num_classes: int = 10, in_channels: int = 3, norm: str = "bn", width: int = 16
) -> nn.Module:
    """Small CNN for the offline spoken-digits demo."""
    return AudioCNN(num_classes, in_channels, norm, width)
