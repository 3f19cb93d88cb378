"""``python -m engine_tools`` runs the ``medquant`` command line."""

import sys

from engine_tools.cli import main

if __name__ == "__main__":  # worker processes (Dask, multiprocessing spawn) import this module too
    sys.exit(main())
