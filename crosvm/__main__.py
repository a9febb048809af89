"""`python -m crosvm` entry point."""

import sys

from crosvm.cli.main import main

sys.exit(main())
