"""``python -m server.cli``: the ``guard`` command."""

import sys

from server.cli import main

sys.exit(main())
