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
PROTOCOL_VERSION: tuple[int, int] = (1, 3)

# Optional capabilities negotiated in ``hello`` (the daemon replies with the intersection).
FEATURES: tuple[str, ...] = ("seq_replay", "restart_detect", "lease", "upload")

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
    UPLOAD = "upload"


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
    Op.OPEN_SESSION: OpSpec(("seed", "lease_s"), (), ("session", "info", "lease_s"), control=True),
    Op.CLOSE_SESSION: OpSpec((), (), ("closed",), control=True),
    Op.PROGRAM: OpSpec(("drift", "staged"), _DRIFT_ARRAYS, ()),
    Op.RUN: OpSpec(_RUN_ARGS, (), _RUN_RESULT, _RUN_ARRAYS),
    Op.STEP: OpSpec(("drift", "staged", *_RUN_ARGS), _DRIFT_ARRAYS, _RUN_RESULT, _RUN_ARRAYS),
    Op.GET_STATE: OpSpec((), (), (), ("state",)),
    Op.SET_STATE: OpSpec((), ("state",), ()),
    Op.CALIBRATE: OpSpec((), (), ("calibration",)),
    Op.SNAPSHOT: OpSpec((), (), ("snapshot",), (ANY_ARRAYS,)),
    Op.RESTORE: OpSpec(("snapshot",), (ANY_ARRAYS,), ()),
    Op.STATUS: OpSpec((), (), ("instance", "uptime_s", "sessions", "queued", "running", "served",
                               "errors", "memory", "connections", "session_status"), session=False,
                     control=True),
    Op.PING: OpSpec((), (), ("pong", "time_ns", "lease"), session=False, control=True),
    # a row block of a large drift array, checked and written in place on arrival (no seq: writing
    # the same rows again is harmless); program/step then name it in ``staged``
    Op.UPLOAD: OpSpec(("name", "dtype", "shape", "offset"), ("block",), ("received", "complete"), control=True),
}

# Header keys. Requests: proto, version, op, id, session, seq, args, arrays.
# Replies add status, instance, result, error, timing (and echo op, id, session, seq).
REQUEST_FIELDS: tuple[str, ...] = ("proto", "version", "op", "id", "session", "seq", "args", "arrays")
REPLY_FIELDS: tuple[str, ...] = ("proto", "version", "op", "id", "session", "seq", "status", "instance",
                                 "result", "error", "timing", "arrays")
ARRAY_FIELDS: tuple[str, ...] = ("name", "frame", "dtype", "shape")
DRIFT_FIELDS: tuple[str, ...] = ("form", "damping")
# Arrays a client may upload in row blocks (``upload``) and then name in program/step ``staged``.
UPLOADABLE: tuple[str, ...] = _DRIFT_ARRAYS

# Budget charges (docs/security.md, "worst-case memory"): a session's fixed cost (backend object,
# its info, the tables) and the multiple of a program's array bytes a session keeps.
SESSION_CHARGE_BYTES = 1 << 20
PROGRAM_FACTOR = 5
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
    # A reply larger than this is not kept for replay (64 sessions x a 512 MiB reply would pin
    # 32 GiB); a retry of it is told so (stale_request) instead of getting it again.
    replay_cache_bytes: int = 1 << 20
    # One budget for what the daemon keeps on behalf of clients: sessions (a fixed charge each),
    # their programs (PROGRAM_FACTOR x the program's array bytes: current and previous programs
    # and their realised copies), replay caches and the compute requests in flight. What would
    # exceed it is refused with ``capacity`` before anything is allocated (docs/security.md).
    memory_budget_bytes: int = 4 << 30
    # A connection that sends nothing for this long while the daemon waits for it (ZMTP heartbeat
    # unanswered: a stalled partial frame, a dead peer) is dropped, and its buffers freed.
    stall_timeout_s: float = 15.0
    # A connection must finish the ZeroMQ (and CURVE) handshake within this time.
    handshake_timeout_s: float = 5.0
    # Connections held at once (each client has two: requests and heartbeats); a handshake beyond
    # it is refused (the client reports ``auth``). Bounds C in docs/security.md's formula.
    max_connections: int = 1024

    def as_dict(self) -> dict[str, int | float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}
