"""The three DCASE 2020 Task 1A networks of the L2BN paper's acoustic experiment, layer for layer.

These are the Keras models of the authors' released code (Ingrid725/ASC_L2BN @ 55b5024, itself
Hu et al.'s MihawkHu/DCASE2020_task1 ``task1a/10class`` models plus an ``l2bn`` switch),
ported to PyTorch with the same layers, widths, strides, paddings, shortcuts, heads, dropout,
BN ``center``/``scale`` flags, bias-free convolutions and He-normal initialisation.

Why one file: the three networks share their blocks (the BN switch that decides where L2BN
goes, the pre-activation path of the ResNet, the attention head of the two FCNNs) and are
checked together against one reference table. The Keras-equivalent layers they are built from
(TensorFlow-"same" convolutions and pools, the He-normal init) are in
:mod:`l2bn.models.keras_layers`.

=================  ===========================  ==================  =====================
registry name      Keras builder                trainable params    BN running-stat size
=================  ===========================  ==================  =====================
``dcase-resnet``   ``resnet.model_resnet``      12,966,444          14,048
``dcase-fcnn``     ``fcnn_att.model_fcnn``      11,780,329          6,382
``dcase-fsfcnn``   ``fsfcnn_att.model_fcnn``    16,531,913          7,790
=================  ===========================  ==================  =====================

(``sum(p.numel() for p in net.parameters())`` equals Keras's *trainable* count; the
``running_mean``/``running_var`` buffers sum to Keras's *non-trainable* count.)

Input: ``(N, 3, 128, T)`` -- channels [log-mel, delta, delta-delta], 128 mel bins, ``T`` frames
(400 in training, 423 in validation). Keras's ``(freq, time)`` kernel and stride lists map to
PyTorch's ``(H, W)`` = ``(freq, time)`` unchanged. The networks return logits (the Keras models
end in a softmax, which the loss applies here).

Porting details that matter:

- Keras ``padding="same"`` is TensorFlow's: ``pad_total = max((ceil(n/s) - 1)*s + k - n, 0)``,
  ``pad_before = pad_total // 2``; with stride 2 the extra cell goes at the end. PyTorch's
  ``padding=k//2`` gives the same output size on a shifted sampling grid, so the stride-2 layers
  use :class:`Conv2dSame`, :class:`MaxPool2dSame` and :class:`AvgPool2dSame`, which pad exactly
  as TensorFlow for any input length.
- ``AveragePooling2D(padding="same")`` (ResNet shortcuts) divides by the number of *valid* cells;
  ``MaxPooling2D(padding="same")`` ignores padded cells.
- Kernels are initialised as Keras 2.2.4's ``he_normal``: a normal truncated at two standard
  deviations, with the standard deviation corrected (``/0.8796``) so the variance is ``2/fan_in``.
- BN constants are Keras's: ``eps = 1e-3`` and momentum 0.99, i.e. PyTorch ``momentum=0.01``
  (override with ``bn_eps``/``bn_momentum``).

**Where L2BN goes.** The authors' design routes every BN through an ``l2bn`` switch except one:
the final non-affine BN on the class maps before pooling (``BatchNormalization(center=False,
scale=False)`` written out directly in ``model_resnet``/``model_fcnn``). Here ``norm=`` sets all
switchable layers (36 in the ResNet, 10 in the FCNN, 12 in the fsFCNN, input BNs included) and
``final_norm`` (default: BN, see :func:`default_final_norm`) sets that last layer, reachable as
``model.final_bn``. (In the released Keras file the switch has no effect: its ``L2BN2d`` subclasses
``BatchNormalization``
and defines only a PyTorch-style ``forward()``, which Keras never calls, so ``l2bn=True`` runs
plain BN. These networks with a working L2BN are the experiment that code never ran.)

Example:
    >>> import torch
    >>> from l2bn.models import create_model
    >>> net = create_model("dcase-fcnn", 10, 3, "l2bn")
    >>> sum(p.numel() for p in net.parameters())
    11780329
    >>> net.eval()(torch.randn(2, 3, 128, 64)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..factory import get_norm_layer
from .keras_layers import (
    KERAS_BN_EPS,
    KERAS_BN_MOMENTUM,
    AvgPool2dSame,
    ChannelAttention,
    Conv2dSame,
    MaxPool2dSame,
    _keras_init,
    _Pair,
    keras_he_normal_,
    tf_same_padding,
)
from .registry import register_model

__all__ = [
    "KERAS_BN_EPS",
    "KERAS_BN_MOMENTUM",
    "REFERENCE",
    "tf_same_padding",
    "Conv2dSame",
    "MaxPool2dSame",
    "AvgPool2dSame",
    "ChannelAttention",
    "DCASEResNet",
    "DCASEFCNN",
    "DCASEFsFCNN",
    "keras_he_normal_",
    "param_counts",
    "default_final_norm",
]


# Totals of the Keras reference build (trainable, non-trainable = BN moving mean + variance).
REFERENCE: Dict[str, Tuple[int, int]] = {
    "dcase-resnet": (12_966_444, 14_048),
    "dcase-fcnn": (11_780_329, 6_382),
    "dcase-fsfcnn": (16_531_913, 7_790),
}

NormCtor = Callable[..., nn.Module]


def default_final_norm(norm: str) -> str:
    """The final layer's norm for ``norm``: plain BN (its synchronised twin for a sync norm, nothing
    for ``"none"``) -- the authors' design keeps it BN whatever the ``l2bn`` switch says.

    Example:
        >>> [default_final_norm(n) for n in ("l2bn", "sync-l2bn-rms", "none")]
        ['bn', 'syncbn', 'none']
    """
    key = str(norm).lower()
    if key in ("none", "identity"):
        return "none"
    return "syncbn" if key.startswith("sync") else "bn"


def _norms(
    norm: str, final_norm: Optional[str], bn_eps: float, bn_momentum: float
) -> Tuple[NormCtor, NormCtor]:
    kw = dict(eps=bn_eps, momentum=bn_momentum)
    final = default_final_norm(norm) if final_norm is None else final_norm
    return get_norm_layer(norm, 2, **kw), get_norm_layer(final, 2, **kw)


class _Tap(nn.Identity):
    """A no-op the classifier's pooled input is passed through, so feature probes can hook it
    (``FeatureProbe(model, layer=model.feature_layer)``); the result is not used."""


# ------------------------------------------------------------------------------------- ResNet


class _PreActBlock(nn.Module):
    """``[BN(no affine) - ReLU - Conv3x3] x 2`` plus the shortcut; a downsampling block uses stride
    (1, 2) in its first conv and a ``3x3`` stride-(1, 2) "same" average pool + zero channels as
    shortcut. The shortcut taps the block input (before its BN), as in ``model_resnet``."""

    def __init__(self, cin: int, cout: int, downsample: bool, norm: NormCtor) -> None:
        super().__init__()
        stride = (1, 2) if downsample else (1, 1)
        self.bn1, self.relu1, self.conv1 = (
            norm(cin, affine=False),
            nn.ReLU(),
            Conv2dSame(cin, cout, 3, stride),
        )
        self.bn2, self.relu2, self.conv2 = (
            norm(cout, affine=False),
            nn.ReLU(),
            Conv2dSame(cout, cout, 3),
        )
        self.pool = AvgPool2dSame(3, (1, 2)) if downsample else None
        self.extra_channels = cout - cin

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.relu2(self.bn2(self.conv1(self.relu1(self.bn1(x))))))
        short = x if self.pool is None else self.pool(x)
        if self.extra_channels:
            short = F.pad(
                short, (0, 0, 0, 0, 0, self.extra_channels)
            )  # concat([s, zeros]) on channels
        return out + short


class _ResNetPath(nn.Module):
    """One frequency path: input BN (affine), Conv3x3 stride (1, 2) without ReLU, then 4 stages x
    2 pre-activation blocks of widths ``w, 2w, 4w, 8w``; time-only downsampling."""

    def __init__(
        self, in_channels: int, width: int, norm: NormCtor, blocks_per_stage: int = 2
    ) -> None:
        super().__init__()
        self.bn_in = norm(in_channels, affine=True)
        self.conv_in = Conv2dSame(in_channels, width, 3, (1, 2))
        stages: List[nn.Module] = []
        c = width
        for i in range(4):
            w = width * 2**i
            stages.append(
                nn.Sequential(
                    *[
                        _PreActBlock(c if j == 0 else w, w, i > 0 and j == 0, norm)
                        for j in range(blocks_per_stage)
                    ]
                )
            )
            c = w
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.out_channels = c

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(self.bn_in(x))
        return self.stage4(self.stage3(self.stage2(self.stage1(x))))


class DCASEResNet(nn.Module):
    """Hu et al.'s two-path frequency-split ResNet (``resnet.model_resnet``, ``num_filters=48``).

    The mel axis is split into bins ``[0, F/2)`` and ``[F/2, F)``; each half goes through its own
    :class:`_ResNetPath`; the two are joined along frequency, then ``BN-ReLU-Conv1x1(8w -> 32w)``,
    ``BN-Conv1x1(-> classes)`` (no ReLU), the final non-affine BN (``final_norm``) and global
    average pooling. All BNs except the two input BNs are non-affine.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        norm: str = "bn",
        width: int = 48,
        final_norm: Optional[str] = None,
        bn_eps: float = KERAS_BN_EPS,
        bn_momentum: float = KERAS_BN_MOMENTUM,
    ) -> None:
        super().__init__()
        nl, fl = _norms(norm, final_norm, bn_eps, bn_momentum)
        self.path1, self.path2 = (
            _ResNetPath(in_channels, width, nl),
            _ResNetPath(in_channels, width, nl),
        )
        c = self.path1.out_channels
        self.bn1, self.relu1, self.conv1 = (
            nl(c, affine=False),
            nn.ReLU(),
            nn.Conv2d(c, 4 * c, 1, bias=False),
        )
        self.bn2, self.conv2 = nl(4 * c, affine=False), nn.Conv2d(4 * c, num_classes, 1, bias=False)
        self.final_bn = fl(num_classes, affine=False)
        self.embedding = _Tap()
        self.feature_layer = "embedding"
        _keras_init(self)

    def body(self, x: Tensor) -> Tensor:
        half = x.shape[2] // 2
        return torch.cat([self.path1(x[:, :, :half]), self.path2(x[:, :, half:])], dim=2)

    def features(self, x: Tensor) -> Tensor:
        """The pooled input of the classifying 1x1 convolution, ``(N, 32w)``."""
        return self.bn2(self.conv1(self.relu1(self.bn1(self.body(x))))).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn2(self.conv1(self.relu1(self.bn1(self.body(x)))))
        self.embedding(h.detach().mean(dim=(2, 3)))
        return self.final_bn(self.conv2(h)).mean(dim=(2, 3))


