"""``python -m cosmicai.cli``: the ``cai`` command."""

import sys

from . import main

sys.exit(main())
