"""PyTorch layers that compute what their Keras counterparts compute, for the ports of the
authors' Keras networks (:mod:`l2bn.models.dcase`): TensorFlow's "same" padding (asymmetric at
stride 2) for convolutions and pools, Keras's channel attention and He-normal initialisation,
and Keras's BN constants in PyTorch's convention."""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KERAS_BN_EPS",
    "KERAS_BN_MOMENTUM",
    "tf_same_padding",
    "Conv2dSame",
    "MaxPool2dSame",
    "AvgPool2dSame",
    "ChannelAttention",
    "keras_he_normal_",
]

KERAS_BN_EPS = 1e-3


KERAS_BN_MOMENTUM = 0.01  # PyTorch's convention: 1 - Keras's momentum=0.99


_Pair = Union[int, Tuple[int, int]]


def _pair(v: _Pair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def tf_same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """``(before, after)`` padding of TensorFlow/Keras ``padding="same"`` along one axis.

    Example:
        >>> tf_same_padding(400, 3, 2), tf_same_padding(423, 3, 2), tf_same_padding(400, 5, 2)
        ((0, 1), (1, 1), (1, 2))
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _same_pads(
    x: Tensor, kernel: Tuple[int, int], stride: Tuple[int, int]
) -> Tuple[int, int, int, int]:
    top, bottom = tf_same_padding(x.shape[-2], kernel[0], stride[0])
    left, right = tf_same_padding(x.shape[-1], kernel[1], stride[1])
    return (left, right, top, bottom)  # F.pad order: last dim first


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with Keras ``padding="same"`` (TensorFlow's, asymmetric for even strides).

    With stride 1 and odd kernels the padding is symmetric and uses ``nn.Conv2d``'s own; otherwise
    the input is padded per call from its actual size (``T`` varies: 400 in training, 423 in
    validation). Bias-free by default, as every convolution of the reference networks.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _Pair,
        stride: _Pair = 1,
        bias: bool = False,
    ) -> None:
        k, s = _pair(kernel_size), _pair(stride)
        static = s == (1, 1) and k[0] % 2 == 1 and k[1] % 2 == 1
        super().__init__(
            in_channels,
            out_channels,
            k,
            s,
            padding=(k[0] // 2, k[1] // 2) if static else 0,
            bias=bias,
        )
        self._dynamic = not static

    def forward(self, input: Tensor) -> Tensor:
        if self._dynamic:
            input = F.pad(input, _same_pads(input, self.kernel_size, self.stride))
        return self._conv_forward(input, self.weight, self.bias)


class MaxPool2dSame(nn.Module):
    """Keras ``MaxPooling2D(padding="same")``: padded cells never win (padding is -inf)."""

    def __init__(self, kernel_size: _Pair, stride: _Pair) -> None:
        super().__init__()
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, _same_pads(x, self.kernel_size, self.stride), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding='same'"


class AvgPool2dSame(nn.Module):
    """Keras ``AveragePooling2D(padding="same")``: the mean over each window's *valid* cells."""

    def __init__(self, kernel_size: _Pair, stride: _Pair) -> None:
        super().__init__()
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)

    def forward(self, x: Tensor) -> Tensor:
        pads = _same_pads(x, self.kernel_size, self.stride)
        total = F.avg_pool2d(F.pad(x, pads), self.kernel_size, self.stride, divisor_override=1)
        ones = torch.ones((1, 1) + tuple(x.shape[-2:]), dtype=x.dtype, device=x.device)
        count = F.avg_pool2d(F.pad(ones, pads), self.kernel_size, self.stride, divisor_override=1)
        return total / count

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding='same'"


class ChannelAttention(nn.Module):
    """CBAM's channel branch as in Hu et al.'s ``attention_layer.channel_attention``: one pair
    of Dense layers (``C -> C // ratio``, ReLU, ``-> C``, with biases) *shared* by the
    global-average
    and the global-max branch; ``x * sigmoid(avg_branch + max_branch)``."""

    def __init__(self, channels: int, ratio: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // ratio)
        self.fc2 = nn.Linear(channels // ratio, channels)

    def _mlp(self, v: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(v)))

    def forward(self, x: Tensor) -> Tensor:
        a = self._mlp(x.mean(dim=(2, 3))) + self._mlp(x.amax(dim=(2, 3)))
        return x * torch.sigmoid(a)[:, :, None, None]


def keras_he_normal_(weight: Tensor) -> Tensor:
    """Keras 2.2.4 ``he_normal``: truncated normal at +-2 sd, sd = sqrt(2 / fan_in) / 0.8796."""
    fan_in = weight[0].numel()
    std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
    with torch.no_grad():
        return nn.init.trunc_normal_(weight, 0.0, std, -2.0 * std, 2.0 * std)


def _keras_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            keras_he_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