# --------------------------------------------------------------------------------- FCNN family


def _cbr(
    cin: int, cout: int, kernel: _Pair, stride: _Pair, norm: NormCtor, padding: Optional[int] = None
) -> List[nn.Module]:
    """Conv (bias-free) - BN(affine) - ReLU; ``padding=None``: Keras "same", else symmetric zero
    padding (``ZeroPadding2D(p)`` then a "valid" conv)."""
    conv = (
        Conv2dSame(cin, cout, kernel, stride)
        if padding is None
        else nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
    )
    return [conv, norm(cout, affine=True), nn.ReLU()]


class _AttentionHead(nn.Module):
    """``Conv1x1(-> classes)`` - BN - ReLU - final BN (both non-affine) - attention - GAP."""

    def __init__(self, cin: int, num_classes: int, norm: NormCtor, final: NormCtor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, num_classes, 1, bias=False)
        self.bn, self.relu = norm(num_classes, affine=False), nn.ReLU()
        self.final_bn = final(num_classes, affine=False)
        self.attention = ChannelAttention(num_classes, ratio=2)
        self.embedding = _Tap()

    def forward(self, x: Tensor) -> Tensor:
        self.embedding(x.detach().mean(dim=(2, 3)))
        return self.attention(self.final_bn(self.relu(self.bn(self.conv(x))))).mean(dim=(2, 3))


