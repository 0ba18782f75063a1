"""``python -m hirespath <task> [overrides]``: the same as the ``hirespath`` command."""

import sys

from hirespath.cli import main

sys.exit(main())
