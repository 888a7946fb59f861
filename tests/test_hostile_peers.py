"""Hostile peers at a small scale (issue 16, item 3), against a daemon in its own process:

* peers that finish the ZeroMQ handshake, declare a large frame, send all but a little of it and
  stall: dropped after ``stall_timeout_s`` (their partial frames freed);
* TCP connections that never handshake: dropped after ``handshake_timeout_s``;
* sessions filling the memory budget: refused with ``capacity``, never allocated;
* large replies in every session's replay cache: not pinned beyond ``replay_cache_bytes``;

while an honest client keeps completing steps, and the daemon's RSS stays under the documented
worst case (docs/security.md) with these limits. Loopback only; everything has a deadline.
"""

from __future__ import annotations

import json
import re
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from host.client import DeviceClient
from protocol import Diagonal, Factored
from protocol.errors import CapacityError, StaleRequestError
from protocol.messages import PROGRAM_FACTOR, SESSION_CHARGE_BYTES

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
LIMITS = {"max_message_bytes": 4 * MiB, "memory_budget_bytes": 48 * MiB, "replay_cache_bytes": 64 * 1024,
          "stall_timeout_s": 1.0, "handshake_timeout_s": 1.0, "max_sessions": 64, "queue_size": 4}
PARTIAL = 3 * MiB  # declared by each stalling peer (under max_message_bytes: libzmq accepts it)
PEERS = 6


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    log = open(tmp_path_factory.mktemp("hostile") / "daemon.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "tests.inproc_daemon", "--limits", json.dumps(LIMITS),
                             "--cells", "4096"], stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline().decode() if ready else ""
        m = re.match(r"serving tcp://127\.0\.0\.1:(\d+) instance", line)
        assert m, f"daemon did not start: {line!r}"
        yield proc, int(m.group(1))
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        log.close()


def _zmtp_peer(port: int) -> socket.socket:
    """A TCP peer that speaks just enough ZMTP 3.1 (NULL mechanism, DEALER) to be handshaken."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
    s.sendall(greeting)
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    s.sendall(b"\x04" + bytes([len(body)]) + body)
    got = b""
    while len(got) < 64:  # the daemon's greeting: proof the handshake is under way
        chunk = s.recv(64 - len(got))
        assert chunk, "the daemon closed the connection during the handshake"
        got += chunk
    return s


def _closed_within(s: socket.socket, seconds: float) -> bool:
    """True when the daemon closes ``s`` within ``seconds`` (we read and drop what it sends)."""
    s.settimeout(0.2)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if s.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:  # reset by the daemon
            return True
    return False


def test_hostile_peers_do_not_take_the_daemon_down(daemon):
    proc, port = daemon
    endpoint = f"tcp://127.0.0.1:{port}"
    honest = DeviceClient(endpoint, seed=1, timeout=10.0, heartbeat=False)
    d = Diagonal(np.linspace(1.0, 2.0, 64))
    honest.step(d, np.ones(64), 0.5)
    base = _rss_mib(proc.pid)

    # 1. stalled partial frames and stalled handshakes
    stallers = []
    for _ in range(PEERS):
        s = _zmtp_peer(port)
        s.sendall(b"\x02" + struct.pack(">Q", PARTIAL) + b"\x00" * (PARTIAL - 4096))  # long frame, unfinished
        stallers.append(s)
    mute = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(PEERS)]
    time.sleep(0.3)
    held = _rss_mib(proc.pid) - base
    honest.step(d, np.ones(64), 0.5)  # still served while they hold their buffers

    # 2. sessions filling the budget with programs (each charges 1 MiB + 5 x its 1 MiB of J)
    j = np.ones((64, 4096), dtype=np.float32)  # 1 MiB
    drift = Factored(j, np.eye(64, dtype=np.float32), 1.0)
    per_session = SESSION_CHARGE_BYTES + PROGRAM_FACTOR * (j.nbytes + 64 * 64 * 4)
    filled, refused = [], None
    try:
        for _ in range(LIMITS["max_sessions"]):
            c = DeviceClient(endpoint, seed=2, timeout=10.0, heartbeat=False)
            filled.append(c)
            c.program(drift)
    except CapacityError as exc:
        refused = exc
    assert refused is not None, "the budget never refused a session or program"
    assert "memory budget" in str(refused)
    assert len(filled) <= LIMITS["memory_budget_bytes"] // per_session + 2

    # 3. large replies in every replay cache: over replay_cache_bytes, so not kept
    for c in filled[:-1]:
        r = c.step(Diagonal(np.ones(4096)), None, 1.0, samples=4)  # 4 x 4096 x 8 = 128 KiB of samples
        assert r.samples.shape == (4, 4096)
    status = honest.status()
    assert status["memory"]["used"] <= LIMITS["memory_budget_bytes"]
    assert status["memory"]["used"] > len(filled[:-1]) * SESSION_CHARGE_BYTES

    # a retry of a step whose reply was too large to keep says so, and runs nothing
    probe = filled[0]
    seq = probe._seq
    probe._seq = seq - 1
    with pytest.raises(StaleRequestError, match="replay_cache_bytes"):
        probe.step(Diagonal(np.ones(4096)), None, 1.0, samples=4)

    # 4. the stallers are dropped by the daemon, the honest client carries on
    assert all(_closed_within(s, 2.0 + LIMITS["stall_timeout_s"] * 2) for s in stallers), "stalled frames kept"
    assert all(_closed_within(s, 2.0 + LIMITS["handshake_timeout_s"] * 2) for s in mute), "mute peers kept"
    for _ in range(20):
        assert honest.step(d, np.ones(64), 0.5).mean.shape == (64,)
    # dropped peers are counted back (else the connection cap would fill up with ghosts)
    end = time.monotonic() + 5.0
    while honest.status()["connections"] > 1 + len(filled) and time.monotonic() < end:
        time.sleep(0.1)
    assert honest.status()["connections"] == 1 + len(filled)
    peak = _rss_mib(proc.pid) - base

    # RSS stays under the worst case of docs/security.md for these limits: the budget plus, per
    # connection, one partial frame (and at most RCVHWM queued messages, which these peers never
    # complete), plus the replies being sent. Measured growth must be far below that.
    worst = (LIMITS["memory_budget_bytes"] + PEERS * LIMITS["max_message_bytes"]
             + 2 * LIMITS["max_message_bytes"]) / MiB
    assert held <= worst and peak <= worst, (held, peak, worst)
    assert held >= PEERS * PARTIAL / MiB * 0.5, "the stalling peers did not even hold their frames (test broken)"
    print(f"held {held:.1f} MiB, peak {peak:.1f} MiB, worst {worst:.1f} MiB, sessions {len(filled)}")

    for c in [honest, *filled]:
        c.close()
    for s in stallers + mute:
        s.close()
