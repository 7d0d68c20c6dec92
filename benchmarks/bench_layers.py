"""Layer benchmark: the same as `l2bn bench`; run `python benchmarks/bench_layers.py --help`."""

import sys

from l2bn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
