"""``python -m graphopt`` is the ``graphopt`` command."""

import sys

from graphopt._cli import main

sys.exit(main())
