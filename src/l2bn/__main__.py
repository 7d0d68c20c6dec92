"""``python -m l2bn ...`` (also what ``torchrun -m l2bn train ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
