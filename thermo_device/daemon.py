"""The device daemon: serves any ``protocol.Device`` backend over a ZeroMQ ROUTER socket.

Threads and the one socket:

* The main thread owns the ROUTER. It receives, answers control operations (hello, info, ping,
  status, open/close session) at once, and runs compute operations (program, run, step, state,
  calibrate) itself, inline: a small ``step`` then costs no thread hand-off, which on a 2-core
  machine would cost more than the whole protocol (about 90 us per round trip, measured).
* A control thread watches for compute jobs that last longer than ``grace_s``. While one does, it
  borrows the socket (under ``_sock_lock``; the lock is the memory barrier ZeroMQ asks for when a
  socket changes threads) and keeps answering control operations, queueing compute requests in a
  bounded queue and answering ``busy`` when it is full. So ping/status/close never wait behind a
  long run, and short work pays nothing for that guarantee.

Every failure becomes an error reply; no input can stop the loop. See docs/protocol.md.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from protocol.codec import (
    check_request,
    decode,
    drift_from_wire,
    encode,
    plain,
    reply_header,
    result_to_wire,
    send,
    with_request_id,
)
from protocol.device import Device, DeviceSnapshot
from protocol.drift import all_finite, mark_finite
from protocol.errors import (
    SEQ_FREE_CODES,
    BusyError,
    CapacityError,
    DeviceError,
    InternalError,
    InvalidInputError,
    NonFiniteError,
    ProtocolError,
    ShapeError,
    StaleRequestError,
    TooLargeError,
    UnknownOperationError,
    UnknownSessionError,
)
from protocol.messages import (
    ANY_ARRAYS,
    FEATURES,
    OPS,
    PROGRAM_FACTOR,
    PROTOCOL_VERSION,
    SESSION_CHARGE_BYTES,
    UPLOADABLE,
    WIRE_DTYPES,
    Limits,
    Op,
)
from protocol.run_args import run_args_from_wire

from .security import CappedAuthenticator, ServerSecurity, check_remote_bind_allowed, start_connection_cap
from .session import Job, Session, SessionTable, Staged

log = logging.getLogger("thermo_device.daemon")

BackendFactory = Callable[[int], Device]
MUTATING = frozenset({Op.OPEN_SESSION, Op.CLOSE_SESSION, Op.PROGRAM, Op.RUN, Op.STEP, Op.SET_STATE,
                      Op.CALIBRATE, Op.RESTORE})
MUTATING_NAMES = frozenset(o.value for o in MUTATING)
# Hot path: a dict lookup, not Op(name) (an enum construction raises on a miss, ~1 us more).
_OP_BY_NAME: dict[str, Op] = {o.value: o for o in Op}
_SESSIONLESS = frozenset({Op.HELLO, Op.PING, Op.STATUS, Op.OPEN_SESSION})
_ARRAY_NAMES: dict[Op, frozenset[str] | None] = {
    op: None if ANY_ARRAYS in spec.arrays else frozenset(spec.arrays) for op, spec in OPS.items()}
REAP_INTERVAL_S = 0.5
RCVHWM = 16  # messages queued per peer, in each direction below
SNDHWM = 64
_PROGRAMMING = frozenset({Op.PROGRAM, Op.STEP, Op.RESTORE})
_STAGING = frozenset({Op.PROGRAM, Op.STEP})  # may name uploaded arrays in args.staged
_WIRE_DTYPES = {s: np.dtype(s) for s in WIRE_DTYPES}


def check_bind(address: str, allow_remote: bool = False, authenticated: bool = False) -> None:
    """Refuse a non-loopback TCP bind without CURVE (``authenticated``) unless ``allow_remote``."""
    if not address.startswith("tcp://"):
        if not address.startswith(("ipc://", "inproc://")):
            raise InvalidInputError(f"bind address must be tcp://, ipc:// or inproc://, got {address!r}")
        return
    host = address[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    why = check_remote_bind_allowed(loopback, allow_remote, authenticated)
    if why is not None:
        raise InvalidInputError(f"refusing to bind {address}: {why}")


class Daemon:
    """Serve ``backend_factory(seed)`` devices, one per session, on ``bind``.

    Args:
        backend_factory: builds a fresh backend for a session from its noise seed.
        bind: ZeroMQ endpoint ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:*", "ipc:///path").
        limits: message, dimension, session and queue limits (advertised in ``hello``).
        describe: the backend description sent in ``hello`` (default: a fresh backend's info()).
        grace_s: how long a compute job runs before the control thread takes over the socket.
        linger_ms: bound on how long unsent replies delay shutdown.
        security: CURVE server keys and client allow-list (None: plaintext, no authentication).
    """

    def __init__(self, backend_factory: BackendFactory, bind: str, *, limits: Limits | None = None,
                 describe: dict[str, Any] | None = None, grace_s: float = 0.01,
                 linger_ms: int = 1000, security: ServerSecurity | None = None) -> None:
        self.factory = backend_factory
        self.bind = bind
        self.limits = limits or Limits()
        self.instance = uuid.uuid4().hex
        self.grace_s = grace_s
        self.linger_ms = linger_ms
        if describe is None:
            probe = backend_factory(0)
            describe = probe.info()
            probe.close()
        self.describe = describe
        self.endpoint = ""
        self.sessions = SessionTable(self.limits.max_sessions)
        self.queue: collections.deque[Job] = collections.deque()
        self.served = 0
        self.errors = 0
        # The memory budget (Limits.memory_budget_bytes): sessions, programs and replay caches
        # (budget_used) plus the frames of compute requests queued or running (in_flight).
        self.budget_used = 0
        self.in_flight = 0
        self.fd_limit = 0  # the open-file limit, raised at start()
        self.connections = 0  # accepted and not yet disconnected (the socket monitor's count)
        self._monitor: zmq.Socket | None = None
        self._monitor_lock = threading.Lock()  # the control and ZAP threads both read the monitor
        self._cap_auth: CappedAuthenticator | None = None
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._sock_lock = threading.Lock()
        self._running: tuple[Job, float] | None = None
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self.security = security

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> str:
        """Create and bind the socket; returns the bound endpoint (a '*' port resolved)."""
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable replies raise instead of vanishing
        sock.setsockopt(zmq.RCVHWM, RCVHWM)  # per peer, in messages (docs/security.md's formula)
        sock.setsockopt(zmq.SNDHWM, SNDHWM)
        sock.setsockopt(zmq.LINGER, self.linger_ms)
        # Hard memory guard checked by libzmq on each frame's length before allocating it; the
        # documented limit is enforced below it with an error reply.
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes + self.limits.max_header_bytes)
        # a peer must finish the ZeroMQ (and CURVE) handshake in time: port scanners and stalled
        # handshakes do not hold a connection (and its buffers) for long
        sock.setsockopt(zmq.HANDSHAKE_IVL, max(1, int(self.limits.handshake_timeout_s * 1000)))
        # ZMTP heartbeats: a peer that answers no PING within stall_timeout_s (a stalled partial
        # frame, a dead host) is dropped and the partial message freed; libzmq peers answer PINGs
        # from their I/O thread, so a busy honest client is never dropped
        stall_ms = max(1, int(self.limits.stall_timeout_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, stall_ms // 2))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, stall_ms)
        sock.setsockopt(zmq.RCVTIMEO, 100)  # the main loop wakes up to notice stop() and idle sessions
        # before bind: no handshake may precede the ZAP handler (which also enforces the cap)
        if self.security is not None:
            self.security.apply(self._ctx, sock, admit=self._admit)
        else:
            self._cap_auth = start_connection_cap(self._ctx, sock, self._admit)
        self._monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        sock.bind(self.bind)
        self._sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.fd_limit = _raise_fd_limit()
        log.info("event=start endpoint=%s instance=%s max_message_bytes=%d max_connections=%d fd_limit=%d",
                 self.endpoint, self.instance, self.limits.max_message_bytes, self.limits.max_connections,
                 self.fd_limit)
        return self.endpoint

    def stop(self) -> None:
        """Ask the loop to finish (signal-safe: only sets a flag)."""
        self._stop.set()

    def serve(self) -> None:
        """Run until ``stop()``; then close every session and the socket."""
        if self._sock is None:
            self.start()
        control = threading.Thread(target=self._control_loop, name="control", daemon=True)
        control.start()
        try:
            self._main_loop()
        finally:
            self._stop.set()
            control.join(timeout=2.0)
            for s in list(self.sessions.open.values()):
                self._close_backend(s)
            assert self._sock is not None and self._ctx is not None
            self._sock.close(linger=self.linger_ms)
            if self.security is not None:
                self.security.stop()  # its ZAP socket would otherwise block ctx.term()
            if self._cap_auth is not None:
                self._cap_auth.stop()
            with self._monitor_lock:
                if self._monitor is not None:
                    self._monitor.close(linger=0)
                    self._monitor = None
            self._ctx.term()
            log.info("event=stop instance=%s served=%d errors=%d", self.instance, self.served, self.errors)

    def _main_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        next_reap = 0.0
        while not self._stop.is_set():
            if self.queue:
                self._execute(self.queue.popleft())
                continue
            with self._sock_lock:
                now = time.monotonic()
                if now >= next_reap:  # leases expire under traffic too, not only when idle
                    self._reap_idle()
                    next_reap = now + REAP_INTERVAL_S
                try:  # RCVTIMEO (one call) rather than poll + recv (two) on the hot path
                    frames = sock.recv_multipart(copy=False)
                except zmq.Again:
                    continue
                job = self._accept(frames, queue_compute=False)
            if job is not None:
                self._execute(job)

    def _control_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        tick = min(self.grace_s / 2, 0.005)
        while not self._stop.wait(tick):
            self._count_connections()
            running = self._running
            if running is None or time.monotonic() - running[1] < self.grace_s:
                continue
            while self._running is running and not self._stop.is_set():
                with self._sock_lock:
                    if self._running is not running:
                        break
                    if sock.poll(2):
                        self._accept(sock.recv_multipart(copy=False), queue_compute=True)

    def _count_connections(self) -> None:
        """Follow the socket monitor: connections accepted minus dropped. Called by the control
        thread (to keep ``status`` current) and the ZAP thread (before each verdict), under a lock
        (the full memory barrier ZeroMQ asks for when a socket is used from two threads)."""
        with self._monitor_lock:
            mon = self._monitor
            if mon is None:
                return
            try:
                while mon.poll(0):
                    event = recv_monitor_message(mon)
                    if event["event"] == zmq.EVENT_ACCEPTED:
                        self.connections += 1
                    elif event["event"] == zmq.EVENT_DISCONNECTED:
                        self.connections = max(0, self.connections - 1)
            except zmq.ZMQError:  # closed at shutdown
                pass

    def _admit(self) -> bool:
        """The connection cap, asked by the ZAP thread for each handshake. The connection being
        handshaken is already counted: libzmq queues its ACCEPTED event before the handshake."""
        self._count_connections()
        return self.connections <= self.limits.max_connections

    # -- receiving ----------------------------------------------------------------------------------

    def _accept(self, frames: list[zmq.Frame], *, queue_compute: bool) -> Job | None:
        """Parse a request; answer it now, or return (main) / enqueue (control) a compute job.

        Called with ``_sock_lock`` held. The sequence-number rule (docs/protocol.md section 5):
        once a mutating request's ``seq`` has passed the replay/stale checks, an error reply whose
        code is not in ``SEQ_FREE_CODES`` uses the ``seq`` up (it is cached for a retry), wherever
        in the daemon it was raised; a refusal (``SEQ_FREE_CODES``) leaves it free.
        """
        received = time.perf_counter_ns()
        identity, body = frames[:1], frames[1:]
        header: dict[str, Any] | None = None
        seq_session: Session | None = None  # set once the seq is known to be new
        op: Op | None = None
        seq: int | None = None
        try:
            msg = decode(body, self.limits)
            header = msg.header
            op_name, req_id, session_id, seq, args = check_request(header)
            op = _OP_BY_NAME.get(op_name)
            if op is None:
                raise UnknownOperationError(f"unknown operation {op_name!r} "
                                            f"(known: {', '.join(o.value for o in Op)})")
            mutating = op in MUTATING
            if mutating and seq is None:
                raise ProtocolError(f"{op.value} needs a sequence number (seq)")
            owner = self._peer_key(body) if self.security is not None else ""
            if op in _SESSIONLESS:  # hello, ping, status, open_session: no seq can be used up
                _check_array_names(op, msg.arrays)
                self._control(op, identity, header, session_id, seq, args, owner)
                return None
            # another key's session looks exactly like no session: ids reveal nothing
            session = self.sessions.get(session_id, owner)
            if session is None:
                if op is Op.CLOSE_SESSION:
                    remembered = self.sessions.closed_reply(session_id, owner)
                    if remembered is not None and remembered[0] == seq:  # a retried close
                        self._send(identity, with_request_id(remembered[1], req_id))
                        return None
                raise UnknownSessionError(f"no open session {_short(session_id)} on daemon {self.instance}")
            session.last_used = time.monotonic()  # any request naming a session renews its lease
            if mutating:
                assert seq is not None
                pending = session.pending
                if pending is not None and pending.seq == seq and pending.op == op.value:
                    # a retry of the running request, perhaps from a new socket or under a new
                    # id: the one reply goes there, under that id
                    pending.identity = identity
                    pending.header = {**pending.header, "id": req_id}
                    return None
                if seq == session.last_seq and session.last_reply is not None:
                    if op.value != session.last_op:
                        raise StaleRequestError(f"seq {seq} was already used by {session.last_op} "
                                                f"in session {_short(session_id)}")
                    if not session.last_reply:
                        raise StaleRequestError(
                            f"seq {seq} ({op.value}) ran, but its reply was over replay_cache_bytes = "
                            f"{self.limits.replay_cache_bytes} and is not kept for a retry")
                    self._send(identity, with_request_id(session.last_reply, req_id))  # never run twice
                    return None
                if seq <= session.last_seq:
                    raise StaleRequestError(f"seq {seq} is older than the last one served "
                                            f"({session.last_seq}) in session {_short(session_id)}")
                if op is not Op.CLOSE_SESSION and session.pending is not None:
                    raise BusyError(f"session {_short(session_id)} already has a request in progress")
                seq_session = session
            _check_array_names(op, msg.arrays)
            if op is Op.UPLOAD:
                self._upload(identity, header, session, args, msg.arrays)
                return None
            if op is Op.INFO:
                # fresh when the backend is idle (temperature, calibrations change); while a job
                # runs on it, the last snapshot (a backend need not be thread-safe)
                if session.pending is None:
                    session.info = session.backend.info()
                self._reply(identity, header, plain({"info": session.info}))
                return None
            if op is Op.CLOSE_SESSION:
                self._close(identity, header, session, seq)
                return None
            if session.pending is not None:  # read-only compute operations
                raise BusyError(f"session {_short(session_id)} already has a request in progress")
            if queue_compute and len(self.queue) >= self.limits.queue_size:  # before any staged
                # array is taken: a busy request changed nothing and may be resent as it is
                raise BusyError(f"work queue full ({self.limits.queue_size} waiting); retry later")
            arrays = msg.arrays
            nbytes = _frames_bytes(body)
            staged = args.get("staged") if op in _STAGING else None
            if staged is not None:
                arrays, moved = self._take_staged(op, session, staged, arrays)
                nbytes += moved
            raw = nbytes - len(body[0]) if op in _PROGRAMMING else 0
            # the device keeps this program and the one before it (the delay runs under it)
            charge = PROGRAM_FACTOR * max(raw, session.program_raw) if raw else session.program_bytes
            self._check_budget(nbytes + max(0, charge - session.program_bytes), op.value)
            job = Job(identity, header, arrays, op.value, args, session, seq, received, nbytes, charge, raw)
            self.in_flight += nbytes  # returned when the job ends (_execute)
            session.pending = job
            if queue_compute:
                self.queue.append(job)
                return None
            return job
        except DeviceError as exc:
            frames_out = self._reply(identity, header or getattr(exc, "header", None), error=exc)
            if seq_session is not None and op is not None and exc.code not in SEQ_FREE_CODES:
                self._remember(seq_session, seq, op.value, frames_out)
        except Exception as exc:  # a bug, not bad input; keep serving
            log.exception("event=internal_error")
            frames_out = self._reply(identity, header, error=InternalError(f"{type(exc).__name__}: {exc}"))
            if seq_session is not None and op is not None:
                self._remember(seq_session, seq, op.value, frames_out)
        return None

    def _remember(self, session: Session, seq: int | None, op: str, frames: list[Any]) -> None:
        """Cache ``frames`` as the reply to ``seq`` (the replay a retry gets); a reply over
        ``replay_cache_bytes`` is not pinned: ``[]`` marks that it ran and was dropped."""
        if seq is None or seq < session.last_seq:
            return  # a late job of a lower seq (a close overtook it): keep the newer reply
        size = _frames_bytes(frames)
        keep = size <= self.limits.replay_cache_bytes
        session.last_seq, session.last_op = seq, op
        session.last_reply = frames if keep else []
        new = size if keep else 0
        if not session.closed:  # a closed session's charges were already returned
            self.budget_used += new - session.reply_bytes
        session.reply_bytes = new

    def _check_budget(self, extra: int, what: str) -> None:
        """Refuse (``capacity``) what would take the daemon over its memory budget."""
        budget = self.limits.memory_budget_bytes
        if self.budget_used + self.in_flight + extra > budget:
            raise CapacityError(f"{what} needs {extra} more bytes; the daemon's memory budget "
                                f"({budget} bytes) has {max(0, budget - self.budget_used - self.in_flight)} "
                                "left: close sessions or send less (the daemon's limit memory_budget_bytes)")

    def _forget(self, session: Session, seq: int, reply: list[Any]) -> None:
        """Remove a session from the table and return its charges to the budget."""
        if not session.closed:
            self.budget_used -= (SESSION_CHARGE_BYTES + session.program_bytes + session.reply_bytes
                                 + session.staged_bytes)
            session.staged.clear()
        self.sessions.remove(session, seq, reply)

    def _upload(self, identity: list[Any], header: dict[str, Any], session: Session, args: dict[str, Any],
                arrays: dict[str, np.ndarray]) -> None:
        """One row block of an array for a later program/step (docs/protocol.md, ``upload``):
        checked (limits, dtype, shape, NaN/Inf) and written in place on arrival, so the scan of
        block i overlaps the transfer of block i + 1 and no message is larger than a block."""
        name, typestr, shape, offset = args.get("name"), args.get("dtype"), args.get("shape"), args.get("offset")
        if not isinstance(name, str) or name not in UPLOADABLE:
            raise InvalidInputError(f"upload: name must be one of {', '.join(UPLOADABLE)}, got {str(name)[:40]!r}")
        dt = _WIRE_DTYPES.get(typestr) if isinstance(typestr, str) else None
        if dt is None:
            raise InvalidInputError(f"upload {name}: dtype must be one of {', '.join(WIRE_DTYPES)}, got {typestr!r}")
        if (type(shape) is not list or not 1 <= len(shape) <= self.limits.max_ndim
                or any(type(n) is not int or n < 1 for n in shape)):
            raise InvalidInputError(f"upload {name}: shape must be 1 to {self.limits.max_ndim} positive "
                                    f"integers, got {str(shape)[:80]}")
        if max(shape) > self.limits.max_dimension:
            raise TooLargeError(f"upload {name}: shape {shape} has an axis above max_dimension "
                                f"{self.limits.max_dimension}")
        if type(offset) is not int or offset < 0:
            raise InvalidInputError(f"upload {name}: offset must be a non-negative integer, got {offset!r}")
        block = arrays.get("block")
        if block is None:
            raise InvalidInputError(f"upload {name}: needs the array 'block'")
        k = block.shape[0] if block.ndim else 0
        if (block.dtype != dt or block.ndim != len(shape) or tuple(block.shape[1:]) != tuple(shape[1:])
                or k < 1 or offset + k > shape[0]):
            raise ShapeError(f"upload {name}: block {block.dtype.str} {list(block.shape)} at row {offset} "
                             f"does not fit {typestr} {shape}")
        if dt.kind == "f" and not all_finite(block):
            raise NonFiniteError(f"upload {name}: rows {offset} to {offset + k - 1} contain NaN or Inf")
        st = session.staged.get(name)
        if st is None or st.array.dtype != dt or list(st.array.shape) != shape:
            old = st.array.nbytes if st is not None else 0
            need = math.prod(shape) * dt.itemsize
            self._check_budget(need - old, f"upload of {name}")
            st = Staged(np.empty(shape, dt), np.zeros(shape[0], dtype=bool))
            session.staged[name] = st
            self.budget_used += need - old
        rows = st.rows[offset:offset + k]
        st.received += k - int(np.count_nonzero(rows))
        rows[:] = True
        st.array[offset:offset + k] = block
        self._reply(identity, header, {"received": st.received, "complete": st.complete})

    def _take_staged(self, op: Op, session: Session, names: Any,
                     arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """The request's arrays plus the complete uploads it names (which leave the staging area:
        the request owns them now). Returns them and their bytes (now in flight, not staged)."""
        allowed = _ARRAY_NAMES[op] or frozenset()
        if type(names) is not list or not all(type(n) is str for n in names) or len(set(names)) != len(names):
            raise InvalidInputError(f"{op.value}: staged must be a list of distinct array names")
        taken: dict[str, Staged] = {}
        for n in names:
            st = session.staged.get(n)
            if n not in allowed or n in arrays:
                raise InvalidInputError(f"{op.value}: staged array {n[:40]!r} is not one this operation takes "
                                        "or is also sent as a frame")
            if st is None or not st.complete:
                got = 0 if st is None else st.received
                rows = "?" if st is None else st.array.shape[0]
                raise InvalidInputError(f"{op.value}: staged array {n!r} is not uploaded completely "
                                        f"({got} of {rows} rows); upload it first")
            taken[n] = st
        out = dict(arrays)
        moved = 0
        for n, st in taken.items():
            del session.staged[n]
            mark_finite(st.array)  # every block was scanned on arrival: the drift need not rescan
            out[n] = st.array
            moved += st.array.nbytes
        self.budget_used -= moved  # from the staging area to the request (in flight)
        return out, moved

    def _control(self, op: Op, identity: list[Any], header: dict[str, Any], session_id: str | None,
                 seq: int | None, args: dict[str, Any], owner: str) -> None:
        """hello, ping, status and open_session: answered at once, no session needed."""
        if op is Op.PING:
            mine = self.sessions.get(session_id, owner)
            if mine is not None:  # the client's heartbeat: it keeps the session's lease
                mine.last_used = time.monotonic()
            self._reply(identity, header, {"pong": True, "time_ns": time.time_ns(), "lease": mine is not None})
        elif op is Op.HELLO:
            self._reply(identity, header, self._hello(args))
        elif op is Op.STATUS:
            mine = self.sessions.get(session_id, owner)
            if mine is not None:
                mine.last_used = time.monotonic()
            self._reply(identity, header, self._status(mine))
        else:
            self._open(identity, header, session_id, seq, args, owner)

    # -- control operations -------------------------------------------------------------------------

    def _hello(self, args: dict[str, Any]) -> dict[str, Any]:
        wanted = args.get("features", [])
        wanted = wanted if isinstance(wanted, list) else []
        log.info("event=hello client=%s", str(args.get("client", "?"))[:80])
        return plain({
            "protocol": list(PROTOCOL_VERSION),
            "instance": self.instance,
            "features": [f for f in FEATURES if f in wanted],
            "ops": [o.value for o in Op],
            "limits": self.limits.as_dict(),
            "backend": self.describe,
            "versions": {"pyzmq": zmq.pyzmq_version(), "libzmq": zmq.zmq_version(),
                         "msgpack": ".".join(map(str, msgpack.version)), "numpy": np.__version__},
        })

    def _status(self, session: Session | None) -> dict[str, Any]:
        running = self._running
        return plain({
            "instance": self.instance,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "sessions": len(self.sessions),
            "queued": len(self.queue),
            "running": None if running is None else {
                "op": running[0].op, "elapsed_s": round(time.monotonic() - running[1], 6)},
            "served": self.served,
            "errors": self.errors,
            "memory": {"budget": self.limits.memory_budget_bytes, "used": self.budget_used,
                       "in_flight": self.in_flight},
            "connections": self.connections,
            "session_status": None if session is None else {**session.status(), "backend": self._backend_status(session)},
        })

    def _peer_key(self, body: list[Any]) -> str:
        """The CURVE public key (Z85) ZAP authenticated for this connection; "" without CURVE.

        Without CURVE there is no user id to read, and asking pyzmq for one raises: skip it, since
        every session request passes here (the hot path).
        """
        if self.security is None:
            return ""
        try:
            return body[0].get("User-Id") or ""
        except (zmq.ZMQError, AttributeError, IndexError):
            return ""

    def _backend_status(self, session: Session) -> dict[str, Any] | None:
        """The backend's own health, when it is idle (a backend need not be thread-safe)."""
        if session.pending is not None:
            return None
        try:
            return plain(session.backend.status())
        except Exception as exc:  # a backend bug must not break the control path
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _open(self, identity: list[Any], header: dict[str, Any], session_id: str | None,
              seq: int | None, args: dict[str, Any], owner: str) -> None:
        if session_id is None:
            raise InvalidInputError("open_session needs a session id chosen by the client")
        existing = self.sessions.get(session_id, owner)  # this key's sessions only (no oracle)
        seed = args.get("seed")
        seed = 0 if seed is None else seed
        if existing is not None:
            if (seq == 0 and existing.last_seq == 0 and seed == existing.seed
                    and existing.last_reply is not None):
                self._send(identity, with_request_id(existing.last_reply, header["id"]))  # a retried open
                return None
            raise InvalidInputError(f"session {_short(session_id)} is already open")
        if len(self.sessions) >= self.limits.max_sessions:
            raise CapacityError(f"{self.limits.max_sessions} sessions are open; close one first")
        if seq != 0:
            raise ProtocolError("open_session must carry seq 0")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InvalidInputError(f"seed must be a non-negative integer or null, got {seed!r}")
        lease = self._lease(args.get("lease_s"))
        self._check_budget(SESSION_CHARGE_BYTES, "a new session")
        backend = self.factory(seed)
        session = Session(session_id, backend, seed, backend.info(), owner=owner, last_op=Op.OPEN_SESSION.value,
                          lease_s=lease)
        reply = self._reply(identity, header, plain({"session": session_id, "info": session.info,
                                                     "lease_s": lease}))
        self.sessions.add(session)
        self.budget_used += SESSION_CHARGE_BYTES
        self._remember(session, 0, Op.OPEN_SESSION.value, reply)
        log.info("event=open session=%s seed=%d lease_s=%g sessions=%d", session_id[:8], seed, lease,
                 len(self.sessions))
        return None

    def _lease(self, asked: Any) -> float:
        """The lease granted for ``asked`` seconds: at most ``session_idle_s`` when that is set."""
        cap = float(self.limits.session_idle_s)
        if asked is None:
            return max(cap, 0.0)
        if isinstance(asked, bool) or not isinstance(asked, (int, float)) or not math.isfinite(asked) or asked <= 0:
            raise InvalidInputError(f"lease_s must be a positive number of seconds or null, got {asked!r}")
        return min(float(asked), cap) if cap > 0 else float(asked)

    def _close(self, identity: list[Any], header: dict[str, Any], session: Session, seq: int | None) -> None:
        reply = self._reply(identity, header, {"closed": True})
        assert seq is not None
        self._forget(session, seq, reply)
        if session.pending is None:  # else the compute path closes it when the job ends
            self._close_backend(session)
        log.info("event=close session=%s sessions=%d", session.id[:8], len(self.sessions))

    def _close_backend(self, session: Session) -> None:
        try:
            session.backend.close()
        except Exception:
            log.exception("event=backend_close_failed session=%s", session.id[:8])

    def _reap_idle(self) -> None:
        for s in self.sessions.idle():
            log.info("event=reap session=%s idle_s=%.0f", s.id[:8], time.monotonic() - s.last_used)
            self._forget(s, -1, [])
            self._close_backend(s)

    # -- compute ----------------------------------------------------------------------------------

    def _execute(self, job: Job) -> None:
        """Run one compute job without holding the socket, then reply (and cache the reply)."""
        session = job.session
        start = time.perf_counter_ns()
        self._running = (job, time.monotonic())
        arrays: dict[str, np.ndarray] = {}
        result: dict[str, Any] = {}
        error: DeviceError | None = None
        try:
            if session.closed:
                raise UnknownSessionError(f"session {_short(session.id)} was closed")
            result, arrays = self._compute(job)
        except DeviceError as exc:
            error = exc
        except np.linalg.LinAlgError as exc:  # finite but extreme input (1e308 entries) defeats LAPACK
            error = InvalidInputError(f"{job.op}: numerical failure on this input ({exc}); "
                                      "are its values within the device's full scale?")
        except Exception as exc:  # a backend bug; report it and keep serving
            log.exception("event=backend_error op=%s session=%s", job.op, session.id[:8])
            error = InternalError(f"{type(exc).__name__}: {exc}")
        done = time.perf_counter_ns()
        timing = {"queue_us": (start - job.received_ns) / 1e3, "compute_us": (done - start) / 1e3}
        try:
            frames = encode(reply_header(job.header, self.instance, result=result, error=error,
                                         timing=timing), arrays)
        except Exception as exc:  # e.g. a backend returning an array of an unsupported dtype
            log.exception("event=encode_error op=%s", job.op)
            frames = encode(reply_header(job.header, self.instance,
                                         error=InternalError(f"cannot encode the reply: {exc}")))
        self._running = None
        with self._sock_lock:
            self.in_flight -= job.nbytes
            if job.program_raw and not session.closed:
                # a failed program changed nothing, but a failed step may have programmed before
                # its run failed: then charge the larger (never undercount)
                charge = job.program_charge if error is None else max(job.program_charge, session.program_bytes)
                self.budget_used += charge - session.program_bytes
                session.program_bytes = charge
                if error is None:
                    session.program_raw = job.program_raw
            session.pending = None
            session.ops += 1
            session.last_used = time.monotonic()
            if job.op in MUTATING_NAMES and (error is None or error.code not in SEQ_FREE_CODES):
                self._remember(session, job.seq, job.op, frames)  # the seq rule (see _accept)
            self._count(error)
            self._send(job.identity, frames)
            if session.closed:
                self._close_backend(session)

    def _compute(self, job: Job) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        handler = _COMPUTE.get(job.op)
        if handler is None:  # pragma: no cover - every compute Op has a handler
            raise UnknownOperationError(f"operation {job.op!r} has no compute handler")
        return handler(job.session.backend, job.args, job.arrays, self.limits)

    # -- sending ----------------------------------------------------------------------------------

    def _reply(self, identity: list[Any], request: dict[str, Any] | None, result: dict[str, Any] | None = None,
               *, error: DeviceError | None = None) -> list[Any]:
        frames = encode(reply_header(request, self.instance, result=result, error=error))
        self._count(error)
        self._send(identity, frames)
        return frames

    def _count(self, error: DeviceError | None) -> None:
        self.served += 1
        if error is not None:
            self.errors += 1
            log.warning("event=error_reply code=%s message=%s", error.code.value, error.message[:200])

    def _send(self, identity: list[Any], frames: list[Any]) -> None:
        try:
            # NOBLOCK: a peer that stopped reading must not stall every other session.
            send(self._sock, frames, envelope=identity, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (peer gone) or EAGAIN (peer's queue full)
            log.warning("event=reply_dropped reason=%s", exc)


# -- compute handlers, one per operation (a dict lookup, not a chain of comparisons) ----------------


def _do_step(dev: Device, args: dict[str, Any], arrays: dict[str, np.ndarray],
             limits: Limits) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    drift = drift_from_wire(args.get("drift"), arrays)
    kwargs = run_args_from_wire(args)
    if kwargs["samples"] or kwargs["second_moment"]:  # else the reply is two N-vectors: no risk
        _check_reply_size(kwargs, drift.dim, limits)
    return result_to_wire(dev.step(drift, _bias(arrays), **kwargs))


def _do_run(dev: Device, args: dict[str, Any], arrays: dict[str, np.ndarray],
            limits: Limits) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    kwargs = run_args_from_wire(args)
    if kwargs["samples"] or kwargs["second_moment"]:
        # reading the state is a board read on hardware: only when the size matters
        _check_reply_size(kwargs, int(np.size(dev.state)), limits)  # 2N underdamped: conservative
    return result_to_wire(dev.run(**kwargs))


def _do_program(dev: Device, args: dict[str, Any], arrays: dict[str, np.ndarray],
                limits: Limits) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    dev.program(drift_from_wire(args.get("drift"), arrays), _bias(arrays))
    return {}, {}


def _do_get_state(dev: Device, args: dict[str, Any], arrays: dict[str, np.ndarray],
                  limits: Limits) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    return {}, {"state": np.asarray(dev.state)}


def _do_set_state(dev: Device, args: dict[str, Any], arrays: dict[str, np.ndarray],
                  limits: Limits) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if "state" not in arrays:
        raise InvalidInputError("set_state needs the array 'state'")
    dev.state = arrays["state"]  # the device checks it (shape, NaN/Inf), as in-process
    return {}, {}


def _do_calibrate(dev: Device, args: dict[str, Any], arrays: dict[str, np.ndarray],
                  limits: Limits) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    try:
        record = dev.calibrate(**args)  # UnsupportedError from a backend without calibration
    except TypeError as exc:  # an option this backend does not take
        raise InvalidInputError(f"calibrate: {exc}") from None
    return plain({"calibration": record}), {}


def _do_snapshot(dev: Device, args: dict[str, Any], arrays: dict[str, np.ndarray],
                 limits: Limits) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    return _snapshot_op(dev, Op.SNAPSHOT, args, arrays)


def _do_restore(dev: Device, args: dict[str, Any], arrays: dict[str, np.ndarray],
                limits: Limits) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    return _snapshot_op(dev, Op.RESTORE, args, arrays)


_COMPUTE: dict[str, Callable[[Device, dict[str, Any], dict[str, np.ndarray], Limits],
                             tuple[dict[str, Any], dict[str, np.ndarray]]]] = {
    Op.STEP.value: _do_step, Op.RUN.value: _do_run, Op.PROGRAM.value: _do_program,
    Op.GET_STATE.value: _do_get_state, Op.SET_STATE.value: _do_set_state,
    Op.CALIBRATE.value: _do_calibrate, Op.SNAPSHOT.value: _do_snapshot, Op.RESTORE.value: _do_restore,
}


def _snapshot_op(dev: Device, op: str, args: dict[str, Any],
                 arrays: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """snapshot / restore (optional members of a Device: UnsupportedError where not supported)."""
    if op == Op.SNAPSHOT:
        snap = dev.snapshot()
        return plain({"snapshot": snap.meta}), dict(snap.arrays)
    meta = args.get("snapshot")
    if not isinstance(meta, dict):
        raise InvalidInputError("restore needs args.snapshot, the meta map of a snapshot")
    # Views on the request frames would pin them; the backend keeps what it needs (it copies).
    dev.restore(DeviceSnapshot(meta, dict(arrays)))
    return {}, {}


def _raise_fd_limit(cap: int = 65536) -> int:
    """Raise the open-file soft limit towards the hard one (at most ``cap``); returns it (0: unknown).

    Every connection, stalled handshakes included, holds a file descriptor until it is dropped
    (``handshake_timeout_s``, ``stall_timeout_s``): a low soft limit (often 1024) lets ~1000 stalled
    peers lock every client out, CURVE ones included. libzmq has no accept-time connection cap;
    this limit is the cap (docs/security.md, worst-case memory).
    """
    try:
        import resource
    except ImportError:  # not on this platform
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return int(soft) if soft != resource.RLIM_INFINITY else cap


def _check_array_names(op: Op, arrays: dict[str, np.ndarray]) -> None:
    """Each operation takes only the array names docs/protocol.md section 4 gives it."""
    allowed = _ARRAY_NAMES[op]
    if allowed is None or not arrays:
        return
    for name in arrays:
        if name not in allowed:
            extra = sorted(set(arrays) - allowed)
            raise InvalidInputError(f"{op.value} takes no array named {', '.join(extra)} "
                                    f"(allowed: {', '.join(sorted(allowed)) or 'none'})")


def _frames_bytes(frames: list[Any]) -> int:
    return sum(f.nbytes if isinstance(f, np.ndarray) else len(f) for f in frames)


def _short(session_id: Any) -> str:
    """A session id as messages and logs may show it: ids are capabilities (docs/protocol.md 9)."""
    return f"{str(session_id)[:8]}..." if isinstance(session_id, str) else repr(session_id)


def _bias(arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    # Not scanned here: Device.program checks the bias (shape, NaN/Inf) where it enters the device,
    # in-process and behind the daemon alike, so a received bias is scanned once.
    return arrays.get("bias")


def _check_reply_size(kwargs: dict[str, Any], n: int, limits: Limits) -> None:
    """Refuse a run whose result (samples K x N, second moment N x N) would exceed the message
    limit: 10^6 samples of 4096 cells is 33 GB, built by the backend before any reply is sent."""
    values = kwargs["samples"] * n + (n * n if kwargs["second_moment"] else 0) + 2 * n
    if values * 8 > limits.max_message_bytes:
        raise TooLargeError(f"the result ({kwargs['samples']} samples of {n} cells"
                            f"{', second moment' if kwargs['second_moment'] else ''}) would take "
                            f"{values * 8} bytes, over max_message_bytes = {limits.max_message_bytes}; "
                            "ask for fewer samples")


# The wire's run-argument checks live in protocol.run_args (the name stays for the fuzz harness).
_run_kwargs = run_args_from_wire
