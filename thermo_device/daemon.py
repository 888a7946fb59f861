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
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import zmq

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
from protocol.errors import (
    BusyError,
    CapacityError,
    DeviceError,
    InternalError,
    InvalidInputError,
    ProtocolError,
    StaleRequestError,
    TooLargeError,
    UnknownOperationError,
    UnknownSessionError,
)
from protocol.messages import ANY_ARRAYS, FEATURES, OPS, PROTOCOL_VERSION, Limits, Op
from protocol.run_args import run_args_from_wire

from .security import ServerSecurity, check_remote_bind_allowed
from .session import Job, Session, SessionTable

log = logging.getLogger("thermo_device.daemon")

BackendFactory = Callable[[int], Device]
MUTATING = frozenset({Op.OPEN_SESSION, Op.CLOSE_SESSION, Op.PROGRAM, Op.RUN, Op.STEP, Op.SET_STATE,
                      Op.CALIBRATE, Op.RESTORE})
REAP_INTERVAL_S = 0.5


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
        sock.setsockopt(zmq.RCVHWM, 16)  # HWM counts messages: 16 x a large program is already a lot
        sock.setsockopt(zmq.SNDHWM, 64)
        sock.setsockopt(zmq.LINGER, self.linger_ms)
        # Hard memory guard checked by libzmq on each frame's length before allocating it; the
        # documented limit is enforced below it with an error reply.
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes + self.limits.max_header_bytes)
        sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)
        sock.setsockopt(zmq.RCVTIMEO, 100)  # the main loop wakes up to notice stop() and idle sessions  # drop non-ZeroMQ peers (port scanners) quickly
        if self.security is not None:
            self.security.apply(self._ctx, sock)  # before bind: no handshake may precede the ZAP handler
        sock.bind(self.bind)
        self._sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("event=start endpoint=%s instance=%s max_message_bytes=%d", self.endpoint, self.instance,
                 self.limits.max_message_bytes)
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
            running = self._running
            if running is None or time.monotonic() - running[1] < self.grace_s:
                continue
            while self._running is running and not self._stop.is_set():
                with self._sock_lock:
                    if self._running is not running:
                        break
                    if sock.poll(2):
                        self._accept(sock.recv_multipart(copy=False), queue_compute=True)

    # -- receiving ----------------------------------------------------------------------------------

    def _accept(self, frames: list[zmq.Frame], *, queue_compute: bool) -> Job | None:
        """Parse a request; answer it now, or return (main) / enqueue (control) a compute job.

        Called with ``_sock_lock`` held.
        """
        received = time.perf_counter_ns()
        identity, body = frames[:1], frames[1:]
        header: dict[str, Any] | None = None
        try:
            msg = decode(body, self.limits)
            header = msg.header
            op_name, _, session_id, seq, args = check_request(header)
            try:
                op = Op(op_name)
            except ValueError:
                raise UnknownOperationError(f"unknown operation {op_name!r} "
                                            f"(known: {', '.join(o.value for o in Op)})") from None
            spec = OPS[op]
            extra = set(msg.arrays) - set(spec.arrays)
            if extra and ANY_ARRAYS not in spec.arrays:
                raise InvalidInputError(f"{op.value} takes no array named {', '.join(sorted(extra))} "
                                        f"(allowed: {', '.join(spec.arrays) or 'none'})")
            if op in MUTATING and seq is None:
                raise ProtocolError(f"{op.value} needs a sequence number (seq)")
            if op is Op.HELLO:
                self._reply(identity, header, self._hello(args))
                return None
            if op is Op.PING:
                self._reply(identity, header, {"pong": True, "time_ns": time.time_ns()})
                return None
            if op is Op.STATUS:
                mine = self.sessions.get(session_id)
                if mine is not None and mine.owner != self._peer_key(body):
                    session_id = None  # another key's session: its counters are not this peer's business
                elif mine is not None:  # any request naming a session renews its lease
                    mine.last_used = time.monotonic()
                self._reply(identity, header, self._status(session_id))
                return None
            if op is Op.OPEN_SESSION:
                self._open(identity, header, session_id, seq, args, self._peer_key(body))
                return None
            if op is Op.CLOSE_SESSION:
                self._close(identity, header, session_id, seq, self._peer_key(body))
                return None
            session = self.sessions.get(session_id)
            if session is None or session.owner != self._peer_key(body):
                # another key's session looks exactly like no session: ids reveal nothing
                raise UnknownSessionError(f"no open session {_short(session_id)} on daemon {self.instance}")
            session.last_used = time.monotonic()
            if op is Op.INFO:
                # fresh when the backend is idle (temperature, calibrations change); while a job
                # runs on it, the last snapshot (a backend need not be thread-safe)
                if session.pending is None:
                    session.info = session.backend.info()
                self._reply(identity, header, plain({"info": session.info}))
                return None
            if op in MUTATING:
                assert seq is not None
                pending = session.pending
                if pending is not None and pending.seq == seq and pending.op == op.value:
                    # a retry of the running request, perhaps from a new socket or under a new
                    # id: the one reply goes there, under that id
                    pending.identity = identity
                    pending.header = {**pending.header, "id": header["id"]}
                    return None
                if seq == session.last_seq and session.last_reply is not None:
                    if op.value != session.last_op:
                        raise StaleRequestError(f"seq {seq} was already used by {session.last_op} "
                                                f"in session {_short(session_id)}")
                    # a retry: replay, never run twice
                    self._send(identity, with_request_id(session.last_reply, header["id"]))
                    return None
                if seq <= session.last_seq:
                    raise StaleRequestError(f"seq {seq} is older than the last one served "
                                            f"({session.last_seq}) in session {_short(session_id)}")
            if session.pending is not None:
                raise BusyError(f"session {_short(session_id)} already has a request in progress")
            job = Job(identity, header, msg.arrays, op.value, args, session, seq, received)
            if queue_compute:
                if len(self.queue) >= self.limits.queue_size:
                    raise BusyError(f"work queue full ({self.limits.queue_size} waiting); retry later")
                self.queue.append(job)
                session.pending = job
                return None
            session.pending = job
            return job
        except DeviceError as exc:
            self._reply(identity, header or getattr(exc, "header", None), error=exc)
        except Exception as exc:  # a bug, not bad input; keep serving
            log.exception("event=internal_error")
            self._reply(identity, header, error=InternalError(f"{type(exc).__name__}: {exc}"))
        return None

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

    def _status(self, session_id: str | None) -> dict[str, Any]:
        running = self._running
        session = self.sessions.get(session_id)
        return plain({
            "instance": self.instance,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "sessions": len(self.sessions),
            "queued": len(self.queue),
            "running": None if running is None else {
                "op": running[0].op, "elapsed_s": round(time.monotonic() - running[1], 6)},
            "served": self.served,
            "errors": self.errors,
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
        existing = self.sessions.get(session_id)
        seed = args.get("seed")
        seed = 0 if seed is None else seed
        if existing is not None:
            if (existing.owner == owner and seq == 0 and existing.last_seq == 0 and seed == existing.seed
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
        backend = self.factory(seed)
        session = Session(session_id, backend, seed, backend.info(), owner=owner, last_op=Op.OPEN_SESSION.value)
        session.last_reply = self._reply(identity, header, plain({"session": session_id, "info": session.info}))
        self.sessions.add(session)
        log.info("event=open session=%s seed=%d sessions=%d", session_id[:8], seed, len(self.sessions))
        return None

    def _close(self, identity: list[Any], header: dict[str, Any], session_id: str | None,
               seq: int | None, owner: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None and session.owner != owner:
            raise UnknownSessionError(f"no open session {_short(session_id)} on daemon {self.instance}")
        if session is None:
            remembered = self.sessions.closed.get(session_id) if session_id else None
            if remembered is not None and remembered[0] == seq:
                self._send(identity, with_request_id(remembered[1], header["id"]))
                return None
            raise UnknownSessionError(f"no open session {_short(session_id)} on daemon {self.instance}")
        assert seq is not None
        if seq <= session.last_seq:
            raise StaleRequestError(f"seq {seq} is older than the last one served ({session.last_seq})")
        reply = self._reply(identity, header, {"closed": True})
        self.sessions.remove(session, seq, reply)
        if session.pending is None:  # else the compute path closes it when the job ends
            self._close_backend(session)
        log.info("event=close session=%s sessions=%d", session.id[:8], len(self.sessions))
        return None

    def _close_backend(self, session: Session) -> None:
        try:
            session.backend.close()
        except Exception:
            log.exception("event=backend_close_failed session=%s", session.id[:8])

    def _reap_idle(self) -> None:
        for s in self.sessions.idle(self.limits.session_idle_s):
            log.info("event=reap session=%s idle_s=%.0f", s.id[:8], time.monotonic() - s.last_used)
            self.sessions.remove(s, -1, [])
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
            session.pending = None
            session.ops += 1
            session.last_used = time.monotonic()
            if job.seq is not None and job.op in MUTATING:
                session.last_seq, session.last_reply, session.last_op = job.seq, frames, job.op
            self._count(error)
            self._send(job.identity, frames)
            if session.closed:
                self._close_backend(session)

    def _compute(self, job: Job) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        dev, args, arrays = job.session.backend, job.args, job.arrays
        if job.op == Op.STEP:
            drift = drift_from_wire(args.get("drift"), arrays)
            kwargs = run_args_from_wire(args)
            _check_reply_size(kwargs, drift.dim, self.limits)
            return result_to_wire(dev.step(drift, _bias(arrays), **kwargs))
        if job.op == Op.RUN:
            kwargs = run_args_from_wire(args)
            if kwargs["samples"] or kwargs["second_moment"]:  # else the reply is two N-vectors: no risk
                # reading the state is a board read on hardware: only when the size matters
                _check_reply_size(kwargs, int(np.size(dev.state)), self.limits)  # 2N underdamped: conservative
            return result_to_wire(dev.run(**kwargs))
        if job.op == Op.PROGRAM:
            dev.program(drift_from_wire(args.get("drift"), arrays), _bias(arrays))
            return {}, {}
        if job.op == Op.GET_STATE:
            return {}, {"state": np.asarray(dev.state)}
        if job.op == Op.SET_STATE:
            if "state" not in arrays:
                raise InvalidInputError("set_state needs the array 'state'")
            dev.state = arrays["state"]  # the device checks it (shape, NaN/Inf), as in-process
            return {}, {}
        if job.op == Op.CALIBRATE:
            try:
                record = dev.calibrate(**args)  # UnsupportedError from a backend without calibration
            except TypeError as exc:  # an option this backend does not take
                raise InvalidInputError(f"calibrate: {exc}") from None
            return plain({"calibration": record}), {}
        if job.op in (Op.SNAPSHOT, Op.RESTORE):
            return _snapshot_op(dev, job.op, args, arrays)
        raise UnknownOperationError(f"operation {job.op!r} has no compute handler")  # pragma: no cover

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
