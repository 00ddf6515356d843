"""``python -m prunelab ...``: the same command line as the ``prunelab`` entry point."""

import sys

from prunelab.cli import main

if __name__ == "__main__":
    sys.exit(main())
