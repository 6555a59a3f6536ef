"""``python -m crystalmapping``: the ``crystalmapping`` command."""

import sys

from .cli import main

sys.exit(main())
