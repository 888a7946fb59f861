"""The digital side: connect to a device and train with TNGD.

``connect(address, seed)`` returns a ``protocol.Device``; the drift descriptions are re-exported.
``TNGD`` (NumPy) and its digital baselines live here; ``TNGDCore``/``TNGDState`` are the step it
is built on, over explicit state (``host.tngd_core``). A model larger than a device runs on tiles
over a pool of devices (``open_pool``, ``host.tiling``; docs/tiling.md). The PyTorch optimizer is
``host.torch_optimizer.TNGDOptimizer`` (needs the ``torch`` extra, so it is not imported here).
"""

from . import blas  # noqa: F401, I001 - first: cap the BLAS pools (host/blas.py)
from protocol.drift import Dense, Diagonal, Factored

from .baselines import NGDCG, SGD, Adam, ExactNGD
from .connect import connect
from .linalg import LinalgResult, inverse, solve
from .pool import DeviceSpec, PoolConfig, TiledDevice, TileFailedError, open_pool
from .tiling import TilePlan, plan_tiles
from .tngd import TNGD, LevenbergMarquardt
from .tngd_core import TNGDCore, TNGDState

__all__ = ["Dense", "Diagonal", "Factored", "LinalgResult", "connect", "inverse", "solve",
           "TNGD", "TNGDCore", "TNGDState", "LevenbergMarquardt", "ExactNGD", "NGDCG", "SGD", "Adam",
           "DeviceSpec", "PoolConfig", "TiledDevice", "TileFailedError", "TilePlan", "open_pool", "plan_tiles"]
