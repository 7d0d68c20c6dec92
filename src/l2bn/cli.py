"""``l2bn`` command line: thin argument parsing over the library.

    l2bn bench [--device cpu] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    report = bench.run(
        device=args.device, threads=args.threads, reps=args.reps, compile=not args.no_compile,
        resnet=not args.no_resnet, json_path=args.json, quick=args.quick,
    )
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="l2bn", description="L2 batch normalization: benchmarks, training and analysis")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="benchmark L2BN against BatchNorm and the naive composite")
    b.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    b.add_argument("--reps", type=int, default=20, help="timed repetitions per variant")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    b.add_argument("--no-resnet", action="store_true", help="skip the ResNet-56 training-step benchmark")
    b.add_argument("--quick", action="store_true", help="two shapes and a small ResNet batch (smoke run)")
    b.add_argument("--json", default=None, help="also write the measurements as JSON")
    b.add_argument("--markdown", default=None, help="also write the table as markdown")
    b.set_defaults(func=_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
