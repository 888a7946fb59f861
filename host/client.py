"""DeviceClient: a ``protocol.Device`` that lives in a ``thermo-device serve`` daemon.

One client = one session on the daemon = one device with its own state and noise stream. Calls
are synchronous; every call has a deadline (``timeout`` seconds) and ends either with the reply
or with a typed exception (``DeviceTimeoutError`` when the deadline passes).

Reliability (the zguide's Lazy Pirate, adapted to a non-idempotent device):

* DEALER socket, never REQ (a REQ socket is wedged after one lost reply), linger 0, IMMEDIATE
  (requests are never queued for a daemon that is not connected).
* On a timeout the socket is closed and reopened, which discards anything queued for a dead
  daemon. With ``retries > 0`` the same request (same sequence number) is re-sent within the
  deadline; the daemon replays its cached reply if it already ran it, so a step never runs twice.
* A ``busy`` reply (the daemon's work queue is full) is retried with jittered exponential
  back-off within the deadline: it means the request did not run.
* Every reply carries the daemon's instance id. When it changes the daemon was restarted and the
  session is gone. With ``restore=True`` (default) the client opens a new session with the same
  seed, re-programs the last drift and bias, sets the last known analog state (from the last
  run/step reply or ``state =``), logs a warning and re-sends the call. The noise stream restarts
  with the seed, so numbers after a restore are not bit-identical to an uninterrupted run. With
  ``restore=False`` it raises ``UnknownSessionError`` instead. Before restoring, the client checks
  that the daemon now at the address is the same device (backend, profile, chip id, capabilities:
  ``device_identity``); another device raises ``DeviceMismatchError`` (restoring a state there
  would silently change the numbers) unless ``accept_other_device=True``.
* Sessions end: ``close()`` (or ``with DeviceClient(...) as dev:``) closes the session. A client
  that dies without closing is reclaimed by the daemon after its lease (``lease_s``, asked for at
  ``open_session``): a heartbeat thread on its own socket pings the session every third of the
  lease while the client object lives, so only a dead client loses it.

Inputs are not copied before sending: do not modify an array in place while a call that sends it
is in progress, nor the arrays of the last ``program`` if you rely on restore.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import zmq

from protocol.capabilities import Capabilities
from protocol.codec import (
    Message,
    decode,
    drift_to_wire,
    encode,
    error_from_payload,
    plain,
    request_header,
    result_from_wire,
    send,
    wire_array,
)
from protocol.device import Device, DeviceSnapshot, RunResult
from protocol.drift import Drift
from protocol.errors import (
    DeviceError,
    DeviceMismatchError,
    DeviceTimeoutError,
    ErrorCode,
    InvalidInputError,
    ProtocolError,
    TooLargeError,
    UnknownSessionError,
)
from protocol.messages import FEATURES, PROTOCOL_VERSION, STATUS_OK, UPLOADABLE, Limits, Op

from .security import CurveClientKeys, HandshakeWatch

log = logging.getLogger("host.client")

# The client accepts what the daemon sends (it asked for it); the limits only stop a broken peer.
_REPLY_LIMITS = Limits(max_message_bytes=1 << 40, max_dimension=1 << 40, max_header_bytes=16 << 20)
# What makes a device "the same device" after a daemon restart (docs/protocol.md section 5).
IDENTITY_KEYS: tuple[str, ...] = ("backend", "profile", "chip_id", "capabilities")
DEFAULT_LEASE_S = 60.0
# Drift arrays above this travel as row blocks (``upload``). Not smaller: on the 2-vCPU reference
# machine under load, a 25.6 MB J in 4 MiB blocks took 1.8x one message (32 vs 18 ms: the blocks
# are copied into place and no core is idle to overlap the scan with), so whole messages stay the
# fast path up to here, and blocks bound what one message can be above it.
DEFAULT_CHUNK_BYTES = 32 << 20
UPLOAD_WINDOW = 4  # row blocks in flight at once: the daemon scans one while the next arrives


def device_identity(info: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a device's ``info`` that must not change across a restore: backend, profile,
    chip id (the mismatch seed: another chip has other static errors) and capabilities."""
    return {k: info.get(k) for k in IDENTITY_KEYS}


