"""``python -m bmseg.cli``: the ``bmseg`` command, for callers without the entry point."""

import sys

from bmseg.cli import main

sys.exit(main())
