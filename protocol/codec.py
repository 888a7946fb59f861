"""The codec: ZeroMQ multipart <-> (header dict, named arrays), plus drift/result/error mapping.

A message is ``[msgpack header, array frame 0, array frame 1, ...]``. The header lists each array
as ``{"name", "frame", "dtype", "shape"}``; the frames are raw C-contiguous little-endian buffers.
Large arrays are sent without a copy (pyzmq ``copy=False``) and received as ``np.frombuffer``
views on the ZeroMQ frame. Nothing here pickles or evaluates data: a hostile peer can at worst
make ``decode`` raise a ``ProtocolError`` (or a subclass), which the daemon turns into a reply.

Decoding checks, in this order, before any array is built: header size, header shape (msgpack
map), total size (after the header, so a too_large reply can echo the request id), version, then
for every array its name, frame index, dtype (allow-list), shape (rank and axis limits) and the
exact byte length of its frame.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import msgpack
import numpy as np
import zmq

from .device import RunResult
from .drift import DRIFT_CLASSES, Drift, drift_form, drift_from_arrays
from .errors import (
    DeviceError,
    ErrorCode,
    InvalidInputError,
    ProtocolError,
    TooLargeError,
    VersionError,
    error_class,
)
from .messages import (
    PROTOCOL_NAME,
    PROTOCOL_VERSION,
    STATUS_ERROR,
    STATUS_OK,
    WIRE_DTYPES,
    Limits,
)

_DTYPES = {s: np.dtype(s) for s in WIRE_DTYPES}
_NATIVE_WIRE = frozenset(_DTYPES.values())  # dtype equality includes the byte order
_TYPESTR = {dt: s for s, dt in _DTYPES.items()}  # dtype.str builds a new string on every call
_VERSION = list(PROTOCOL_VERSION)
# Session ids reach logs and error messages: a plain alphabet keeps both unforgeable.
_SESSION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class Message(NamedTuple):
    """A decoded message: the header and its arrays by name (views on the received frames)."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray]


# -- arrays --------------------------------------------------------------------------------------


def wire_array(value: np.ndarray, name: str) -> np.ndarray:
    """``value`` as a C-contiguous little-endian array of a wire dtype (a copy only if needed)."""
    if type(value) is np.ndarray and value.dtype in _NATIVE_WIRE and value.flags.c_contiguous:
        return value  # the common case, checked without building anything
    arr = np.asarray(value)
    kind = arr.dtype.kind
    if kind == "f":
        target = "<f4" if arr.dtype.itemsize == 4 else "<f8"
    elif kind in "iub":
        target = "<i4" if arr.dtype.itemsize == 4 and kind == "i" else "<i8"
    else:
        raise InvalidInputError(f"{name}: dtype {arr.dtype} cannot travel on the wire "
                                f"(allowed: {', '.join(WIRE_DTYPES)})")
    out = np.ascontiguousarray(arr, dtype=_DTYPES[target])
    return out if out.ndim == arr.ndim else out.reshape(arr.shape)  # keep 0-d arrays 0-d


