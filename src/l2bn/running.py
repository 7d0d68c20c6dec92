"""Running statistics of the L2BN layers, on the scale of the l2-normalized input.

After the l2 step every entry of a sample is about :math:`1/\\sqrt{D}` (:math:`D` entries per
sample), so the channel mean and variance that an L2BN layer tracks are :math:`O(1/\\sqrt{D})`
and :math:`O(1/D)` — not BN's :math:`O(1)`. Three things here follow from that:

* :func:`running_factor` — the update factor of each training step. BN's exponential moving
  average starts from a prior (mean 0, variance 1) whose weight decays as
  :math:`(1 - m)^k`; on L2BN's scale that prior is wrong by a factor of about :math:`D`, and
  with ``momentum = 0.1`` it dominates evaluation for the first ~100 steps. L2BN removes the
  prior's weight instead, as Adam's bias correction does: the factor of step :math:`k` is
  :math:`m / (1 - (1 - m)^k)`, so the running statistics are the exponentially weighted mean of
  the batches seen so far, normalised by the weights' sum. Step 1 copies the first batch's
  statistics; from step :math:`36.7 / -\\ln(1 - m)` on (356 for ``momentum = 0.1``) the
  factor equals ``momentum`` exactly in float64, and the layer updates exactly as BN does.
  ``momentum=None`` keeps BN's cumulative average.
* :func:`check_eps_share` — warns once per layer (at its first training step) when BN's
  ``eps`` dominates the variance of the l2-normalized input (:class:`EpsDominanceWarning`).
* :func:`update_bn` — :func:`torch.optim.swa_utils.update_bn` for BN *and* L2BN layers.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from .functional import exporting, in_functorch_transform

__all__ = ["EpsDominanceWarning", "running_factor", "update_bn"]


class EpsDominanceWarning(UserWarning):
    """An L2BN layer's ``eps`` is at least half of the variance denominator in its median
    channel: the layer no longer standardizes its channels. Silence it as any warning.

    Example:
        >>> import warnings
        >>> warnings.filterwarnings("ignore", category=EpsDominanceWarning)
    """


def running_factor(momentum: Optional[float], step: int) -> float:
    """The running-statistics update factor of tracked batch ``step`` (1, 2, ...).

    ``momentum=None``: ``1 / step`` (BN's cumulative moving average). Otherwise
    ``momentum / (1 - (1 - momentum) ** step)``: the exponential moving average without the
    prior's weight (1 at the first step, ``momentum`` exactly once the correction vanishes in
    float64). A momentum outside ``(0, 1)`` is used as it is.

    Example:
        >>> running_factor(0.1, 1), round(running_factor(0.1, 2), 4), running_factor(0.1, 1000)
        (1.0, 0.5263, 0.1)
    """
    if momentum is None:
        return 1.0 / step
    if not 0.0 < momentum < 1.0:
        return float(momentum)
    # 1 - (1 - m)^k as -expm1(k log1p(-m)): exactly m at k = 1, so the first step copies the batch
    return momentum / -math.expm1(step * math.log1p(-momentum))


def warmup_steps(momentum: float) -> int:
    """The first step from which ``running_factor(momentum, step) == momentum`` exactly
    (356 for ``momentum=0.1``).

    Example:
        >>> warmup_steps(0.1), running_factor(0.1, 355) == 0.1
        (356, False)
    """
    if not 0.0 < momentum < 1.0:
        return 1
    # (1 - m)^k < 2^-53 makes 1 - (1 - m)^k round to 1: start a few steps before that bound
    step = max(1, math.ceil(-53 * math.log(2) / math.log1p(-momentum)) - 4)
    while running_factor(momentum, step) != momentum:
        step += 1
    while step > 1 and running_factor(momentum, step - 1) == momentum:
        step -= 1
    return step


def tracing() -> bool:
    """Whether the forward is being traced (``torch.compile``, ``torch.export``, TorchScript) or
    runs inside a ``torch.func`` transform: no tensor value may be read on the host then."""
    return torch.compiler.is_compiling() or exporting() or in_functorch_transform()


def end_warmup(layer: _NormBase) -> None:
    """Clear a layer's warm-up flag once the factor of the step just counted is its momentum
    exactly, as its Python path does (the single C++ call cannot set it; a host read per step
    during the warm-up only)."""
    m, nbt = layer.momentum, layer.num_batches_tracked
    if m is None or nbt is None or not layer.track_running_stats or not 0.0 < m < 1.0:
        return
    if running_factor(m, int(nbt)) == m:
        layer._stats_warmup = False


def correct_traced_update(layer: _NormBase, m_mean: Tensor, m_var: Tensor) -> None:
    """Write the corrected update ``lerp(R, b, f_k)`` into the layer's buffers ``R`` with tensor
    ops only (``f_k`` from the ``num_batches_tracked`` tensor; no host read). The kernel updated
    zero-filled copies, so they hold ``m b`` (the batch statistics times the momentum) exactly:
    ``b`` is recovered by one division, never from a difference with the prior (which lost the
    first step's ``b`` of about ``1/D`` against a prior of 1 in half precision). ``lerp`` is
    exact at ``f_k = 1``, so the first step copies ``b``. Agrees with the eager path to rounding
    (the eager path is BN's update bit for bit after :func:`warmup_steps`; this one is lerp's)."""
    m = float(layer.momentum)
    k = layer.num_batches_tracked
    with torch.no_grad():
        f = m / -torch.expm1(k.to(torch.float64) * math.log1p(-m))
        for buf, mb in ((layer.running_mean, m_mean), (layer.running_var, m_var)):
            buf.copy_(torch.lerp(buf, mb / m, f.to(buf.dtype)))


def check_eps_share(layer: _NormBase, input: Tensor) -> None:
    """Warn (:class:`EpsDominanceWarning`) when ``eps`` is at least half of ``Var[u] + eps`` in
    the layer's median channel, ``Var[u]`` the running variance just set from the first batch.
    Healthy layers (``Var[u] >> eps``, as BN's inputs and ``unit_rms=True``) never warn."""
    var = layer.running_var.detach().double()
    if var.numel() == 0 or not bool(torch.isfinite(var).all()):
        return
    median = float(var.median())
    share = layer.eps / (median + layer.eps)
    if share < 0.5:
        return
    d = input[0].numel()
    dims = "·".join(str(s) for s in input.shape[1:])
    warnings.warn(
        f"{type(layer).__name__}({layer.num_features}): eps={layer.eps:g} is {share:.0%} of the "
        f"variance denominator in the median channel (Var[u] ≈ {median:.2g} for D = {dims} = "
        f"{d:,} entries per sample, about 1/D after the l2 step), so the layer hardly "
        "standardizes its channels. Use unit_rms=True (norm 'l2bn-rms') or a smaller eps.",
        EpsDominanceWarning,
        stacklevel=5,  # the caller of the layer (past forward and Module.__call__)
    )


def _is_batch_norm(module: nn.Module) -> bool:
    from .modules import _L2NormBase

    return isinstance(module, (_BatchNorm, _L2NormBase)) and module.track_running_stats


@torch.no_grad()
def update_bn(
    loader: Iterable[Any],
    model: nn.Module,
    device: Union[int, str, torch.device, None] = None,
) -> None:
    """Recompute the running statistics of every BN *and* L2BN layer from one pass over data.

    Same signature and semantics as :func:`torch.optim.swa_utils.update_bn` (which skips L2BN
    layers, as they are not ``_BatchNorm``): the statistics of ``nn.BatchNorm*``,
    ``nn.SyncBatchNorm``, :class:`l2bn.L2BatchNorm1d`/``2d``/``3d`` and
    :class:`l2bn.SyncL2BatchNorm` are reset, then averaged over the batches of ``loader``
    (cumulative average, ``momentum=None``) in training mode; each layer's momentum and the
    model's train/eval mode are restored. Works on a :class:`torch.optim.swa_utils.AveragedModel`.

    Args:
        loader: batches, each a tensor or a list/tuple whose first element is the input.
        model: the model (its layers are found by type, at any depth).
        device: if given, each input is moved there first.

    Example:
        >>> import torch, l2bn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), l2bn.L2BatchNorm2d(4)).eval()
        >>> update_bn([torch.randn(8, 3, 6, 6) for _ in range(2)], model)
        >>> int(model[1].num_batches_tracked), model.training
        (2, False)
    """
    momenta = {}
    for module in model.modules():
        if _is_batch_norm(module):
            module.reset_running_stats()
            momenta[module] = module.momentum
    if not momenta:
        return
    was_training = model.training
    model.train()
    for module in momenta:
        module.momentum = None
    try:
        for batch in loader:
            if isinstance(batch, (list, tuple)):
                batch = batch[0]
            if device is not None:
                batch = batch.to(device)
            model(batch)
    finally:
        for module, momentum in momenta.items():
            module.momentum = momentum
        model.train(was_training)
