"""Concurrency on one daemon, bounded: many hosts at once stay isolated and bit-identical to the
embedded emulator, a stuck client blocks nobody, and a full queue answers "busy" (which the
client backs off from) instead of growing. The throughput numbers are benchmarks/bench_load.py's."""

from __future__ import annotations

import threading

import numpy as np
import zmq

from host.client import DeviceClient
from protocol import Factored
from protocol.codec import drift_to_wire, encode, request_header
from tests.test_wire_daemon import DaemonProcess
from thermo_device import Emulator, load_profile

N, M, STEPS = 48, 12, 15
KAPPA = 1e-3


def _run(dev, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    j = rng.standard_normal((M, N))
    out = []
    for _ in range(STEPS):
        out.append(dev.step(Factored(j, np.eye(M), 0.2), rng.standard_normal(N), 5.0).mean)
    return np.array(out)


def _stuck_client(endpoint: str) -> zmq.Socket:
    """Opens a session, sends a burst of steps and never reads a reply."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    spec, arrays = drift_to_wire(Factored(np.ones((M, N)), np.eye(M), 1.0))
    s.send_multipart(encode(request_header("open_session", 1, "stuck", 0, {"seed": 0})))
    for seq in range(1, 30):
        s.send_multipart(encode(request_header("step", seq + 1, "stuck", seq, {"drift": spec, "duration": 5.0}),
                                arrays))
    return s


def test_concurrent_hosts_are_isolated_and_bit_identical_to_embedded_while_a_client_is_stuck(tmp_path):
    hosts = 6
    d = DaemonProcess(tmp_path / "d.log", "--set", f"noise.kappa={KAPPA}")
    try:
        stuck = _stuck_client(d.endpoint)
        results: dict[int, np.ndarray] = {}
        errors: list[BaseException] = []

        def host(seed: int) -> None:
            try:
                with DeviceClient(d.endpoint, seed=seed, timeout=60) as dev:
                    results[seed] = _run(dev, seed)
            except BaseException as exc:  # reported below, with the others
                errors.append(exc)

        threads = [threading.Thread(target=host, args=(s,)) for s in range(hosts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a host hung"
        assert not errors, errors
        for seed in range(hosts):  # each session saw only its own calls, in its own order
            ref = _run(Emulator(load_profile("ideal", {"noise.kappa": KAPPA}), seed=seed), seed)
            assert np.array_equal(results[seed], ref), seed
        assert d.alive()
        stuck.close(0)
    finally:
        d.stop()


def test_a_full_queue_answers_busy_and_the_clients_back_off_until_served(tmp_path):
    # queue of 1: with a slow job running and several hosts waiting, some requests find it full
    d = DaemonProcess(tmp_path / "d.log", "--queue-size", "1", "--set", "integrator.method=euler_maruyama",
                      "--set", "integrator.dt=0.01")
    try:
        clients = [DeviceClient(d.endpoint, seed=s, timeout=60) for s in range(4)]
        errors: list[BaseException] = []

        def work(dev: DeviceClient) -> None:
            try:
                for _ in range(3):
                    dev.step(Factored(np.ones((2, 32)), np.eye(2), 1.0), None, 200.0)  # ~20k steps each
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert sum(c.busy_retries for c in clients) > 0  # back-pressure happened and was absorbed
        assert all(c.status()["session_status"]["ops"] >= 3 for c in clients)
        for c in clients:
            c.close()
        assert "code=busy" in (tmp_path / "d.log").read_text()
    finally:
        d.stop()
