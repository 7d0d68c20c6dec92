"""L2BN kernels: ``reference`` (the spec), ``algebra`` (the (N, C) math), ``engine`` (bulk
passes and engines), ``fused`` (the autograd Function every fast backend runs through),
``native`` (C++ CPU operators), ``triton_kernels`` (CUDA), ``compiled`` (the engines compiled)
and ``backends`` (the one table, and automatic selection)."""

from .autograd import fused_l2_batch_norm, l2_batch_norm_fast
from .reference import l2_batch_norm_reference, l2_normalize_samples, reference_backend

__all__ = [
    "fused_l2_batch_norm",
    "l2_batch_norm_fast",
    "l2_batch_norm_reference",
    "l2_normalize_samples",
    "reference_backend",
]
