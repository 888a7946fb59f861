"""Error codes and the typed exceptions that carry them.

Every failure a device can report has a stable string code. The code travels on the wire (the
reply's ``error.code``) and the client re-raises the matching exception class, so a host sees the
same exception type whether the device is in-process, behind a socket, or a real board.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable error codes; documented one by one in docs/protocol.md."""

    INVALID_INPUT = "invalid_input"  # generic malformed argument
    SHAPE_MISMATCH = "shape_mismatch"  # arrays whose shapes do not fit together
    NON_FINITE = "non_finite"  # NaN or Inf in an array or a scalar
    NOT_STABLE = "not_stable"  # drift not positive-stable / curvature not PSD
    CAPACITY = "capacity"  # dimension above the device's cell count or limits
    NOT_PROGRAMMED = "not_programmed"  # run before any program
    PROFILE = "profile"  # invalid profile / configuration key
    UNSUPPORTED = "unsupported"  # operation or drift form this device does not offer
    PROTOCOL = "protocol"  # malformed message, bad framing
    VERSION = "version"  # incompatible protocol version
    TOO_LARGE = "too_large"  # message or array over the configured limit
    UNKNOWN_OPERATION = "unknown_operation"
    UNKNOWN_SESSION = "unknown_session"
    STALE_REQUEST = "stale_request"  # sequence number older than the last one served
    BUSY = "busy"  # work queue full; retry later
    TIMEOUT = "timeout"  # no reply within the deadline (raised client-side)
    AUTH = "auth"  # the security handshake was refused (client-side)
    DEVICE_MISMATCH = "device_mismatch"  # a restarted daemon is another device (client-side)
    INTERNAL = "internal"  # a bug in the device; the daemon keeps serving


class DeviceError(Exception):
    """Base class of every error a Device raises; ``code`` is an ErrorCode."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidInputError(DeviceError, ValueError):
    code = ErrorCode.INVALID_INPUT


class ShapeError(InvalidInputError):
    code = ErrorCode.SHAPE_MISMATCH


class NonFiniteError(InvalidInputError):
    code = ErrorCode.NON_FINITE


class NotStableError(InvalidInputError):
    code = ErrorCode.NOT_STABLE


class CapacityError(InvalidInputError):
    code = ErrorCode.CAPACITY


class ProfileError(InvalidInputError):
    code = ErrorCode.PROFILE


class NotProgrammedError(DeviceError, RuntimeError):
    code = ErrorCode.NOT_PROGRAMMED


class UnsupportedError(DeviceError, NotImplementedError):
    code = ErrorCode.UNSUPPORTED


class ProtocolError(DeviceError):
    code = ErrorCode.PROTOCOL


class VersionError(ProtocolError):
    code = ErrorCode.VERSION


class TooLargeError(ProtocolError):
    code = ErrorCode.TOO_LARGE


class UnknownOperationError(ProtocolError):
    code = ErrorCode.UNKNOWN_OPERATION


class UnknownSessionError(DeviceError):
    code = ErrorCode.UNKNOWN_SESSION


class StaleRequestError(DeviceError):
    code = ErrorCode.STALE_REQUEST


class BusyError(DeviceError):
    code = ErrorCode.BUSY


class DeviceTimeoutError(DeviceError, TimeoutError):
    code = ErrorCode.TIMEOUT


class AuthenticationError(DeviceError, PermissionError):
    """The daemon refused the ZeroMQ security handshake (raised by the client: a refused peer gets
    no reply at all, so this code never travels in a reply)."""

    code = ErrorCode.AUTH



class DeviceMismatchError(DeviceError):
    """After a daemon restart, the daemon now at the address is not the device the session ran on
    (another backend, profile, chip or capabilities): restoring the analog state there would
    silently change the numbers. Raised by the client, never sent by the daemon; the user may opt
    in to adopting the new device (``DeviceClient(..., accept_other_device=True)``)."""

    code = ErrorCode.DEVICE_MISMATCH


class InternalError(DeviceError):
    code = ErrorCode.INTERNAL


_BY_CODE: dict[ErrorCode, type[DeviceError]] = {
    cls.code: cls
    for cls in (
        InvalidInputError, ShapeError, NonFiniteError, NotStableError, CapacityError, ProfileError,
        NotProgrammedError, UnsupportedError, ProtocolError, VersionError, TooLargeError,
        UnknownOperationError, UnknownSessionError, StaleRequestError, BusyError,
        DeviceTimeoutError, AuthenticationError, DeviceMismatchError, InternalError,
    )
}

# The sequence-number rule (docs/protocol.md section 5), by code alone: an error reply with one of
# these codes means the daemon refused the request before the device saw it, so its ``seq`` stays
# free (the corrected request may be sent again under the same ``seq``). Every other reply to a
# mutating request (ok, or an error the device raised on its content) uses the ``seq`` up and is
# what a retry of that ``seq`` gets. One rule a client can apply without knowing the daemon's code.
SEQ_FREE_CODES: frozenset[ErrorCode] = frozenset({
    ErrorCode.PROTOCOL, ErrorCode.VERSION, ErrorCode.TOO_LARGE, ErrorCode.UNKNOWN_OPERATION,
    ErrorCode.UNKNOWN_SESSION, ErrorCode.STALE_REQUEST, ErrorCode.BUSY,
})
# Codes the daemon never sends (the client raises them itself): the rule does not apply to them.
CLIENT_SIDE_CODES: frozenset[ErrorCode] = frozenset({ErrorCode.TIMEOUT, ErrorCode.AUTH,
                                                     ErrorCode.DEVICE_MISMATCH})


def error_class(code: ErrorCode | str) -> type[DeviceError]:
    """The exception class for a code; unknown codes map to DeviceError (forward compatible)."""
    try:
        return _BY_CODE[ErrorCode(code)]
    except ValueError:
        return DeviceError
