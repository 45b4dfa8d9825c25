"""``python -m decon_med`` (used by ``torchrun -m decon_med ...``)."""

import sys

from decon_med.cli import main

sys.exit(main())
