"""The ``triton`` backend: L2BN's bulk passes as Triton kernels, for CUDA.

Five kernels, launched directly (no ``torch.compile``, no dynamo frame per call):

* ``_row_stats``: per-(n, c) mean and centred variance (two sweeps over a row; the second
  hits the cache);
* ``_affine``: ``y = x * A[n, c] + B[c]``;
* ``_grad_sums``: per-(n, c) sums of ``g`` and ``g * x`` in one sweep;
* ``_grad_apply``: ``dx = g * P[n, c] + x * Q[n, c] + R[n, c]``;
* ``_sample_norm``: per-sample l2 norm (evaluation).

They plug into the engine functions every fast backend shares
(:func:`l2bn.kernels.engine.train_forward`, :func:`~l2bn.kernels.engine.eval_forward`,
:func:`~l2bn.kernels.engine.backward_core`), so the ``(N, C)`` algebra, scale safety, double
backward, ``jvp`` and process groups are those of :mod:`l2bn.kernels.autograd`. The algebra still
runs as a handful of small ATen launches on ``(N, C)`` tensors; fusing it into the kernels is the
next step. Rows are read in the contiguous ``(N, C, M)`` layout (channels_last inputs are copied
to it and the output converted back). Accumulation is float32 for float16/bfloat16/float32 and
float64 for float64.

Correctness is tested on the CPU with Triton's interpreter (``TRITON_INTERPRET=1``,
``tests/test_triton.py``); automatic selection on CUDA first runs a small probe against the ATen
path and falls back, with one warning, if it disagrees or fails.

Why one file: the five Triton kernels, their launch helper and the backend entry that uses
them are one binding of the engine to Triton.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .autograd import fused_l2_batch_norm, l2_batch_norm_fast
from .engine import Engine, Kernels, backward_core, eval_forward, train_forward

__all__ = ["ENGINE", "TRITON_KERNELS", "triton_l2_batch_norm"]


@functools.cache
def _jit() -> Any:
    """Define the kernels on first use (``TRITON_INTERPRET`` is read when they are defined)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _row_stats(x_ptr, mean_ptr, var_ptr, M, BLOCK: tl.constexpr, ACC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * M
        acc = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, M, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(base + offs, mask=offs < M, other=0.0).to(ACC)
        mean = tl.sum(acc, axis=0) / M
        sq = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, M, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(base + offs, mask=offs < M, other=0.0).to(ACC)
            d = tl.where(offs < M, v - mean, 0.0)
            sq += d * d
        tl.store(mean_ptr + row, mean)
        tl.store(var_ptr + row, tl.sum(sq, axis=0) / M)

    @triton.jit
    def _affine(x_ptr, y_ptr, a_ptr, b_ptr, M, C, NBLK, BLOCK: tl.constexpr, ACC: tl.constexpr):
        # one program per (row, block of the row), flattened onto grid axis 0 (CUDA allows 2^31 - 1
        # programs there, 65,535 on axes 1 and 2)
        pid = tl.program_id(0).to(tl.int64)
        row = pid // NBLK
        offs = (pid % NBLK) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M
        a = tl.load(a_ptr + row)
        b = tl.load(b_ptr + row % C)
        x = tl.load(x_ptr + row * M + offs, mask=mask, other=0.0).to(ACC)
        tl.store(y_ptr + row * M + offs, (x * a + b).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _grad_sums(
        g_ptr, x_ptr, shift_ptr, gs_ptr, gx_ptr, M, BLOCK: tl.constexpr, ACC: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        shift = tl.load(shift_ptr + row).to(ACC)
        s1 = tl.zeros([BLOCK], dtype=ACC)
        s2 = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, M, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < M
            g = tl.load(g_ptr + row * M + offs, mask=mask, other=0.0).to(ACC)
            x = tl.load(x_ptr + row * M + offs, mask=mask, other=0.0).to(ACC)
            s1 += g
            s2 += g * tl.where(mask, x - shift, 0.0)
        tl.store(gs_ptr + row, tl.sum(s1, axis=0))
        tl.store(gx_ptr + row, tl.sum(s2, axis=0))

    @triton.jit
    def _grad_apply(
        g_ptr, x_ptr, p_ptr, q_ptr, r_ptr, dx_ptr, M, NBLK, BLOCK: tl.constexpr, ACC: tl.constexpr
    ):
        pid = tl.program_id(0).to(tl.int64)
        row = pid // NBLK
        offs = (pid % NBLK) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M
        p = tl.load(p_ptr + row)
        q = tl.load(q_ptr + row)
        r = tl.load(r_ptr + row)
        g = tl.load(g_ptr + row * M + offs, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + row * M + offs, mask=mask, other=0.0).to(ACC)
        tl.store(
            dx_ptr + row * M + offs, (g * p + (x * q + r)).to(dx_ptr.dtype.element_ty), mask=mask
        )

    @triton.jit
    def _sample_norm(x_ptr, out_ptr, D, BLOCK: tl.constexpr, ACC: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        acc = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, D, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + n * D + offs, mask=offs < D, other=0.0).to(ACC)
            acc += v * v
        tl.store(out_ptr + n, tl.sqrt(tl.sum(acc, axis=0)))

    return (
        triton,
        tl,
        dict(
            row_stats=_row_stats,
            affine=_affine,
            grad_sums=_grad_sums,
            grad_apply=_grad_apply,
            sample_norm=_sample_norm,
        ),
    )


#: CUDA's grid limits: axis 0 up to 2^31 - 1 programs, axes 1 and 2 up to 65,535
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def launch(name: str, grid: Tuple[int, ...], *args: Any, **meta: Any) -> None:
    """Launch kernel ``name`` on ``grid`` after checking it against CUDA's limits (the
    interpreter does not enforce them, so the CPU tests would not see a violation)."""
    if len(grid) > 3 or any(not 0 < g <= lim for g, lim in zip(grid, GRID_LIMITS)):
        raise ValueError(
            f"l2bn triton: grid {grid} for {name!r} exceeds CUDA's limits "
            f"{GRID_LIMITS[: len(grid)]}"
        )
    _jit()[2][name][grid](*args, **meta)


def _acc(dtype: torch.dtype) -> Any:
    _, tl, _k = _jit()
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block(m: int, cap: int = 1024) -> int:
    triton = _jit()[0]
    return max(16, min(triton.next_power_of_2(max(m, 1)), cap))


def _rows(t: Tensor) -> Tensor:
    """``t`` in the contiguous ``(N, C, M)`` layout the kernels index."""
    return t.contiguous()


def _like_input(out: Tensor, xs: Tensor) -> Tensor:
    """Give ``out`` (contiguous) the memory format of ``xs`` (channels_last stays channels_last)."""
    if (
        xs.dim() == 4
        and not xs.is_contiguous()
        and xs.is_contiguous(memory_format=torch.channels_last)
    ):
        return out.contiguous(memory_format=torch.channels_last)
    if (
        xs.dim() == 5
        and not xs.is_contiguous()
        and xs.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return out.contiguous(memory_format=torch.channels_last_3d)
    return out


def _row_stats(
    xs: Tensor, dims: Tuple[int, ...], m_sp: int, acc: torch.dtype
) -> Tuple[Tensor, Tensor]:
    x = _rows(xs)
    n, c = x.shape[0], x.shape[1]
    mean = torch.empty((n, c), dtype=acc, device=x.device)
    var = torch.empty_like(mean)
    if n * c:
        launch("row_stats", (n * c,), x, mean, var, m_sp, BLOCK=_block(m_sp), ACC=_acc(acc))
    return mean, var


def _affine_apply(xs: Tensor, amat: Tensor, bvec: Tensor, out_dtype: torch.dtype) -> Tensor:
    x = _rows(xs)
    n, c = x.shape[0], x.shape[1]
    m = x.numel() // max(n * c, 1)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if x.numel():
        blk = _block(m)
        nblk = -(-m // blk)
        launch(
            "affine",
            (n * c * nblk,),
            x,
            y,
            amat.contiguous(),
            bvec.contiguous(),
            m,
            c,
            nblk,
            BLOCK=blk,
            ACC=_acc(amat.dtype),
        )
    return _like_input(y, xs)


def _grad_sums(
    gs: Tensor, xs: Tensor, dims: Tuple[int, ...], acc: torch.dtype, shift: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    g, x = _rows(gs), _rows(xs)
    n, c = x.shape[0], x.shape[1]
    m = x.numel() // max(n * c, 1)
    s1 = torch.empty((n, c), dtype=acc, device=x.device)
    s2 = torch.empty_like(s1)
    sh = (shift.to(acc) if shift is not None else s1.new_zeros(n, c)).contiguous()
    if n * c:
        launch("grad_sums", (n * c,), g, x, sh, s1, s2, m, BLOCK=_block(m), ACC=_acc(acc))
    return s1, s2


def _grad_apply(
    gs: Tensor, xs: Tensor, p: Tensor, q: Tensor, r: Tensor, out_dtype: torch.dtype
) -> Tensor:
    g, x = _rows(gs), _rows(xs)
    n, c = x.shape[0], x.shape[1]
    m = x.numel() // max(n * c, 1)
    dx = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if x.numel():
        blk = _block(m)
        nblk = -(-m // blk)
        launch(
            "grad_apply",
            (n * c * nblk,),
            g,
            x,
            p.contiguous(),
            q.contiguous(),
            r.contiguous(),
            dx,
            m,
            nblk,
            BLOCK=blk,
            ACC=_acc(p.dtype),
        )
    return _like_input(dx, xs)


def _sample_norm(xs: Tensor, acc: torch.dtype) -> Tensor:
    x = _rows(xs)
    n = x.shape[0]
    d = x.numel() // max(n, 1)
    out = torch.empty(n, dtype=acc, device=x.device)
    if n:
        launch("sample_norm", (n,), x, out, d, BLOCK=_block(d, 2048), ACC=_acc(acc))
    return out


TRITON_KERNELS = Kernels(_row_stats, _affine_apply, _grad_sums, _grad_apply, _sample_norm)


#: The Triton engine (CUDA; on the CPU only under ``TRITON_INTERPRET=1``, for testing).
ENGINE = Engine(
    "triton",
    TRITON_KERNELS,
    functools.partial(train_forward, kernels=TRITON_KERNELS),
    functools.partial(eval_forward, kernels=TRITON_KERNELS),
    functools.partial(backward_core, kernels=TRITON_KERNELS),
)


def triton_l2_batch_norm(
    x, weight, bias, stat_mean, stat_var, eps, l2_eps, unit_rms, process_group=None
):  # type: ignore[no-untyped-def]
    """Same contract as :func:`l2bn.kernels.autograd.fused_l2_batch_norm`, on the Triton kernels."""
    return fused_l2_batch_norm(
        x, weight, bias, stat_mean, stat_var, eps, l2_eps, unit_rms, process_group, ENGINE
    )


@functools.cache
def _probe(device: str) -> Optional[str]:
    """Run a small L2BN (forward and backward) with the Triton kernels once per device and
    compare it with the ATen path; ``None`` if it agrees, else why not."""
    try:
        _jit()
        x = torch.randn(6, 4, 5, 7, device=device, requires_grad=True)
        y = triton_l2_batch_norm(x, None, None, None, None, 1e-5, 1e-12, False)[0]
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y) + x.detach())
        x2 = x.detach().clone().requires_grad_()
        ref = fused_l2_batch_norm(x2, None, None, None, None, 1e-5, 1e-12, False)[0]
        (gr,) = torch.autograd.grad(ref, x2, torch.ones_like(ref) + x2.detach())
        if not (torch.allclose(y, ref, atol=1e-4) and torch.allclose(gx, gr, atol=1e-4)):
            return "Triton kernels disagree with the ATen path on this device"
        return None
    except Exception as e:  # no Triton, unsupported GPU, compile failure
        return (
            f"Triton failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        )


def _unavailable(x: Tensor) -> Optional[str]:
    if x.device.type != "cuda":
        return f"the Triton kernels run on CUDA (input on {x.device.type})"
    return _probe(str(x.device))


def _prefer(x: Tensor) -> bool:
    return x.is_cuda and not torch.compiler.is_compiling()


backends.register(
    "triton",
    functools.partial(l2_batch_norm_fast, engine=ENGINE),
    _unavailable,
    auto_priority=0,
    prefer=_prefer,
)
