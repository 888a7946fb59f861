"""CURVE (ironhouse) on a real daemon subprocess: allow-listed keys work and give the same numbers
as plaintext; unknown keys, a wrong server key and no key at all get nothing (not even hello) and
fail fast with AuthenticationError; the daemon keeps serving; keygen output loads; binding a
non-loopback address needs authentication or an explicit flag. Loopback only; keys in tmp_path."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth

import host
from host.client import DeviceClient
from protocol import Dense, Diagonal, Factored
from protocol.errors import AuthenticationError, DeviceTimeoutError, InvalidInputError, UnknownSessionError
from protocol.messages import Op
from tests.test_wire_daemon import DaemonProcess, Raw, _same_result, _spd
from thermo_device import Emulator, load_profile
from thermo_device.daemon import check_bind
from thermo_device.security import ServerSecurity, keygen

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0  # long enough that a refusal reported in well under it cannot be a timeout
FAST = 2.0  # a refused handshake must be reported within this


def _keygen_cli(out: Path, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "thermo_device.cli", "keygen", "--out", str(out),
                           "--name", name, *extra], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    for out, name in ((d, "daemon"), (d / "allow", "alice"), (d / "allow", "bob"), (d, "mallory"),
                      (d, "other-daemon")):
        done = _keygen_cli(out, name)
        assert done.returncode == 0, done.stderr
    return d


@pytest.fixture(scope="module")
def curve_daemon(keys, tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("curve") / "daemon.log", "--profile", "ideal",
                      "--curve-secret-key", str(keys / "daemon.key_secret"), "--allow-keys", str(keys / "allow"))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def plain_daemon(tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("plain") / "daemon.log", "--profile", "ideal")
    yield d
    d.stop()


def _alice(keys: Path) -> dict[str, str]:
    return {"server_key": str(keys / "daemon.key"), "secret_key_file": str(keys / "allow" / "alice.key_secret")}


# -- keys ----------------------------------------------------------------------------------------------


def test_keygen_writes_loadable_certificates_with_a_private_secret(keys, tmp_path):
    public, secret = zmq.auth.load_certificate(keys / "daemon.key_secret")
    assert len(public) == 40 and len(secret) == 40
    assert zmq.auth.load_certificate(keys / "daemon.key") == (public, None)  # the public half only
    assert stat.S_IMODE((keys / "daemon.key_secret").stat().st_mode) == 0o600
    assert zmq.curve_public(secret) == public  # the pair belongs together
    assert ServerSecurity(keys / "daemon.key_secret", keys / "allow").public_key == public
    again = _keygen_cli(keys, "daemon")  # never overwrite a key silently
    assert again.returncode == 2 and "already exists" in again.stderr
    assert zmq.auth.load_certificate(keys / "daemon.key_secret")[1] == secret
    pub2, sec2 = keygen(tmp_path, "x")
    pub3, _ = keygen(tmp_path, "x", force=True)
    assert pub3 == pub2 and zmq.auth.load_certificate(sec2)[0] != public
    with pytest.raises(InvalidInputError):
        keygen(tmp_path, "../escape")


def test_server_security_refuses_bad_set_ups(keys, tmp_path):
    with pytest.raises(InvalidInputError, match="no secret key"):
        ServerSecurity(keys / "daemon.key", keys / "allow")  # the public file by mistake
    with pytest.raises(InvalidInputError, match="not a directory"):
        ServerSecurity(keys / "daemon.key_secret", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no client"):
        ServerSecurity(keys / "daemon.key_secret", tmp_path / "empty")


# -- binding -------------------------------------------------------------------------------------------


def test_non_loopback_bind_needs_authentication_or_the_explicit_flag():
    for addr in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:5555", "tcp://[::]:5555",
                 "tcp://eth0:5555"):
        with pytest.raises(InvalidInputError, match="--allow-remote"):
            check_bind(addr)
        check_bind(addr, authenticated=True)  # CURVE on: allowed
        check_bind(addr, allow_remote=True)  # the operator's explicit choice
    for addr in ("tcp://127.0.0.1:5555", "tcp://localhost:5555", "tcp://[::1]:5555", "ipc:///tmp/x.sock"):
        check_bind(addr)


def test_cli_refuses_a_public_bind_without_curve_and_half_a_curve_set_up(keys):
    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "thermo_device.cli", "serve", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    public = serve("--bind", "tcp://0.0.0.0:*")  # refused before anything is bound
    assert public.returncode == 2 and "refusing to bind" in public.stderr and "serving" not in public.stdout
    half = serve("--bind", "tcp://127.0.0.1:*", "--curve-secret-key", str(keys / "daemon.key_secret"))
    assert half.returncode != 0 and "--allow-keys" in half.stderr


# -- the handshake -------------------------------------------------------------------------------------


def _script(dev):
    rng = np.random.default_rng(21)
    J = rng.standard_normal((3, 6))
    out = [dev.step(Dense(_spd(6, 3)), np.ones(6), 2.0, burn_in=0.5, samples=3)]
    out.append(dev.step(Factored(J, np.eye(3), 0.5), None, 1.0, delay=0.1))
    out.append(dev.step(Diagonal(np.linspace(1, 2, 6)), np.ones(6), 0.7))
    return out


def test_allowed_key_works_and_is_bit_identical_to_plaintext(keys, curve_daemon, plain_daemon):
    with host.connect(curve_daemon.endpoint, seed=5, curve=_alice(keys), timeout=TIMEOUT) as sec:
        assert isinstance(sec, DeviceClient) and sec.instance == curve_daemon.instance
        got = _script(sec)
        assert sec.info()["seed"] == 5 and sec.ping() < FAST
    with host.connect(plain_daemon.endpoint, seed=5, timeout=TIMEOUT) as plain:
        want = _script(plain)
    ref = _script(Emulator(load_profile("ideal"), 5))
    for a, b, c in zip(got, want, ref, strict=True):
        _same_result(a, b)
        _same_result(a, c)
    assert not np.array_equal(got[0].mean, got[2].mean)  # not vacuous


@pytest.mark.parametrize("case", ["unknown client key", "wrong server key", "no key at all"])
def test_refused_clients_fail_fast_and_the_daemon_keeps_serving(case, keys, curve_daemon):
    good = DeviceClient(curve_daemon.endpoint, seed=1, timeout=TIMEOUT,
                        curve_server_key=keys / "daemon.key", curve_secret_key_file=keys / "allow" / "alice.key_secret")
    try:
        good.program(Diagonal(np.ones(4)), np.ones(4))
        served = good.status()["served"]
        kwargs = {
            "unknown client key": {"curve": {"server_key": str(keys / "daemon.key"),
                                             "secret_key_file": str(keys / "mallory.key_secret")}},
            "wrong server key": {"curve": (str(keys / "other-daemon.key"), str(keys / "allow" / "alice.key_secret"))},
            "no key at all": {},
        }[case]
        t0 = time.perf_counter()
        with pytest.raises(AuthenticationError) as info:
            host.connect(curve_daemon.endpoint, seed=1, timeout=TIMEOUT, **kwargs)
        elapsed = time.perf_counter() - t0
        assert elapsed < FAST, f"{case}: refusal took {elapsed:.2f} s"  # a verdict, not the deadline
        assert info.value.code.value == "auth"
        assert good.run(0.5).mean.shape == (4,)  # the allowed client is unaffected
        # the refused client reached nothing: the daemon's loop served only our status call since
        assert good.status()["served"] == served + 2
        assert curve_daemon.alive()
    finally:
        good.close()


@pytest.mark.parametrize("with_bad_key", [False, True])
def test_a_raw_peer_without_the_right_key_gets_no_bytes_at_all(with_bad_key, keys, curve_daemon):
    raw = Raw(curve_daemon.endpoint, timeout_ms=1500)
    try:
        if with_bad_key:
            pub, sec = zmq.auth.load_certificate(keys / "mallory.key_secret")
            raw.sock.close(0)
            raw.sock = zmq.Context.instance().socket(zmq.DEALER)
            raw.sock.setsockopt(zmq.LINGER, 0)
            raw.sock.setsockopt(zmq.RCVTIMEO, 1500)
            raw.sock.curve_publickey, raw.sock.curve_secretkey = pub, sec
            raw.sock.curve_serverkey = zmq.auth.load_certificate(keys / "daemon.key")[0]
            raw.sock.connect(curve_daemon.endpoint)
        raw.sock.setsockopt(zmq.SNDTIMEO, 1500)  # a DEALER with no completed handshake blocks on send
        try:
            raw.sock.send_multipart(raw.frames(Op.HELLO.value, session=None))
        except zmq.Again:
            pass  # the refused handshake left no peer to queue for: nothing sent, nothing back
        with pytest.raises(zmq.Again):
            raw.sock.recv_multipart()
    finally:
        raw.close()
    assert curve_daemon.alive()


def test_a_curve_client_of_a_plaintext_daemon_is_told_so(keys, plain_daemon):
    with pytest.raises(AuthenticationError, match="does not use CURVE"):
        host.connect(plain_daemon.endpoint, curve=_alice(keys), timeout=TIMEOUT)


def test_client_argument_checks(keys, curve_daemon):
    with pytest.raises(InvalidInputError, match="both"):
        DeviceClient(curve_daemon.endpoint, curve_server_key=keys / "daemon.key")
    with pytest.raises(InvalidInputError, match="Z85|certificate"):
        DeviceClient(curve_daemon.endpoint, curve_server_key="not-a-key",
                     curve_secret_key_file=keys / "allow" / "alice.key_secret")
    with pytest.raises(InvalidInputError):
        host.connect(curve_daemon.endpoint, curve={"server_key": "x"})
    server_z85 = zmq.auth.load_certificate(keys / "daemon.key")[0].decode()  # the key itself works too
    with host.connect(curve_daemon.endpoint, curve=(server_z85, keys / "allow" / "alice.key_secret"),
                      timeout=TIMEOUT) as dev:
        assert dev.ping() < FAST


def test_a_daemon_that_is_down_is_still_a_timeout_not_an_auth_error(keys, tmp_path):
    d = DaemonProcess(tmp_path / "d.log", "--profile", "ideal",
                      "--curve-secret-key", str(keys / "daemon.key_secret"), "--allow-keys", str(keys / "allow"))
    endpoint = d.endpoint
    d.stop()
    t0 = time.perf_counter()
    with pytest.raises(DeviceTimeoutError):
        host.connect(endpoint, curve=_alice(keys), timeout=1.0)
    assert time.perf_counter() - t0 < 3.0


def test_sighup_reloads_the_allow_list_and_sigterm_stops_cleanly(keys, tmp_path):
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "alice.key").write_bytes((keys / "allow" / "alice.key").read_bytes())
    newcomer_pub, newcomer_sec = keygen(tmp_path, "bob")
    d = DaemonProcess(tmp_path / "d.log", "--profile", "ideal",
                      "--curve-secret-key", str(keys / "daemon.key_secret"), "--allow-keys", str(allow))
    try:
        bob = {"server_key": str(keys / "daemon.key"), "secret_key_file": str(newcomer_sec)}
        with pytest.raises(AuthenticationError):
            host.connect(d.endpoint, curve=bob, timeout=TIMEOUT)
        os.replace(newcomer_pub, allow / "bob.key")
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:  # the signal is handled within the loop's 100 ms receive timeout
            try:
                dev = host.connect(d.endpoint, curve=bob, timeout=TIMEOUT)
                break
            except AuthenticationError:
                assert time.monotonic() < deadline, "SIGHUP did not reload the allow-list"
                time.sleep(0.1)
        assert dev.ping() < FAST
        dev.close()
        (allow / "bob.key").unlink()  # revocation works the same way
        d.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        with pytest.raises(AuthenticationError):
            host.connect(d.endpoint, curve=bob, timeout=TIMEOUT)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0  # the ZAP thread is stopped, the context terminates
    finally:
        d.stop()


def test_a_session_belongs_to_the_key_that_opened_it(keys, curve_daemon):
    """An allowed client that learns another client's session id still cannot touch that session."""
    bob_keys = {"server_key": str(keys / "daemon.key"), "secret_key_file": str(keys / "allow" / "bob.key_secret")}
    with host.connect(curve_daemon.endpoint, seed=1, curve=_alice(keys), timeout=TIMEOUT) as alice, \
            host.connect(curve_daemon.endpoint, seed=2, curve=bob_keys, timeout=TIMEOUT) as bob:
        alice.program(Diagonal(np.ones(3)), np.ones(3))
        before = alice.run(1.0).state
        bob.auto_restore = False
        bob._session, bob._seq = alice.session, 10**6  # a stolen id
        with pytest.raises(UnknownSessionError):
            bob.run(1.0)
        with pytest.raises(UnknownSessionError):
            bob.state = np.zeros(3)
        with pytest.raises(UnknownSessionError):
            bob._call(Op.CLOSE_SESSION, mutating=True, recover=False)
        assert bob.status()["session_status"] is None  # not even its counters
        assert alice.status()["session_status"]["ops"] >= 2
        np.testing.assert_array_equal(alice.state, before)  # untouched


