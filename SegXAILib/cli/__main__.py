"""``python -m SegXAILib.cli``: the ``segxai`` command."""

import sys

from .app import main

sys.exit(main())
