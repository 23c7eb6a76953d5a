"""``python -m soho_core ...`` is ``soho ...`` (and what torchrun -m runs)."""

import sys

from soho_core.cli import main

sys.exit(main())
