"""l2bn — L2 batch normalization (Wang et al., arXiv:2207.02625) for PyTorch.

Public API: the layers :class:`L2BatchNorm1d`, :class:`L2BatchNorm2d`, :class:`L2BatchNorm3d`,
:class:`SyncL2BatchNorm`; model conversion :func:`convert` / :func:`revert`; the norm factory
:func:`create_norm` / :func:`get_norm_layer`; running statistics :func:`update_bn`
(BN and L2BN) and :class:`EpsDominanceWarning`; frozen backbones :func:`freeze`;
:data:`L2_NORM_CLASSES`; and :mod:`l2bn.functional`.
"""

from . import functional
from .convert import convert, revert
from .factory import create_norm, get_norm_layer
from .frozen import FrozenL2BatchNorm, freeze
from .modules import L2BatchNorm1d, L2BatchNorm2d, L2BatchNorm3d, _L2NormBase
from .running import EpsDominanceWarning, update_bn
from .sync import SyncL2BatchNorm

__version__ = "0.1.0"

#: l2bn's normalization classes, for code that treats norm layers specially (weight-decay
#: exclusion as torchvision's ``set_weight_decay(norm_classes=...)``, ``isinstance`` checks):
#: L2BN layers are deliberately not ``_BatchNorm`` (see :mod:`l2bn.modules`).
L2_NORM_CLASSES = (_L2NormBase, FrozenL2BatchNorm)

__all__ = [
    "L2BatchNorm1d",
    "L2BatchNorm2d",
    "L2BatchNorm3d",
    "SyncL2BatchNorm",
    "convert",
    "revert",
    "create_norm",
    "get_norm_layer",
    "functional",
    "update_bn",
    "freeze",
    "FrozenL2BatchNorm",
    "L2_NORM_CLASSES",
    "EpsDominanceWarning",
]
