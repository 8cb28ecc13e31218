"""``python -m mloffload``: see mloffload.cli."""

import sys

from .cli import main

sys.exit(main())