class _FCNNBase(nn.Module):
    feature_layer = "head.embedding"

    @property
    def final_bn(self) -> nn.Module:
        return self.head.final_bn

    def features(self, x: Tensor) -> Tensor:
        """The pooled input of the classifying 1x1 convolution."""
        return self.body(x).mean(dim=(2, 3))

    def body(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class DCASEFCNN(_FCNNBase):
    """Hu et al.'s FCNN with channel attention (``fcnn_att.model_fcnn``, ``num_filters=[48, 96,
    192]``; widths are ``num_filters * in_channels`` = 144, 288, 576 as in the Keras code).

    Input BN; ``ZeroPad(2)-Conv5x5 s2``, ``ZeroPad(1)-Conv3x3``, max-pool 2 (block 1); two 3x3
    convs,
    max-pool 2 (block 2); four 3x3 convs with element-wise dropout 0.3 after the first three,
    max-pool 2 (block 3); then the attention head. BNs after convolutions are affine.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        norm: str = "bn",
        num_filters: Sequence[int] = (48, 96, 192),
        dropout: float = 0.3,
        final_norm: Optional[str] = None,
        bn_eps: float = KERAS_BN_EPS,
        bn_momentum: float = KERAS_BN_MOMENTUM,
    ) -> None:
        super().__init__()
        nl, fl = _norms(norm, final_norm, bn_eps, bn_momentum)
        w1, w2, w3 = (f * in_channels for f in num_filters)
        self.bn_in = nl(in_channels, affine=True)
        self.block1 = nn.Sequential(
            *_cbr(in_channels, w1, 5, 2, nl, 2), *_cbr(w1, w1, 3, 1, nl, 1), nn.MaxPool2d(2)
        )
        self.block2 = nn.Sequential(
            *_cbr(w1, w2, 3, 1, nl, 1), *_cbr(w2, w2, 3, 1, nl, 1), nn.MaxPool2d(2)
        )
        layers: List[nn.Module] = []
        for i in range(4):
            layers += _cbr(w2 if i == 0 else w3, w3, 3, 1, nl, 1)
            if i < 3:
                layers.append(nn.Dropout(dropout))
        self.block3 = nn.Sequential(*layers, nn.MaxPool2d(2))
        self.head = _AttentionHead(w3, num_classes, nl, fl)
        _keras_init(self)

    def body(self, x: Tensor) -> Tensor:
        return self.block3(self.block2(self.block1(self.bn_in(x))))


class DCASEFsFCNN(_FCNNBase):
    """Hu et al.'s "fsFCNN" with channel attention (``fsfcnn_att.model_fcnn``,
    ``num_filters=[48, 96,
    512, 768]``; fixed widths). Despite the name it has one path over all 128 bins.

    Input BN; ``Conv5x5 s(1,2)``, ``Conv3x3``, max-pool 3x3 s2 (block 1); two 3x3 convs, max-pool
    3x3
    s2 (block 2); two 3x3 convs, max-pool 3x3 s(1,2), two 3x3 convs, max-pool 3x3 s(1,2) (block 3);
    two 3x3 convs each followed by element-wise dropout 0.5 (block 4); then the attention head.
    Convolutions and pools use Keras "same" padding.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        norm: str = "bn",
        num_filters: Sequence[int] = (48, 96, 512, 768),
        dropout: float = 0.5,
        final_norm: Optional[str] = None,
        bn_eps: float = KERAS_BN_EPS,
        bn_momentum: float = KERAS_BN_MOMENTUM,
    ) -> None:
        super().__init__()
        nl, fl = _norms(norm, final_norm, bn_eps, bn_momentum)
        w1, w2, w3, w4 = num_filters
        self.bn_in = nl(in_channels, affine=True)
        self.block1 = nn.Sequential(
            *_cbr(in_channels, w1, 5, (1, 2), nl), *_cbr(w1, w1, 3, 1, nl), MaxPool2dSame(3, 2)
        )
        self.block2 = nn.Sequential(
            *_cbr(w1, w2, 3, 1, nl), *_cbr(w2, w2, 3, 1, nl), MaxPool2dSame(3, 2)
        )
        self.block3 = nn.Sequential(
            *_cbr(w2, w3, 3, 1, nl),
            *_cbr(w3, w3, 3, 1, nl),
            MaxPool2dSame(3, (1, 2)),
            *_cbr(w3, w3, 3, 1, nl),
            *_cbr(w3, w3, 3, 1, nl),
            MaxPool2dSame(3, (1, 2)),
        )
        self.block4 = nn.Sequential(
            *_cbr(w3, w4, 3, 1, nl),
            nn.Dropout(dropout),
            *_cbr(w4, w4, 3, 1, nl),
            nn.Dropout(dropout),
        )
        self.head = _AttentionHead(w4, num_classes, nl, fl)
        _keras_init(self)

    def body(self, x: Tensor) -> Tensor:
        return self.block4(self.block3(self.block2(self.block1(self.bn_in(x)))))


