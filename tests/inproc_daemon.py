"""A Daemon served from a thread of the test process, and a bare DEALER for hand-built frames.

Faster to start than a subprocess (no interpreter, no numba import) and it lets a test give the
daemon a backend of its own. Loopback only; everything has a timeout and stops by itself.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import zmq

from protocol.codec import Message, decode, encode, request_header
from protocol.device import Device
from protocol.messages import Limits
from thermo_device.daemon import Daemon

READ_LIMITS = Limits(max_message_bytes=1 << 34)


class InprocDaemon:
    """``Daemon(factory)`` bound to a free loopback port, served by a daemon thread."""

    def __init__(self, factory: Callable[[int], Device], *, limits: Limits | None = None,
                 describe: dict[str, Any] | None = None, bind: str = "tcp://127.0.0.1:*", **kwargs: Any) -> None:
        self.daemon = Daemon(factory, bind, limits=limits, describe=describe or {"backend": "test"}, **kwargs)
        self.endpoint = self.daemon.start()
        self.instance = self.daemon.instance
        self.thread = threading.Thread(target=self.daemon.serve, name="test-daemon", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.daemon.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "the daemon thread did not stop"

    def __enter__(self) -> InprocDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Raw:
    """A bare DEALER sending exactly the frames a test builds (5 s timeouts: nothing hangs)."""

    def __init__(self, endpoint: str, timeout_ms: int = 5000) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        self.sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
        self.sock.connect(endpoint)
        self.session = uuid.uuid4().hex
        self.req = 0

    def ask(self, frames: list[Any]) -> Message:
        self.sock.send_multipart(frames)
        return decode(self.sock.recv_multipart(), READ_LIMITS, check=False)

    def frames(self, op: str, *, seq: int | None = None, session: str | None = "own",
               args: dict[str, Any] | None = None, arrays: dict[str, np.ndarray] | None = None,
               **header: Any) -> list[Any]:
        self.req += 1
        h = request_header(op, self.req, self.session if session == "own" else session, seq, args)
        out = encode(h, arrays)
        if header:
            h.update(header)
            out[0] = msgpack.packb(h)
        return [f if isinstance(f, bytes) else f.tobytes() for f in out]

    def request(self, op: str, **kw: Any) -> Message:
        return self.ask(self.frames(op, **kw))

    def close(self) -> None:
        self.sock.close(0)


def error_code(msg: Message) -> str | None:
    return msg.header["error"]["code"] if msg.header.get("status") == "error" else None


def main() -> None:
    """``python -m tests.inproc_daemon --limits JSON [--profile P] [--cells N]``: a daemon in its own
    process with any Limits (the CLI exposes only some), printing "serving ENDPOINT instance ID"."""
    import argparse
    import json
    import signal

    from thermo_device import Emulator, load_profile

    ap = argparse.ArgumentParser()
    ap.add_argument("--limits", default="{}")
    ap.add_argument("--profile", default="ideal")
    ap.add_argument("--cells", type=int, default=0)
    args = ap.parse_args()
    profile = load_profile(args.profile, {"device.cells": args.cells} if args.cells else None)
    daemon = Daemon(lambda seed: Emulator(profile, seed), "tcp://127.0.0.1:*", limits=Limits(**json.loads(args.limits)),
                    describe={"backend": "emulator"})
    endpoint = daemon.start()
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    print(f"serving {endpoint} instance {daemon.instance}", flush=True)
    daemon.serve()


if __name__ == "__main__":
    main()
