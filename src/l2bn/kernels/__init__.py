"""L2BN kernels: ``reference`` (the spec), ``fused`` (one-pass autograd.Function) and backends."""

from .fused import fused_l2_batch_norm
from .reference import l2_batch_norm_reference, l2_normalize_samples

__all__ = ["fused_l2_batch_norm", "l2_batch_norm_reference", "l2_normalize_samples"]
