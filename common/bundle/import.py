# ruff: noqa: N999 -- named for the command users type; code imports common.bundle.importer
"""``python -m common.bundle.import``: the command of :mod:`common.bundle.importer` under the issue's name
(``import`` is a Python keyword, so code imports ``common.bundle.importer``)."""

import sys

from common.bundle.importer import main

if __name__ == "__main__":
    sys.exit(main())
