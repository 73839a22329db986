"""``python -m jobfeed_client tail JOB`` (the same as ``jobfeed tail JOB``)."""

import sys

from .cli import main

sys.exit(main(prog="python -m jobfeed_client"))
