"""``python -m dormant ...`` (also under ``torchrun``): the command line."""

import sys

from dormant.cli import main

sys.exit(main())
