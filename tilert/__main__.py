"""`python -m tilert ...`: the same as the `tilert` console script."""

import sys

from tilert.cli import main

sys.exit(main())
