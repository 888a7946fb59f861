"""The wire and the seam: drift descriptions, error codes, and the Device interface.

This package imports nothing of ``thermo_device`` or ``host``; both depend on it.
"""

from .capabilities import BACKEND_INTERFACE_VERSION, Capabilities
from .device import Device, DeviceSnapshot, RunResult
from .drift import DRIFT_FORMS, Dense, Diagonal, Drift, Factored, drift_form, drift_matvec
from .errors import (
    AuthenticationError,
    BusyError,
    CapacityError,
    DeviceError,
    DeviceMismatchError,
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
from .run_args import MAX_RETURNED_SAMPLES, check_run_args

__all__ = [
    "DRIFT_FORMS", "CapacityError", "Dense", "Device", "DeviceError", "Diagonal", "Drift",
    "ErrorCode", "Factored", "InvalidInputError", "NonFiniteError", "NotProgrammedError",
    "NotStableError", "ProfileError", "RunResult", "DeviceSnapshot", "ShapeError", "UnsupportedError",
    "drift_form", "drift_matvec", "BACKEND_INTERFACE_VERSION", "Capabilities",
    "MAX_RETURNED_SAMPLES", "check_run_args",
    # the wire (protocol.codec holds the codec; it imports pyzmq, so it is not imported here)
    "PROTOCOL_VERSION", "AuthenticationError", "BusyError", "DeviceMismatchError", "DeviceTimeoutError", "Limits", "Op", "ProtocolError",
    "StaleRequestError", "TooLargeError", "UnknownOperationError", "UnknownSessionError", "VersionError",
]
