"""``python -m lrmath_hf`` runs the ``lrmath`` command."""

import sys

from .cli import main

sys.exit(main())
