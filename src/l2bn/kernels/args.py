"""The arguments of one validated :func:`l2bn.functional.l2_batch_norm` call, as every backend
receives them: one object, so that a new option is one field here, set in ``functional`` and
read by the backends that use it (not a positional argument threaded through each)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

__all__ = ["NormArgs"]


@dataclass(frozen=True)
class NormArgs:
    """Everything but the input: running statistics (updated in place in training, used in
    evaluation), affine parameters, and the scalars of :func:`l2bn.functional.l2_batch_norm`.

    Example:
        >>> a = NormArgs(None, None, None, None, training=True)
        >>> a.eps, a.l2_eps, a.unit_rms, a.process_group
        (1e-05, 1e-12, False, None)
    """

    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    training: bool = False
    momentum: float = 0.1
    eps: float = 1e-5
    l2_eps: float = 1e-12
    unit_rms: bool = False
    process_group: Any = None
