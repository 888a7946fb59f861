"""A real daemon subprocess on loopback and real clients: every operation, isolation, bit identity
with the embedded emulator, bad input, busy/ping during long runs, a killed and a restarted daemon."""

from __future__ import annotations

import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

import host
from host.client import DeviceClient
from protocol import Dense, Device, Diagonal, ErrorCode, Factored
from protocol.codec import request_header
from protocol.errors import (
    CapacityError,
    DeviceTimeoutError,
    InvalidInputError,
    NonFiniteError,
    TooLargeError,
    UnknownSessionError,
)
from protocol.messages import PROTOCOL_VERSION, Limits, Op
from thermo_device import Emulator, load_profile

from .inproc_daemon import Raw, error_code  # shared with the protocol tests (test_security imports Raw here)

ROOT = Path(__file__).resolve().parent.parent
READ_LIMITS = Limits(max_message_bytes=1 << 34)
MAX_MESSAGE = 4_000_000  # the test daemon's --max-message-bytes: small, so oversize is cheap
TIMEOUT = 20.0  # client deadline in the tests that expect answers


# -- harness -----------------------------------------------------------------------------------------


class DaemonProcess:
    """``thermo-device serve`` in a subprocess (started with subprocess, never forked)."""

    def __init__(self, log_path: Path, *args: str, bind: str = "tcp://127.0.0.1:*") -> None:
        self.log = open(log_path, "ab")  # a file, not a pipe: a full pipe would block the daemon
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "thermo_device.cli", "serve", "--bind", bind, "--log-level", "INFO", *args],
            stdout=subprocess.PIPE, stderr=self.log, cwd=ROOT)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline().decode() if ready else ""
        m = re.match(r"serving (\S+) instance (\w+)", line)
        if not m:
            self.stop()
            raise RuntimeError(f"daemon did not start (said {line!r}); see {log_path}")
        self.endpoint, self.instance = m.group(1), m.group(2)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.log.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("daemon") / "daemon.log", "--profile", "ideal",
                      "--max-message-bytes", str(MAX_MESSAGE), "--queue-size", "1")
    yield d
    d.stop()


@pytest.fixture
def client(daemon):
    dev = DeviceClient(daemon.endpoint, seed=7, timeout=TIMEOUT)
    yield dev
    dev.close()


@pytest.fixture
def raw(daemon):
    r = Raw(daemon.endpoint)
    opened = r.request("open_session", seq=0, args={"seed": 1})
    assert opened.header["status"] == "ok"
    yield r
    r.close()


