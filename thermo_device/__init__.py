"""The analog side: an emulated stochastic processing unit and its physics.

Public names: ``Emulator``, ``load_profile``, ``Profile``, the drift descriptions ``Dense``,
``Factored`` and ``Diagonal`` (from ``protocol``). ``Backend`` is the interface every device
implementation (the emulator, board drivers, plugins) satisfies; ``Capabilities`` what it declares.
Thermodynamic linear algebra on top of any device (``solve``, ``inverse``) lives in ``host.linalg``.
"""

# First: cap the BLAS pools before any emulator code runs (blas.py says why; THERMO_NGD_BLAS_THREADS).
from . import blas  # noqa: F401, I001
from protocol.capabilities import Capabilities
from protocol.drift import Dense, Diagonal, Factored

from ._version import __version__  # one version string, dependency-free (pyproject reads it at build)
from .backend import Backend
from .emulator import Emulator
from .profile import Profile, load_profile

__all__ = ["Backend", "Capabilities", "Dense", "Diagonal", "Emulator", "Factored", "Profile", "__version__",
           "load_profile"]
