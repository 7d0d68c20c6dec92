"""Per-call cost of a layer, where the kernel is negligible: BN, L2BN's single C++ call (the
default on the CPU) and L2BN's Python layer (what runs where the single call declines: the
first step, torch.compile/export tracing, torch.func, forward-mode AD, dispatch modes,
SyncL2BatchNorm, another backend). Module calls on a tiny 4x8x2x2 input, one thread by
default; then batch-1 inference 1x64x56x56 with the machine's threads::

    python benchmarks/per_call.py            # 1 thread for the tiny shape
    python benchmarks/per_call.py --threads 2

Each round times the three variants interleaved (a few thousand calls each) and keeps each
one's median; ratios are per round, printed as median (min-max) over the rounds. It measures
and prints; it asserts nothing.
"""

import argparse
import os
import statistics
import time

import torch
from torch import nn

import l2bn


def _per_call_us(fn, n):
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def _variants(shape, train):
    x = torch.randn(shape)
    bn, l2 = nn.BatchNorm2d(shape[1]), l2bn.L2BatchNorm2d(shape[1])
    for m in (bn, l2):
        m.train(train)
        m(x)  # past the first step (L2BN's first step runs in Python)
    xg = x.clone().requires_grad_()

    def call(f):
        if not train:
            return lambda: f(x)

        def step():
            f(xg).sum().backward()

        return step

    return {"BN": call(bn), "L2BN single call": call(l2), "L2BN Python layer": call(l2)}


def measure(shape, train, rounds, n):
    fns = _variants(shape, train)
    grad = torch.enable_grad() if train else torch.no_grad()
    per = {k: [] for k in fns}
    with grad:
        for f in fns.values():  # warm-up
            _per_call_us(f, n // 10 + 1)
        for _ in range(rounds):
            for k, f in fns.items():
                # the Python layer: the same module with the single call switched off
                os.environ["L2BN_SINGLE_CALL"] = "0" if "Python" in k else "1"
                per[k].append(_per_call_us(f, n))
    os.environ.pop("L2BN_SINGLE_CALL")
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="threads for the tiny shape")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    cases = [
        ((4, 8, 2, 2), False, args.threads, 3000, "tiny 4x8x2x2, eval module call"),
        ((4, 8, 2, 2), True, args.threads, 1000, "tiny 4x8x2x2, training forward+backward"),
        ((1, 64, 56, 56), False, torch.get_num_threads(), 300, "batch-1 1x64x56x56, inference"),
    ]
    print(f"torch {torch.__version__}, l2bn {l2bn.__version__}")
    print("| case | threads | BN µs | L2BN single call / BN | L2BN Python layer / BN |")
    print("|---|---|---|---|---|")
    for shape, train, threads, n, label in cases:
        torch.set_num_threads(threads)
        per = measure(shape, train, args.rounds, n)
        cells = []
        for k in ("L2BN single call", "L2BN Python layer"):
            r = [a / b for a, b in zip(per[k], per["BN"])]
            cells.append(f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})")
        bn = statistics.median(per["BN"])
        print(f"| {label} | {threads} | {bn:.1f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
