"""Compilation time of the ``compiled`` backend: the first training forward+backward and the
first evaluation forward of one layer, in a fresh process. Run it twice with the same
``TORCHINDUCTOR_CACHE_DIR`` (the second run reads inductor's on-disk cache)::

    TORCHINDUCTOR_CACHE_DIR=/tmp/ind python benchmarks/compile_time.py   # cold
    TORCHINDUCTOR_CACHE_DIR=/tmp/ind python benchmarks/compile_time.py   # cached

It measures and prints; it asserts nothing.
"""

import time

import torch

import l2bn
from l2bn.functional import l2_batch_norm


def main() -> None:
    x = torch.randn(64, 64, 16, 16, requires_grad=True)
    m = l2bn.L2BatchNorm2d(64)
    t = time.perf_counter()
    y = l2_batch_norm(
        x, m.running_mean, m.running_var, m.weight, m.bias, training=True, backend="compiled"
    )
    y.sum().backward()
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        l2_batch_norm(
            x, m.running_mean, m.running_var, m.weight, m.bias, training=False, backend="compiled"
        )
    eval_s = time.perf_counter() - t
    print(
        f"first training fwd+bwd {train_s:.1f} s, first eval {eval_s:.1f} s "
        f"({torch.get_num_threads()} threads, torch {torch.__version__})"
    )


if __name__ == "__main__":
    main()
