"""``python -m l2bn.kernels``: build the native CPU kernel now (once per machine) and check it."""

from l2bn.kernels.native import _main

raise SystemExit(_main())
