"""`python -m ensemble`: blend run directories and write the submission (see ensemble/cli.py)."""

import sys

from ensemble.cli import main

sys.exit(main())
