"""The shared library that every bundle's configs import.

Importing it installs :func:`common.errors.install_excepthook`: MONAI wraps each exception raised
while a config component is built or a ``$`` expression evaluated in its own ``RuntimeError``, so
without the hook a user whose data is missing would read MONAI's wrapper, not which path is wrong
and how to fix it, at the end of ``python -m monai.bundle run``'s output.
"""

from common.errors import install_excepthook

install_excepthook()
