"""``python -m cqsa_dask``: the ``cqsa`` command."""

import sys

from cqsa_dask.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