class DeviceClient(Device):
    """A remote device: implements ``protocol.Device`` (declared by subclassing it), the optional
    members included; a backend without one answers ``unsupported`` (UnsupportedError here).

    Args:
        address: "tcp://host:port" or "ipc://path" of a ``thermo-device serve`` daemon.
        seed: noise seed of the session (None means 0, as for the embedded device).
        timeout: deadline of every call, in seconds (a long run needs a long enough one).
        retries: re-sends of a request within its deadline, each on a fresh socket.
        restore: after a daemon restart, restore the session (see the module docstring).
        context: a pyzmq Context (default: the process-wide one).
        curve_server_key: CURVE: the daemon's public key (40 Z85 characters) or its NAME.key file.
        curve_secret_key_file: CURVE: this client's NAME.key_secret certificate (its public key
            must be in the daemon's allow-list). Give both or neither; a refused handshake raises
            AuthenticationError (see docs/security.md).
        accept_other_device: after a restart, restore onto whatever device now answers (a
            warning is logged) instead of raising DeviceMismatchError.
        lease_s: seconds without a request or heartbeat after which the daemon reclaims the
            session (capped by its ``session_idle_s``); None: the daemon's default.
        heartbeat: ping the session every third of its lease from a background thread, so a
            live but idle client keeps it (False: only requests renew it).
        chunk_bytes: drift arrays (and bias) larger than this (default 32 MiB) are uploaded in
            row blocks of at most this size before the program/step that uses them (daemons with the ``upload``
            feature): the daemon checks each block on arrival, so its NaN/Inf scan overlaps the
            transfer, and no message exceeds the block size. None: always one message.
    """

    def __init__(self, address: str, seed: int | None = None, *, timeout: float = 10.0, retries: int = 0,
                 restore: bool = True, context: zmq.Context | None = None,
                 curve_server_key: str | bytes | os.PathLike[str] | None = None,
                 curve_secret_key_file: str | os.PathLike[str] | None = None,
                 accept_other_device: bool = False, lease_s: float | None = DEFAULT_LEASE_S,
                 heartbeat: bool = True, chunk_bytes: int | None = DEFAULT_CHUNK_BYTES) -> None:
        if not isinstance(address, str) or not address.startswith(("tcp://", "ipc://")):
            raise InvalidInputError(f"address must be tcp://host:port or ipc://path, got {address!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise InvalidInputError(f"seed must be a non-negative integer or None, got {seed!r}")
        if not timeout > 0:
            raise InvalidInputError(f"timeout must be positive, got {timeout!r}")
        if lease_s is not None and (isinstance(lease_s, bool) or not isinstance(lease_s, (int, float))
                                    or not lease_s > 0):
            raise InvalidInputError(f"lease_s must be a positive number of seconds or None, got {lease_s!r}")
        self.address = address
        self.seed = None if seed is None else int(seed)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.auto_restore = restore  # fail-over after a daemon restart (see the module doc)
        self.accept_other_device = bool(accept_other_device)
        if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                        or chunk_bytes < 1024):
            raise InvalidInputError(f"chunk_bytes must be an integer >= 1024 or None, got {chunk_bytes!r}")
        self.chunk_bytes = chunk_bytes
        self.uploads = 0  # row blocks sent (a counter for tests and benchmarks)
        self.lease_s = None if lease_s is None else float(lease_s)
        self._want_heartbeat = bool(heartbeat)
        self._heartbeat: _Heartbeat | None = None
        self.identity: dict[str, Any] | None = None  # device_identity of the first session
        self.granted_lease_s: float = 0.0
        self._sock_timeouts: tuple[int, int] = (-2, -2)  # (SNDTIMEO, RCVTIMEO) set on the socket
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._watch: HandshakeWatch | None = None
        if (curve_server_key is None) != (curve_secret_key_file is None):
            raise InvalidInputError("CURVE needs both curve_server_key and curve_secret_key_file")
        self._curve = (None if curve_server_key is None
                       else CurveClientKeys.load(curve_server_key, curve_secret_key_file))  # type: ignore[arg-type]
        self._req_id = 0
        self._seq = 0
        self._session: str | None = None
        self._closed = False
        self._restoring = False
        self.busy_retries = 0  # requests re-sent after a "busy" reply (back-pressure seen)
        self.retry_busy = True  # False: raise BusyError at once (to see back-pressure, e.g. in tests)
        self._last_program: tuple[Drift, np.ndarray | None] | None = None
        self._last_state: np.ndarray | None = None
        self._last_snapshot: DeviceSnapshot | None = None
        self.instance: str = ""
        self.daemon: dict[str, Any] = {}
        self._max_message_bytes: int | None = None  # the daemon's, from hello
        self._open_socket()
        try:
            self._connect_session()
        except BaseException:
            self._close_socket()
            raise

    # -- Device interface ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The backend's capabilities, plus a "remote" entry (address, daemon instance, protocol)."""
        info = dict(self._call(Op.INFO).header["result"].get("info", {}))
        info["remote"] = {"address": self.address, "instance": self.instance, "session": self._session,
                          "protocol": self.daemon.get("protocol"), "versions": self.daemon.get("versions")}
        return info

    def capabilities(self) -> Capabilities:
        """The backend's declared capabilities (one ``info`` round trip)."""
        return Capabilities.from_info(self.info())

    def program(self, drift: Drift, bias: np.ndarray | None = None) -> None:
        spec, arrays = _drift_args(drift, bias)
        self._program_call(Op.PROGRAM, {"drift": spec}, arrays)
        self._last_snapshot = None
        prev = self._last_program
        if prev is not None and prev[0].dim != drift.dim:
            self._last_state = None  # the device resets its state when the size changes
        self._last_program = (drift, bias)

    def run(self, duration: float, *, burn_in: float = 0.0, delay: float = 0.0, reset: bool = False,
            samples: int = 0, second_moment: bool = False) -> RunResult:
        args = _run_args(duration, burn_in, delay, reset, samples, second_moment)
        prev = self._last_program
        small = _small_reply(prev[0].dim if prev is not None else None, samples, second_moment)
        msg = self._call(Op.RUN, args, mutating=True, small_reply=small)
        return self._result(msg)

    def step(self, drift: Drift, bias: np.ndarray | None, duration: float, *, burn_in: float = 0.0,
             delay: float = 0.0, reset: bool = False, samples: int = 0,
             second_moment: bool = False) -> RunResult:
        spec, arrays = _drift_args(drift, bias)
        args = _run_args(duration, burn_in, delay, reset, samples, second_moment)
        args["drift"] = spec
        msg = self._program_call(Op.STEP, args, arrays, small_reply=_small_reply(drift.dim, samples, second_moment))
        self._last_snapshot = None
        prev = self._last_program
        if prev is not None and prev[0].dim != drift.dim:
            self._last_state = None
        self._last_program = (drift, bias)
        return self._result(msg)

    @property
    def state(self) -> np.ndarray:
        return self._call(Op.GET_STATE).arrays["state"]

    @state.setter
    def state(self, value: np.ndarray) -> None:
        arr = np.asarray(value)
        self._call(Op.SET_STATE, {}, {"state": arr}, mutating=True)
        self._last_state = np.array(arr, dtype=np.float64)

    def snapshot(self) -> DeviceSnapshot:
        """The device's complete dynamic state (backends that support it; else UnsupportedError)."""
        msg = self._call(Op.SNAPSHOT)
        meta = msg.header["result"].get("snapshot")
        if not isinstance(meta, dict):
            raise ProtocolError("snapshot reply lacks the snapshot map")
        return DeviceSnapshot(meta, {k: np.array(v) for k, v in msg.arrays.items()})

    def restore(self, snapshot: DeviceSnapshot) -> None:
        """Continue from ``snapshot`` (taken on a device of the same profile)."""
        if not isinstance(snapshot, DeviceSnapshot):
            raise InvalidInputError(f"restore needs a DeviceSnapshot, got {type(snapshot).__name__}")
        self._call(Op.RESTORE, {"snapshot": plain(snapshot.meta)}, dict(snapshot.arrays), mutating=True)
        # after a daemon restart, this snapshot (not the last program) is what to restore
        self._last_program, self._last_snapshot = None, snapshot
        state = snapshot.arrays.get("state")
        self._last_state = None if state is None else np.array(state, dtype=np.float64)

    def close(self) -> None:
        """End the session on the daemon (best effort, short deadline) and close the socket."""
        if self._closed:
            return
        self._closed = True
        self._stop_heartbeat()
        try:
            if self._session is not None and self._sock is not None:
                self._call(Op.CLOSE_SESSION, mutating=True, timeout=min(self.timeout, 1.0), recover=False)
        except DeviceError as exc:
            log.debug("close_session failed: %s", exc)
        finally:
            self._close_socket()

    def status(self) -> dict[str, Any]:
        """Daemon telemetry, with this session's counters under "session_status"."""
        return dict(self._call(Op.STATUS).header["result"])

    def calibrate(self, **options: Any) -> dict[str, Any]:
        """Run the device's calibration (raises UnsupportedError on backends without one)."""
        return dict(self._call(Op.CALIBRATE, plain(options), mutating=True).header["result"])

    # -- beyond the Device interface -------------------------------------------------------------------

    def ping(self) -> float:
        """Round-trip time of a ping, in seconds (answered even while a long run is going on)."""
        t0 = time.perf_counter()
        self._call(Op.PING, session=False)
        return time.perf_counter() - t0

    @property
    def session(self) -> str | None:
        return self._session

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # sockets must not outlive the object (linger is 0, so this is quick)
        try:
            self._stop_heartbeat()  # a dropped client stops renewing: the daemon reclaims the session
            self._close_socket()
        except Exception:
            pass

    # -- session set-up and restore ---------------------------------------------------------------------

    def _connect_session(self) -> None:
        reply = self._call(Op.HELLO, {"features": list(FEATURES), "client": "thermo-ngd host"},
                           session=False, recover=False).header
        result = reply["result"]
        proto = result.get("protocol")
        if not isinstance(proto, list) or not proto or proto[0] != PROTOCOL_VERSION[0]:
            raise ProtocolError(f"daemon speaks protocol {proto}, this client {list(PROTOCOL_VERSION)}",
                                code=None)
        self.instance = reply["instance"]
        self.daemon = result
        limit = result.get("limits", {}).get("max_message_bytes") if isinstance(result.get("limits"), dict) else None
        self._max_message_bytes = limit if isinstance(limit, int) else None
        self._session = uuid.uuid4().hex
        self._seq = -1  # open_session carries seq 0
        opened = self._call(Op.OPEN_SESSION, {"seed": self.seed, "lease_s": self.lease_s}, mutating=True,
                            recover=False).header["result"]
        info = opened.get("info")
        identity = device_identity(info if isinstance(info, Mapping) else {})
        if self.identity is not None and identity != self.identity:
            changed = sorted(k for k in IDENTITY_KEYS if identity.get(k) != self.identity.get(k))
            what = ", ".join(f"{k} {self.identity.get(k)!r} -> {identity.get(k)!r}" for k in changed
                             if k != "capabilities") or "capabilities differ"
            if not self.accept_other_device:
                try:  # do not leave the new session behind
                    self._call(Op.CLOSE_SESSION, mutating=True, timeout=min(self.timeout, 1.0), recover=False)
                except DeviceError as exc:
                    log.debug("closing the mismatched session failed: %s", exc)
                self._session = None
                raise DeviceMismatchError(
                    f"the daemon at {self.address} restarted as another device ({what}; changed: "
                    f"{', '.join(changed)}); its analog state was not restored. Connect anew, or pass "
                    "accept_other_device=True to adopt it")
            log.warning("the daemon at %s is now another device (%s); adopting it (accept_other_device)",
                        self.address, what)
        self.identity = identity
        lease = opened.get("lease_s")
        self.granted_lease_s = float(lease) if isinstance(lease, (int, float)) and not isinstance(lease, bool) else 0.0
        self._start_heartbeat()

    def _restore(self, new_instance: str) -> None:
        old = self.instance
        if not new_instance:  # found out mid-upload: the new instance id comes with hello
            log.warning("session %s on %s is gone (daemon restarted or session reclaimed); restoring it",
                        str(self._session)[:8], self.address)
        elif new_instance != old:
            log.warning("daemon at %s restarted (instance %s -> %s); restoring the session",
                        self.address, old[:8], new_instance[:8])
        self._restoring = True
        try:
            self._connect_session()
            if self._last_snapshot is not None:
                snap = self._last_snapshot
                self._call(Op.RESTORE, {"snapshot": plain(snap.meta)}, dict(snap.arrays), mutating=True,
                           recover=False)
            if self._last_program is not None:
                drift, bias = self._last_program
                spec, arrays = _drift_args(drift, bias)
                self._program_call(Op.PROGRAM, {"drift": spec}, arrays, recover=False)
            if self._last_state is not None and self._last_state.size:
                self._call(Op.SET_STATE, {}, {"state": self._last_state}, mutating=True, recover=False)
        finally:
            self._restoring = False

    # -- one request ----------------------------------------------------------------------------------

    def _call(self, op: Op, args: dict[str, Any] | None = None, arrays: dict[str, np.ndarray] | None = None,
              *, session: bool = True, mutating: bool = False, timeout: float | None = None,
              recover: bool = True, small_reply: bool = False) -> Message:
        if self._closed and op is not Op.CLOSE_SESSION:
            raise InvalidInputError("the device client is closed")
        if self._sock is None:
            self._open_socket()
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._req_id += 1
        req_id = self._req_id
        seq = None
        if mutating:
            self._seq += 1
            seq = self._seq
        frames = encode(request_header(op.value, req_id, self._session if session else None, seq, args), arrays)
        self._check_size(op, frames)
        attempts = self.retries + 1
        msg = None
        busy = 0
        last_busy: Message | None = None
        # a full work queue clears by itself; a busy open_session (a board another session owns) does not
        retry_busy = self.retry_busy and op is not Op.OPEN_SESSION
        while True:
            for attempt in range(attempts):
                now = time.monotonic()
                attempt_deadline = now + (deadline - now) / (attempts - attempt)
                msg = self._exchange(frames, req_id, attempt_deadline, small_reply)
                if msg is not None:
                    break
                self._reopen()  # Lazy Pirate: a fresh socket drops whatever was queued for a dead peer
            if msg is None:
                msg = last_busy  # the deadline ran out while backing off: report the back-pressure
                break
            if not retry_busy or not _is_busy(msg.header):
                break
            last_busy = msg
            # Back-pressure: "busy" means the request was not run, so re-sending the same seq is
            # safe. Jittered exponential back-off, within the deadline.
            pause = min(0.05, 0.002 * 2.0 ** busy) * (0.5 + random.random())
            if time.monotonic() + pause >= deadline:
                break
            busy += 1
            self.busy_retries += 1
            time.sleep(pause)
        if msg is None:
            raise DeviceTimeoutError(f"no reply from {self.address} to {op.value} within {timeout:.3g} s "
                                     "(daemon down, stuck or unreachable); the socket was reset")
        header = msg.header
        instance = header.get("instance")
        if self.instance and instance != self.instance and recover:
            if not self.auto_restore or self._restoring:
                raise UnknownSessionError(f"the daemon at {self.address} restarted (instance "
                                          f"{self.instance[:8]} -> {str(instance)[:8]}); its session and "
                                          "analog state are gone")
            self._restore(str(instance))
            return self._call(op, args, arrays, session=session, mutating=mutating, timeout=timeout,
                              recover=False)
        if header.get("status") != STATUS_OK:
            error = error_from_payload(header.get("error"))
            if (isinstance(error, UnknownSessionError) and recover and session and self.auto_restore
                    and not self._restoring and op not in (Op.OPEN_SESSION, Op.CLOSE_SESSION)):
                # the same daemon reclaimed the session (its idle lease ran out): restore as after a restart
                log.warning("session %s expired on %s; restoring it", str(self._session)[:8], self.address)
                self._restore(str(instance))
                return self._call(op, args, arrays, session=session, mutating=mutating, timeout=timeout,
                                  recover=False)
            raise error
        if not isinstance(header.get("result", {}), dict):
            raise ProtocolError("reply result must be a map")
        header.setdefault("result", {})
        return msg

    # -- chunked uploads --------------------------------------------------------------------------------

    def _program_call(self, op: Op, args: dict[str, Any], arrays: dict[str, np.ndarray], *,
                      recover: bool = True, small_reply: bool = False) -> Message:
        """program/step, with the drift arrays over ``chunk_bytes`` uploaded in row blocks first."""
        big = self._to_upload(arrays)
        if not big:
            return self._call(op, args, arrays, mutating=True, recover=recover, small_reply=small_reply)
        try:
            for name in big:
                self._upload(name, arrays[name])
            rest = {k: v for k, v in arrays.items() if k not in big}
            return self._call(op, {**args, "staged": big}, rest, mutating=True, recover=False,
                              small_reply=small_reply)
        except UnknownSessionError:
            # the daemon restarted or reclaimed the session mid-upload: its staged blocks are gone
            if not (recover and self.auto_restore and not self._restoring):
                raise
            self._restore("")
            return self._program_call(op, args, arrays, recover=False, small_reply=small_reply)

    def _block_bytes(self) -> int | None:
        """The row-block size: ``chunk_bytes``, and at most half the daemon's message limit (so a
        daemon run with a small ``--max-message-bytes`` still takes large programs)."""
        if self.chunk_bytes is None or "upload" not in self.daemon.get("features", ()):
            return None
        cap = self._max_message_bytes
        return self.chunk_bytes if cap is None else max(1024, min(self.chunk_bytes, cap // 2))

    def _to_upload(self, arrays: dict[str, np.ndarray]) -> list[str]:
        limit = self._block_bytes()
        if limit is None:
            return []
        return [k for k, v in arrays.items()
                if k in UPLOADABLE and getattr(v, "nbytes", 0) > limit and np.ndim(v) >= 1 and np.shape(v)[0] > 1]

    def _upload(self, name: str, value: np.ndarray) -> None:
        """Send ``value`` as row blocks of at most ``chunk_bytes``, UPLOAD_WINDOW in flight."""
        arr = wire_array(value, name)
        block = self._block_bytes()
        assert block is not None
        rows = max(1, block // max(1, arr.nbytes // arr.shape[0]))
        offsets = list(range(0, arr.shape[0], rows))
        deadline = time.monotonic() + self.timeout
        if self._sock is None:
            self._open_socket()
        sock, watch = self._sock, self._watch
        assert sock is not None and watch is not None
        if not watch.ok and not watch.wait(deadline):
            raise DeviceTimeoutError(f"no handshake with {self.address} within {self.timeout:.3g} s")
        waiting: set[int] = set()
        head = {"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape)}
        sent = 0
        while sent < len(offsets) or waiting:
            while sent < len(offsets) and len(waiting) < UPLOAD_WINDOW:
                self._req_id += 1
                o = offsets[sent]
                frames = encode(request_header(Op.UPLOAD.value, self._req_id, self._session, None,
                                               {**head, "offset": o}), {"block": arr[o:o + rows]})
                send(sock, frames)
                waiting.add(self._req_id)
                sent += 1
                self.uploads += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(max(1, int(remaining * 1000))):
                self._reopen()
                raise DeviceTimeoutError(f"upload of {name} to {self.address}: no reply within "
                                         f"{self.timeout:.3g} s; the socket was reset")
            msg = decode(sock.recv_multipart(copy=False), _REPLY_LIMITS)
            if msg.header.get("id") not in waiting:
                continue  # a late reply to a request given up on
            waiting.discard(msg.header["id"])
            if msg.header.get("instance") != self.instance:
                raise UnknownSessionError(f"the daemon at {self.address} restarted during an upload")
            if msg.header.get("status") != STATUS_OK:
                raise error_from_payload(msg.header.get("error"))

    def _check_size(self, op: Op, frames: list[Any]) -> None:
        """Refuse here what the daemon would refuse: above its hard frame guard a message gets no
        reply at all (libzmq drops the connection), so the caller would only see a timeout."""
        limit = self._max_message_bytes
        if limit is None:
            return  # before hello: nothing known yet (hello itself is small)
        total = sum(f.nbytes if isinstance(f, np.ndarray) else len(f) for f in frames)
        if total > limit:
            raise TooLargeError(f"{op.value}: the request takes {total} bytes, over the daemon's "
                                f"max_message_bytes = {limit} (thermo-device serve --max-message-bytes)")

    def _exchange(self, frames: list[Any], req_id: int, deadline: float, small_reply: bool = False) -> Message | None:
        sock = self._sock
        assert sock is not None
        try:
            if not self._watch.ok and not self._watch.wait(deadline):  # type: ignore[union-attr]
                return None  # no handshake within the deadline (a refusal raises in wait)
            # Timeouts are set only when they change (one setsockopt per socket for calls with the
            # same deadline: the hot path); the deadline is re-checked below, so a value set a few
            # microseconds earlier can overshoot it by no more than that.
            ms = max(1, int((deadline - time.monotonic()) * 1000 + 0.999))
            if self._sock_timeouts != (ms, ms):
                sock.setsockopt(zmq.SNDTIMEO, ms)
                sock.setsockopt(zmq.RCVTIMEO, ms)
                self._sock_timeouts = (ms, ms)
            send(sock, frames)
        except zmq.Again:  # IMMEDIATE: no connected daemon within the deadline
            return None
        first = True
        while True:
            if not first:  # a late reply was discarded: wait only for what is left
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                ms = max(1, int(remaining * 1000))
                sock.setsockopt(zmq.RCVTIMEO, ms)
                self._sock_timeouts = (self._sock_timeouts[0], ms)
            first = False
            try:
                # a reply known to be small is copied into bytes at once (cheaper than a zmq.Frame
                # per part); any other one is received without copies (large results)
                reply = sock.recv_multipart(copy=small_reply)
            except zmq.Again:
                return None
            msg = decode(reply, _REPLY_LIMITS)
            reply_id = msg.header.get("id")
            if reply_id == req_id:
                return msg
            if reply_id is None and msg.header.get("status") != STATUS_OK:
                # the daemon could not read an id in the request: this socket has one request
                # outstanding (a timeout replaces the socket), so the error is that request's
                return msg
            log.debug("discarding a late reply (id %s, awaiting %s)", msg.header.get("id"), req_id)

    def _result(self, msg: Message) -> RunResult:
        result = result_from_wire(msg.header["result"], msg.arrays)
        self._last_state = result.state
        return result

    # -- socket ---------------------------------------------------------------------------------------

    def _open_socket(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)  # never block interpreter exit on unsent requests
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a completed connection
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self._curve is not None:
            self._curve.apply(sock)
        # Every socket, CURVE or not, is watched until its first handshake: a plaintext client of
        # a CURVE daemon then hears "authentication required" at once rather than a timeout.
        self._watch = HandshakeWatch(sock, self.address, curve=self._curve is not None)
        sock.connect(self.address)
        self._sock = sock
        self._sock_timeouts = (-2, -2)

    def _close_socket(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _reopen(self) -> None:
        self._close_socket()
        self._open_socket()

    # -- heartbeat ------------------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        if not self._want_heartbeat or self.granted_lease_s <= 0 or self._session is None:
            return
        if self._heartbeat is not None:  # a restore opened a new session: follow it
            self._heartbeat.session = self._session
            return
        self._heartbeat = _Heartbeat(self._ctx, self.address, self._session, self.granted_lease_s / 3.0,
                                     self._curve)
        self._heartbeat.start()

    def _stop_heartbeat(self) -> None:
        hb, self._heartbeat = self._heartbeat, None
        if hb is not None:
            hb.stop()


class _Heartbeat(threading.Thread):
    """Pings the session from its own socket (a socket belongs to one thread) every ``interval``
    seconds, so the daemon keeps the session of a live client and reclaims that of a dead one.
    Holds no reference to the client: a client dropped without close() stops renewing."""

    def __init__(self, ctx: zmq.Context, address: str, session: str, interval: float,
                 curve: CurveClientKeys | None) -> None:
        super().__init__(name="thermo-heartbeat", daemon=True)
        self.ctx, self.address, self.session, self.interval, self.curve = ctx, address, session, interval, curve
        self.beats = 0
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        if self is not threading.current_thread():
            self.join(timeout=2.0)

    def run(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, 0)  # never block: a missed beat is retried next interval
            sock.setsockopt(zmq.SNDHWM, 2)
            if self.curve is not None:
                self.curve.apply(sock)
            sock.connect(self.address)
            req_id = 0
            while not self._stop_event.wait(self.interval):
                while sock.poll(0):  # the pongs: read and drop (nothing depends on them)
                    sock.recv_multipart()
                req_id += 1
                try:
                    send(sock, encode(request_header(Op.PING.value, req_id, self.session)))
                    self.beats += 1
                except zmq.ZMQError:
                    pass
        finally:
            sock.close(linger=0)


def _small_reply(dim: int | None, samples: int, second_moment: bool) -> bool:
    """A run/step reply of two N-vectors below pyzmq's copy threshold (64 KiB) each."""
    return dim is not None and not samples and not second_moment and dim * 16 < zmq.COPY_THRESHOLD


def _is_busy(header: dict[str, Any]) -> bool:
    error = header.get("error")
    return header.get("status") != STATUS_OK and isinstance(error, dict) and error.get("code") == ErrorCode.BUSY.value


def _drift_args(drift: Drift, bias: np.ndarray | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    spec, arrays = drift_to_wire(drift)
    if bias is not None:
        arrays["bias"] = np.asarray(bias)
    return spec, arrays


def _run_args(duration: float, burn_in: float, delay: float, reset: bool, samples: int,
              second_moment: bool) -> dict[str, Any]:
    if (type(duration) is float and type(burn_in) is float and type(delay) is float and type(samples) is int
            and type(reset) is bool and type(second_moment) is bool):  # the hot path; NumPy scalars go through plain()
        return {"duration": duration, "burn_in": burn_in, "delay": delay, "reset": reset,
                "samples": samples, "second_moment": second_moment}
    return plain({"duration": duration, "burn_in": burn_in, "delay": delay, "reset": reset,
                  "samples": samples, "second_moment": second_moment})