def test_open_session_with_another_keys_id_answers_as_for_an_unknown_id(keys, curve_daemon):
    """No oracle: opening a session id that another key uses is answered exactly like opening an
    id never used (a new session of this key), and the other key's session is untouched."""
    from host.security import CurveClientKeys

    bob = CurveClientKeys.load(keys / "daemon.key", keys / "allow" / "bob.key_secret")
    with host.connect(curve_daemon.endpoint, seed=1, curve=_alice(keys), timeout=TIMEOUT) as alice:
        alice.program(Diagonal(np.ones(3)), np.ones(3))
        before = alice.run(1.0).state
        replies = {}
        for label, sid in (("foreign", alice.session), ("unknown", "never-used-" + alice.session[:8])):
            raw = Raw.__new__(Raw)
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, 5000)
            sock.setsockopt(zmq.SNDTIMEO, 5000)
            bob.apply(sock)
            sock.connect(curve_daemon.endpoint)
            raw.sock, raw.session, raw.req = sock, sid, 0
            try:
                opened = raw.request("open_session", seq=0, args={"seed": 9})
                replies[label] = opened.header
                # bob's session under that id is bob's own: programming it leaves alice's alone
                assert raw.request("program", seq=1, args={"drift": {"form": "diagonal"}},
                                   arrays={"diag": np.full(3, 2.0)}).header["status"] == "ok"
                assert raw.request("close_session", seq=2).header["status"] == "ok"
            finally:
                raw.close()
        for head in replies.values():
            assert head["status"] == "ok", head
        foreign, unknown = replies["foreign"]["result"], replies["unknown"]["result"]
        assert foreign["info"] == unknown["info"] and foreign["lease_s"] == unknown["lease_s"]
        np.testing.assert_array_equal(alice.state, before)
        assert alice.run(1.0).state.shape == (3,)  # alice's session still answers


def test_key_paths_with_a_tilde_are_expanded(keys, monkeypatch):
    """docs/security.md's example passes "~/.thermo-ngd/..." paths from Python (issue 18 item 8)."""
    from host.security import CurveClientKeys

    monkeypatch.setenv("HOME", str(keys))
    loaded = CurveClientKeys.load("~/daemon.key", "~/allow/alice.key_secret")
    direct = CurveClientKeys.load(keys / "daemon.key", keys / "allow" / "alice.key_secret")
    assert loaded == direct
