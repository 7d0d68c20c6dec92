"""L2BN for Keras 3: :class:`L2BatchNormalization`, in place of Keras's ``BatchNormalization``.

Wang et al., "L2BN: Enhancing Batch Normalization by Equalizing the L2 Norms of Features",
arXiv:2207.02625. Each sample is scaled to unit l2 norm over **all** its non-batch axes, then
Keras's own batch normalization runs unchanged. The layer uses only ``keras.ops``, so it runs on
every Keras 3 backend (TensorFlow, JAX, PyTorch).

This is the only module of :mod:`l2bn` that needs Keras; ``import l2bn`` never imports it. Keras
is imported when this module is; if it is missing (``pip install 'l2bn[keras]'``) or cannot load
its backend, this module still imports, and using :class:`L2BatchNormalization` raises an
``ImportError`` that says what to do. (Tools that import every submodule, such as
``pytest --doctest-modules``, keep working without Keras.)

Keras picks its backend once per process, from the ``KERAS_BACKEND`` environment variable (else
``~/.keras/keras.json``, default ``"tensorflow"``), when ``keras`` is first imported::

    KERAS_BACKEND=torch python train.py     # PyTorch is installed with l2bn already
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Dict, Optional

from .running import warmup_steps

__all__ = ["L2BatchNormalization"]

_IMPORT_ERROR: Optional[str] = None
_IMPORT_CAUSE: Optional[BaseException] = None

try:
    import keras
    from keras import ops
except ImportError as exc:  # keras missing, or its configured backend is not installed
    _IMPORT_CAUSE = exc
    try:
        _missing = importlib.util.find_spec("keras") is None
    except (ImportError, ValueError):  # e.g. sys.modules["keras"] = None
        _missing = True
    if _missing:
        _IMPORT_ERROR = (
            "l2bn.keras needs Keras 3, which is not installed: pip install 'l2bn[keras]' "
            "(or pip install 'keras>=3.0.5')"
        )
    else:
        _IMPORT_ERROR = (
            f"l2bn.keras: Keras is installed but failed to import ({exc}). Keras loads the "
            "backend named by the KERAS_BACKEND environment variable (else ~/.keras/keras.json, "
            "default 'tensorflow'); set KERAS_BACKEND=torch (PyTorch comes with l2bn) or "
            "KERAS_BACKEND=jax before keras is first imported, or install that backend."
        )
else:
    _version = getattr(keras, "__version__", "0")
    if int(_version.split(".")[0]) < 3:
        _IMPORT_ERROR = (
            f"l2bn.keras needs Keras 3 (found keras {_version}, the Keras 2 / tf.keras API): "
            "pip install 'keras>=3.0.5'"
        )


def __getattr__(name: str) -> Any:
    # Reached only when the class below was not defined (Keras unavailable).
    if name in __all__ and _IMPORT_ERROR is not None:
        raise ImportError(_IMPORT_ERROR) from _IMPORT_CAUSE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if _IMPORT_ERROR is None:

    @keras.saving.register_keras_serializable(package="l2bn")
    class L2BatchNormalization(keras.layers.BatchNormalization):
        r"""L2 batch normalization: per-sample l2 normalization, then Keras batch normalization.

        .. math::
            u_n = s \cdot \frac{x_n}{\max(\lVert x_n \rVert_2, \epsilon_2)}, \qquad
            y = \gamma \, \frac{u - \mathrm{E}[u]}{\sqrt{\mathrm{Var}[u] + \epsilon}} + \beta

        The norm runs over **all** non-batch axes of sample :math:`n` (for an image
        ``H x W x C``, all ``D = H*W*C`` entries), whatever ``axis`` is; ``axis`` only names the
        channel axis of the batch normalization that follows. :math:`s = 1` (the paper) or
        :math:`\sqrt{D}` with ``unit_rms=True``.

        The batch-normalization part *is* ``keras.layers.BatchNormalization`` (this class
        subclasses it and overrides ``call``), so every argument, default and behaviour is
        Keras's: ``axis=-1``, ``momentum=0.99``, ``epsilon=1e-3``, ``center``, ``scale``, the
        initializers, regularizers and constraints, ``synchronized`` (TensorFlow backend only,
        as in Keras; the l2 step is per sample and needs no synchronisation), ``renorm`` where
        the installed Keras has it, masking, and ``trainable = False`` meaning inference mode.

        Differences from the PyTorch layers (:class:`l2bn.L2BatchNorm2d`), for converting
        hyper-parameters or weights:

        * ``momentum`` is the decay of the moving average: Keras ``momentum = 1 - momentum``
          of PyTorch (PyTorch's 0.1 is Keras's 0.9). There is no cumulative average
          (PyTorch's ``momentum=None``).
        * ``epsilon`` defaults to 1e-3 (PyTorch: 1e-5).
        * The moving averages start as the PyTorch layers' running statistics do
          (:mod:`l2bn.running`): the update factor of training step :math:`k` is
          :math:`(1 - \\text{momentum}) / (1 - \\text{momentum}^k)`, so the first step copies
          the batch statistics instead of keeping most of the initial ``moving_variance = 1``
          (about :math:`D` times too large after the l2 step). The step count is the
          non-trainable variable ``moving_count``; files saved without it load as trained
          layers (plain Keras updates from then on).
        * ``moving_variance`` averages the **biased** batch variance (divided by the number
          ``n`` of entries per channel), as Keras's BatchNormalization does; PyTorch's
          ``running_var`` averages the unbiased one (divided by ``n - 1``). Outputs in training
          and ``moving_mean`` are identical; ``moving_variance`` differs by the factor
          ``(n - 1) / n`` in each update.
        * ``gamma``/``beta``/``moving_mean``/``moving_variance`` are PyTorch's
          ``weight``/``bias``/``running_mean``/``running_var``.

        **epsilon and unit_rms.** After the l2 step each entry is about :math:`1/\sqrt{D}`, so
        the channel variance is about :math:`1/D`. Keras's ``epsilon=1e-3`` exceeds that as soon
        as :math:`D > 1000` (any feature map larger than, e.g., 8x8x16); ``epsilon`` then
        dominates the denominator and the output shrinks towards ``beta``. ``unit_rms=True``
        scales each sample to unit RMS (:math:`\times\sqrt{D}`) so that ``epsilon`` keeps its
        meaning; the normalized direction is the same. The default is the paper's formula.

        Args:
            \*args, \*\*kwargs: exactly those of ``keras.layers.BatchNormalization`` (including
                ``name`` and ``dtype``).
            l2_epsilon: (keyword) lower bound of each sample's l2 norm, so an all-zero sample
                gives zeros and finite gradients. Must be ``>= 0``; keep it above ~1e-18 in
                float32 (it is squared internally). Default: 1e-12, as PyTorch's ``l2_eps``.
            unit_rms: (keyword) scale each normalized sample to unit RMS instead of unit l2
                norm. Default: ``False``.

        Call arguments:
            inputs: tensor of rank >= 2, batch first.
            training: batch statistics (and moving-average updates) if true, moving statistics
                otherwise; Keras sets it in ``fit`` / ``predict``.
            mask: optional, of rank ``inputs.ndim - 1`` (e.g. ``(batch, time)``), as for
                BatchNormalization; masked positions are left out of each sample's norm (and of
                ``D`` with ``unit_rms``) as well as of the batch statistics.

        Example (not run as a doctest: Keras needs ``KERAS_BACKEND`` set before import)::

            import os
            os.environ.setdefault("KERAS_BACKEND", "torch")
            import keras
            from l2bn.keras import L2BatchNormalization

            model = keras.Sequential([
                keras.Input((32, 32, 3)),
                keras.layers.Conv2D(16, 3, use_bias=False),
                L2BatchNormalization(),          # instead of keras.layers.BatchNormalization()
                keras.layers.ReLU(),
            ])
            model.save("model.keras")            # loads again once l2bn.keras is imported
        """

        def __init__(
            self, *args: Any, l2_epsilon: float = 1e-12, unit_rms: bool = False, **kwargs: Any
        ) -> None:
            super().__init__(*args, **kwargs)
            l2_epsilon = float(l2_epsilon)
            if not l2_epsilon >= 0.0:
                raise ValueError(f"l2_epsilon must be >= 0, got {l2_epsilon}")
            self.l2_epsilon = l2_epsilon
            self.unit_rms = bool(unit_rms)

        def build(self, input_shape: Any) -> None:
            super().build(input_shape)
            # the number of training steps, for the bias-corrected moving averages (last
            # variable, so files saved before it existed still load: load_own_variables)
            self.moving_count = self.add_weight(
                shape=(),
                name="moving_count",
                initializer="zeros",
                trainable=False,
                autocast=False,
            )

        def load_own_variables(self, store: Any) -> None:
            if len(store.keys()) == len(self.variables) - 1:  # saved without moving_count
                for i, var in enumerate(v for v in self.variables if v is not self.moving_count):
                    var.assign(store[f"{i}"])
                # a trained layer: its statistics keep BN's update rule (no correction)
                self.moving_count.assign(float(warmup_steps(1.0 - self.momentum)))
                return
            super().load_own_variables(store)

        def _step_momentum(self) -> Any:
            """Count this training step ``k`` and return its decay: ``1 - f_k`` with the
            bias-corrected factor ``f_k = (1 - mom) / (1 - mom^k)`` of :mod:`l2bn.running` (as
            the PyTorch layers), ``mom`` itself once the correction is exactly 1, so the first
            step copies the batch statistics."""
            k = self.moving_count + 1.0
            self.moving_count.assign(k)
            mom = self.momentum
            if not 0.0 < mom < 1.0:
                return mom
            # 1 - f_k = mom (1 - mom^(k-1)) / (1 - mom^k): exactly 0 at k = 1 in any precision
            m32 = ops.cast(mom, "float32")
            decay = m32 * (1.0 - ops.power(m32, k - 1.0)) / (1.0 - ops.power(m32, k))
            return ops.where(ops.greater_equal(k, float(warmup_steps(1.0 - mom))), mom, decay)

        def _l2_normalize(self, x: Any, mask: Any) -> Any:
            """``x`` scaled per sample to unit l2 norm (or unit RMS) over all non-batch axes."""
            ndim = len(x.shape)
            axes = tuple(range(1, ndim))
            sq = ops.square(x)
            if mask is not None:
                weights = ops.cast(ops.expand_dims(mask, axis=-1), x.dtype)
                sq = sq * weights
            sumsq = ops.sum(sq, axis=axes, keepdims=True)
            # rsqrt(max(|x|^2, eps^2)) == 1 / max(|x|, eps), with finite gradients at x = 0
            # (the gradient of sqrt at 0 is infinite; here it is taken at eps^2 > 0).
            inv = ops.rsqrt(ops.maximum(sumsq, self.l2_epsilon * self.l2_epsilon))
            if self.unit_rms:
                if mask is not None:
                    count = ops.sum(
                        ops.broadcast_to(weights, ops.shape(x)), axis=axes, keepdims=True
                    )
                    inv = inv * ops.sqrt(count)
                elif all(isinstance(s, int) for s in x.shape[1:]):
                    inv = inv * math.sqrt(math.prod(x.shape[1:]))
                else:  # dynamic non-batch shape (symbolic tracing with None dims)
                    inv = inv * ops.sqrt(ops.sum(ops.ones_like(x[:1])))
            return x * inv

        def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
            if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
                raise ValueError(
                    "The mask provided should be one dimension less than the inputs. "
                    f"Received: mask.shape={mask.shape}, inputs.shape={inputs.shape}"
                )
            # Statistics in at least float32, as BatchNormalization computes them.
            compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
            x = ops.cast(inputs, compute_dtype)
            u = self._l2_normalize(x, mask)
            if not (training and self.trainable):
                return super().call(u, training=training, mask=mask)
            momentum = self.momentum  # Keras's update reads it: this step's decay meanwhile
            self.momentum = self._step_momentum()
            try:
                return super().call(u, training=training, mask=mask)
            finally:
                self.momentum = momentum

        def get_config(self) -> Dict[str, Any]:
            config = super().get_config()
            config.update({"l2_epsilon": self.l2_epsilon, "unit_rms": self.unit_rms})
            return config
