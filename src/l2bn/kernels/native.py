"""The ``native`` backend: L2BN as PyTorch custom operators with a C++ CPU kernel.

Four operators, registered in ``csrc/l2bn_cpu.cpp`` (computation in ``csrc/kernels.h``):

* ``l2bn::train_forward(x, weight?, bias?, eps, l2_eps, s)`` →
  ``(y, r, k, mk, vk, mean, var, invstd)`` — the outputs of
  :func:`l2bn.kernels.engine.train_forward` (``mk``/``vk`` are empty when ``x`` has one entry
  per (n, c), where they are ``k x`` and 0);
* ``l2bn::eval_forward(x, weight?, bias?, mean, var, eps, l2_eps, s)`` →
  ``(y, r, k, mean, var, invstd)`` — one sweep per sample (its norm, then the affine map while
  it is in cache);
* ``l2bn::backward(g, x, weight?, k, r, mk?, vk?, mean, invstd, l2_eps, s, batch_stats,
  need_dx)`` → ``(dx, dweight, dbias)`` (``dx`` empty when not needed; ``mk``/``vk`` recomputed
  from ``x`` where not given);
* ``l2bn::layer(x, weight?, bias?, running_mean!?, running_var!?, num_batches_tracked!?,
  training, track_running_stats, momentum?, warmup, eps, l2_eps, unit_rms, dims, num_features)``
  → ``y``
  or ``None`` — the layers' single call on the CPU (``csrc/layer.h``): checks, kernel, running
  statistics and step count in place, and a C++ autograd node; ``None`` (nothing changed) where
  the Python layer is needed. :func:`layer_op` gives it, :func:`python_layer_needed` says when
  the layers skip it.

The first three have fake (meta) implementations, so ``torch.compile`` (also
``fullgraph=True``) sees one opaque op per call instead of tracing the algorithm, and the two
forwards have autograd
registered with ``torch.library.register_autograd`` (first order; the layers go through
:class:`l2bn.kernels.autograd.L2BatchNormFunction`, which adds exact double backward, ``jvp``,
scale safety and process groups around the same operators). ``torch.export`` of a model uses
the reference composite (see :func:`l2bn.functional.exporting`), which every exporter knows.

**Build.** The kernel is compiled once per machine (and torch version) with
``torch.utils.cpp_extension`` — ninja and a C++ compiler, both installed by the README's set-up
command — into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), on first use or ahead of time with ``python -m
l2bn.kernels``. Where it cannot be built (no compiler) the backend reports why, automatic
selection warns once and uses the ``fused`` ATen path. ``L2BN_NO_NATIVE=1`` disables it.

Why one file: building the C++ library, registering its operators (with fake kernels and
autograd) and the engine that calls them are one binding; split, each part would import the
others' private names.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor

from . import backends
from .algebra import unit_scale
from .autograd import fused_l2_batch_norm, l2_batch_norm_fast
from .engine import ATEN_KERNELS, Engine
from .reference import accumulate_dtype

__all__ = [
    "ENGINE",
    "build",
    "layer_op",
    "load",
    "native_l2_batch_norm",
    "python_layer_needed",
    "unavailable_reason",
]

_functorch_level = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", None)
_SRC = Path(__file__).with_name("csrc") / "l2bn_cpu.cpp"
_NAME = "l2bn_cpu_" + re.sub(r"[^0-9A-Za-z]", "_", torch.__version__)
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class _DropNoCudaNote(logging.Filter):
    """``torch.utils.cpp_extension`` warns "No CUDA runtime is found, using CUDA_HOME=..." when
    it is first imported on a CPU-only machine with a CUDA build of PyTorch; loading l2bn's CPU
    kernel imports it, and the note says nothing to an l2bn user. Only that message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()


