"""The Triton kernels (the CUDA backend) against the reference, run on the CPU by Triton's
interpreter (``TRITON_INTERPRET=1``, set before the kernels are defined: in a subprocess)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECK = textwrap.dedent(
    """
    import json, torch
    from l2bn.kernels import triton_kernels as tk
    from l2bn.kernels.engine import ATEN
    from l2bn.kernels.reference import l2_batch_norm_reference

    def rel(a, b):
        scale = b.double().abs().max().clamp_min(1e-30)
        return float((a.double() - b.double()).abs().max() / scale)

    out = {}
    cases = [((4, 3, 5), None), ((3, 2, 4, 4), None), ((5, 6), None), ((3, 4, 3, 2), "cl"),
             ((2, 3, 40, 41), None)]
    for dtype in (torch.float64, torch.float32):
        for shape, fmt in cases:
            g = torch.Generator().manual_seed(len(shape))
            x = (torch.randn(shape, generator=g, dtype=dtype) * 2 + 0.5)
            if fmt == "cl":
                x = x.contiguous(memory_format=torch.channels_last)
            c = shape[1]
            w = torch.linspace(0.5, 1.5, c, dtype=dtype).requires_grad_()
            b = torch.linspace(-0.3, 0.3, c, dtype=dtype).requires_grad_()
            gy = torch.randn(shape, generator=g, dtype=dtype)
            rm = torch.linspace(-0.2, 0.2, c, dtype=dtype)
            rv = torch.linspace(0.5, 1.5, c, dtype=dtype)
            key = f"{dtype}-{shape}-{fmt}"
            for mode, stats in (("train", (None, None)), ("eval", (rm, rv))):
                xt = x.detach().clone().requires_grad_()
                y = tk.triton_l2_batch_norm(xt, w, b, *stats, 1e-5, 1e-12, False)[0]
                gt = torch.autograd.grad(y, (xt, w, b), gy)
                xr = x.detach().clone().requires_grad_()
                ref = l2_batch_norm_reference(xr, stats[0], stats[1], w, b, mode == "train",
                                              0.0, 1e-5)
                gr = torch.autograd.grad(ref, (xr, w, b), gy)
                out[f"{key}-{mode}-y"] = rel(y, ref)
                for name, a, e in zip(("dx", "dw", "db"), gt, gr):
                    out[f"{key}-{mode}-{name}"] = rel(a, e)
                if fmt == "cl":
                    nhwc = y.is_contiguous(memory_format=torch.channels_last)
                    out[f"{key}-{mode}-layout"] = 0.0 if nhwc else 1.0
    # unit-RMS variant, and the bulk passes one by one against the ATen ones
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    y = tk.triton_l2_batch_norm(x, None, None, None, None, 1e-5, 1e-12, True)[0]
    out["unit_rms"] = rel(y, l2_batch_norm_reference(x, None, None, training=True, unit_rms=True))
    m1, v1 = tk.TRITON_KERNELS.row_stats(x, (2,), 6, torch.float64)
    m2, v2 = ATEN.kernels.row_stats(x, (2,), 6, torch.float64)
    out["row_stats"] = max(rel(m1, m2), rel(v1, v2))
    out["sample_norm"] = rel(tk.TRITON_KERNELS.sample_norm(x, torch.float64),
                             ATEN.kernels.sample_norm(x, torch.float64))
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def errors():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_triton_kernels_match_reference_float64(errors):
    f64 = {k: v for k, v in errors.items() if k.startswith("torch.float64")}
    assert len(f64) == 5 * 2 * 4 + 2  # every case, both modes, y/dx/dw/db, + two layout checks
    bad = {k: v for k, v in f64.items() if v > 1e-10}
    assert not bad, bad


def test_triton_kernels_match_reference_float32(errors):
    f32 = {k: v for k, v in errors.items() if k.startswith("torch.float32")}
    bad = {k: v for k, v in f32.items() if v > 2e-4}
    assert f32 and not bad, bad


def test_triton_channels_last_output_and_bulk_passes(errors):
    assert all(v == 0.0 for k, v in errors.items() if k.endswith("-layout"))
    assert errors["unit_rms"] < 1e-10
    assert errors["row_stats"] < 1e-12 and errors["sample_norm"] < 1e-12


def test_triton_backend_is_cuda_only():
    import torch

    from l2bn.kernels import backends

    x = torch.randn(4, 3)
    with pytest.raises(
        RuntimeError, match="'triton' is not available: the Triton kernels run on CUDA"
    ):
        backends.select("triton", x)
    assert backends.select(None, x) != "triton"
