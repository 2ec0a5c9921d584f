"""``python -m backends``: the ``quiclb-backend`` command."""

import sys

from backends.cli import main

sys.exit(main())
