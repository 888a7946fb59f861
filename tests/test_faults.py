"""Faults a lab daemon meets: kill -9 mid-training and a restart, a network partition, a client
killed mid-request, wall-clock jumps; plus snapshots over the wire. Real daemon processes on
loopback; every wait is bounded."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import host
from host.client import DeviceClient
from protocol import Dense, Factored
from protocol.errors import DeviceTimeoutError
from tests.test_wire_daemon import ROOT, DaemonProcess
from thermo_device import Emulator, load_profile

N, M = 24, 40
KAPPA = "noise.kappa=1e-4"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((M, N)) / np.sqrt(N), rng.standard_normal(M)


def loss(a: np.ndarray, y: np.ndarray, theta: np.ndarray) -> float:
    return float(0.5 * np.sum((a @ theta - y) ** 2))


def train(dev, steps: int, on_step=None) -> tuple[float, np.ndarray]:
    """TNGD on least squares (curvature A^T A + lambda I as Factored(A, I, lambda))."""
    a, y = problem()
    opt = host.TNGD(dev, lr=0.5, analog_time=10.0, damping=0.05)
    theta = np.zeros(N)
    for k in range(steps):
        if on_step is not None:
            on_step(k)
        theta = theta + opt.step(a.T @ (a @ theta - y), Factored(a, np.eye(M), 0.05))
    return loss(a, y, theta), theta


def test_snapshot_restore_over_the_wire_continues_bit_for_bit(tmp_path):
    d = DaemonProcess(tmp_path / "d.log", "--set", KAPPA)
    try:
        a, y = problem()
        with DeviceClient(d.endpoint, seed=4, timeout=20) as one, DeviceClient(d.endpoint, seed=9, timeout=20) as two:
            one.program(Factored(a, np.eye(M), 0.05), a.T @ y)
            one.run(5.0)
            snap = one.snapshot()
            expected = one.run(3.0, delay=0.5, samples=4).samples
            two.restore(snap)  # another session, another seed: the snapshot decides
            assert np.array_equal(two.run(3.0, delay=0.5, samples=4).samples, expected)
            # the formats agree across the seam: an embedded emulator restores a remote snapshot
            emb = Emulator(load_profile("ideal", {"noise.kappa": 1e-4}), seed=0)
            emb.restore(snap)
            assert np.array_equal(emb.run(3.0, delay=0.5, samples=4).samples, expected)
    finally:
        d.stop()


def test_kill_9_mid_training_then_restart_is_detected_restored_and_the_run_finishes(tmp_path):
    port = free_port()
    bind = f"tcp://127.0.0.1:{port}"
    steps, kill_at = 30, 12
    ref = DaemonProcess(tmp_path / "ref.log", "--set", KAPPA)
    try:
        with DeviceClient(ref.endpoint, seed=1, timeout=20) as dev:
            ref_loss, _ = train(dev, steps)
    finally:
        ref.stop()

    box = {"d": DaemonProcess(tmp_path / "a.log", "--set", KAPPA, bind=bind)}
    first = box["d"].instance
    restarted = threading.Event()
    timing: dict[str, float] = {}

    def kill_and_restart() -> None:
        os.kill(box["d"].proc.pid, signal.SIGKILL)
        box["d"].proc.wait(timeout=10)
        timing["killed"] = time.monotonic()
        time.sleep(1.0)  # the host's next step meets a dead daemon first
        box["d"] = DaemonProcess(tmp_path / "b.log", "--set", KAPPA, bind=bind)
        restarted.set()

    def on_step(k: int) -> None:
        if k == kill_at:
            threading.Thread(target=kill_and_restart, daemon=True).start()
            time.sleep(0.3)  # the kill lands before this step's request
        if k == kill_at + 1:
            timing["recovered"] = time.monotonic()

    try:
        with DeviceClient(bind, seed=1, timeout=15, retries=5) as dev:
            got_loss, _ = train(dev, steps, on_step)
            assert restarted.is_set()
            assert dev.instance == box["d"].instance != first  # it noticed the new instance
    finally:
        box["d"].stop()
    # detected and recovered within the call's deadline (15 s), not by a hang
    assert timing["recovered"] - timing["killed"] < 15.0
    # Restored program and analog state, restarted noise stream: the final loss agrees with the
    # uninterrupted run within the noise. Stationary noise of x_bar per step is about
    # sqrt(kappa / (lambda_min t)) = sqrt(1e-4 / (0.05 * 10)) = 0.014 per coordinate, times lr;
    # its effect on the loss at the optimum is second order: |dL| <~ N (lr * 0.014)^2 = 1.2e-3.
    assert abs(got_loss - ref_loss) <= 1.2e-3, (got_loss, ref_loss)


class Proxy:
    """A TCP forwarder between client and daemon whose link can be cut and healed."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stopped:
            try:
                c, _ = self.listener.accept()
            except OSError:
                continue
            if not self.up.is_set():
                c.close()  # partitioned: connections are refused
                continue
            s = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            with self.lock:
                self.conns += [c, s]
            threading.Thread(target=self._pump, args=(c, s), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        socks = [a, b]
        try:
            while not self.stopped and self.up.is_set():
                r, _, _ = select.select(socks, [], [], 0.1)
                for s in r:
                    data = s.recv(1 << 16)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            pass
        finally:
            a.close()
            b.close()

    def cut(self) -> None:
        self.up.clear()
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.conns.clear()

    def heal(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.stopped = True
        self.cut()
        self.listener.close()


def test_network_partition_times_out_within_the_deadline_then_heals_without_running_twice(tmp_path):
    d = DaemonProcess(tmp_path / "d.log", "--set", KAPPA)
    proxy = Proxy(int(d.endpoint.rpartition(":")[2]))
    try:
        with DeviceClient(d.endpoint, seed=2, timeout=20) as dev:
            ref_loss, ref_theta = train(dev, 12)
        via = f"tcp://127.0.0.1:{proxy.port}"
        with DeviceClient(via, seed=2, timeout=2.0, retries=1) as dev:
            # a partition with no retry budget left: a timeout error within the deadline
            proxy.cut()
            t = time.monotonic()
            with pytest.raises(DeviceTimeoutError):
                _ = dev.state
            assert time.monotonic() - t < 2.0 + 1.0
            proxy.heal()
            dev.timeout = 20.0
            dev.retries = 6

            def on_step(k: int) -> None:
                if k == 5:  # cut in mid-run and heal a little later, while the step is retried
                    proxy.cut()
                    threading.Timer(1.5, proxy.heal).start()

            got_loss, got_theta = train(dev, 12, on_step)
            assert dev.instance == d.instance  # same daemon: no restore needed
    finally:
        proxy.close()
        d.stop()
    # sequence numbers + the reply cache: no step ran twice or was lost, so bit for bit the same
    assert got_loss == ref_loss
    assert np.array_equal(got_theta, ref_theta)


CLIENT = """
import sys, numpy as np
from host.client import DeviceClient
from protocol import Dense
dev = DeviceClient(sys.argv[1], seed=0, timeout=60)
dev.program(Dense(np.eye(64) * 2.0))
print(dev.session, flush=True)
dev.run(20000.0, samples=0)  # long: killed while the daemon works on it
"""


def test_a_client_killed_mid_request_has_its_session_reclaimed(tmp_path):
    d = DaemonProcess(tmp_path / "d.log", "--session-idle-s", "1.0", "--set", "integrator.method=euler_maruyama",
                      "--set", "integrator.dt=0.01")
    try:
        child = subprocess.Popen([sys.executable, "-c", CLIENT, d.endpoint], stdout=subprocess.PIPE, cwd=ROOT)
        ready, _, _ = select.select([child.stdout], [], [], 60)
        assert ready, "client did not start"
        sid = child.stdout.readline().decode().strip()
        time.sleep(0.3)  # its run is in progress on the daemon
        child.kill()
        child.wait(timeout=10)
        log = tmp_path / "d.log"
        with DeviceClient(d.endpoint, seed=0, timeout=30) as watcher:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and f"event=reap session={sid[:8]}" not in log.read_text():
                watcher.status()  # renews the watcher's own lease while it waits
                time.sleep(0.2)
            st = watcher.status()
            assert st["sessions"] == 1, st  # the dead client's session is gone, the watcher's is not
            assert st["session_status"] is not None
            assert watcher.ping() < 5.0
        assert d.alive()
        assert "event=reply_dropped" in log.read_text()  # its reply had nowhere to go: dropped, not queued
    finally:
        d.stop()


def test_wall_clock_jumps_do_not_move_deadlines(tmp_path, monkeypatch):
    """Deadlines use the monotonic clock: jumping time.time() by hours changes nothing."""
    real = time.time
    jumps = iter([3600.0, -7200.0, 86400.0, -86400.0] * 1000)
    monkeypatch.setattr(time, "time", lambda: real() + next(jumps))
    monkeypatch.setattr(time, "time_ns", lambda: int((real() + next(jumps)) * 1e9))
    d = DaemonProcess(tmp_path / "d.log")
    try:
        with DeviceClient(d.endpoint, seed=0, timeout=5.0) as dev:
            dev.program(Dense(np.eye(4) * 2.0))
            assert dev.run(1.0).mean.shape == (4,)
            d.stop()
            t = time.monotonic()
            with pytest.raises(DeviceTimeoutError):
                dev.run(1.0)
            assert 4.0 < time.monotonic() - t < 7.0
    finally:
        if d.alive():
            d.stop()


def test_an_expired_lease_is_restored_by_the_client_with_its_program_and_state(tmp_path):
    d = DaemonProcess(tmp_path / "d.log", "--session-idle-s", "1.0")
    try:
        # no heartbeat: this client goes quiet on purpose, so that the daemon reclaims its session
        with DeviceClient(d.endpoint, seed=3, timeout=20, heartbeat=False) as dev:
            dev.program(Dense(np.diag([1.0, 2.0, 4.0])), np.array([1.0, 2.0, 4.0]))
            first = dev.run(30.0).state  # relaxed to A^-1 b = 1 (noise kT/C: negligible)
            old = dev.session
            time.sleep(2.0)  # the daemon reclaims the idle session
            res = dev.run(0.5)  # restored: same program, warm state, not a fresh zero state
            assert dev.session != old
            np.testing.assert_allclose(res.mean, first, atol=1e-4)
        assert "event=reap" in (tmp_path / "d.log").read_text()
    finally:
        d.stop()
