"""``python -m mmtts`` (and ``accelerate launch -m mmtts``) runs the command line."""

import sys

from .cli import main

sys.exit(main())
