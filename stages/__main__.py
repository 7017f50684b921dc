"""``python -m stages <command> ...``: the stage command every runner starts (see :mod:`stages.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
