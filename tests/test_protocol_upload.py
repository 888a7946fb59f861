"""Chunked uploads (docs/protocol.md ``upload``): large drift arrays as row blocks, each checked on
arrival and written in place; program/step then name them in ``staged``."""

from __future__ import annotations

import time

import numpy as np
import pytest

from host.client import DeviceClient
from protocol import Diagonal, Factored
from protocol.drift import _known_finite, mark_finite
from protocol.errors import NonFiniteError, TooLargeError
from protocol.messages import Limits, Op
from thermo_device import Emulator, load_profile

from .inproc_daemon import InprocDaemon, Raw, error_code

CELLS = 2048
MAX_MESSAGE = 300_000  # smaller than the J below: only uploads get it through


def _profile():
    return load_profile("ideal", {"device.cells": CELLS})


@pytest.fixture(scope="module")
def daemon():
    profile = _profile()
    with InprocDaemon(lambda seed: Emulator(profile, seed),
                      limits=Limits(max_message_bytes=MAX_MESSAGE, memory_budget_bytes=64 << 20)) as d:
        yield d


def _drift(rng: np.random.Generator) -> Factored:
    j = rng.standard_normal((64, CELLS)).astype(np.float32) / 8  # 512 KiB
    return Factored(j, np.eye(64, dtype=np.float32), 1.0)


def test_a_program_larger_than_any_message_travels_in_blocks_bit_for_bit(daemon):
    rng = np.random.default_rng(0)
    drift, bias = _drift(rng), rng.standard_normal(CELLS)
    ref = Emulator(_profile(), seed=4)
    with DeviceClient(daemon.endpoint, seed=4, timeout=30.0, chunk_bytes=64 * 1024) as dev:
        dev.program(drift, bias)
        assert dev.uploads == 8  # 512 KiB of J in 64 KiB blocks; bias (16 KiB) in the message
        got = dev.run(2.0, samples=2)
        step = dev.step(drift, bias, 1.0)  # step stages too
        assert dev.uploads == 16
    ref.program(drift, bias)
    want = ref.run(2.0, samples=2)
    want_step = ref.step(drift, bias, 1.0)
    for a, b in ((got, want), (step, want_step)):
        np.testing.assert_array_equal(a.mean, b.mean)
        np.testing.assert_array_equal(a.state, b.state)
    end = time.monotonic() + 3.0  # the daemon thread replies to the close before it updates its tables
    while daemon.daemon.budget_used and time.monotonic() < end:
        time.sleep(0.01)
    assert daemon.daemon.budget_used == 0 and daemon.daemon.in_flight == 0  # nothing staged, open or pending


def test_without_uploads_the_same_program_is_too_large(daemon):
    drift = _drift(np.random.default_rng(1))
    with DeviceClient(daemon.endpoint, seed=4, timeout=30.0, chunk_bytes=None) as dev:
        with pytest.raises(TooLargeError):
            dev.program(drift)


def test_a_nan_in_one_block_is_refused_on_arrival_and_changes_nothing(daemon):
    rng = np.random.default_rng(2)
    good, bad = _drift(rng), _drift(rng)
    j = bad.J.copy()
    j[40, 7] = np.nan
    with DeviceClient(daemon.endpoint, seed=4, timeout=30.0, chunk_bytes=64 * 1024) as dev:
        dev.program(good)
        before = dev.run(1.0).state
        with pytest.raises(NonFiniteError, match="rows 40 to"):
            dev._program_call(Op.PROGRAM, {"drift": {"form": "factored", "damping": 1.0}},
                              {"J": j, "H": bad.H})
        np.testing.assert_array_equal(dev.state, before)


