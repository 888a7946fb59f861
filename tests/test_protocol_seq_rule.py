"""The sequence-number rule of docs/protocol.md section 5, for every error code the daemon sends.

The rule: a reply to a new mutating request uses up its ``seq`` unless it is an error whose code
is in ``SEQ_FREE_CODES``. "Used" is observed as: the same request, corrected, sent again under the
same ``seq`` gets the cached error back and does not run; "free": it runs.

Two halves: (1) every daemon-sent code raised by a backend (a test backend that raises what it is
told), so the rule is checked code by code wherever an error comes from; (2) each code produced
the way a client really meets it (bad framing, an extra array, a bias of length 7, a full
session, ...), since those are found at different places in the daemon.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import msgpack
import numpy as np
import pytest

from protocol.errors import CLIENT_SIDE_CODES, SEQ_FREE_CODES, ErrorCode, InternalError, error_class
from protocol.messages import Limits
from thermo_device import Emulator, load_profile

from .inproc_daemon import InprocDaemon, Raw, error_code

CELLS = 16
MAX_MESSAGE = 200_000
GATE = threading.Event()  # releases a blocked calibrate (the busy case)
DAEMON_CODES = sorted(c.value for c in ErrorCode if c not in CLIENT_SIDE_CODES)


class Raiser(Emulator):
    """The ideal emulator whose ``calibrate`` raises the error it is asked for, or blocks."""

    def calibrate(self, raise_code: str | None = None, block: bool = False, bug: bool = False,
                  **options: Any) -> dict[str, Any]:
        if block:
            GATE.wait(10.0)
        if bug:
            raise RuntimeError("a backend bug (not a DeviceError)")
        if raise_code is not None:
            cls = error_class(raise_code)
            raise (InternalError if raise_code == "internal" else cls)(f"raised {raise_code} on purpose")
        return {"calibrated": True}


@pytest.fixture(scope="module")
def daemon():
    profile = load_profile("ideal", {"device.cells": CELLS})
    with InprocDaemon(lambda seed: Raiser(profile, seed),
                      limits=Limits(max_message_bytes=MAX_MESSAGE, max_sessions=64)) as d:
        yield d


@pytest.fixture
def raw(daemon):
    r = Raw(daemon.endpoint)
    assert r.request("open_session", seq=0, args={"seed": 1}).header["status"] == "ok"
    yield r
    r.close()


def _diag(n: int = 4, value: float = 2.0) -> dict[str, np.ndarray]:
    return {"diag": np.full(n, value), "bias": np.ones(n)}


DIAG = {"drift": {"form": "diagonal"}}


def _program(raw: Raw, seq: int, arrays: dict[str, np.ndarray] | None = None, **kw: Any):
    return raw.request("program", seq=seq, args=DIAG, arrays=arrays or _diag(), **kw)


def _check(first, again, code: str) -> None:
    """``first`` is the error ``code``; ``again`` (the corrected request, same seq) ran or not."""
    assert error_code(first) == code, first.header
    assert first.header["id"] is not None  # every one of these echoes the request id
    if ErrorCode(code) in SEQ_FREE_CODES:
        assert again.header["status"] == "ok", f"{code} is free: the corrected resend must run, got {again.header}"
    else:
        assert error_code(again) == code, f"{code} uses the seq: the resend must get the cached error"
        assert again.header["error"]["message"] == first.header["error"]["message"]
        assert again.header["id"] == first.header["id"] + 1  # the replay carries the retry's id


def test_every_daemon_code_is_covered_and_the_client_codes_are_not_sent():
    assert set(DAEMON_CODES) | {c.value for c in CLIENT_SIDE_CODES} == {c.value for c in ErrorCode}
    assert not SEQ_FREE_CODES & CLIENT_SIDE_CODES


@pytest.mark.parametrize("code", DAEMON_CODES)
def test_rule_for_a_code_raised_by_the_backend(raw, code):
    first = raw.request("calibrate", seq=1, args={"raise_code": code})
    again = raw.request("calibrate", seq=1, args={})
    _check(first, again, code)


def test_rule_for_a_backend_bug(raw):
    first = raw.request("calibrate", seq=1, args={"bug": True})
    again = raw.request("calibrate", seq=1, args={})
    _check(first, again, "internal")


# -- each code as a client meets it ------------------------------------------------------------------


def _truncated_frame(raw: Raw, seq: int) -> list[Any]:
    frames = raw.frames("program", seq=seq, args=DIAG, arrays=_diag())
    frames[1] = frames[1][:-3]  # byte length no longer matches the header
    return frames


def _bad_dtype(raw: Raw, seq: int) -> list[Any]:
    frames = raw.frames("program", seq=seq, args=DIAG, arrays=_diag())
    head = msgpack.unpackb(frames[0])
    head["arrays"][0]["dtype"] = "<f2"
    head["arrays"][0]["shape"] = [8]  # same byte length: only the dtype is wrong
    return [msgpack.packb(head), *frames[1:]]


CASES: dict[str, tuple[str, Any]] = {
    # name: (code, function(raw, seq) -> the bad reply)
    "frame length": ("protocol", lambda raw, s: raw.ask(_truncated_frame(raw, s))),
    "dtype not allowed": ("protocol", lambda raw, s: raw.ask(_bad_dtype(raw, s))),
    "major version": ("version", lambda raw, s: _program(raw, s, version=[2, 0])),
    "message too large": ("too_large", lambda raw, s: _program(raw, s, arrays=_diag(MAX_MESSAGE // 8))),
    "result too large": ("too_large", lambda raw, s: raw.request(
        "step", seq=s, args={**DIAG, "duration": 1.0, "samples": MAX_MESSAGE}, arrays=_diag())),
    "unknown op": ("unknown_operation", lambda raw, s: raw.request("progrm", seq=s, args=DIAG, arrays=_diag())),
    "unknown session": ("unknown_session", lambda raw, s: _program(raw, s, session="not-open-here")),
    "extra array": ("invalid_input", lambda raw, s: _program(raw, s, arrays={**_diag(), "foo": np.ones(4)})),
    "bias of length 7": ("shape_mismatch", lambda raw, s: _program(raw, s, arrays={"diag": np.ones(4),
                                                                                   "bias": np.ones(7)})),
    "empty drift": ("shape_mismatch", lambda raw, s: _program(raw, s, arrays={"diag": np.ones(0)})),
    "NaN": ("non_finite", lambda raw, s: _program(raw, s, arrays={"diag": np.array([1.0, np.nan, 1.0, 1.0])})),
    "over the cells": ("capacity", lambda raw, s: _program(raw, s, arrays=_diag(CELLS + 1))),
    "not stable": ("not_stable", lambda raw, s: raw.request(
        "program", seq=s, args={"drift": {"form": "dense"}}, arrays={"matrix": -np.eye(4)})),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rule_as_a_client_meets_each_code(raw, case):
    code, bad = CASES[case]
    first = bad(raw, 1)
    again = _program(raw, 1)  # the corrected request, same seq
    if code in ("protocol", "too_large") and first.header["id"] is None:
        pytest.fail(f"{case}: the error reply must echo the id")
    _check(first, again, code)


def test_not_programmed_uses_the_seq(raw):
    first = raw.request("run", seq=1, args={"duration": 1.0})
    assert error_code(first) == "not_programmed"
    # seq 1 is taken by that run: a program under it is stale, the next seq runs
    assert error_code(_program(raw, 1)) == "stale_request"
    assert _program(raw, 2).header["status"] == "ok"


def test_stale_request_leaves_the_seq_and_its_cached_reply(raw):
    ok = _program(raw, 1)
    assert ok.header["status"] == "ok"
    stale = raw.request("run", seq=1, args={"duration": 1.0})  # seq 1 was a program
    assert error_code(stale) == "stale_request"
    older = _program(raw, 0)
    assert error_code(older) == "stale_request"
    replay = _program(raw, 1)  # still the program's cached reply: the stale ones took nothing
    assert replay.header["status"] == "ok" and replay.header["id"] == older.header["id"] + 1
    assert _program(raw, 2).header["status"] == "ok"


def test_busy_leaves_the_seq_free(daemon, raw):
    GATE.clear()
    blocker = Raw(daemon.endpoint)
    blocker.session = raw.session  # the same session from a second socket
    try:
        blocker.sock.send_multipart(blocker.frames("calibrate", seq=1, args={"block": True}))
        end = time.monotonic() + 5.0  # two sockets: wait until the blocking request is running
        while daemon.daemon._running is None and time.monotonic() < end:
            time.sleep(0.005)
        busy = _program(raw, 2)
        assert error_code(busy) == "busy"
        GATE.set()
        assert msgpack.unpackb(blocker.sock.recv_multipart()[0])["status"] == "ok"
        assert _program(raw, 2).header["status"] == "ok"  # the same seq runs now
    finally:
        GATE.set()
        blocker.close()


def test_missing_seq_is_protocol_and_takes_nothing(raw):
    first = raw.request("program", seq=None, args=DIAG, arrays=_diag())
    assert error_code(first) == "protocol"
    assert _program(raw, 1).header["status"] == "ok"


def test_failed_open_uses_up_nothing(daemon):
    r = Raw(daemon.endpoint)
    try:
        bad = r.request("open_session", seq=0, args={"seed": -1})
        assert error_code(bad) == "invalid_input"
        assert r.request("open_session", seq=0, args={"seed": 1}).header["status"] == "ok"
    finally:
        r.close()
