"""Edge cases of the fast backends' autograd Function (``l2bn.kernels.autograd``) that the mutation
run of that module found untested (docs/mutation-fused.md, class T): synchronised statistics
with *different* batches on the two ranks, half precision and extreme scales under a process
group, the statistics that ``fused_l2_batch_norm`` returns, forward-mode AD and double backward
in mixed precision, ``torch.func`` over ``torch.compile``, the rescale boundary, and a sample
whose norm equals ``l2_eps`` exactly (the kink of ``max(r, l2_eps)``).

Every expected value comes from the float64 reference composite
(:func:`l2bn.kernels.reference.l2_batch_norm_reference`), on the union of the ranks' batches
where a process group is involved.
"""

import math
import threading

import pytest
import torch
import torch.autograd.forward_ad as fwad

from l2bn.functional import l2_batch_norm
from l2bn.kernels.autograd import fused_l2_batch_norm
from l2bn.kernels.reference import l2_batch_norm_reference

F64 = torch.float64


def _two_rank_world(monkeypatch):
    """An in-process process group of two ranks that hold *different* batches: each rank runs in
    its own thread, and ``all_gather``/``all_reduce`` exchange the two threads' tensors (a
    mirrored world, where the other rank holds the same batch, cannot tell a missing
    collective from a present one when local and global ratios are equal).

    Returns ``(group, run)``; ``run(f0, f1)`` calls ``f0`` as rank 0 and ``f1`` as rank 1
    concurrently and returns their results.
    """
    import torch.distributed as dist

    group = object()
    barrier = threading.Barrier(2, timeout=120)
    slots = [None, None]
    me = threading.local()

    def world_size(g=None):
        assert g is group, "a collective without the layer's process group"
        return 2

    def exchange(op, t):
        slots[me.rank] = (op, t.shape, t.dtype, t.detach().clone())
        barrier.wait()
        both = list(slots)
        barrier.wait()  # both ranks have read before the next exchange overwrites a slot
        assert both[0][:3] == both[1][:3], (
            f"the ranks called different collectives: {both[0][:3]} and {both[1][:3]}"
        )
        return [s[3] for s in both]

    def all_gather(out, local, group=None):
        world_size(group)
        for o, s in zip(out, exchange("all_gather", local)):
            o.copy_(s)

    def all_reduce(t, group=None):
        world_size(group)
        a, b = exchange("all_reduce", t)
        t.copy_(a + b)  # same order on both ranks: bitwise the same result

    monkeypatch.setattr(dist, "get_world_size", world_size)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)

    def run(f0, f1):
        results, errors = [None, None], []

        def target(rank, f):
            me.rank = rank
            try:
                results[rank] = f()
            except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
                errors.append(e)
                barrier.abort()

        threads = [
            threading.Thread(target=target, args=(i, f), daemon=True)
            for i, f in enumerate((f0, f1))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a rank hangs"
        if errors:
            raise errors[0]
        return results

    return group, run


def _mirror_world(monkeypatch):
    """A process group of two ranks where the other rank holds this rank's batch (one thread)."""
    import torch.distributed as dist

    group = object()
    monkeypatch.setattr(dist, "get_world_size", lambda g=None: 2)
    monkeypatch.setattr(
        dist, "all_gather", lambda out, local, group=None: [o.copy_(local) for o in out]
    )
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: t.mul_(2))
    return group


def _union_reference(xs, gs, w, b, momentum=0.1, eps=1e-5, l2_eps=1e-12):
    """Float64 reference on the ranks' batches concatenated: y, dx, dw, db, running stats."""
    x = torch.cat(xs).double().requires_grad_()
    wr, br = w.double().requires_grad_(), b.double().requires_grad_()
    rm, rv = torch.full((w.numel(),), 0.3, dtype=F64), torch.ones(w.numel(), dtype=F64)
    y = l2_batch_norm_reference(x, rm, rv, wr, br, True, momentum, eps, l2_eps=l2_eps)
    y.backward(torch.cat(gs).double())
    return y.detach(), x.grad, wr.grad, br.grad, rm, rv


