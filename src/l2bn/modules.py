"""L2BN layers: drop-in replacements for ``nn.BatchNorm1d/2d/3d``.

Wang et al., "L2BN: Enhancing Batch Normalization by Equalizing the L2 Norms of Features",
arXiv:2207.02625. Each sample is l2-normalized over all its non-batch dimensions, then batch
normalization follows.

The classes derive from ``torch.nn.modules.batchnorm._NormBase`` (same parameters, buffers,
state-dict keys and checkpoint-version handling as BN) but deliberately **not** from
``_BatchNorm``: PyTorch utilities that recognise BN by ``isinstance(m, _BatchNorm)`` or by exact
type (``nn.SyncBatchNorm.convert_sync_batchnorm``, conv-BN fusion in ``torch.fx`` and
``torch.ao.quantization``) would otherwise replace or fold the layer as plain BN and silently
drop the l2 step.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Optional

import torch.fx
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from .functional import l2_batch_norm
from .kernels.native import layer_op as _layer_op
from .kernels.native import python_layer_needed as _python_layer_needed
from .running import check_eps_share, end_warmup, running_factor
from .running import correct_traced_update as _correct_traced_update
from .running import tracing as _tracing

__all__ = ["L2BatchNorm1d", "L2BatchNorm2d", "L2BatchNorm3d"]

# torch >= 2.14: BatchNorm takes a keyword-only ``bias`` (affine scale without shift)
_NORMBASE_HAS_BIAS = "bias" in inspect.signature(_NormBase.__init__).parameters


def _check_input(input: Tensor, expected_dims: tuple, num_features: int, name: str) -> Tensor:
    if input.dim() not in expected_dims:
        want = " or ".join(f"{d}D" for d in expected_dims)
        raise ValueError(f"expected {want} input (got {input.dim()}D input)")
    if input.shape[1] != num_features:
        raise ValueError(
            f"{name}({num_features}) expected {num_features} channels in dim 1, got input of "
            f"shape {tuple(input.shape)}"
        )
    return input


def _check_args(name: str, num_features: Any, eps: Any, momentum: Any, l2_eps: Any) -> None:
    """Constructor checks, with BN's error types: ``num_features`` an int (``TypeError``) and
    not negative (``RuntimeError``, as ``torch.empty`` raises it for BN), ``eps`` and
    ``momentum`` numbers (``momentum`` may be ``None``), ``l2_eps`` positive (``ValueError``).
    ``eps`` itself is checked at the forward, as BN does (positive in training, non-negative in
    evaluation)."""
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        raise TypeError(f"{name}: num_features must be an int, got {type(num_features).__name__}")
    if num_features < 0:
        raise RuntimeError(f"{name}: num_features must be non-negative, got {num_features}")
    for arg, val in (("eps", eps), ("momentum", momentum), ("l2_eps", l2_eps)):
        if val is None and arg == "momentum":
            continue
        if isinstance(val, bool) or not isinstance(val, numbers.Real):
            raise TypeError(
                f"{name}: {arg} must be a float{' or None' if arg == 'momentum' else ''}, got "
                f"{type(val).__name__}"
            )
    if not l2_eps > 0:
        raise ValueError(
            f"{name}: l2_eps must be positive (the lower bound of a sample's norm), got {l2_eps}"
        )


# Symbolic tracing (torch.fx, torchvision's feature extraction) records these as calls
# instead of tracing into their shape checks.
torch.fx.wrap("_check_input")
torch.fx.wrap("l2_batch_norm")


class _L2NormBase(_NormBase):
    """Common implementation of the L2BN layers (see :class:`L2BatchNorm2d`)."""

    _expected_dims: tuple = ()
    _stats_warmup: bool = True  # class default: modules pickled before the flag existed
    _single_call: bool = True  # forward tries the one-operator CPU path first (not when synced)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        unit_rms: bool = False,
        l2_eps: float = 1e-12,
    ) -> None:
        _check_args(type(self).__name__, num_features, eps, momentum, l2_eps)
        kw = {"bias": bias} if _NORMBASE_HAS_BIAS else {}
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            **kw,
        )
        if affine and not bias and not _NORMBASE_HAS_BIAS:
            self.register_parameter("bias", None)
        self.unit_rms = bool(unit_rms)
        self.l2_eps = float(l2_eps)
        # True while the running statistics may still carry the prior's weight (see
        # running_factor); a host-side flag, so that a trained layer reads no tensor per call
        self._stats_warmup = True

    def _check_input_dim(self, input: Tensor) -> Tensor:
        return _check_input(input, self._expected_dims, self.num_features, type(self).__name__)

    def _process_group(self) -> Any:
        return None

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self._stats_warmup = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._stats_warmup = True  # the loaded count decides at the next training step

    def forward(self, input: Tensor) -> Tensor:
        # One C++ call on the CPU (csrc/layer.h): checks, kernel, running statistics and autograd
        # node; it returns None, having changed nothing, for whatever the Python path handles
        if self._single_call and type(input) is Tensor and not _python_layer_needed():
            op = _layer_op(input)
            if op is not None:
                out = op(
                    input,
                    self.weight,
                    self.bias,
                    self.running_mean,
                    self.running_var,
                    self.num_batches_tracked,
                    self.training,
                    self.track_running_stats,
                    self.momentum,
                    self._stats_warmup,
                    self.eps,
                    self.l2_eps,
                    self.unit_rms,
                    self._expected_dims,
                    self.num_features,
                )
                if out is not None:
                    if self._stats_warmup and self.training:
                        end_warmup(self)
                    return out
        return self._python_forward(input)

    def _python_forward(self, input: Tensor) -> Tensor:
        """The layer in Python: :func:`l2bn.functional.l2_batch_norm` with BN's step count and
        the running-statistics factor of :func:`l2bn.running.running_factor`."""
        input = self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        step = 0  # the tracked batch this call is, when read on the host (0: not read)
        traced_warmup = False
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, read on the host as BN does
                step = int(self.num_batches_tracked)
                factor = 1.0 / step
            elif self._stats_warmup and 0.0 < self.momentum < 1.0:
                if _tracing() or self.num_batches_tracked.is_meta:
                    traced_warmup = True  # no host read: corrected with tensor ops below
                else:
                    step = int(self.num_batches_tracked)
                    factor = running_factor(self.momentum, step)
                    if factor == self.momentum:
                        self._stats_warmup = False  # the correction is exactly 1 from here on
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        running_mean, running_var = (self.running_mean, self.running_var) if track else (None, None)
        if (
            traced_warmup
        ):  # the kernel updates zero copies (m * batch); corrected values go to the buffers
            running_mean, running_var = (
                torch.zeros_like(running_mean),
                torch.zeros_like(running_var),
            )
        out = l2_batch_norm(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
            l2_eps=self.l2_eps,
            unit_rms=self.unit_rms,
            process_group=self._process_group() if use_batch_stats else None,
        )
        if traced_warmup:
            _correct_traced_update(self, running_mean, running_var)
        elif step == 1:
            check_eps_share(self, input)
        return out

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.unit_rms:
            s += ", unit_rms=True"
        if self.l2_eps != 1e-12:
            s += f", l2_eps={self.l2_eps}"
        return s


_DOC = r"""L2 batch normalization over a {shape_words} input (Wang et al., arXiv:2207.02625).

    Each sample is first scaled to unit l2 norm over **all** its non-batch dimensions (for
    ``(N, C, *S)`` the vector of ``C * prod(S)`` entries), then ordinary batch normalization
    follows, with the same running statistics, affine parameters and train/eval behaviour as
    :class:`torch.nn.{bn}`:

    .. math::
        u_n = s \cdot \frac{{x_n}}{{\max(\lVert x_n \rVert_2, \epsilon_2)}}, \qquad
        y = \frac{{u - \mathrm{{E}}[u]}}{{\sqrt{{\mathrm{{Var}}[u] + \epsilon}}}} * \gamma + \beta

    with :math:`s = 1` (the paper) or :math:`s = \sqrt{{D}}` (``unit_rms=True``), :math:`D` the
    number of entries of one sample. In evaluation the running statistics replace
    :math:`\mathrm{{E}}[u]` and :math:`\mathrm{{Var}}[u]`; the per-sample l2 step is always applied.

    **unit_rms trade-off.** After l2 normalization every entry is about :math:`1/\sqrt{{D}}`, so
    the channel variance is about :math:`1/D`. For large maps (64x56x56: :math:`D \approx 2\cdot
    10^5`) that is below BN's ``eps = 1e-5``, and ``eps`` then dominates the denominator: the
    output is shrunk towards zero and the layer is no longer scale-normalizing. ``unit_rms=True``
    multiplies by :math:`\sqrt{{D}}` so each sample has unit RMS and ``eps`` keeps BN's meaning;
    the normalized direction (and hence the paper's effect) is identical, only the scale
    relative to ``eps`` differs. The default is the paper's formula, which the authors' results
    were obtained with.

    Args:
        num_features: :math:`C` from an expected input of size {shape}.
        eps: added to the denominator for numerical stability. Default: 1e-5
        momentum: the running-statistics update factor; ``None`` for a cumulative moving
            average. Default: 0.1
        affine: learnable per-channel :math:`\gamma, \beta`. Default: ``True``
        track_running_stats: keep running mean/variance; if ``False`` batch statistics are
            used in evaluation too. Default: ``True``
        bias: (keyword) with ``affine``, also learn the shift :math:`\beta` (as BN's ``bias``
            keyword in recent PyTorch). Default: ``True``
        unit_rms: (keyword) rescale each normalized sample to unit RMS instead of unit l2 norm.
            Default: ``False``
        l2_eps: (keyword) lower bound of the per-sample norm; an all-zero sample gives finite
            outputs and gradients. Default: 1e-12

    Shape:
        - Input: {shape}
        - Output: same shape (and memory format) as the input

    Examples::

        >>> import torch, l2bn
        >>> m = l2bn.{name}({c})
        >>> x = torch.randn({example})
        >>> m(x).shape == x.shape
        True
    """


class L2BatchNorm1d(_L2NormBase):
    _expected_dims = (2, 3)


class L2BatchNorm2d(_L2NormBase):
    _expected_dims = (4,)


class L2BatchNorm3d(_L2NormBase):
    _expected_dims = (5,)


L2BatchNorm1d.__doc__ = _DOC.format(
    shape_words="2D or 3D",
    bn="BatchNorm1d",
    shape=":math:`(N, C)` or :math:`(N, C, L)`",
    name="L2BatchNorm1d",
    c=16,
    example="20, 16, 50",
)
L2BatchNorm2d.__doc__ = _DOC.format(
    shape_words="4D",
    bn="BatchNorm2d",
    shape=":math:`(N, C, H, W)`",
    name="L2BatchNorm2d",
    c=16,
    example="20, 16, 8, 8",
)
L2BatchNorm3d.__doc__ = _DOC.format(
    shape_words="5D",
    bn="BatchNorm3d",
    shape=":math:`(N, C, D, H, W)`",
    name="L2BatchNorm3d",
    c=4,
    example="6, 4, 3, 5, 5",
)


def l2_layer_for_dim(dim: int) -> type:
    """The L2BN class matching ``nn.BatchNorm{dim}d`` for ``dim`` in 1, 2, 3."""
    try:
        return {1: L2BatchNorm1d, 2: L2BatchNorm2d, 3: L2BatchNorm3d}[dim]
    except KeyError:
        raise ValueError(f"no L2BatchNorm{dim}d; expected dim 1, 2 or 3") from None
