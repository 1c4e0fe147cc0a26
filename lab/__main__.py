"""`python -m lab`: the `lab` command."""

import sys

from lab.cli import main

sys.exit(main())
