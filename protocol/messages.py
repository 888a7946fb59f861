"""The wire vocabulary: protocol version, operations, header fields, limits.

docs/protocol.md is the contract; ``tests/test_protocol_doc.py`` checks that it names exactly the
operations, fields and error codes defined here, and the same version.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

PROTOCOL_NAME = "thermo-ngd"
# (major, minor): a different major is refused; a different minor is accepted and unknown fields
# are ignored, so compatible additions bump only the minor.
PROTOCOL_VERSION: tuple[int, int] = (1, 2)

# Optional capabilities negotiated in ``hello`` (the daemon replies with the intersection).
FEATURES: tuple[str, ...] = ("seq_replay", "restart_detect")

# Array dtypes allowed on the wire (NumPy typestrs; little-endian only).
WIRE_DTYPES: tuple[str, ...] = ("<f4", "<f8", "<i4", "<i8")


class Op(StrEnum):
    """Operations, by wire name."""

    HELLO = "hello"
    INFO = "info"
    OPEN_SESSION = "open_session"
    CLOSE_SESSION = "close_session"
    PROGRAM = "program"
    RUN = "run"
    STEP = "step"
    GET_STATE = "get_state"
    SET_STATE = "set_state"
    CALIBRATE = "calibrate"
    SNAPSHOT = "snapshot"
    RESTORE = "restore"
    STATUS = "status"
    PING = "ping"


@dataclass(frozen=True)
class OpSpec:
    """What an operation takes and returns (names only; docs/protocol.md gives the meaning).

    ``session``: needs a session id and a sequence number (replayed on retry).
    ``control``: answered by the daemon's I/O path, never queued behind a compute job.
    ``ANY_ARRAYS`` in ``arrays``: the backend names the arrays (snapshots).
    """

    args: tuple[str, ...]
    arrays: tuple[str, ...]
    result: tuple[str, ...]
    result_arrays: tuple[str, ...] = ()
    session: bool = True
    control: bool = False


ANY_ARRAYS = "*"
_DRIFT_ARRAYS = ("matrix", "J", "H", "diag", "bias")
_RUN_ARGS = ("duration", "burn_in", "delay", "reset", "samples", "second_moment")
_RUN_RESULT = ("analog_time_s", "diagnostics")
_RUN_ARRAYS = ("mean", "state", "samples", "second_moment")

OPS: dict[Op, OpSpec] = {
    Op.HELLO: OpSpec(("features", "client"), (),
                     ("protocol", "instance", "features", "ops", "limits", "backend", "versions"),
                     session=False, control=True),
    Op.INFO: OpSpec((), (), ("info",), session=True, control=True),
    Op.OPEN_SESSION: OpSpec(("seed",), (), ("session", "info"), control=True),
    Op.CLOSE_SESSION: OpSpec((), (), ("closed",), control=True),
    Op.PROGRAM: OpSpec(("drift",), _DRIFT_ARRAYS, ()),
    Op.RUN: OpSpec(_RUN_ARGS, (), _RUN_RESULT, _RUN_ARRAYS),
    Op.STEP: OpSpec(("drift", *_RUN_ARGS), _DRIFT_ARRAYS, _RUN_RESULT, _RUN_ARRAYS),
    Op.GET_STATE: OpSpec((), (), (), ("state",)),
    Op.SET_STATE: OpSpec((), ("state",), ()),
    Op.CALIBRATE: OpSpec((), (), ("calibration",)),
    Op.SNAPSHOT: OpSpec((), (), ("snapshot",), (ANY_ARRAYS,)),
    Op.RESTORE: OpSpec(("snapshot",), (ANY_ARRAYS,), ()),
    Op.STATUS: OpSpec((), (), ("instance", "uptime_s", "sessions", "queued", "running", "served",
                               "errors", "session_status"), session=False, control=True),
    Op.PING: OpSpec((), (), ("pong", "time_ns"), session=False, control=True),
}

# Header keys. Requests: proto, version, op, id, session, seq, args, arrays.
# Replies add status, instance, result, error, timing (and echo op, id, session, seq).
REQUEST_FIELDS: tuple[str, ...] = ("proto", "version", "op", "id", "session", "seq", "args", "arrays")
REPLY_FIELDS: tuple[str, ...] = ("proto", "version", "op", "id", "session", "seq", "status", "instance",
                                 "result", "error", "timing", "arrays")
ARRAY_FIELDS: tuple[str, ...] = ("name", "frame", "dtype", "shape")
DRIFT_FIELDS: tuple[str, ...] = ("form", "damping")
STATUS_OK = "ok"
STATUS_ERROR = "error"


@dataclass(frozen=True)
class Limits:
    """Limits a daemon enforces before allocating anything (all advertised in ``hello``)."""

    max_message_bytes: int = 512 * 1024 * 1024  # all frames of one message together
    max_header_bytes: int = 64 * 1024
    max_arrays: int = 32  # a snapshot carries both programs, the state and calibrations
    max_ndim: int = 3
    max_dimension: int = 1 << 24  # any single axis
    max_sessions: int = 64
    queue_size: int = 16  # compute jobs waiting behind the running one; more get "busy"
    session_idle_s: float = 3600.0  # an idle session is reclaimed after this long (0: never)

    def as_dict(self) -> dict[str, int | float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}