@pytest.mark.parametrize("backend", ["fused", "native"])
@pytest.mark.parametrize(
    "shapes",
    [
        ((4, 1, 5), (3, 1, 5)),  # one channel
        ((4, 3, 2, 2), (2, 3, 2, 2)),  # conv maps, unequal batches
        ((5, 4), (2, 4)),  # (N, C)
        ((1, 3), (1, 3)),
    ],
)  # one sample per rank: count 2
def test_sync_with_different_batches_per_rank_equals_the_union_batch(backend, shapes, monkeypatch):
    """Two ranks with different batches (sizes, scales, offsets): each rank's output and input
    gradient, the sum of the ranks' parameter gradients (what DDP reduces) and both running
    statistics (unbiased with the *global* count) equal one process on the union batch."""
    group, run = _two_rank_world(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    c = shapes[0][1]
    xs = [
        torch.randn(s, generator=gen, dtype=F64) * (1 + 3 * i) + 0.7 * i
        for i, s in enumerate(shapes)
    ]
    gs = [torch.randn(s, generator=gen, dtype=F64) * (1 + i) for i, s in enumerate(shapes)]
    w0, b0 = torch.linspace(0.5, 1.5, c, dtype=F64), torch.linspace(-1, 1, c, dtype=F64)

    def rank(i):
        def f():
            x, w, b = (
                xs[i].clone().requires_grad_(),
                w0.clone().requires_grad_(),
                b0.clone().requires_grad_(),
            )
            rm, rv = torch.full((c,), 0.3, dtype=F64), torch.ones(c, dtype=F64)
            y = l2_batch_norm(
                x, rm, rv, w, b, True, 0.1, 1e-5, backend=backend, process_group=group
            )
            y.backward(gs[i])
            return y.detach(), x.grad, w.grad, b.grad, rm, rv

        return f

    r0, r1 = run(rank(0), rank(1))
    y, dx, dw, db, rm, rv = _union_reference(xs, gs, w0, b0)
    torch.testing.assert_close(torch.cat([r0[0], r1[0]]), y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.cat([r0[1], r1[1]]), dx, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(r0[2] + r1[2], dw, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(r0[3] + r1[3], db, rtol=1e-9, atol=1e-9)
    for r in (r0, r1):
        torch.testing.assert_close(r[4], rm, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r[5], rv, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["fused", "native"])
def test_sync_half_input_keeps_float32_statistics(backend, monkeypatch):
    """A float16 input under a process group: the statistics are taken, combined and returned in
    float32 (the accumulation dtype), as without a group; the output is the float64 union
    reference rounded to half."""
    from l2bn.kernels.native import native_l2_batch_norm

    run = native_l2_batch_norm if backend == "native" else fused_l2_batch_norm
    group = _mirror_world(monkeypatch)
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(6, 4, 9, generator=g) * 3 + 1).half()
    w, b = torch.linspace(0.5, 1.5, 4), torch.linspace(-0.2, 0.2, 4)
    y, mean, var, count = run(x, w, b, None, None, 1e-5, 1e-12, False, process_group=group)
    assert y.dtype == torch.float16
    assert (mean.dtype, var.dtype, count.dtype) == (torch.float32,) * 3
    assert float(count) == 2 * 6 * 9
    ref = l2_batch_norm_reference(
        torch.cat([x, x]).double(), None, None, w.double(), b.double(), True
    )[:6]
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1.5e-3)
    u = torch.nn.functional.normalize(x.double().flatten(1), dim=1).view_as(x)
    torch.testing.assert_close(mean.double(), u.mean((0, 2)), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        var.double(), u.transpose(0, 1).flatten(1).var(1, unbiased=False), rtol=0, atol=1e-6
    )


def test_sync_rescales_tiny_samples_with_the_right_entry_count(monkeypatch):
    """Float32 samples of norm ~1e-24 under a process group with an l2_eps below float32's
    accurate range: the range check must count all C·M entries of a sample (it decides the exact
    rescale before the collective); the output equals the float64 union reference."""
    group = _mirror_world(monkeypatch)
    x = torch.randn(4, 3, 25, generator=torch.Generator().manual_seed(6)) * 1e-25
    y, mean, var, count = fused_l2_batch_norm(
        x, None, None, None, None, 1e-30, 1e-15, False, process_group=group
    )
    ref = l2_batch_norm_reference(
        torch.cat([x, x]).double(), None, None, training=True, eps=1e-30, l2_eps=1e-15
    )[:4]
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_fused_statistics_under_a_process_group(monkeypatch):
    """``fused_l2_batch_norm`` with a group returns the *global* statistics and count, none of
    them differentiable; in evaluation the group plays no part, so forward-mode AD and double
    backward (both refused for synchronised batch statistics) work there."""
    group = _mirror_world(monkeypatch)
    x = torch.randn(5, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(7)).requires_grad_()
    y, mean, var, count = fused_l2_batch_norm(
        x, None, None, None, None, 1e-5, 1e-12, False, process_group=group
    )
    assert float(count) == 2 * 5 * 4 and count.dtype == F64
    assert y.requires_grad and not (mean.requires_grad or var.requires_grad or count.requires_grad)
    # evaluation with running statistics and a (never used) group
    rm, rv = torch.linspace(-0.1, 0.1, 3, dtype=F64), torch.linspace(0.5, 1.5, 3, dtype=F64) * 1e-2
    w, b = torch.linspace(0.5, 1.5, 3, dtype=F64), torch.zeros(3, dtype=F64)
    t = torch.randn_like(x)
    with fwad.dual_level():
        out = fused_l2_batch_norm(
            fwad.make_dual(x.detach(), t), w, b, rm, rv, 1e-5, 1e-12, False, process_group=object()
        )
        dy = fwad.unpack_dual(out[0]).tangent
    _, dy_ref = torch.func.jvp(
        lambda v: l2_batch_norm_reference(v, rm, rv, w, b, False), (x.detach(),), (t,)
    )
    torch.testing.assert_close(dy, dy_ref)
    ye = fused_l2_batch_norm(x, w, b, rm, rv, 1e-5, 1e-12, False, process_group=object())[0]
    (gx,) = torch.autograd.grad(ye.pow(2).sum(), x, create_graph=True)
    (gx_ref,) = torch.autograd.grad(
        l2_batch_norm_reference(x, rm, rv, w, b, False).pow(2).sum(), x, create_graph=True
    )
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(
        torch.autograd.grad(gx.sum(), x)[0], torch.autograd.grad(gx_ref.sum(), x)[0]
    )


def test_fused_count_lives_on_the_input_device():
    """The count tensor is made on the statistics' device, not the default one (a meta input
    stands for any non-CPU device)."""
    x = torch.empty(4, 3, 5, device="meta")
    y, mean, var, count = fused_l2_batch_norm(x, None, None, None, None, 1e-5, 1e-12, False)
    assert count.device.type == mean.device.type == "meta" and count.dtype == mean.dtype


@pytest.mark.parametrize("backend", ["fused", "native"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_ad_half_input_tangent_sums_in_float32(backend, dtype):
    """Forward-mode AD of a half-precision input: the tangent's channel sums run in float32, so
    the tangent is the float32 composite's rounded to the input dtype. Input and tangent have a
    large common part, which the tangent's mean subtraction cancels: channel sums rounded to half
    precision first are then off by 8-19 ulps of the largest value (within 0.4 ulps here)."""
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(8, 4, 36, generator=g) * 0.05 + 2).to(dtype)
    t = (torch.randn(8, 4, 36, generator=g) * 0.2 + 2).to(dtype)
    w, b = torch.linspace(0.5, 1.5, 4), torch.linspace(-0.2, 0.2, 4)
    with fwad.dual_level():
        dy = fwad.unpack_dual(
            l2_batch_norm(fwad.make_dual(x, t), None, None, w, b, True, backend=backend)
        ).tangent
    _, dy_ref = torch.func.jvp(
        lambda v: l2_batch_norm_reference(v, None, None, w, b, True), (x.float(),), (t.float(),)
    )
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(dy.float(), dy_ref, rtol=0, atol=ulp * float(dy_ref.abs().max()))


@pytest.mark.parametrize("backend", ["fused", "native"])
@pytest.mark.parametrize(
    "x_dtype, p_dtype",
    [
        (torch.float16, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float64, torch.float32),
    ],
)
def test_double_backward_in_mixed_precision(backend, x_dtype, p_dtype):
    """create_graph=True with an input and parameters of different dtypes: no dtype error, the
    first derivatives with a graph equal the plain first-order ones (db summed in float32, then
    cast to the bias dtype), and the second derivative equals the float64 composite's."""
    g = torch.Generator().manual_seed(9)
    x0 = (torch.randn(6, 3, 8, generator=g) + 0.3).to(x_dtype)
    v = torch.randn(6, 3, 8, generator=g).to(x_dtype)
    w0, b0 = torch.linspace(0.5, 1.5, 3).to(p_dtype), torch.linspace(-0.3, 0.3, 3).to(p_dtype)
    x, w, b = x0.clone().requires_grad_(), w0.clone().requires_grad_(), b0.clone().requires_grad_()
    first = torch.autograd.grad(
        (v * l2_batch_norm(x, None, None, w, b, True, backend=backend)).sum(),
        (x, w, b),
        create_graph=True,
    )
    plain = torch.autograd.grad(
        (v * l2_batch_norm(x, None, None, w, b, True, backend=backend)).sum(), (x, w, b)
    )
    for f, p, want in zip(first, plain, (x_dtype, p_dtype, p_dtype)):
        assert f.dtype == p.dtype == want
        ulps = (
            2 if want.itemsize == 2 else 16
        )  # float32 gradients: the composite and the engine round differently
        torch.testing.assert_close(
            f.double(), p.double(), rtol=0, atol=ulps * torch.finfo(want).eps * float(p.abs().max())
        )
    second = torch.autograd.grad(first[0].double().pow(2).sum(), x)[0]
    xr, wr = x0.double().requires_grad_(), w0.double()
    fr = torch.autograd.grad(
        (v.double() * l2_batch_norm_reference(xr, None, None, wr, b0.double(), True)).sum(),
        xr,
        create_graph=True,
    )[0]
    second_ref = torch.autograd.grad(fr.pow(2).sum(), xr)[0]
    tol = (
        1e-8 if x_dtype == F64 else 5e-2
    )  # float64 input: statistics in float64 whatever the parameters
    assert float((second.double() - second_ref).abs().max()) <= tol * float(second_ref.abs().max())


def test_func_grad_over_compiled_fused_layer():
    """``torch.func.grad`` of a ``torch.compile``d function calling the fused backend (dynamo
    traces under the functorch transform): the gradient equals the reference's."""
    x = torch.randn(4, 3, 5, dtype=F64, generator=torch.Generator().manual_seed(10))

    def loss(be):
        def f(v):
            return (
                l2_batch_norm(v, None, None, None, None, True, backend=be)
                * torch.arange(60.0, dtype=F64).view(4, 3, 5)
            ).sum()

        return f

    got = torch.func.grad(torch.compile(loss("fused"), backend="eager", fullgraph=False))(x)
    want = torch.func.grad(loss("reference"))(x)
    torch.testing.assert_close(got, want)


def test_compiled_call_with_a_subnormal_sample_is_finite():
    """Under ``torch.compile`` (where the scale check is skipped) a float32 sample of subnormal
    entries with the default l2_eps gives the reference's finite output."""
    torch._dynamo.reset()
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(12))
    x[1] = torch.full((3, 5), 1e-40) * torch.sign(
        torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    )
    f = torch.compile(
        lambda v: l2_batch_norm(v, None, None, None, None, True, backend="fused"), backend="eager"
    )
    y = f(x)
    ref = l2_batch_norm_reference(x.double(), None, None, training=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["fused", "native"])
@pytest.mark.parametrize("training", [True, False])
def test_norm_exactly_at_the_safe_bound_beside_a_subnormal_sample(backend, training):
    """A float64 sample whose norm is exactly the upper bound of the safe range (no rescale
    needed) beside a sample of subnormal entries: finite, and equal to the reference."""
    hi = math.sqrt(torch.finfo(F64).max) / 4
    x = torch.tensor([[hi], [1e-310], [1.0], [-2.0]], dtype=F64)
    stats = (None, None) if training else (torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64))
    y = l2_batch_norm(
        x.clone(),
        *[s.clone() if s is not None else None for s in stats],
        None,
        None,
        training,
        backend=backend,
    )
    ref = l2_batch_norm_reference(x, *stats, None, None, training)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["fused", "compiled", "native"])