def _same_result(a, b):
    for name in ("mean", "state", "samples", "second_moment"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert a.analog_time_s == b.analog_time_s
    strip = {"wall_s"}
    assert {k: v for k, v in a.diagnostics.items() if k not in strip} == \
        {k: v for k, v in b.diagnostics.items() if k not in strip}


def _spd(n, seed):
    m = np.random.default_rng(seed).standard_normal((n, n))
    return m @ m.T / n + np.eye(n)


# -- every operation -----------------------------------------------------------------------------------


def test_every_operation_through_the_client(daemon, client):
    assert isinstance(client, Device)
    assert client.daemon["protocol"] == list(PROTOCOL_VERSION)
    assert set(client.daemon["ops"]) == {op.value for op in Op}
    assert client.daemon["features"] == ["seq_replay", "restart_detect", "lease", "upload"]
    assert client.instance == daemon.instance
    info = client.info()
    assert info["cells"] == load_profile("ideal").device.cells and info["seed"] == 7
    assert info["remote"]["instance"] == daemon.instance

    client.program(Dense(_spd(6, 0)), np.ones(6))
    r = client.run(1.0, burn_in=0.2, samples=3, second_moment=True)
    assert r.mean.shape == (6,) and r.samples.shape == (3, 6) and r.second_moment.shape == (6, 6)
    r2 = client.step(Diagonal(np.arange(1.0, 7.0)), None, 0.5, delay=0.1)
    assert r2.samples is None and r2.analog_time_s > 0
    state = client.state
    assert np.array_equal(state, r2.state)
    client.state = state * 0.5
    assert np.array_equal(client.state, state * 0.5)
    cal = client.calibrate(n=6, duration=20.0)["calibration"]
    assert cal["n"] == 6 and client.info()["calibrated_sizes"] == [6]
    with pytest.raises(InvalidInputError, match="calibrate"):
        client.calibrate(bogus=1)
    assert client.ping() < 5.0
    status = client.status()
    assert status["instance"] == daemon.instance and status["sessions"] >= 1
    assert status["session_status"]["ops"] >= 5
    session = client.session
    client.close()
    with pytest.raises(InvalidInputError):
        client.run(1.0)
    probe = Raw(daemon.endpoint)
    try:  # the session is gone on the daemon too
        assert error_code(probe.request("info", session=session)) == "unknown_session"
    finally:
        probe.close()


def test_connect_routes_tcp_to_a_device_client(daemon):
    dev = host.connect(daemon.endpoint, seed=3, timeout=TIMEOUT)
    try:
        assert isinstance(dev, DeviceClient) and dev.info()["seed"] == 3
    finally:
        dev.close()


def test_bit_identical_to_the_embedded_emulator(daemon):
    rng = np.random.default_rng(4)
    J = rng.standard_normal((3, 6)).astype(np.float32)
    H = np.eye(3, dtype=np.float32)

    def script(dev):
        out = []
        dev.program(Dense(_spd(6, 1)), rng_bias)
        out.append(dev.run(2.0, burn_in=0.5, samples=4, second_moment=True))
        out.append(dev.step(Factored(J, H, 0.5), rng_bias.astype(np.float32), 1.5, delay=0.2))
        s = dev.state
        dev.state = s[::-1].copy()
        out.append(dev.run(1.0, reset=False))
        out.append(dev.run(0.3, reset=True, samples=2))
        out.append(dev.step(Diagonal(np.linspace(1, 2, 6)), None, 0.7, burn_in=0.1))
        return out, dev.state

    rng_bias = rng.standard_normal(6)
    remote = host.connect(daemon.endpoint, seed=11, timeout=TIMEOUT)
    try:
        got, got_state = script(remote)
    finally:
        remote.close()
    want, want_state = script(Emulator(load_profile("ideal"), 11))
    for a, b in zip(got, want, strict=True):
        _same_result(a, b)
    assert np.array_equal(got_state, want_state)
    assert not np.array_equal(got[0].mean, got[3].mean)  # the comparison is not vacuous


def test_bit_identical_at_a_size_where_blas_threads_change_the_bits(daemon):
    # N = 600: eigh and GEMM split their sums over threads, so 1 and 2 BLAS threads round
    # differently. The daemon runs with --blas-threads 1 (default), as train() runs the embedded
    # emulator; here the embedded side is limited the same way.
    from threadpoolctl import threadpool_limits

    n = 600
    rng = np.random.default_rng(8)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a, b = (q * np.logspace(0, 1, n)) @ q.T, rng.standard_normal(n)
    remote = host.connect(daemon.endpoint, seed=2, timeout=TIMEOUT)
    try:
        remote.program(Dense(a), b)
        got = remote.run(2.0, samples=2)
    finally:
        remote.close()
    with threadpool_limits(1, user_api="blas"):
        emu = Emulator(load_profile("ideal"), 2)
        emu.program(Dense(a), b)
        want = emu.run(2.0, samples=2)
    _same_result(got, want)


def test_training_through_a_daemon_is_bit_identical_to_embedded(tmp_path):
    # The headline promise: the same training code, and the same numbers, on the embedded
    # emulator and on a device behind the wire (digits TNGD: J is 640 x 2410, 12 MB per step).
    from host.tasks import train

    noisy = {"noise.kappa": 1e-3}
    d = DaemonProcess(tmp_path / "train-daemon.log", "--profile", "ideal", "--set", "noise.kappa=1e-3")
    try:
        remote = train("digits", "tngd", steps=6, eval_every=3, device=d.endpoint)
    finally:
        d.stop()
    local = train("digits", "tngd", steps=6, eval_every=3, device="embedded:ideal", device_overrides=noisy)
    assert remote.loss == local.loss and remote.test_accuracy == local.test_accuracy
    assert len(set(local.loss)) == len(local.loss)  # training moved: the comparison is not vacuous


def test_two_clients_have_independent_state(daemon):
    a = DeviceClient(daemon.endpoint, seed=5, timeout=TIMEOUT)
    b = DeviceClient(daemon.endpoint, seed=5, timeout=TIMEOUT)
    ea, eb = Emulator("ideal", 5), Emulator("ideal", 5)
    try:
        assert a.session != b.session
        for dev, emu in ((a, ea), (b, eb)):
            dev.program(Diagonal(np.full(4, 2.0)), np.ones(4))
            emu.program(Diagonal(np.full(4, 2.0)), np.ones(4))
        b.state = np.full(4, 100.0)  # only b's device moves
        eb.state = np.full(4, 100.0)
        _same_result(a.run(0.5), ea.run(0.5))
        _same_result(b.run(0.5), eb.run(0.5))
        b.program(Dense(_spd(4, 2)))
        eb.program(Dense(_spd(4, 2)))
        _same_result(b.run(0.5), eb.run(0.5))
        _same_result(a.run(0.5), ea.run(0.5))
        assert not np.allclose(a.state, b.state)
        assert a.status()["sessions"] >= 2
    finally:
        a.close()
        b.close()


# -- bad input: an error reply, and the daemon keeps serving --------------------------------------


def _bad_requests(raw: Raw) -> list[tuple[str, list[Any], str]]:
    diag = np.ones(8)
    ok_step = {"drift": {"form": "diagonal"}, "duration": 0.1}
    return [
        ("garbage bytes", [b"\x00\xffnot msgpack at all"], "protocol"),
        ("empty frame", [b""], "protocol"),
        ("msgpack of the wrong shape", [msgpack.packb(["op", "ping"])], "protocol"),
        ("wrong field types", raw.frames("ping", id="seven"), "protocol"),
        ("truncated multipart", raw.frames("program", seq=50, args={"drift": {"form": "diagonal"}},
                                           arrays={"diag": diag, "bias": diag})[:2], "protocol"),
        ("unknown operation", raw.frames("explode"), "unknown_operation"),
        ("wrong protocol version", raw.frames("ping", version=[PROTOCOL_VERSION[0] + 1, 0]), "version"),
        ("dtype/shape mismatch with frame",
         raw.frames("program", seq=51, args={"drift": {"form": "diagonal"}}, arrays={"diag": diag})[:1]
         + [np.ones(5).tobytes()], "protocol"),
        ("disallowed dtype", [msgpack.packb(request_header("program", 1, raw.session, 52) | {
            "arrays": [{"name": "diag", "frame": 0, "dtype": "|O", "shape": [8]}]})] + [diag.tobytes()],
         "protocol"),
        ("NaN in a drift", raw.frames("step", seq=53, args=ok_step, arrays={"diag": np.array([1.0, np.nan])}),
         "non_finite"),
        ("Inf in a bias", raw.frames("step", seq=54, args=ok_step,
                                     arrays={"diag": np.ones(2), "bias": np.array([np.inf, 0.0])}), "non_finite"),
        ("NaN duration", raw.frames("step", seq=55, args=ok_step | {"duration": float("nan")},
                                    arrays={"diag": np.ones(2)}), "non_finite"),
        ("oversize message", raw.frames("set_state", seq=56, arrays={
            "a": np.zeros(MAX_MESSAGE // 16 + 1000), "b": np.zeros(MAX_MESSAGE // 16 + 1000)}), "too_large"),
        ("too many axes", raw.frames("set_state", seq=57, arrays={"state": np.zeros((1, 1, 1, 2))}), "too_large"),
        ("unknown session", raw.frames("run", seq=1, session="no-such-session", args={"duration": 1.0}),
         "unknown_session"),
        ("missing seq", raw.frames("run", args={"duration": 1.0}), "protocol"),
        ("unexpected array", raw.frames("run", seq=58, args={"duration": 1.0}, arrays={"J": diag}),
         "invalid_input"),
        ("unknown drift form", raw.frames("program", seq=59, args={"drift": {"form": "sparse"}},
                                          arrays={"diag": diag}), "invalid_input"),
        ("bad run argument", raw.frames("run", seq=60, args={"duration": 1.0, "samples": -1}), "invalid_input"),
        ("run before program", raw.frames("run", seq=61, args={"duration": 1.0}), "not_programmed"),
        ("session id in use", raw.frames("open_session", seq=0), "invalid_input"),
    ]


def test_bad_input_gets_an_error_reply_and_the_daemon_keeps_serving(daemon, raw, client):
    for name, frames, code in _bad_requests(raw):
        reply = raw.ask(frames)
        assert error_code(reply) == code, f"{name}: {reply.header}"
        assert reply.header["instance"] == daemon.instance
        assert daemon.alive(), name
    # the same daemon still does real work for a well-behaved client
    client.program(Diagonal(np.ones(3)), np.ones(3))
    assert client.run(0.2).mean.shape == (3,)
    assert client.status()["errors"] >= len(_bad_requests(raw))


def test_error_replies_echo_the_request_id(raw):
    frames = raw.frames("explode")
    reply = raw.ask(frames)
    assert reply.header["id"] == raw.req and error_code(reply) == "unknown_operation"
    garbage = raw.ask([b"\x93garbage"])
    assert garbage.header["id"] is None and error_code(garbage) == "protocol"


def test_client_surfaces_daemon_errors_with_code_and_message(client):
    client.program(Diagonal(np.ones(3)))
    with pytest.raises(NonFiniteError) as info:
        client.run(float("inf"))
    assert info.value.code == ErrorCode.NON_FINITE and "duration" in info.value.message
    with pytest.raises(NonFiniteError):
        client.program(Diagonal(np.ones(3)), np.array([0.0, np.nan, 1.0]))
    with pytest.raises(InvalidInputError) as info:
        client.program(Diagonal(np.ones(5000)))  # more than the profile's 4096 cells
    assert info.value.code == ErrorCode.CAPACITY


def test_a_frame_above_the_hard_guard_is_dropped_without_harm(daemon, client):
    raw = Raw(daemon.endpoint, timeout_ms=1000)
    try:
        raw.sock.send_multipart([b"x", bytes(MAX_MESSAGE + 70_000)])
        with pytest.raises(zmq.Again):  # libzmq drops the connection before reading the frame
            raw.sock.recv_multipart()
    finally:
        raw.close()
    assert daemon.alive() and client.ping() < 5.0


def test_client_sends_numpy_scalars_as_plain_arguments(client):
    client.program(Diagonal(np.ones(3)))
    res = client.run(0.5, samples=np.int64(2), reset=np.bool_(True), second_moment=np.bool_(False))
    assert res.samples.shape == (2, 3) and res.second_moment is None


def test_client_refuses_an_oversize_request_at_once_instead_of_timing_out(daemon, client):
    # Above the daemon's hard frame guard a request would get no reply at all (test above): the
    # client knows max_message_bytes from hello and raises before sending.
    huge = Diagonal(np.ones(MAX_MESSAGE // 8 + 70_000))
    client.chunk_bytes = None  # no row-block uploads (protocol 1.3): one message, over the limit
    t0 = time.monotonic()
    with pytest.raises(TooLargeError, match="max_message_bytes"):
        client.program(huge)
    assert time.monotonic() - t0 < TIMEOUT / 4
    client.chunk_bytes = 32 << 20  # with uploads the array travels, and the device judges it
    with pytest.raises(CapacityError, match="cells"):
        client.program(huge)
    client.program(Diagonal(np.ones(3)))  # the session goes on
    assert client.run(0.2).mean.shape == (3,)


def test_client_takes_an_id_less_error_as_its_request_s(client):
    # A header over max_header_bytes cannot be read, so its error reply has id nil; the client,
    # which has one request outstanding per socket, raises it rather than waiting out the deadline.
    t0 = time.monotonic()
    with pytest.raises(TooLargeError):
        client.calibrate(note="x" * 70_000)
    assert time.monotonic() - t0 < TIMEOUT / 4
    assert client.ping() < 5.0


# -- sequence numbers: retries are replayed, never run twice ---------------------------------------


def test_a_retried_request_gets_the_cached_reply(raw):
    arrays = {"diag": np.ones(4), "bias": np.ones(4)}
    assert raw.request("program", seq=1, args={"drift": {"form": "diagonal"}}, arrays=arrays).header["status"] == "ok"
    first = raw.ask(run := raw.frames("run", seq=2, args={"duration": 1.0}))
    again = raw.ask(run)  # the same request again (a client retry)
    assert first.header["status"] == again.header["status"] == "ok"
    assert np.array_equal(first.arrays["state"], again.arrays["state"])
    ops = raw.request("status").header["result"]
    third = raw.request("run", seq=3, args={"duration": 1.0})
    assert not np.array_equal(third.arrays["state"], first.arrays["state"])  # a new seq does run
    replay = raw.request("run", seq=3, args={"duration": 1.0})
    assert np.array_equal(replay.arrays["state"], third.arrays["state"])
    assert raw.request("status").header["result"]["served"] == ops["served"] + 2  # replays are not re-run
    assert error_code(raw.request("run", seq=2, args={"duration": 1.0})) == "stale_request"
    assert ops["served"] >= 3


def test_a_replay_answers_the_retry_s_id_and_only_the_same_operation(raw):
    arrays = {"diag": np.ones(4)}
    assert raw.request("program", seq=1, args={"drift": {"form": "diagonal"}}, arrays=arrays).header["status"] == "ok"
    first = raw.request("run", seq=2, args={"duration": 1.0})
    retry = raw.request("run", seq=2, args={"duration": 1.0})  # a retry under a new request id
    assert retry.header["id"] == raw.req != first.header["id"]
    assert np.array_equal(retry.arrays["state"], first.arrays["state"])
    other = raw.request("set_state", seq=2, arrays={"state": np.zeros(4)})  # seq reused by another op
    assert error_code(other) == "stale_request" and "already used by run" in other.header["error"]["message"]
    assert np.array_equal(raw.request("get_state").arrays["state"], first.arrays["state"])  # it did not run


# -- long runs: control operations do not wait, compute requests queue or get "busy" --------------


def test_ping_status_and_close_do_not_wait_behind_a_long_run(daemon):
    a = DeviceClient(daemon.endpoint, seed=1, timeout=60)
    b = DeviceClient(daemon.endpoint, seed=2, timeout=TIMEOUT)
    c = DeviceClient(daemon.endpoint, seed=3, timeout=TIMEOUT)
    d = DeviceClient(daemon.endpoint, seed=4, timeout=TIMEOUT)
    d.retry_busy = False  # this test looks at the "busy" reply itself
    try:
        for dev in (a, b, c, d):
            dev.program(Diagonal(np.ones(64)))
        longest = load_profile("ideal").device.max_duration
        duration = 1e4
        # samples=1 keeps the sampled readout (every ADC sample stepped): the closed-form window
        # would finish any duration in milliseconds, and this test needs a run that takes seconds
        while True:  # a run long enough to time: fixed costs make a short one a poor estimate
            t0 = time.perf_counter()
            a.run(duration, samples=1)
            elapsed = time.perf_counter() - t0
            if elapsed > 0.3 or duration >= longest:
                break
            duration = min(longest, duration * 4)
        duration = min(longest, duration * 3.0 / elapsed)  # about 3 s
        done = {}
        runner = threading.Thread(target=lambda: done.setdefault("r", a.run(duration, samples=1)))
        runner.start()
        time.sleep(0.3)
        t1 = time.perf_counter()
        assert b.ping() < 2.0
        status = b.status()
        assert status["running"] is not None and status["running"]["op"] == "run"
        queued = threading.Thread(target=lambda: done.setdefault("c", c.run(0.1)))
        queued.start()  # queue size 1: this one waits behind the long run...
        time.sleep(0.3)
        st = b.status()
        assert st["queued"] == 1, (st, c.busy_retries, done.keys())
        with pytest.raises(Exception) as info:  # ...and the next one is told "busy"
            d.run(0.1)
        assert info.value.code == ErrorCode.BUSY
        d.close()  # close is a control operation too
        control_time = time.perf_counter() - t1
        assert runner.is_alive() and "r" not in done, "the long run finished before the control ops"
        assert control_time < 2.5
        runner.join(60)
        queued.join(60)
        assert done["r"].mean.shape == (64,) and done["c"].mean.shape == (64,)
    finally:
        for dev in (a, b, c, d):
            dev.close()


# -- a killed daemon, a restarted daemon, a graceful stop ---------------------------------------------


def test_killed_daemon_times_out_and_restarted_daemon_is_reconnected(tmp_path):
    first = DaemonProcess(tmp_path / "first.log", "--profile", "ideal")
    second = None
    try:
        port_bind = first.endpoint
        dev = DeviceClient(first.endpoint, seed=9, timeout=1.0)
        strict = DeviceClient(first.endpoint, seed=9, timeout=1.0, restore=False)
        dev.program(Diagonal(np.linspace(1, 2, 5)), np.ones(5))
        last = dev.run(0.5).state.copy()
        strict.program(Diagonal(np.ones(2)))

        first.proc.kill()
        first.proc.wait(10)
        t0 = time.perf_counter()
        with pytest.raises(DeviceTimeoutError):
            dev.run(0.5)
        elapsed = time.perf_counter() - t0
        assert 0.9 <= elapsed < 2.0, elapsed  # within its deadline, not a hang
        dev.timeout = strict.timeout = TIMEOUT  # a fresh daemon's first session may take longer

        second = DaemonProcess(tmp_path / "second.log", "--profile", "ideal", bind=port_bind)
        assert second.instance != first.instance
        restored = dev.state  # notices the new instance, restores the session, then answers
        assert dev.instance == second.instance
        assert np.array_equal(restored, last)
        assert dev.run(0.5).mean.shape == (5,)  # and keeps working with the restored drift
        with pytest.raises(UnknownSessionError):
            strict.run(0.5)
        dev.close()
        strict.close()

        second.proc.send_signal(signal.SIGTERM)  # graceful shutdown
        assert second.proc.wait(10) == 0
    finally:
        first.stop()
        if second is not None:
            second.stop()
