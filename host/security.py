"""Client side of CURVE, and a handshake watch that turns a refused handshake into an error.

libzmq never tells a client that its handshake was refused: the request just waits, exactly as if
the daemon were down (libzmq#2227). A socket monitor does see it (``EVENT_HANDSHAKE_FAILED_*``,
libzmq 4.3), so the client watches its socket until the first handshake succeeds and raises
``AuthenticationError`` at once on a failure, instead of a timeout at the deadline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from protocol.errors import AuthenticationError, InvalidInputError

_WATCHED = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_MECHANISM_MISMATCH = zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH


@dataclass(frozen=True)
class CurveClientKeys:
    """What a client needs to reach a CURVE daemon: its public key and our own key pair (Z85)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_key: str | bytes | os.PathLike[str],
             secret_key_file: str | os.PathLike[str]) -> CurveClientKeys:
        """``server_key``: the daemon's public key (40 Z85 characters) or its ``NAME.key`` file;
        ``secret_key_file``: this client's ``NAME.key_secret`` certificate."""
        server = _public_key(server_key)
        secret_key_file = _expand(secret_key_file)
        try:
            public, secret = zmq.auth.load_certificate(Path(secret_key_file))
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"cannot read the client certificate {secret_key_file}: {exc}") from None
        if not secret:
            raise InvalidInputError(f"{secret_key_file} holds no secret key (give NAME.key_secret)")
        return cls(server, public, secret)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def _expand(path: str | os.PathLike[str]) -> str:
    """``~`` and ``~user`` expanded: the documented examples use ``~/.thermo-ngd/...``, which only
    a shell would expand otherwise (issue 18)."""
    return os.path.expanduser(os.fsdecode(path))


def _public_key(value: str | bytes | os.PathLike[str]) -> bytes:
    if isinstance(value, str) and value.startswith("~"):  # "~" is not in the Z85 alphabet: a path
        value = _expand(value)
    if isinstance(value, (str, bytes)) and len(value) == 40 and not os.path.exists(value):
        key = value.encode("ascii") if isinstance(value, str) else value
    else:
        try:
            key, _ = zmq.auth.load_certificate(Path(os.fsdecode(value)))
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"curve server key must be 40 Z85 characters or a public "
                                    f"certificate file, got {value!r} ({exc})") from None
    try:
        z85.decode(key)
    except Exception:
        raise InvalidInputError(f"curve server key {key!r} is not valid Z85") from None
    return key


def curve_options(curve: Any) -> dict[str, Any]:
    """``host.connect(curve=...)`` as DeviceClient keyword arguments.

    Accepts a mapping ``{"server_key": ..., "secret_key_file": ...}`` or a pair
    ``(server_key, secret_key_file)``.
    """
    if isinstance(curve, Mapping):
        unknown = set(curve) - {"server_key", "secret_key_file"}
        if unknown or len(curve) != 2:
            raise InvalidInputError("curve must be {'server_key': ..., 'secret_key_file': ...}")
        server, secret = curve["server_key"], curve["secret_key_file"]
    elif isinstance(curve, (tuple, list)) and len(curve) == 2:
        server, secret = curve
    else:
        raise InvalidInputError("curve must be {'server_key': ..., 'secret_key_file': ...} or a pair")
    return {"curve_server_key": server, "curve_secret_key_file": secret}


class HandshakeWatch:
    """A monitor on one client socket, read only until its first handshake succeeds.

    After that ``ok`` is True and the request path pays one attribute check. A later failure
    (e.g. the daemon restarted with other keys) first shows as a timeout; the client then opens
    a fresh socket, whose watch reports the refusal.
    """

    def __init__(self, sock: zmq.Socket, address: str, curve: bool) -> None:
        self.address = address
        self.curve = curve
        self.ok = False
        self._sock = sock
        self._mon: zmq.Socket | None = sock.get_monitor_socket(_WATCHED)
        self._mon.setsockopt(zmq.LINGER, 0)

    def wait(self, deadline: float) -> bool:
        """Block until the handshake succeeds (True) or the deadline passes (False); raise
        AuthenticationError as soon as the daemon refuses it."""
        mon = self._mon
        while not self.ok and mon is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not mon.poll(max(1, int(remaining * 1000))):
                return False
            self._event(recv_monitor_message(mon))
        return True

    def _event(self, event: dict[str, Any]) -> None:
        kind, value = event["event"], event["value"]
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.ok = True
            self.close()  # nothing more to learn from it; frees the inproc pair
            return
        where = f"the daemon at {self.address}"
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            if not self.curve:  # a plaintext daemon refuses a connection only at its connection cap
                raise AuthenticationError(f"{where} refused the connection (ZAP status {value}): it holds "
                                          "max_connections already; close idle clients or retry later")
            raise AuthenticationError(f"{where} refused this client's CURVE key (ZAP status {value}): "
                                      "its public key is not in the daemon's allow-list, or the daemon "
                                      "holds max_connections already")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == _MECHANISM_MISMATCH:
            if self.curve:
                raise AuthenticationError(f"{where} does not use CURVE, but this client does")
            raise AuthenticationError(f"{where} requires CURVE authentication: pass curve_server_key and "
                                      "curve_secret_key_file (host.connect(..., curve=...))")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and self.curve:
            raise AuthenticationError(f"the CURVE handshake with {where} failed: wrong server public key, "
                                      "or the daemon does not use CURVE")
        # Anything else (a peer that died mid-handshake, a non-ZeroMQ listener) is not a verdict
        # on our credentials: libzmq reconnects, and the deadline decides.

    def close(self) -> None:
        if self._mon is not None:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass  # the socket is already closed
            self._mon.close(linger=0)
            self._mon = None


__all__ = ["CurveClientKeys", "HandshakeWatch", "curve_options"]