def test_staged_rules_over_the_raw_wire(daemon):
    raw = Raw(daemon.endpoint)
    try:
        assert raw.request("open_session", seq=0, args={"seed": 1}).header["status"] == "ok"
        diag = np.linspace(1.0, 2.0, 1000)
        up = {"name": "diag", "dtype": "<f8", "shape": [1000]}
        first = raw.request("upload", args={**up, "offset": 0}, arrays={"block": diag[:600]})
        assert first.header["result"] == {"received": 600, "complete": False}
        again = raw.request("upload", args={**up, "offset": 0}, arrays={"block": diag[:600]})
        assert again.header["result"]["received"] == 600  # idempotent: no seq, same rows again
        early = raw.request("program", seq=1, args={"drift": {"form": "diagonal"}, "staged": ["diag"]})
        assert error_code(early) == "invalid_input" and "600 of 1000" in early.header["error"]["message"]
        wrong = raw.request("upload", args={**up, "offset": 600}, arrays={"block": diag[600:900].reshape(3, 100)})
        assert error_code(wrong) == "shape_mismatch"
        over = raw.request("upload", args={**up, "offset": 900}, arrays={"block": diag[:200]})
        assert error_code(over) == "shape_mismatch"
        done = raw.request("upload", args={**up, "offset": 600}, arrays={"block": diag[600:]})
        assert done.header["result"] == {"received": 1000, "complete": True}
        both = raw.request("program", seq=2, args={"drift": {"form": "diagonal"}, "staged": ["diag"]},
                           arrays={"diag": diag})
        assert error_code(both) == "invalid_input"  # staged and also sent as a frame
        ok = raw.request("program", seq=3, args={"drift": {"form": "diagonal"}, "staged": ["diag"]})
        assert ok.header["status"] == "ok"
        gone = raw.request("program", seq=4, args={"drift": {"form": "diagonal"}, "staged": ["diag"]})
        assert error_code(gone) == "invalid_input"  # consumed by seq 3
        state = raw.request("run", seq=5, args={"duration": 50.0}).arrays["state"]
        np.testing.assert_allclose(state, 0.0, atol=1e-4)  # A = diag, b = 0
        assert error_code(raw.request("upload", args={**up, "name": "foo", "offset": 0},
                                      arrays={"block": diag})) == "invalid_input"
        huge = raw.request("upload", args={"name": "J", "dtype": "<f8", "shape": [4096, 4096], "offset": 0},
                           arrays={"block": np.ones((1, 4096))})
        assert error_code(huge) == "capacity"  # 128 MiB staged: over the 64 MiB budget
        assert raw.request("close_session", seq=6).header["status"] == "ok"
    finally:
        raw.close()


def test_marked_arrays_skip_the_second_scan_only_for_that_object():
    a = np.ones(10)
    assert not _known_finite(a)
    mark_finite(a)
    assert _known_finite(a) and not _known_finite(a.copy())
    d = Diagonal(a)  # accepted without a rescan; a different NaN array is still refused
    assert d.dim == 10
    b = np.ones(10)
    b[3] = np.nan
    with pytest.raises(NonFiniteError):
        Diagonal(b)


def test_the_default_client_fits_its_blocks_to_a_small_message_limit(daemon):
    """chunk_bytes defaults to 32 MiB, but blocks never exceed half the daemon's message limit."""
    drift = _drift(np.random.default_rng(3))
    with DeviceClient(daemon.endpoint, seed=4, timeout=30.0) as dev:
        dev.program(drift)
        assert dev.uploads == 4  # 512 KiB of J in blocks of at most 150,000 bytes
        assert dev.run(1.0).state.shape == (CELLS,)


def test_a_restart_between_uploads_restores_and_uploads_again():
    """The daemon restarts (same profile): the staged blocks are gone; the client restores the
    session (its last program uploaded again) and repeats the call."""
    profile = _profile()
    rng = np.random.default_rng(5)
    first = InprocDaemon(lambda seed: Emulator(profile, seed), limits=Limits(max_message_bytes=MAX_MESSAGE))
    second = None
    try:
        with DeviceClient(first.endpoint, seed=4, timeout=30.0, chunk_bytes=64 * 1024) as dev:
            dev.program(_drift(rng))
            dev.run(5.0)
            endpoint = first.endpoint
            first.stop()
            second = InprocDaemon(lambda seed: Emulator(profile, seed), bind=endpoint,
                                  limits=Limits(max_message_bytes=MAX_MESSAGE))
            before = dev.uploads
            res = dev.step(_drift(rng), None, 1.0)
            assert res.state.shape == (CELLS,) and dev.instance == second.instance
            # the window of the attempt that met the new daemon (4 blocks, refused), then the
            # restored program (8 blocks) and the new one again (8)
            assert dev.uploads - before == 4 + 8 + 8
    finally:
        (second or first).stop()
