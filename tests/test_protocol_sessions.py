"""Sessions end and restarts are checked (issue 16, items 4 and 5):

* a daemon restarted with another profile (or chip) is refused with DeviceMismatchError instead
  of silently adopted, unless the user opts in; the same profile restores as before;
* a client's heartbeat keeps its session past the lease; a client that stops beating (dead) is
  reclaimed within about one lease; the client is a context manager that closes its session.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from host.client import DeviceClient, device_identity
from protocol import Diagonal
from protocol.errors import DeviceMismatchError, UnknownSessionError
from protocol.messages import Limits
from thermo_device import Emulator, load_profile

from .inproc_daemon import InprocDaemon

TIMEOUT = 10.0
D = Diagonal(np.full(3, 2.0))
B = np.ones(3)


def _factory(profile: str, **overrides: object):
    p = load_profile(profile, dict(overrides) or None)
    return lambda seed: Emulator(p, seed)


def _eventually(check, within: float = 3.0) -> bool:
    """The daemon thread sends a reply before it updates its tables: poll briefly."""
    end = time.monotonic() + within
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def _restart(first: InprocDaemon, profile: str, **overrides: object) -> InprocDaemon:
    endpoint = first.endpoint
    first.stop()
    return InprocDaemon(_factory(profile, **overrides), bind=endpoint)


def test_identity_names_backend_profile_chip_and_capabilities():
    info = Emulator(load_profile("ideal")).info()
    ident = device_identity(info)
    assert set(ident) == {"backend", "profile", "chip_id", "capabilities"}
    other_chip = device_identity(Emulator(load_profile("ideal", {"mismatch.seed": 5})).info())
    assert other_chip != ident and other_chip["chip_id"] == 5


@pytest.mark.parametrize("change", [("noisy", {}), ("ideal", {"mismatch.seed": 7})], ids=["profile", "chip"])
def test_restart_as_another_device_raises_the_typed_error(change):
    first = InprocDaemon(_factory("ideal"))
    second = None
    try:
        with DeviceClient(first.endpoint, seed=3, timeout=TIMEOUT) as dev:
            dev.program(D, B)
            dev.run(1.0)
            second = _restart(first, change[0], **change[1])
            with pytest.raises(DeviceMismatchError) as info:
                dev.run(1.0)
            assert "accept_other_device" in str(info.value)
            assert info.value.code.value == "device_mismatch"
            # the new session it opened to find out was closed again: nothing is left behind
            assert _eventually(lambda: not second.daemon.sessions.open)
    finally:
        (second or first).stop()


def test_restart_as_another_device_is_adopted_when_the_user_opts_in(caplog):
    first = InprocDaemon(_factory("ideal"))
    second = None
    try:
        with DeviceClient(first.endpoint, seed=3, timeout=TIMEOUT, accept_other_device=True) as dev:
            dev.program(D, B)
            dev.run(1.0)
            second = _restart(first, "noisy")
            with caplog.at_level(logging.WARNING, logger="host.client"):
                r = dev.run(1.0)
            assert r.state.shape == (3,) and dev.info()["profile"] == "noisy"
            assert any("another device" in rec.getMessage() for rec in caplog.records)
    finally:
        (second or first).stop()


def test_restart_with_the_same_profile_restores_the_state():
    first = InprocDaemon(_factory("ideal"))
    second = None
    try:
        with DeviceClient(first.endpoint, seed=3, timeout=TIMEOUT) as dev:
            dev.program(D, B)
            before = dev.run(30.0).state  # at the mean, 0.5
            second = _restart(first, "ideal")
            after = dev.run(0.0).state  # restored: program and state put back, nothing run
            np.testing.assert_allclose(after, before, atol=1e-5)
            assert dev.instance == second.instance
    finally:
        (second or first).stop()


def test_heartbeat_keeps_a_live_session_and_a_dead_client_is_reclaimed():
    with InprocDaemon(_factory("ideal"), limits=Limits(session_idle_s=600.0)) as d:
        live = DeviceClient(d.endpoint, seed=1, timeout=TIMEOUT, lease_s=0.6)
        dead = DeviceClient(d.endpoint, seed=2, timeout=TIMEOUT, lease_s=0.6)
        try:
            assert live.granted_lease_s == pytest.approx(0.6)
            live.program(D, B)
            dead.program(D, B)
            dead._stop_heartbeat()  # what a killed client looks like to the daemon: silence
            time.sleep(2.0)  # > 3 leases
            ids = {s.id for s in d.daemon.sessions.open.values()}
            assert live.session in ids, "a live, idle client lost its session"
            assert dead.session not in ids, "a silent client's session was not reclaimed"
            assert live.run(0.5).state.shape == (3,)  # no restore needed
            dead.auto_restore = False
            with pytest.raises(UnknownSessionError):
                dead.run(0.5)
        finally:
            live.close()
            dead.close()
        assert _eventually(lambda: not d.daemon.sessions.open)  # close() ended the live one


def test_lease_is_capped_by_the_daemon_and_checked():
    with InprocDaemon(_factory("ideal"), limits=Limits(session_idle_s=5.0)) as d:
        with DeviceClient(d.endpoint, timeout=TIMEOUT, lease_s=3600.0) as dev:
            assert dev.granted_lease_s == 5.0
        with DeviceClient(d.endpoint, timeout=TIMEOUT, lease_s=None, heartbeat=False) as dev:
            assert dev.granted_lease_s == 5.0 and dev._heartbeat is None
        with pytest.raises(Exception, match="lease_s"):
            DeviceClient(d.endpoint, timeout=TIMEOUT, lease_s=-1.0)


def test_context_manager_closes_on_error():
    with InprocDaemon(_factory("ideal")) as d:
        with pytest.raises(RuntimeError), DeviceClient(d.endpoint, timeout=TIMEOUT) as dev:
            dev.program(D, B)
            assert len(d.daemon.sessions) == 1
            raise RuntimeError("the user's code failed")
        assert _eventually(lambda: len(d.daemon.sessions) == 0) and dev._heartbeat is None


def test_connections_beyond_the_cap_are_refused_and_counted_back():
    """max_connections: the ZAP handler refuses one more handshake (AuthenticationError at once);
    once a client closes, its connections are counted back and a new client gets in."""
    from protocol.errors import AuthenticationError

    with InprocDaemon(_factory("ideal"), limits=Limits(max_connections=2)) as d:
        a = DeviceClient(d.endpoint, seed=1, timeout=TIMEOUT, heartbeat=False)
        b = DeviceClient(d.endpoint, seed=2, timeout=TIMEOUT, heartbeat=False)
        assert _eventually(lambda: d.daemon.connections == 2)
        t0 = time.monotonic()
        with pytest.raises(AuthenticationError, match="max_connections"):
            DeviceClient(d.endpoint, seed=3, timeout=TIMEOUT, heartbeat=False)
        assert time.monotonic() - t0 < TIMEOUT / 2  # refused, not timed out
        a.program(D, B)  # the admitted ones are served
        assert _eventually(lambda: b.status()["connections"] == 2)  # the refused one is counted back
        a.close()
        assert _eventually(lambda: d.daemon.connections == 1)
        with DeviceClient(d.endpoint, seed=3, timeout=TIMEOUT, heartbeat=False) as c:
            assert c.run.__self__ is c and c.ping() < TIMEOUT
        b.close()
        assert _eventually(lambda: d.daemon.connections == 0)
