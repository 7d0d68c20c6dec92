"""A small MLP for 1-D features (flattens any input): Linear -> norm -> ReLU blocks."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..factory import get_norm_layer
from ..io import BadInput
from .registry import register_model


class MLP(nn.Module):
    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (256, 256),
        norm: str = "bn",
    ) -> None:
        super().__init__()
        norm_layer = get_norm_layer(norm, 1)
        layers = []
        cin = in_features
        for h in hidden:
            layers += [nn.Linear(cin, h, bias=False), norm_layer(h), nn.ReLU(inplace=True)]
            cin = h
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(torch.flatten(x, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


@register_model("mlp", takes=("in_features",))
def mlp(
    num_classes: int = 10,
    in_channels: int = 1,
    norm: str = "bn",
    in_features: int = 0,
    hidden: Sequence[int] = (256, 256),
) -> nn.Module:
    """MLP; ``in_features`` is the flattened input size (set by the engine from the dataset)."""
    if in_features <= 0:
        raise BadInput("mlp needs in_features (the flattened input size)")
    return MLP(in_features, num_classes, hidden, norm)
