"""Operator-level timing of the native L2BN kernels against ATen's batch_norm (no module, no
autograd.Function, no Python dispatch around them): what the C++ kernel costs by itself.

    .venv/bin/python benchmarks/native_ops.py [--threads 2] [--reps 50]

Prints, per shape, the median time of each operator and its ratio to the matching BN call
(eval forward, training forward, backward). A measurement, not a test.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from l2bn.kernels import native

SHAPES = [
    (128, 16, 32, 32),
    (128, 32, 16, 16),
    (128, 64, 8, 8),
    (32, 64, 56, 56),
    (32, 1024, 7, 7),
    (256, 1024),
]


def _median_us(fn, reps):
    for _ in range(5):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    native.load()
    ops = torch.ops.l2bn
    print(
        "| shape | BN eval µs | L2BN eval/BN | BN train fwd µs | L2BN train fwd/BN | BN bwd µs | "
        "L2BN bwd/BN |"
    )
    print("|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        x = torch.randn(shape)
        c = shape[1]
        w, b, rm, rv = torch.rand(c) + 0.5, torch.randn(c), torch.zeros(c), torch.ones(c)
        g = torch.randn(shape)
        with torch.no_grad():
            bn_eval = _median_us(lambda: F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5), args.reps)
            l2_eval = _median_us(
                lambda: ops.eval_forward(x, w, b, rm, rv, 1e-5, 1e-12, 1.0), args.reps
            )
            bn_train = _median_us(
                lambda: F.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5), args.reps
            )
            l2_train = _median_us(lambda: ops.train_forward(x, w, b, 1e-5, 1e-12, 1.0), args.reps)
            _y, r, k, mk, vk, mu, _v, invstd = ops.train_forward(x, w, b, 1e-5, 1e-12, 1.0)
            rows = (mk, vk) if mk.numel() else (None, None)
            l2_bwd = _median_us(
                lambda: ops.backward(g, x, w, k, r, *rows, mu, invstd, 1e-12, 1.0, True, True),
                args.reps,
            )
        xx, ww, bb = (
            x.clone().requires_grad_(),
            w.clone().requires_grad_(),
            b.clone().requires_grad_(),
        )
        yb = F.batch_norm(xx, None, None, ww, bb, True, 0.1, 1e-5)
        bn_bwd = _median_us(
            lambda: torch.autograd.grad(yb, (xx, ww, bb), g, retain_graph=True), args.reps
        )
        name = "x".join(map(str, shape))
        print(
            f"| {name} | {bn_eval:.0f} | {l2_eval / bn_eval:.2f} | {bn_train:.0f} | "
            f"{l2_train / bn_train:.2f} "
            f"| {bn_bwd:.0f} | {l2_bwd / bn_bwd:.2f} |"
        )


if __name__ == "__main__":
    main()
