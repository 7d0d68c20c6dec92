"""SyncL2BatchNorm: L2BN with batch statistics synchronised across processes.

The per-sample l2 normalization is local (each sample is on one rank); the per-channel mean and
variance of the normalized features are combined across the process group in the forward
(all-gather of per-rank count, mean and M2 — exact for uneven batch sizes), and the two
per-channel gradient sums are all-reduced in the backward, as ``nn.SyncBatchNorm`` does.
Unlike ``nn.SyncBatchNorm`` it works on CPU tensors with the gloo backend as well as on CUDA
with NCCL.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.distributed as dist

if dist.is_available():
    # torch.distributed.nn binds ``group=group.WORLD`` as default arguments when first imported;
    # imported after a group exists (building an optimizer imports dynamo, which imports it), it
    # keeps the group alive past destroy_process_group, and at interpreter exit gloo's threads
    # then free tensors without the GIL (SIGABRT, "terminate called without an active
    # exception"). Imported here, with the package, it binds None for l2bn's own training and
    # for any script that imports l2bn before init_process_group.
    import torch.distributed.nn  # noqa: F401

from .modules import _L2NormBase

__all__ = ["SyncL2BatchNorm"]


class SyncL2BatchNorm(_L2NormBase):
    r"""L2 batch normalization with statistics synchronised over a process group.

    Same formula as :class:`l2bn.L2BatchNorm2d`; in training the batch mean and variance of
    the l2-normalized features are those of the union of all ranks' batches, so N ranks with
    batches :math:`B_1, \dots, B_N` give the same outputs, input gradients, summed parameter
    gradients and running statistics as one process with :math:`B_1 \cup \dots \cup B_N`.
    Parameter gradients are local (DDP all-reduces them), as in :class:`torch.nn.SyncBatchNorm`.

    Outside an initialised process group, or with a group of one process, it behaves exactly
    like :class:`l2bn.L2BatchNorm2d` (and its 1d/3d siblings): no error, no communication.
    Evaluation never communicates: it uses the running statistics, or with
    ``track_running_stats=False`` each rank's own batch statistics (as ``nn.SyncBatchNorm``).

    ``num_features``, ``eps``, ``momentum``, ``affine``, ``track_running_stats``, ``device``,
    ``dtype``, ``unit_rms`` and ``l2_eps`` are as in :class:`l2bn.L2BatchNorm2d`.

    Args:
        process_group: the group to synchronise over; ``None`` for the default (world) group.

    Shape:
        - Input: :math:`(N, C, *)` with at least 2 dims.
        - Output: same shape as the input.

    Examples::

        >>> import torch, l2bn
        >>> m = l2bn.SyncL2BatchNorm(8)          # no process group: plain L2BN
        >>> m(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        unit_rms: bool = False,
        l2_eps: float = 1e-12,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            unit_rms=unit_rms,
            l2_eps=l2_eps,
        )
        self.process_group = process_group

    _expected_dims = (2, 3, 4, 5)
    _single_call = False  # the Python layer combines the statistics across the group

    def _process_group(self) -> Any:
        # As nn.SyncBatchNorm: only training synchronises. In evaluation without running
        # statistics (track_running_stats=False) each rank normalizes with its own batch, so
        # uneven evaluation batch counts across ranks cannot hang a collective.
        if not self.training:
            return None
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if dist.get_world_size(group) <= 1:
            return None
        return group
