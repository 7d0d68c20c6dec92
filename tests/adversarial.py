"""Adversarial inputs for the L2BN backends and the error measure the suite judges them by.

Each family breaks something a fast path may do: one-pass or shifted variances (a large mean
with a small spread; a zero, negated or outlying first sample), heavy tails (Cauchy), overflow
guards and tiny-norm handling (mixed tiny and normal samples, huge norms), and all-positive
post-ReLU features. The bar (tests/test_adversarial.py) is relative: a backend's error against
the float64 reference may be at most ``RATIO`` times the error of the plain composite
``BN(F.normalize(x))`` in the input's own dtype — what a user would otherwise write — plus an
absolute floor per dtype.

    python tests/adversarial.py      # prints the worst ratio per family and backend
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch

from l2bn.functional import l2_batch_norm
from l2bn.kernels.reference import l2_batch_norm_reference

RATIO = 5.0
FLOOR = {torch.float64: 1e-12, torch.float32: 3e-6, torch.float16: 3e-3, torch.bfloat16: 3e-2}
#: families whose scales fit each dtype (half and bfloat16 hold neither 1e20 nor 1e-20 norms)
WIDE = ("huge", "mixed_tiny")


def _base(shape, g):
    return torch.randn(shape, generator=g, dtype=torch.float64)


def family(name: str, shape, g: torch.Generator) -> torch.Tensor:
    """A float64 input of ``shape`` from family ``name``."""
    x = _base(shape, g)
    if name == "offset":  # a large mean, a small spread: breaks unshifted one-pass variances
        return 10 + 0.01 * x
    if name == "zero_first":  # the same, first sample all zero: breaks a shift by the first sample
        x = 10 + 0.01 * x
        x[0] = 0
        return x
    if name == "neg_first":
        x = 10 + 0.01 * x
        x[0] = -x[0]
        return x
    if name == "outlier_first":
        x = 1 + 0.1 * x
        x[0] *= 1e4
        return x
    if name == "cauchy":  # heavy tails
        u = torch.rand(shape, generator=g, dtype=torch.float64)
        return torch.tan(math.pi * (u - 0.5))
    if name == "mixed_tiny":  # half the samples 1e20 times smaller than the others
        x[: max(1, shape[0] // 2)] *= 1e-20
        return x
    if name == "huge":  # squares overflow float32
        return x * 1e20
    if name == "relu":  # post-ReLU: all entries >= 0, a positive mean
        return x.clamp_min(0)
    raise ValueError(name)


FAMILIES = (
    "offset",
    "zero_first",
    "neg_first",
    "outlier_first",
    "cauchy",
    "mixed_tiny",
    "huge",
    "relu",
)


def _per_sample(a: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> float:
    """Worst over samples of max|a_n - t_n| / scale_n."""
    if a.numel() == 0:
        return 0.0
    a, t = a.double().flatten(1), t.double().flatten(1)
    return float(((a - t).abs().amax(1) / scale).max())


def _rel(a: Optional[torch.Tensor], t: Optional[torch.Tensor], scale: float) -> float:
    if a is None or t is None or t.numel() == 0:
        return 0.0
    return float((a.double() - t.double()).abs().max()) / scale


def run(backend: str, x: torch.Tensor, training: bool, params_dtype: torch.dtype, seed: int = 1):
    """Outputs, input/weight/bias gradients and running statistics of one call."""
    c = x.shape[1]
    w = torch.linspace(0.5, 1.5, c, dtype=params_dtype).requires_grad_()
    b = torch.linspace(-0.3, 0.3, c, dtype=params_dtype).requires_grad_()
    rm = torch.linspace(-0.01, 0.01, c, dtype=params_dtype)
    rv = torch.linspace(0.5, 1.5, c, dtype=params_dtype) * 1e-3
    xx = x.detach().clone().requires_grad_()
    fn = l2_batch_norm_reference if backend == "reference" else l2_batch_norm
    # "layer": no backend named, so a CPU call is the single C++ call of the layers (csrc/layer.h)
    kw = {} if backend in ("reference", "layer") else {"backend": backend}
    y = fn(xx, rm, rv, w, b, training, 0.1, 1e-5, **kw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y.backward(gy.to(y.dtype))
    return {"y": y.detach(), "dx": xx.grad, "dw": w.grad, "db": b.grad, "mean": rm, "var": rv}


def errors(
    backend: str, x: torch.Tensor, training: bool, runner: Callable = None
) -> Dict[str, float]:
    """Errors of ``backend`` on ``x`` against the float64 reference on the same (rounded) input,
    each relative to the quantity's natural magnitude (so that a truth that cancels to ~0, as
    the input gradient of a single channel, is not judged by its rounding noise): per sample
    for y (its largest entry, at least max|beta|) and dx (the leading term's bound
    max|g_n| max|gamma / sigma| / r_n); overall for dw (at least sum|g| / C / 1000), db
    (sum|g| / C) and the running statistics (mean: at least the largest channel's std)."""
    pdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    got = (runner or run)(backend, x, training, pdt)
    ref = run("reference", x.double(), training, torch.float64)
    xd = x.double()
    c, dims = x.shape[1], [0] + list(range(2, x.dim()))
    r = xd.flatten(1).norm(dim=1).clamp_min(1e-12)
    u = xd / r.view(-1, *([1] * (x.dim() - 1)))
    var = (
        u.var(dims, unbiased=False)
        if training and x.shape[0] * x[0, 0].numel() > 1
        else torch.linspace(0.5, 1.5, c, dtype=torch.float64) * 1e-3
    )
    w = torch.linspace(0.5, 1.5, c, dtype=torch.float64)
    gy = torch.randn(
        ref["y"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    lead = gy.flatten(1).abs().amax(1) * float((w / (var + 1e-5).sqrt()).max()) / r
    y_scale = ref["y"].flatten(1).abs().amax(1).clamp_min(0.3)
    g1 = float(gy.abs().sum()) / c
    out = {
        "y": _per_sample(got["y"], ref["y"], y_scale),
        "dx": _per_sample(got["dx"], ref["dx"], lead),
        "dw": _rel(got["dw"], ref["dw"], max(float(ref["dw"].abs().max()), g1 * 1e-3)),
        "db": _rel(got["db"], ref["db"], g1),
    }
    if training and got.get("mean") is not None:
        sd = float(ref["var"].abs().max()) ** 0.5
        out["mean"] = _rel(
            got["mean"], ref["mean"], max(float(ref["mean"].abs().max()), sd, 1e-300)
        )
        out["var"] = _rel(got["var"], ref["var"], max(float(ref["var"].abs().max()), 1e-300))
    return out


def judge(backend: str, x: torch.Tensor, training: bool) -> Dict[str, tuple]:
    """``{quantity: (backend error, composite error, allowed)}`` for the quantities that
    exceed the bar (empty when the backend passes)."""
    mine = errors(backend, x, training)
    comp = errors("reference", x, training)
    floor = FLOOR[x.dtype]
    bad = {}
    for k, e in mine.items():
        allowed = RATIO * comp[k] + floor
        if not e <= allowed:  # also catches NaN
            bad[k] = (e, comp[k], allowed)
    return bad


def layouts(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x


if __name__ == "__main__":
    import sys

    backends = sys.argv[1:] or ["fused", "native", "layer"]
    shapes = {
        "(N, C)": (4096, 16),
        "(N, C, L)": (64, 8, 33),
        "(N, C, H, W)": (16, 8, 9, 9),
        "channels_last": (16, 8, 9, 9),
    }
    print("| family | layout | dtype | " + " | ".join(backends) + " |")
    print("|---" * (3 + len(backends)) + "|")
    for fam in FAMILIES:
        for lay, shape in shapes.items():
            for dt in (torch.float32, torch.float16, torch.bfloat16):
                if dt != torch.float32 and fam in WIDE:
                    continue
                x = layouts(family(fam, shape, torch.Generator().manual_seed(0)).to(dt), lay)
                cells = []
                for be in backends:
                    worst = 0.0
                    for training in (True, False):
                        mine, comp = errors(be, x, training), errors("reference", x, training)
                        for k in mine:
                            worst = max(worst, mine[k] / (comp[k] + FLOOR[dt]))
                    cells.append(f"{worst:.2g}")
                print(f"| {fam} | {lay} | {str(dt)[6:]} | " + " | ".join(cells) + " |", flush=True)
