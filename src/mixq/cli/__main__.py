"""``python -m mixq.cli``: the same as the ``mixq`` console script (used by ``torchrun -m``)."""

import sys

from mixq.cli import main

sys.exit(main())
