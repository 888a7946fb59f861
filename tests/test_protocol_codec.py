"""The codec alone: round trips, zero copy, and every framing error (no daemon needed)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import Dense, Diagonal, ErrorCode, Factored, RunResult
from protocol.codec import (
    decode,
    drift_from_wire,
    drift_to_wire,
    encode,
    error_from_payload,
    error_payload,
    request_header,
    result_from_wire,
    result_to_wire,
    send,
)
from protocol.errors import DeviceError, error_class
from protocol.messages import PROTOCOL_VERSION, Limits

LIMITS = Limits()


def _bytes(frames):
    """Frames as the bytes a peer would receive."""
    return [f if isinstance(f, bytes) else f.tobytes() for f in frames]


def _roundtrip(header, arrays, limits=LIMITS):
    return decode(_bytes(encode(header, arrays)), limits)


def _code(frames, limits=LIMITS):
    with pytest.raises(DeviceError) as info:
        decode(frames, limits)
    return info.value.code


def test_drifts_round_trip_keeping_dtype():
    rng = np.random.default_rng(1)
    drifts = [
        Dense(rng.standard_normal((5, 5))),
        Factored(rng.standard_normal((3, 7)).astype(np.float32), np.eye(3, dtype=np.float32), 0.25),
        Diagonal(np.arange(1.0, 9.0)),
    ]
    for drift in drifts:
        spec, arrays = drift_to_wire(drift)
        msg = _roundtrip(request_header("program", 1, "s", 1, {"drift": spec}), arrays)
        back = drift_from_wire(msg.header["args"]["drift"], msg.arrays)
        assert type(back) is type(drift)
        for name in arrays:
            a, b = getattr(drift, {"matrix": "matrix", "J": "J", "H": "H", "diag": "diag"}[name]), msg.arrays[name]
            assert a.dtype == b.dtype and np.array_equal(a, b)
        if isinstance(drift, Factored):
            assert back.damping == 0.25


def test_run_result_round_trips():
    rng = np.random.default_rng(2)
    r = RunResult(mean=rng.standard_normal(4), state=rng.standard_normal(4), samples=rng.standard_normal((3, 4)),
                  second_moment=np.eye(4), analog_time_s=2.5e-6,
                  diagnostics={"method": "exact", "adc_samples": np.int64(10), "dt": np.float64(0.1)})
    result, arrays = result_to_wire(r)
    msg = _roundtrip(request_header("run", 1), arrays | {})
    back = result_from_wire(msg.header["args"] | result, msg.arrays)
    for name in ("mean", "state", "samples", "second_moment"):
        assert np.array_equal(getattr(back, name), getattr(r, name))
    assert back.analog_time_s == 2.5e-6
    assert back.diagnostics == {"method": "exact", "adc_samples": 10, "dt": 0.1}
    bare = RunResult(mean=np.zeros(2), state=np.zeros(2))
    result, arrays = result_to_wire(bare)
    back = result_from_wire(result, _roundtrip(request_header("run", 1), arrays).arrays)
    assert back.samples is None and back.second_moment is None


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["<f4", "<f8", "<i4", "<i8"]),
       st.lists(st.integers(0, 6), min_size=0, max_size=3), st.integers(0, 2**31))
def test_any_wire_array_round_trips(dtype, shape, seed):
    arr = (np.random.default_rng(seed).standard_normal(shape) * 100).astype(dtype)
    msg = _roundtrip(request_header("x", 1), {"a": arr})
    assert msg.arrays["a"].dtype == np.dtype(dtype)
    assert msg.arrays["a"].shape == tuple(shape)
    assert np.array_equal(msg.arrays["a"], arr)


def test_big_endian_and_strided_inputs_travel_as_contiguous_little_endian():
    a = np.arange(12, dtype=">f8").reshape(3, 4)[:, ::2]
    frames = encode(request_header("x", 1), {"a": a})
    assert frames[1].dtype.str == "<f8" and frames[1].flags.c_contiguous
    assert np.array_equal(decode(_bytes(frames), LIMITS).arrays["a"], a)


def test_large_arrays_are_sent_and_received_without_copies():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://codec-zero-copy")
        b.connect("inproc://codec-zero-copy")
        J = np.random.default_rng(3).standard_normal((64, 2000)).astype(np.float32)  # 512 kB
        frames = encode(request_header("program", 1), {"J": J})
        assert frames[1] is J  # no conversion copy on the way out
        send(a, frames)
        received = b.recv_multipart(copy=False)
        msg = decode(received, LIMITS)
        view = np.frombuffer(received[1].buffer, dtype=np.float32)
        assert np.shares_memory(msg.arrays["J"], view)  # a view on the ZeroMQ frame
        assert np.array_equal(msg.arrays["J"], J)
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def _frames(header_overrides=None, arrays=None, raw_arrays=None):
    header = request_header("ping", 1)
    frames = encode(header, arrays)
    if header_overrides:
        header.update(header_overrides)
        frames[0] = msgpack.packb(header)
    out = _bytes(frames)
    if raw_arrays is not None:
        out = out[:1] + raw_arrays
    return out


@pytest.mark.parametrize("frames, code", [
    ([b"\xc1\xff garbage"], ErrorCode.PROTOCOL),
    ([msgpack.packb([1, 2, 3])], ErrorCode.PROTOCOL),
    ([b""], ErrorCode.PROTOCOL),
    ([], ErrorCode.PROTOCOL),
    (_frames({"version": [PROTOCOL_VERSION[0] + 1, 0]}), ErrorCode.VERSION),
    (_frames({"version": "1.0"}), ErrorCode.PROTOCOL),
    (_frames({"proto": "jupyter"}), ErrorCode.PROTOCOL),
    # truncated multipart: two arrays declared, one sent
    (_frames(arrays={"a": np.ones(3), "b": np.ones(3)})[:2], ErrorCode.PROTOCOL),
    # an array frame the header does not declare
    (_frames(arrays={"a": np.ones(3)}) + [b"extra"], ErrorCode.PROTOCOL),
    # byte length does not match dtype x shape
    (_frames(arrays={"a": np.ones(3)}, raw_arrays=[np.ones(2).tobytes()]), ErrorCode.PROTOCOL),
    (_frames({"arrays": [{"name": "a", "frame": 0, "dtype": ">f8", "shape": [3]}]},
             raw_arrays=[np.ones(3).tobytes()]), ErrorCode.PROTOCOL),
    (_frames({"arrays": [{"name": "a", "frame": 0, "dtype": "|O", "shape": [3]}]},
             raw_arrays=[np.ones(3).tobytes()]), ErrorCode.PROTOCOL),
    (_frames({"arrays": [{"name": "a", "frame": 1, "dtype": "<f8", "shape": [3]}]},
             raw_arrays=[np.ones(3).tobytes()]), ErrorCode.PROTOCOL),
    (_frames({"arrays": [{"name": "a", "frame": 0, "dtype": "<f8", "shape": [-3]}]},
             raw_arrays=[np.ones(3).tobytes()]), ErrorCode.PROTOCOL),
    (_frames({"arrays": [{"name": "a", "frame": 0, "dtype": "<f8", "shape": [1, 1, 1, 3]}]},
             raw_arrays=[np.ones(3).tobytes()]), ErrorCode.TOO_LARGE),  # rank over max_ndim
    (_frames({"arrays": "a"}), ErrorCode.PROTOCOL),
])
def test_malformed_messages_raise_typed_errors(frames, code):
    assert _code(frames) == code


def test_limits_are_checked_from_lengths_before_arrays_are_built():
    small = Limits(max_message_bytes=1000, max_header_bytes=300, max_arrays=2, max_dimension=10)
    assert _code(_frames(arrays={"a": np.ones(100), "b": np.ones(100)}), small) == ErrorCode.TOO_LARGE
    assert _code(_frames(arrays={"a": np.ones(11)}), small) == ErrorCode.TOO_LARGE
    assert _code(_frames(arrays={"a": np.ones(1), "b": np.ones(1), "c": np.ones(1)}), small) == ErrorCode.TOO_LARGE
    assert _code(_frames({"pad": "x" * 400}), small) == ErrorCode.TOO_LARGE
    # a header that declares a huge shape over a tiny frame is a framing error, not an allocation
    huge = {"arrays": [{"name": "a", "frame": 0, "dtype": "<f8", "shape": [10**6, 10**6]}]}
    assert _code(_frames(huge, raw_arrays=[b"12345678"])) == ErrorCode.PROTOCOL


def test_error_replies_map_back_to_the_same_exception_class():
    for code in ErrorCode:
        exc = error_class(code)(f"message for {code.value}", code=code)
        back = error_from_payload(error_payload(exc))
        assert type(back) is error_class(code) and back.code == code
        assert back.message == f"message for {code.value}"
    future = error_from_payload({"code": "from_the_future", "message": "hi"})
    assert type(future) is DeviceError and "from_the_future" in str(future)


def test_drift_from_wire_rejects_bad_descriptions():
    for spec, arrays in [("dense", {}), ({"form": "sparse"}, {}), ({"form": "dense"}, {}),
                         ({"form": "factored", "damping": "x"}, {"J": np.ones((2, 3)), "H": np.eye(2)})]:
        with pytest.raises(DeviceError) as info:
            drift_from_wire(spec, arrays)
        assert info.value.code == ErrorCode.INVALID_INPUT
    with pytest.raises(DeviceError) as info:
        drift_from_wire({"form": "diagonal"}, {"diag": np.array([1.0, np.nan])})
    assert info.value.code == ErrorCode.NON_FINITE


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [7, 100_001, 3_000_001])  # each scan path
def test_finiteness_scan_finds_every_nan_and_inf_and_no_false_alarm(dtype, size):
    from protocol.drift import all_finite

    x = np.random.default_rng(0).standard_normal(size).astype(dtype)
    assert all_finite(x)
    big = x.copy()
    big[::3] = np.finfo(dtype).max / 2  # finite, but x.x overflows: must fall back, not reject
    assert all_finite(big)
    for pos in (0, size // 2 - 1, size // 2, size - 1):  # both halves and their seam
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[pos] = bad
            assert not all_finite(y), (pos, bad)
            assert not all_finite(y.reshape(1, -1)[:, ::-1])  # a non-contiguous view
    with pytest.raises(DeviceError, match="NaN or Inf"):
        Factored(x.reshape(1, -1) * np.array([[np.nan]], dtype=dtype), np.eye(1, dtype=dtype))


def test_decoded_arrays_are_writable_whatever_the_frame_type():
    """Small frames are read as bytes (cheaper than zmq.Frame views); the arrays stay writable,
    as an embedded device's results are."""
    import zmq

    from protocol.codec import decode as _decode
    from protocol.codec import encode as _encode
    from protocol.codec import request_header as _rh
    from protocol.messages import Limits as _Limits

    frames = _encode(_rh("ping", 1), {"small": np.ones(4), "big": np.ones(20_000)})
    for wrap in (lambda f: f if isinstance(f, bytes) else f.tobytes(), lambda f: zmq.Frame(f)):
        msg = _decode([wrap(f) for f in frames], _Limits())
        for arr in msg.arrays.values():
            assert arr.flags.writeable
            arr[0] = 2.0
