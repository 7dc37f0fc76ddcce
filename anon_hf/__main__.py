"""``python -m anon_hf run ...``: the same as the ``anon-hf`` console script (see :mod:`anon_hf.launcher.cli`)."""

import sys

from .launcher.cli import main

if __name__ == "__main__":
    sys.exit(main())
