"""Fuzzing the decoder (hypothesis, bounded, fixed seed): arbitrary frames and hostile headers.

Only ``ProtocolError`` (and its subclasses: ``too_large``, ``version``) may escape ``decode``; the
request checks and the error reply built from whatever was decoded must not fail either (that is
the daemon's path for every message). Limits hold before allocation: a header that declares a
10^12-element array, a 4 GiB string or a 2^32-entry map is refused with a few KiB allocated.
"""

from __future__ import annotations

import math
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import (
    check_request,
    decode,
    drift_from_wire,
    encode,
    reply_header,
    request_header,
)
from protocol.errors import DeviceError, ProtocolError
from protocol.messages import PROTOCOL_NAME, PROTOCOL_VERSION, WIRE_DTYPES, Limits

LIMITS = Limits(max_message_bytes=1 << 20)  # small, so "too large" is reachable by generated input
COUNT = {"decode": 0}
FUZZ = settings(max_examples=600, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_scalars = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12) | st.binary(max_size=12)
            | st.sampled_from([0, -1, 1 << 24, (1 << 24) + 1, 10**12, (1 << 63) - 1, (1 << 64) - 1]))
HOSTILE = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=4)
                       | st.dictionaries(st.text(max_size=6), kids, max_size=4), max_leaves=12)
_AXIS = st.one_of(st.integers(0, 9), st.sampled_from([-1, 1 << 24, (1 << 24) + 1, 10**6, 10**12, (1 << 64) - 1]),
                  HOSTILE)


def _pipeline(frames: list[bytes], limits: Limits = LIMITS) -> None:
    """What the daemon does with a message, up to the operation: any non-typed error fails."""
    header = None
    try:
        msg = decode(frames, limits)
        header = msg.header
        for name, arr in msg.arrays.items():  # what came out matches what was declared
            d = next(d for d in header["arrays"] if d["name"] == name)
            assert arr.dtype.str == d["dtype"] and list(arr.shape) == d["shape"]
        op, _, _, _, args = check_request(header)
        if isinstance(args.get("drift"), dict):
            drift_from_wire(args["drift"], msg.arrays)
    except ProtocolError as exc:
        header = header or getattr(exc, "header", None)
        reply = reply_header(header, "fuzz", error=exc)
    except DeviceError as exc:  # drift_from_wire's invalid_input etc. (only after a clean decode)
        assert header is not None, f"{type(exc).__name__} escaped decode itself"
        reply = reply_header(header, "fuzz", error=exc)
    else:
        reply = reply_header(header, "fuzz", result={})
    encode(reply)  # the error reply itself must always be encodable


def _header(arrays: list[dict], **extra) -> dict:
    h = request_header("step", 1, "s" * 8, 1, {"drift": {"form": "diagonal"}, "duration": 1.0})
    h["arrays"] = arrays
    h.update(extra)
    return h


@FUZZ
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=10))
def test_arbitrary_frames_raise_only_protocol_errors(frames):
    COUNT["decode"] += 1
    if not frames:
        with pytest.raises(ProtocolError):
            decode(frames, LIMITS)
        return
    _pipeline(frames)