def encode(header: dict[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> list[Any]:
    """Frames for ``header`` + ``arrays``; fills ``header["arrays"]``. Arrays are not copied
    unless their dtype, byte order or layout needs it."""
    descs = []
    frames: list[Any] = [b""]
    if arrays:
        for i, (name, value) in enumerate(arrays.items()):
            arr = wire_array(value, name)
            descs.append({"name": name, "frame": i, "dtype": _TYPESTR[arr.dtype], "shape": list(arr.shape)})
            frames.append(arr)
    header["arrays"] = descs
    frames[0] = msgpack.packb(header, use_bin_type=True)
    return frames


def send(sock: zmq.Socket, frames: list[Any], envelope: Sequence[Any] = (), flags: int = 0) -> None:
    """Send a multipart; zero-copy when an array frame is above pyzmq's copy threshold.

    (pyzmq still copies the frames below ``sock.copy_threshold`` when ``copy=False``; small
    messages go in one copying call, which is cheaper than tracking zero-copy frames.)
    """
    big = any(isinstance(f, np.ndarray) and f.nbytes >= zmq.COPY_THRESHOLD for f in frames)
    sock.send_multipart([*envelope, *frames], flags=flags, copy=not big)


def _unpack_header(view: bytes | memoryview, limits: Limits) -> dict[str, Any]:
    if len(view) > limits.max_header_bytes:
        raise TooLargeError(f"header of {len(view)} bytes exceeds the limit of {limits.max_header_bytes}")
    try:
        # Explicit limits so a hostile header cannot make msgpack allocate much.
        header = msgpack.unpackb(
            view, raw=False, strict_map_key=True, use_list=True, max_str_len=limits.max_header_bytes,
            max_bin_len=limits.max_header_bytes, max_array_len=4096, max_map_len=256, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types (ValueError, ExtraData, ...)
        raise ProtocolError(f"header is not a valid msgpack document ({type(exc).__name__}: {exc})") from exc
    if type(header) is not dict:
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    return header


def check_version(header: Mapping[str, Any]) -> None:
    """Refuse a foreign or incompatible peer (every message carries the version)."""
    if header.get("proto") != PROTOCOL_NAME:
        raise ProtocolError(f"not a {PROTOCOL_NAME} message (proto = {header.get('proto')!r})")
    version = header.get("version")
    if (type(version) is not list or len(version) != 2
            or not all(type(v) is int for v in version)):
        raise ProtocolError(f"version must be [major, minor], got {version!r}")
    if version[0] != PROTOCOL_VERSION[0]:
        raise VersionError(f"protocol version {version[0]}.{version[1]} is not compatible with "
                           f"{PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]} (major versions differ)")


def _spec(i: int, d: Any, view: bytes | memoryview, limits: Limits,
          seen: set[str]) -> tuple[str, np.dtype, list[int], int]:
    """Check one array descriptor against its frame: (name, dtype, shape, element count)."""
    if type(d) is not dict:
        raise ProtocolError(f"arrays[{i}] must be a map")
    name, frame, dtype, shape = d.get("name"), d.get("frame"), d.get("dtype"), d.get("shape")
    if type(name) is not str or not name or len(name) > 64 or name in seen:
        raise ProtocolError(f"arrays[{i}].name must be a unique non-empty string, got {name!r}")
    seen.add(name)
    if frame != i or type(frame) is not int:
        raise ProtocolError(f"arrays[{i}] ({name}): frame must be {i}, got {frame!r}")
    dt = _DTYPES.get(dtype) if type(dtype) is str else None
    if dt is None:
        raise ProtocolError(f"array {name}: dtype {dtype!r} is not allowed (allowed: {', '.join(WIRE_DTYPES)})")
    if type(shape) is not list:
        raise ProtocolError(f"array {name}: shape must be a list of at most {limits.max_ndim} "
                            f"non-negative integers, got {shape!r}")
    if len(shape) > limits.max_ndim:
        raise TooLargeError(f"array {name}: {len(shape)} axes, over the limit max_ndim = {limits.max_ndim}")
    count = 1
    for s in shape:  # Python ints: no overflow
        if type(s) is not int or s < 0:
            raise ProtocolError(f"array {name}: shape must be a list of at most {limits.max_ndim} "
                                f"non-negative integers, got {shape!r}")
        if s > limits.max_dimension:
            raise TooLargeError(f"array {name}: shape {shape} has an axis above the limit {limits.max_dimension}")
        count *= s
    if count * dt.itemsize != len(view):
        raise ProtocolError(f"array {name}: dtype {dtype} and shape {shape} need {count * dt.itemsize} "
                            f"bytes, its frame has {len(view)}")
    return name, dt, shape, count


def _build(spec: tuple[str, np.dtype, list[int], int], view: bytes | memoryview) -> np.ndarray:
    """A view on a checked frame (no copy; a small frame received as bytes is copied into a
    bytearray, ~20 ns, so every decoded array is writable, as views on zmq frames are)."""
    _, dt, shape, count = spec
    if count == 0:
        return np.zeros(shape, dtype=dt)
    arr = np.frombuffer(bytearray(view) if type(view) is bytes else view, dtype=dt)
    if len(shape) != 1:
        arr = arr.reshape(shape)
    if not arr.flags.aligned:  # only tiny frames stored inline by libzmq; copying them is free
        arr = arr.copy()
    return arr


def _view(f: Any) -> bytes | memoryview:
    """A frame's bytes without a copy for bulk frames; small frames as ``bytes`` (pyzmq caches
    them, and making a memoryview of a zmq.Frame costs more than copying a few hundred bytes)."""
    if type(f) is zmq.Frame:
        return f.bytes if len(f) < _SMALL_FRAME else f.buffer
    if type(f) is bytes:
        return f
    return memoryview(f).cast("B")  # any buffer (an ndarray in tests): count bytes, not items


_SMALL_FRAME = 65536  # pyzmq's COPY_THRESHOLD: below it a copy is cheaper than tracking a view


def decode(frames: Sequence[Any], limits: Limits, *, check: bool = True) -> Message:
    """Parse and check a multipart (without routing envelope). Raises ProtocolError subclasses.

    Every size, count, dtype and shape is checked before the first array view is made.
    ``check=False`` skips the version check.
    """
    if not frames:
        raise ProtocolError("empty message")
    views = [_view(f) for f in frames]
    # The header first (its size is bounded on its own), so even a too_large reply echoes the id.
    header = _unpack_header(views[0], limits)
    try:
        total = 0
        for v in views:
            total += len(v)
        if total > limits.max_message_bytes:
            raise TooLargeError(f"message of {total} bytes exceeds the limit of {limits.max_message_bytes}")
        if check and (header.get("version") != _VERSION or header.get("proto") != PROTOCOL_NAME):
            check_version(header)  # the full check (and its errors) only when not our exact version
        descs = header.get("arrays", [])
        if type(descs) is not list:
            raise ProtocolError("header.arrays must be a list")
        if len(descs) > limits.max_arrays:
            raise TooLargeError(f"{len(descs)} arrays exceed the limit of {limits.max_arrays}")
        if len(descs) != len(views) - 1:
            raise ProtocolError(f"header declares {len(descs)} array(s) but the message has "
                                f"{len(views) - 1} array frame(s)")
        if not descs:
            return Message(header, {})
        seen: set[str] = set()
        specs = [_spec(i, d, views[i + 1], limits, seen) for i, d in enumerate(descs)]
    except DeviceError as exc:
        exc.header = header  # type: ignore[attr-defined]  # lets an error reply echo the request id
        raise
    return Message(header, {spec[0]: _build(spec, v) for spec, v in zip(specs, views[1:], strict=True)})


# -- headers -------------------------------------------------------------------------------------


def request_header(op: str, req_id: int, session: str | None = None, seq: int | None = None,
                   args: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"proto": PROTOCOL_NAME, "version": _VERSION, "op": op, "id": req_id, "session": session,
            "seq": seq, "args": args or {}}


def with_request_id(frames: list[Any], req_id: int) -> list[Any]:
    """A cached reply (our own encoding) answering request ``req_id``: a client may retry a
    request under a new id, and matches replies by id."""
    head = msgpack.unpackb(frames[0], raw=False)
    if head.get("id") == req_id:
        return frames
    head["id"] = req_id
    return [msgpack.packb(head, use_bin_type=True), *frames[1:]]


def check_request(header: Mapping[str, Any]) -> tuple[str, int, str | None, int | None, dict[str, Any]]:
    """(op, id, session, seq, args) of a request header, type-checked (ProtocolError otherwise)."""
    op, req_id, session, seq = header.get("op"), header.get("id"), header.get("session"), header.get("seq")
    args = header.get("args", {})
    if not isinstance(op, str) or not op:
        raise ProtocolError(f"op must be a non-empty string, got {op!r}")
    if isinstance(req_id, bool) or not isinstance(req_id, int) or req_id < 0:
        raise ProtocolError(f"id must be a non-negative integer, got {req_id!r}")
    if session is not None and (type(session) is not str or _SESSION_ID.fullmatch(session) is None):
        raise ProtocolError("session must be null or 1 to 64 characters from A-Z a-z 0-9 - _ . :, "
                            f"got {str(session)[:80]!r}")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 0):
        raise ProtocolError(f"seq must be null or a non-negative integer, got {seq!r}")
    if not isinstance(args, dict):
        raise ProtocolError(f"args must be a map, got {type(args).__name__}")
    return op, req_id, session, seq, args


def _echo(v: Any) -> Any:
    return v if v is None or (type(v) is int or type(v) is str) else (
        v if isinstance(v, (int, str)) and not isinstance(v, bool) else None)


def reply_header(request: Mapping[str, Any] | None, instance: str, *, result: dict[str, Any] | None = None,
                 error: DeviceError | None = None, timing: dict[str, float] | None = None) -> dict[str, Any]:
    """A reply echoing the request's op, id, session and seq (None when the request was unreadable).

    ``result`` must already be msgpack-native (see ``plain``).
    """
    req = request if isinstance(request, Mapping) else {}
    head = {"proto": PROTOCOL_NAME, "version": _VERSION, "op": _echo(req.get("op")), "id": _echo(req.get("id")),
            "session": _echo(req.get("session")), "seq": _echo(req.get("seq")), "instance": instance}
    if error is None:
        head["status"] = STATUS_OK
        head["result"] = result or {}
    else:
        head["status"] = STATUS_ERROR
        head["error"] = error_payload(error)
    if timing:
        head["timing"] = timing
    return head


_NATIVE = (bool, int, float, str, bytes, type(None))


def plain(value: Any) -> Any:
    """``value`` made of msgpack-native types (NumPy scalars to Python numbers, tuples to lists)."""
    if type(value) in _NATIVE:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): v if type(v) in _NATIVE else plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray) and value.size <= 4096:
        return value.tolist()
    return str(value)


