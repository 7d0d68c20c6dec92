"""l2bn — L2 batch normalization (Wang et al., arXiv:2207.02625) for PyTorch.

Public API: the layers :class:`L2BatchNorm1d`, :class:`L2BatchNorm2d`, :class:`L2BatchNorm3d`,
:class:`SyncL2BatchNorm`; model conversion :func:`convert` / :func:`revert`; the norm factory
:func:`create_norm` / :func:`get_norm_layer`; and :mod:`l2bn.functional`.
"""

from . import functional
from .convert import convert, revert
from .factory import create_norm, get_norm_layer
from .modules import L2BatchNorm1d, L2BatchNorm2d, L2BatchNorm3d
from .sync import SyncL2BatchNorm

__version__ = "0.1.0"

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
]
