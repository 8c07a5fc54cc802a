"""``python -m fxcompress``: the same command line as the ``fxcompress`` script."""

import sys

from compiler.cli import main

if __name__ == "__main__":
    sys.exit(main())