@pytest.mark.parametrize("training", [True, False])
def test_sample_norm_exactly_l2_eps(backend, training):
    """A sample whose norm equals ``l2_eps`` exactly sits on the kink of ``x / max(r, l2_eps)``:
    the fast backends take the same one-sided derivative there as the reference composite (no
    gradient through ``r`` at the tie, written out in the reference so that it does not depend on
    the torch version's ``clamp_min`` subgradient), in backward and in forward-mode AD."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(4, 3, dtype=F64, generator=g)
    x[0] = torch.tensor([0.5, 0.0, 0.0], dtype=F64)  # norm 0.5, exactly representable
    t = torch.randn(4, 3, dtype=F64, generator=g)
    stats = (
        (None, None)
        if training
        else (torch.linspace(-0.1, 0.1, 3, dtype=F64), torch.linspace(0.5, 1.5, 3, dtype=F64))
    )

    def f(be):
        return lambda v: l2_batch_norm(v, *stats, None, None, training, l2_eps=0.5, backend=be)

    _, vjp = torch.func.vjp(f("reference"), x)
    want_vjp = vjp(t)[0]
    xg = x.clone().requires_grad_()
    f(backend)(xg).backward(t)
    torch.testing.assert_close(xg.grad, want_vjp, rtol=1e-10, atol=1e-10)
    _, want_jvp = torch.func.jvp(f("reference"), (x,), (t,))
    if (
        backend != "compiled"
    ):  # forward-mode AD runs the fused Function's jvp (compiled: see its tests)
        with fwad.dual_level():
            got = fwad.unpack_dual(f(backend)(fwad.make_dual(x, t))).tangent
        torch.testing.assert_close(got, want_jvp, rtol=1e-10, atol=1e-10)


def test_vmap_over_fused_evaluation_off_the_cpu():
    """``torch.func.vmap`` over the fused evaluation on a non-CPU device (meta stands for CUDA):
    with nothing to differentiate, the call runs the plain forward, never an autograd.Function
    (which would need ``setup_context`` under functorch transforms)."""
    rm, rv = torch.zeros(3, device="meta"), torch.ones(3, device="meta")
    x = torch.empty(5, 4, 3, 6, device="meta")
    y = torch.func.vmap(
        lambda t: fused_l2_batch_norm(t, None, None, rm, rv, 1e-5, 1e-12, False)[0]
    )(x)
    assert y.shape == x.shape and y.device.type == "meta"


@pytest.mark.parametrize("backend", ["fused", "native"])
def test_forward_ad_with_a_float64_weight_casts_it_to_the_accumulation_dtype(backend):
    """A float32 input with a float64 weight: the tangent is computed with the weight cast to
    float32, exactly as with a float32 weight (bitwise), in forward-mode AD as in the forward."""
    g = torch.Generator().manual_seed(14)
    x = torch.randn(6, 3, 7, generator=g)
    t = torch.randn(6, 3, 7, generator=g)
    w64 = torch.linspace(0.5, 1.5, 3, dtype=F64) + 1e-9  # not exactly a float32
    tangents = []
    for w in (w64, w64.float()):
        with fwad.dual_level():
            y = l2_batch_norm(fwad.make_dual(x, t), None, None, w, None, True, backend=backend)
            tangents.append(fwad.unpack_dual(y).tangent)
    assert torch.equal(tangents[0], tangents[1])
