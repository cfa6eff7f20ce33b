"""``python -m continue_pt.cli``: the command line without the installed ``continue-pt`` script (torchrun starts
it this way on each node)."""

import sys

from continue_pt.cli import main

sys.exit(main())
