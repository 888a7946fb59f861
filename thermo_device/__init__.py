"""The analog side: an emulated stochastic processing unit and its physics.

Public names: ``Emulator``, ``load_profile``, ``Profile``, the drift descriptions ``Dense``,
``Factored`` and ``Diagonal`` (from ``protocol``). ``Backend`` is the interface every device
implementation (the emulator, board drivers, plugins) satisfies; ``Capabilities`` what it declares.
Thermodynamic linear algebra on top of any device (``solve``, ``inverse``) lives in ``host.linalg``.
"""

__version__ = "0.1.0"

from protocol.capabilities import Capabilities  # noqa: E402
from protocol.drift import Dense, Diagonal, Factored  # noqa: E402

from .backend import Backend  # noqa: E402
from .emulator import Emulator  # noqa: E402
from .profile import Profile, load_profile  # noqa: E402

__all__ = ["Backend", "Capabilities", "Dense", "Diagonal", "Emulator", "Factored", "Profile", "__version__",
           "load_profile"]
