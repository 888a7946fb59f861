"""The digital side: connect to a device and train with TNGD.

``connect(address, seed)`` returns a ``protocol.Device``; the drift descriptions are re-exported.
"""

from protocol.drift import Dense, Diagonal, Factored

from .connect import connect
from .linalg import LinalgResult, inverse, solve

__all__ = ["Dense", "Diagonal", "Factored", "LinalgResult", "connect", "inverse", "solve"]
