"""``python -m launcher.report``: the command line of ``launcher.report`` (also the ``toe-report`` script)."""

import sys

from . import main

sys.argv[0] = "python -m launcher.report"  # argparse's usage line names the command, not this __main__.py
sys.exit(main())