def quiet_cpp_extension() -> None:
    """Install :class:`_DropNoCudaNote` on torch's extension logger (once)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _DropNoCudaNote) for f in logger.filters):
        logger.addFilter(_DropNoCudaNote())


def _cflags() -> list:
    flags = ["-O3", "-fopenmp"]  # at::parallel_for is header code: OpenMP must be on here too
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("AVX2", "AVX512"):  # ATen's 256-bit Vectorized<float/double>
        flags += ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def _library_path() -> Path:
    quiet_cpp_extension()
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(_NAME, False)) / f"{_NAME}.so"


def build(verbose: bool = False) -> Path:
    """Compile (if needed) and load the kernel library; returns its path. Raises if it cannot."""
    quiet_cpp_extension()
    from torch.utils.cpp_extension import load as _load

    if shutil.which("ninja") is None:  # the pip wheel's binary, when the venv is not activated
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    path = _library_path()
    newest = max(f.stat().st_mtime for f in _SRC.parent.iterdir())  # the .cpp and its headers
    fresh = not path.exists() or path.stat().st_mtime < newest
    if fresh:
        print(
            f"l2bn: building the native CPU kernel for this machine (once, ~1 min) in "
            f"{path.parent}",
            file=sys.stderr,
            flush=True,
        )
    t0 = time.perf_counter()
    # -fopenmp links libgomp.so.1, which resolves to the copy torch has already loaded
    _load(
        name=_NAME,
        sources=[str(_SRC)],
        extra_cflags=_cflags(),
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=verbose,
    )
    if fresh:
        print(
            f"l2bn: native kernel built in {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return path


_decided: list = []  # [reason or None] once the library has been looked for in this process


def unavailable_reason() -> Optional[str]:
    """``None`` when the operators are loaded (building them on first call), else why not.

    Decided once per process. Inside ``torch.compile`` tracing nothing is built or loaded: a
    first use there reports the kernel as not loaded (the traced ATen path is used instead).
    """
    if _decided:
        return _decided[0]
    if torch.compiler.is_compiling():
        return "not loaded yet (first L2BN call of the process is inside torch.compile)"
    reason: Optional[str] = None
    if os.environ.get("L2BN_NO_NATIVE", "") not in ("", "0"):
        reason = "disabled by L2BN_NO_NATIVE"
    else:
        try:
            build()
            _register_python_side()
        except Exception as e:  # no compiler, no ninja, failed compile
            first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else ""
            reason = f"the C++ kernel could not be built ({type(e).__name__}: {first})"
    _decided.append(reason)
    return reason


_LAYER: list = []  # [the l2bn::layer operator or None] once decided


def layer_op(x: Tensor) -> Any:
    """``torch.ops.l2bn.layer.default``, the single-call layer of ``csrc/layer.h``, when the
    kernel is loaded (built on first call; decided once per process) and automatic selection
    would choose the native backend first for ``x``, else ``None``. Nothing is built while
    ``L2BN_BACKEND`` names another backend (which the operator also reads per call).

    Example:
        >>> op = layer_op(torch.zeros(2, 3))
        >>> op is None or op.name() == "l2bn::layer"
        True
    """
    if not _LAYER:
        if (os.environ.get("L2BN_BACKEND") or "auto") not in ("auto", "native"):
            return None
        _LAYER.append(torch.ops.l2bn.layer.default if unavailable_reason() is None else None)
    return _LAYER[0] if backends.tried_first("native", _unavailable, x) else None


def python_layer_needed() -> bool:
    """Whether something is active that only the Python layer handles: ``torch.compile`` or
    ``torch.export`` tracing (fake kernels), a TorchScript trace (ONNX's legacy exporter), a
    ``torch.func`` transform, forward-mode AD, or a ``TorchDispatchMode`` (which must see the
    layer's ATen ops).

    Example:
        >>> python_layer_needed()
        False
    """
    return (
        torch.compiler.is_compiling()
        or _fwad._current_level >= 0
        or torch._C._get_tracing_state() is not None
        or torch._C._len_torch_dispatch_stack() > 0
        or (_functorch_level is not None and _functorch_level() is not None)
    )


def load() -> None:
    """Load (building if needed) the operators; raise ``RuntimeError`` with the reason if not."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"l2bn native kernel unavailable: {reason}")


# ------------------------------------------------------------- fake and autograd kernels

_registered = [False]


def _rows_of_one(x: Tensor) -> bool:
    """Whether ``x`` has one entry per (n, c) as ``layout_of`` in C++ counts it (an empty batch
    counts as M = 0)."""
    n, c = x.shape[0], x.shape[1]
    return n * c > 0 and x.numel() // (n * c) == 1


def _out_format(x: Tensor) -> torch.memory_format:
    """The memory format of the kernel's outputs for input ``x`` (see ``layout_of`` in C++). A
    half-precision input is widened to float32 first, with ``x.to``'s own layout rule (a strided
    slice of a channels_last tensor becomes a dense channels_last one): the fake decides on that."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = torch.empty_like(x, dtype=torch.float32)
    if _rows_of_one(x) or x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _register_python_side() -> None:
    if _registered[0]:
        return
    _registered[0] = True

    @torch.library.register_fake("l2bn::train_forward")
    def _train_fake(x, weight, bias, eps, l2_eps, s):  # type: ignore[no-untyped-def]
        n, c = x.shape[0], x.shape[1]
        one = _rows_of_one(x)
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_out_format(x))
        st = functools.partial(x.new_empty, dtype=accumulate_dtype(x.dtype))
        rows = [st(0), st(0)] if one else [st(n, c), st(n, c)]
        return (y, st(n), st(n), *rows, st(c), st(c), st(c))

    @torch.library.register_fake("l2bn::eval_forward")
    def _eval_fake(x, weight, bias, mean, var, eps, l2_eps, s):  # type: ignore[no-untyped-def]
        n, c = x.shape[0], x.shape[1]
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_out_format(x))
        st = functools.partial(x.new_empty, dtype=accumulate_dtype(x.dtype))
        return y, st(n), st(n), st(c), st(c), st(c)

    @torch.library.register_fake("l2bn::backward")
    def _backward_fake(g, x, weight, k, r, mk, vk, mu, invstd, l2_eps, s, batch_stats, need_dx):  # type: ignore[no-untyped-def]
        c = x.shape[1]
        acc = accumulate_dtype(
            x.dtype
        )  # an unneeded dx stays the kernel's empty accumulation-dtype tensor
        dx = (
            torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_out_format(x))
            if need_dx
            else x.new_empty(0, dtype=acc)
        )
        return dx, x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc)

    def _setup_train(ctx, inputs, output):  # type: ignore[no-untyped-def]
        x, weight, bias, _eps, l2_eps, s = inputs
        _y, r, k, mk, vk, mu, _var, invstd = output
        ctx.save_for_backward(x, weight, k, r, mk, vk, mu, invstd)
        ctx.l2_eps, ctx.s, ctx.batch_stats = l2_eps, s, True
        ctx.bias_dtype = bias.dtype if bias is not None else None
        # only y is differentiable (first order); the statistics are outputs, not functions of x
        # here
        ctx.mark_non_differentiable(*output[1:])

    def _setup_eval(ctx, inputs, output):  # type: ignore[no-untyped-def]
        x, weight, bias, _mean, _var, _eps, l2_eps, s = inputs
        _y, r, k, mu, _v, invstd = output
        ctx.save_for_backward(x, weight, k, r, None, None, mu, invstd)
        ctx.l2_eps, ctx.s, ctx.batch_stats = l2_eps, s, False
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(*output[1:])

    def _backward(ctx, gy, *_rest):  # type: ignore[no-untyped-def]
        """First-order backward of ``y``; the statistics outputs are treated as constants."""
        x, weight, k, r, mk, vk, mu, invstd = ctx.saved_tensors
        if gy is None:
            gy = torch.zeros_like(x)
        rows = mk is not None and mk.numel() > 0
        dx, gw, gb = torch.ops.l2bn.backward(
            gy,
            x,
            weight,
            k,
            r,
            mk if rows else None,
            vk if rows else None,
            mu,
            invstd,
            ctx.l2_eps,
            ctx.s,
            ctx.batch_stats,
            ctx.needs_input_grad[0],
        )
        grads = [
            dx if ctx.needs_input_grad[0] else None,
            gw.to(weight.dtype) if weight is not None else None,
            gb.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None,
        ]  # the bias's dtype, not x's
        return (*grads, *([None] * (len(ctx.needs_input_grad) - 3)))

    torch.library.register_autograd("l2bn::train_forward", _backward, setup_context=_setup_train)
    torch.library.register_autograd("l2bn::eval_forward", _backward, setup_context=_setup_eval)


# ------------------------------------------------------------------------------ engine


def _below_autograd(op: Any, *args: Any) -> Any:
    """Call ``op`` straight on its CPU kernel. The engine runs inside
    :class:`~l2bn.kernels.autograd.L2BatchNormFunction` or without grad, so the op's own (Python)
    autograd kernel would only redispatch — about 10 µs per call, as much as a small layer's
    kernel. Under ``torch.compile`` the op is called normally (traced as one node)."""
    if torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _train(xs, weight, bias, eps, l2_eps, s):  # type: ignore[no-untyped-def]
    y, r, k, mk, vk, mu, var, invstd = _below_autograd(
        torch.ops.l2bn.train_forward.default, xs, weight, bias, eps, l2_eps, s
    )
    if (
        mk.numel() == 0 and xs.numel() > 0
    ):  # one entry per (n, c): not computed (recomputed if needed)
        mk = vk = None
    return y, r, k, mk, vk, mu, var, invstd


def _evaluate(xs, weight, bias, mean, var, eps, l2_eps, s):  # type: ignore[no-untyped-def]
    return _below_autograd(
        torch.ops.l2bn.eval_forward.default, xs, weight, bias, mean, var, eps, l2_eps, s
    )


def _backward_engine(
    gs, xs, weight, k, r, mk, vk, mu, invstd, l2_eps, unit_rms, batch_stats, need_dx
):  # type: ignore[no-untyped-def]
    s = unit_scale(xs.shape[1] * math.prod(xs.shape[2:]), unit_rms)
    dx, gw, gb = _below_autograd(
        torch.ops.l2bn.backward.default,
        gs,
        xs,
        weight,
        k,
        r,
        mk,
        vk,
        mu,
        invstd,
        l2_eps,
        s,
        batch_stats,
        need_dx,
    )
    return (dx if need_dx else None), gw, gb


#: The native engine; synchronised training (a process group) uses the ATen bulk passes piecewise.
ENGINE = Engine("native", ATEN_KERNELS, _train, _evaluate, _backward_engine)


def native_l2_batch_norm(
    x, weight, bias, stat_mean, stat_var, eps, l2_eps, unit_rms, process_group=None
):  # type: ignore[no-untyped-def]
    """As :func:`l2bn.kernels.autograd.fused_l2_batch_norm`, on the native operators."""
    return fused_l2_batch_norm(
        x, weight, bias, stat_mean, stat_var, eps, l2_eps, unit_rms, process_group, ENGINE
    )


def _unavailable(x: Tensor) -> Optional[str]:
    if x.device.type != "cpu":
        return f"the native kernel runs on the CPU only (input on {x.device.type})"
    if x.dtype not in _DTYPES:
        return f"the native kernel supports float16/bfloat16/float32/float64 (input is {x.dtype})"
    return unavailable_reason()


def _prefer(x: Any) -> bool:
    return x.device.type == "cpu" and x.dtype in _DTYPES


backends.register(
    "native",
    functools.partial(l2_batch_norm_fast, engine=ENGINE),
    _unavailable,
    auto_priority=0,
    prefer=_prefer,
)


def _main(argv: Optional[list] = None) -> int:
    """``python -m l2bn.kernels``: build the kernel now and check it against the reference."""
    from .reference import l2_batch_norm_reference

    t0 = time.perf_counter()
    reason = unavailable_reason()
    if reason is not None:
        print(f"l2bn native kernel unavailable: {reason}", file=sys.stderr)
        return 1
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    y = native_l2_batch_norm(x, None, None, None, None, 1e-5, 1e-12, False)[0]
    ref = l2_batch_norm_reference(x, None, None, training=True)
    err = float((y - ref).abs().max())
    print(
        f"l2bn native kernel ready ({_library_path()}), loaded in {time.perf_counter() - t0:.2f} "
        f"s, "
        f"max |native - reference| = {err:.1e} (float64)"
    )
    return 0 if err < 1e-10 else 1
