"""``python -m dormant.cli ...``: the command line."""

import sys

from dormant.cli import main

sys.exit(main())
