"""`python -m llamaviz` runs the `llamaviz` command."""

import sys

from llamaviz.cli import main

sys.exit(main())
