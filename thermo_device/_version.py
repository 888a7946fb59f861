"""The project's one version string.

pyproject.toml reads it at build time (``[tool.setuptools.dynamic]``); setuptools extracts the literal
from this file's syntax tree without importing anything, which is why it lives alone here: importing
``thermo_device`` itself would pull numba, which an isolated build environment does not have.
"""

__version__ = "0.1.0"