@settings(FUZZ, max_examples=400)
@given(st.data())
def test_hostile_headers_raise_only_typed_errors(data):
    """Valid envelopes with mutated headers, descriptors and frames."""
    COUNT["decode"] += 1
    n = data.draw(st.integers(0, 4))
    descs, frames = [], []
    for i in range(n):
        dtype = data.draw(st.sampled_from(WIRE_DTYPES))
        shape = data.draw(st.lists(st.integers(0, 5), max_size=3))
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        descs.append({"name": f"a{i}", "frame": i, "dtype": dtype, "shape": shape})
        frames.append(data.draw(st.binary(min_size=nbytes, max_size=nbytes)))
    header = _header(descs)
    for _ in range(data.draw(st.integers(0, 4))):
        kind = data.draw(st.sampled_from(["header", "delete", "desc", "shape", "frames", "args", "extra"]))
        if kind == "header":
            header[data.draw(st.sampled_from(list(header)))] = data.draw(HOSTILE)
        elif kind == "delete":
            header.pop(data.draw(st.sampled_from(list(header))), None)
        elif kind == "desc" and descs:
            d = data.draw(st.sampled_from(descs))
            d[data.draw(st.sampled_from(["name", "frame", "dtype", "shape", "other"]))] = data.draw(HOSTILE)
        elif kind == "shape" and descs:
            data.draw(st.sampled_from(descs))["shape"] = data.draw(st.lists(_AXIS, max_size=5))
        elif kind == "frames":
            op = data.draw(st.sampled_from(["drop", "add", "truncate", "garbage"]))
            if op == "drop" and frames:
                frames.pop()
            elif op == "add":
                frames.append(data.draw(st.binary(max_size=64)))
            elif op == "truncate" and frames:
                frames[-1] = frames[-1][: data.draw(st.integers(0, max(0, len(frames[-1]) - 1)))]
            elif op == "garbage" and frames:
                frames[0] = data.draw(st.binary(max_size=64))
        elif kind == "args":
            args = header.get("args") if isinstance(header.get("args"), dict) else {}
            args[data.draw(st.sampled_from(["drift", "duration", "samples", "seed", "x"]))] = data.draw(HOSTILE)
            header["args"] = args
        else:
            header[data.draw(st.text(max_size=8))] = data.draw(HOSTILE)
    head = msgpack.packb(header, use_bin_type=True)
    if data.draw(st.booleans()):  # sometimes a truncated or extended header
        head = head[: data.draw(st.integers(0, len(head)))] + data.draw(st.binary(max_size=4))
    _pipeline([head, *frames])


@settings(FUZZ, max_examples=300)
@given(shape=st.lists(st.integers(0, 1 << 62), min_size=1, max_size=4), dtype=st.sampled_from(WIRE_DTYPES),
       frame=st.binary(max_size=64))
def test_declared_sizes_are_refused_before_allocation(shape, dtype, frame):
    COUNT["decode"] += 1
    frames = [msgpack.packb(_header([{"name": "J", "frame": 0, "dtype": dtype, "shape": shape}])), frame]
    tracemalloc.start()
    try:
        try:
            msg = decode(frames, LIMITS)
        except ProtocolError:
            msg = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"decode allocated {peak} bytes for a {len(frame)}-byte frame"
    if msg is not None:  # only a declaration that matches the frame exactly is accepted
        assert msg.arrays["J"].nbytes == len(frame)


@pytest.mark.parametrize("name, payload", [
    ("10^12-element array", None),
    ("4 GiB string", b"\x81\xa2op\xdb\xff\xff\xff\xff" + b"x" * 16),
    ("4 GiB binary", b"\x81\xa2op\xc6\xff\xff\xff\xff" + b"x" * 16),
    ("2^32-entry list", b"\x81\xa2op\xdd\xff\xff\xff\xff" + b"\x00" * 16),
    ("2^32-entry map", b"\xdf\xff\xff\xff\xff" + b"\x00" * 16),
    ("ext type", b"\x81\xa2op\xc7\x10\x05" + b"x" * 16),
    ("deep nesting", b"\x81\xa2op" + b"\x91" * 60_000 + b"\x00"),
    ("non-string map keys", b"\x81\x01\x02"),
    ("invalid UTF-8", b"\x81\xa2op\xa2\xff\xfe"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_msgpack_bombs_are_refused_cheaply(name, payload):
    if payload is None:
        payload = msgpack.packb(_header([{"name": "J", "frame": 0, "dtype": "<f8", "shape": [10**6, 10**6]}]))
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            decode([payload, b"\x00" * 8], Limits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{name}: {peak} bytes allocated"
    _pipeline([payload, b"\x00" * 8], Limits())


def test_a_valid_message_still_decodes():
    """The fuzz target is not vacuous: the base envelope the mutations start from is accepted."""
    frames = encode(_header([]), {"diag": np.ones(3)})
    frames = [f if isinstance(f, bytes) else f.tobytes() for f in frames]
    msg = decode(frames, LIMITS)
    assert msg.header["proto"] == PROTOCOL_NAME and msg.header["version"] == list(PROTOCOL_VERSION)
    assert np.array_equal(msg.arrays["diag"], np.ones(3))