# -- errors --------------------------------------------------------------------------------------


def error_payload(exc: DeviceError) -> dict[str, str]:
    return {"code": str(exc.code.value), "message": exc.message}


def error_from_payload(error: Any) -> DeviceError:
    """The typed exception for a reply's ``error`` map (DeviceError for codes this build lacks)."""
    if not isinstance(error, Mapping):
        return ProtocolError(f"malformed error in reply: {error!r}")
    code, message = str(error.get("code", "")), str(error.get("message", ""))
    cls = error_class(code)
    if cls is DeviceError:
        exc = DeviceError(f"[{code}] {message}")
        exc.wire_code = code  # type: ignore[attr-defined]
        return exc
    return cls(message, code=ErrorCode(code))


# -- drift descriptions and results --------------------------------------------------------------


def drift_to_wire(drift: Drift) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(args["drift"], arrays) for a drift description: its form, its scalars, its named arrays.

    The drift was validated when it was built: nothing is scanned here.
    """
    return {"form": drift_form(drift), **drift.params()}, dict(drift.arrays())


def drift_from_wire(spec: Any, arrays: Mapping[str, np.ndarray]) -> Drift:
    """Rebuild a drift; ``drift_from_arrays`` checks shapes and finiteness (typed errors).

    ``decode`` does not scan array values, so this is the one NaN/Inf scan of a received drift.
    """
    if not isinstance(spec, Mapping):
        raise InvalidInputError(f"args.drift must be a map, got {type(spec).__name__}")
    form = spec.get("form")
    cls = DRIFT_CLASSES.get(form) if isinstance(form, str) else None
    params = {k: spec[k] for k in (cls.param_names if cls is not None else ()) if k in spec}
    for name, value in params.items():
        # msgpack numbers only: float() would also take "5" or true
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInputError(f"{form} drift: {name} must be a number, got {value!r}")
    return drift_from_arrays(form, arrays, params, where="args.drift")


def result_to_wire(r: RunResult) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    arrays = {"mean": r.mean, "state": r.state}
    if r.samples is not None:
        arrays["samples"] = r.samples
    if r.second_moment is not None:
        arrays["second_moment"] = r.second_moment
    return {"analog_time_s": float(r.analog_time_s), "diagnostics": plain(r.diagnostics)}, arrays


def result_from_wire(result: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> RunResult:
    if "mean" not in arrays or "state" not in arrays:
        raise ProtocolError("run reply lacks the mean or state array")
    diagnostics = result.get("diagnostics", {})
    return RunResult(mean=arrays["mean"], state=arrays["state"], samples=arrays.get("samples"),
                     second_moment=arrays.get("second_moment"),
                     analog_time_s=float(result.get("analog_time_s", 0.0)),
                     diagnostics=dict(diagnostics) if isinstance(diagnostics, Mapping) else {})


__all__ = [
    "Message", "check_request", "check_version", "decode", "drift_from_wire", "drift_to_wire", "encode",
    "error_from_payload", "error_payload", "plain", "reply_header", "request_header",
    "result_from_wire", "result_to_wire", "send", "wire_array", "with_request_id", "STATUS_ERROR", "STATUS_OK",
]
