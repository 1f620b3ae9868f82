"""`python -m flower`: the same as the `flower` command."""

import sys

from flower.cli import main

sys.exit(main())