@register_model("dcase-resnet", takes=("bn_eps", "bn_momentum"))
def dcase_resnet(
    num_classes: int = 10, in_channels: int = 3, norm: str = "bn", **kw: Any
) -> nn.Module:
    """Hu et al.'s two-path frequency-split ResNet, as in the L2BN authors' code (12.97 M params).

    Keyword arguments: ``width`` (48), ``final_norm`` (BN), ``bn_eps`` (1e-3), ``bn_momentum``
    (0.01).
    """
    return DCASEResNet(num_classes, in_channels, norm, **kw)


@register_model("dcase-fcnn", takes=("bn_eps", "bn_momentum"))
def dcase_fcnn(
    num_classes: int = 10, in_channels: int = 3, norm: str = "bn", **kw: Any
) -> nn.Module:
    """Hu et al.'s FCNN with channel attention, as in the L2BN authors' code (11.78 M params).

    Keyword arguments: ``num_filters`` ((48, 96, 192), times ``in_channels``), ``dropout`` (0.3),
    ``final_norm`` (BN), ``bn_eps`` (1e-3), ``bn_momentum`` (0.01).
    """
    return DCASEFCNN(num_classes, in_channels, norm, **kw)


@register_model("dcase-fsfcnn", takes=("bn_eps", "bn_momentum"))
def dcase_fsfcnn(
    num_classes: int = 10, in_channels: int = 3, norm: str = "bn", **kw: Any
) -> nn.Module:
    """Hu et al.'s fsFCNN with channel attention, as in the L2BN authors' code (16.53 M params).

    Keyword arguments: ``num_filters`` ((48, 96, 512, 768)), ``dropout`` (0.5), ``final_norm``
    ("bn"), ``bn_eps`` (1e-3), ``bn_momentum`` (0.01).
    """
    return DCASEFsFCNN(num_classes, in_channels, norm, **kw)


# ------------------------------------------------------------------------------ measurements


def param_counts(model: nn.Module) -> Tuple[int, int]:
    """``(trainable parameters, running-statistic entries)`` -- Keras's (trainable, non-trainable).

    Example:
        >>> param_counts(DCASEFsFCNN(norm="l2bn")) == REFERENCE["dcase-fsfcnn"]
        True
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stats = sum(
        b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))
    )
    return trainable, stats
