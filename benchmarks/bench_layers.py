"""Layer benchmark: the same as `l2bn bench`; run `python benchmarks/bench_layers.py --help`.

python benchmarks/bench_layers.py --threads 2 --rounds 5 --reps 20     # CPU table
python benchmarks/bench_layers.py --device cuda --json gpu.json        # GPU shapes + bandwidth
bash benchmarks/gpu_check.sh OUT_DIR      # on a GPU machine: CUDA correctness, then the tables
"""

import sys

from l2bn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
