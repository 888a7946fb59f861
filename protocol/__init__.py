"""The wire and the seam: drift descriptions, error codes, and the Device interface.

This package imports nothing of ``thermo_device`` or ``host``; both depend on it.
"""

from .device import Device, RunResult
from .drift import DRIFT_FORMS, Dense, Diagonal, Drift, Factored, drift_form, drift_matvec
from .errors import (
    BusyError,
    CapacityError,
    DeviceError,
    DeviceTimeoutError,
    ErrorCode,
    InvalidInputError,
    NonFiniteError,
    NotProgrammedError,
    NotStableError,
    ProfileError,
    ProtocolError,
    ShapeError,
    StaleRequestError,
    TooLargeError,
    UnknownOperationError,
    UnknownSessionError,
    UnsupportedError,
    VersionError,
)
from .messages import PROTOCOL_VERSION, Limits, Op

__all__ = [
    "DRIFT_FORMS", "CapacityError", "Dense", "Device", "DeviceError", "Diagonal", "Drift",
    "ErrorCode", "Factored", "InvalidInputError", "NonFiniteError", "NotProgrammedError",
    "NotStableError", "ProfileError", "RunResult", "ShapeError", "UnsupportedError",
    "drift_form", "drift_matvec",
    # the wire (protocol.codec holds the codec; it imports pyzmq, so it is not imported here)
    "PROTOCOL_VERSION", "BusyError", "DeviceTimeoutError", "Limits", "Op", "ProtocolError",
    "StaleRequestError", "TooLargeError", "UnknownOperationError", "UnknownSessionError", "VersionError",
]
