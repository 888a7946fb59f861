"""Protocol overhead against raw pyzmq, measured fairly; writes benchmarks/results/protocol.json.

Fairness (issue 16, item 6): on a 2-vCPU machine the placement of processes alone moves a raw
echo from ~57 to ~94 us, so each variant served by its own process is not comparable. Here ONE
server process serves every variant from ONE ROUTER socket and thread: the daemon (a ``Daemon``
subclass) answers DeviceClient sessions as usual, and routes the benchmark's own DEALERs by their
routing id (``raw:``, ``scan:``, ``floor:``) to a raw echo, a raw NaN/Inf-scanning sink and the
framing floor. The whole measurement is repeated with fresh processes (``--runs``); medians over
runs are reported with every run, and the load average (os.getloadavg) at start and end.

What is measured (tcp loopback; variants interleaved in rounds so load hits them alike):

1. Small ``step`` round trip (N = 64, Diagonal drift, bias, duration 0.1 tau):
   a. ``protocol_null_backend``: DeviceClient against a session on a *null* backend (no physics):
      the protocol alone (client encode, daemon decode + validation + dispatch, reply encode,
      client decode);
   b. ``protocol_emulator``: a session on the Emulator (``ideal``): what a host really sees;
   c. ``raw_pyzmq``: a DEALER sending the very same request bytes, answered with reply bytes of the
      very same size, no parsing;
   d. ``floor_same_header`` / ``floor_compact_header``: the least any implementation of the framing
      does (pack/unpack the msgpack headers, view the arrays), with our header and a compact one.
   Reported: median and p99 (us), ratios to raw, and ``added_us_over_raw`` (median minus raw's).
2. Large ``program`` (Factored, J 64 x 100,000 float32 + H 64 x 64, 25.6 MB) through the client
   (null backend) vs raw pyzmq zero-copy of the same buffers, and vs a raw sink that also scans J
   for NaN/Inf (``floor_raw_plus_nan_scan``, the one check the daemon cannot skip). The daemon's
   ``compute_us`` (validation incl. the scan) is reported; "wire only" subtracts it.
   ``protocol_program_chunked``: the same program sent by ``DeviceClient.program`` with
   ``chunk_bytes`` = 4 MiB: J in 7 row blocks, 4 in flight, each scanned on arrival (``upload``).
3. In process, without sockets: the client's encode/decode and the daemon's path of that step.
4. Daemon RSS over many large programs (null backend) and small Dense programs (Emulator).

Run: python3 benchmarks/bench_protocol.py [--quick] [--runs R]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import rss_mb, start_server, stats_us, write_json  # noqa: E402

from host.client import DeviceClient  # noqa: E402
from protocol import DRIFT_FORMS, Capabilities, Device, Diagonal, Factored, RunResult  # noqa: E402
from protocol.codec import encode, reply_header, request_header, result_to_wire  # noqa: E402
from protocol.drift import Dense, Drift  # noqa: E402

N_SMALL = 64
J_SHAPE = (64, 100_000)
RECV_TIMEOUT_MS = 60_000
CHUNK_BYTES = 4 << 20  # the row-block size of the chunked large-program row


# -- servers (run in subprocesses) ---------------------------------------------------------------------


class NullDevice(Device):
    """A Device that does no physics: isolates the protocol's cost (the optional members keep
    ``Device``'s defaults, which raise UnsupportedError)."""

    def __init__(self) -> None:
        self._state = np.zeros(0)
        self._result: RunResult | None = None

    def info(self) -> dict[str, Any]:
        return {"backend": "null", "cells": 1 << 20}

    def capabilities(self) -> Capabilities:
        return Capabilities(backend="null", cells=1 << 20, dynamics="overdamped", drift_forms=DRIFT_FORMS,
                            tau_s=1e-6, max_duration=1e7, sample_interval=0.1)

    def status(self) -> dict[str, Any]:
        return {}

    def program(self, drift: Drift, bias: np.ndarray | None = None) -> None:
        if self._state.shape[0] != drift.dim:
            self._state = np.zeros(drift.dim)
            self._result = None

    def run(self, duration: float, **kw: Any) -> RunResult:
        # One result object per state size: a null backend should cost nothing.
        if self._result is None:
            self._result = RunResult(mean=self._state, state=self._state, analog_time_s=0.0,
                                     diagnostics={"method": "null", "adc_samples": 1})
        return self._result

    def step(self, drift: Drift, bias: np.ndarray | None, duration: float, **kw: Any) -> RunResult:
        self.program(drift, bias)
        return self.run(duration, **kw)

    @property
    def state(self) -> np.ndarray:
        return self._state.copy()

    @state.setter
    def state(self, value: np.ndarray) -> None:
        self._state = np.array(value, dtype=np.float64)

    def close(self) -> None:
        pass


def serve_null(bind: str) -> None:
    from protocol.messages import Limits
    from thermo_device.daemon import Daemon

    daemon = Daemon(lambda seed: NullDevice(), bind, limits=Limits(max_dimension=1 << 20))
    endpoint = daemon.start()
    print(f"serving {endpoint} instance {daemon.instance}", flush=True)
    daemon.serve()


def _null_or_emulator(cells: int = 131072) -> Any:
    """Backend factory of the shared server: seed 0 -> NullDevice, any other seed -> Emulator."""
    from thermo_device import Emulator, load_profile

    profile = load_profile("ideal", {"device.cells": cells})
    return lambda seed: NullDevice() if seed == 0 else Emulator(profile, seed)


def serve_shared(bind: str) -> None:
    """One process, one ROUTER: the daemon plus raw, scan and floor peers routed by routing id."""
    from protocol.drift import all_finite
    from protocol.messages import Limits
    from thermo_device.daemon import Daemon

    class SharedDaemon(Daemon):
        raw_replies: dict[bytes, list[bytes]] = {}
        floor_replies: dict[bytes, tuple[Any, list[np.ndarray]]] = {}

        def _accept(self, frames: list[Any], *, queue_compute: bool) -> Any:
            ident = frames[0].bytes
            if not ident.startswith((b"raw:", b"scan:", b"floor:")):  # DeviceClients: the daemon
                return super()._accept(frames, queue_compute=queue_compute)
            sock = self._sock
            assert sock is not None
            if frames[1].bytes == b"SET":
                if ident.startswith(b"floor:"):
                    self.floor_replies[ident] = (msgpack.unpackb(frames[2].bytes),
                                                 [np.frombuffer(f.bytes) for f in frames[3:]])
                else:
                    self.raw_replies[ident] = [f.bytes for f in frames[2:]]
                sock.send_multipart([frames[0], b"ok"])
            elif ident.startswith(b"floor:"):
                _floor_answer(sock, frames, self.floor_replies[ident])
            else:
                if ident.startswith(b"scan:") and len(frames) > 2 and len(frames[2]) > 65536:
                    if not all_finite(np.frombuffer(frames[2].buffer, dtype=np.float32)):
                        sock.send_multipart([frames[0], b"nan"])
                        return None
                sock.send_multipart([frames[0], *self.raw_replies[ident]])
            return None

    daemon = SharedDaemon(_null_or_emulator(), bind, limits=Limits(max_dimension=1 << 20),
                          describe={"backend": "null-or-emulator"})
    endpoint = daemon.start()
    print(f"serving {endpoint} instance {daemon.instance}", flush=True)
    daemon.serve()


def _floor_answer(sock: zmq.Socket, frames: list[Any], reply: tuple[Any, list[np.ndarray]]) -> None:
    head, arrays = reply
    h = msgpack.unpackb(frames[1].buffer)
    compact = type(h) is list
    descs = h[-1] if compact else h["arrays"]
    for d, f in zip(descs, frames[2:], strict=True):
        np.frombuffer(f.buffer, dtype=d[1] if compact else d["dtype"])
    if compact:
        head[1] = h[2]
    else:
        head["id"] = h["id"]
    sock.send_multipart([frames[0], msgpack.packb(head), *arrays])


def serve_raw(bind: str, scan: bool = False) -> None:
    """ROUTER that answers every message with the frames last given to it by a b"SET" message
    (``scan``: after checking a bulk frame for NaN/Inf as the daemon must)."""
    from protocol.drift import all_finite

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(bind)
    print(f"serving {sock.getsockopt_string(zmq.LAST_ENDPOINT)} instance raw", flush=True)
    reply: list[Any] = [b"ack"]
    while True:
        frames = sock.recv_multipart(copy=False)
        if frames[1].bytes == b"SET":
            reply = [f.bytes for f in frames[2:]]
            sock.send_multipart([frames[0], b"ok"])
            continue
        if len(frames) > 2 and len(frames[2]) > 65536:  # bulk: view the array as the daemon would
            j = np.frombuffer(frames[2].buffer, dtype=np.float32)
            if scan and not all_finite(j):
                sock.send_multipart([frames[0], b"nan"])
                continue
        sock.send_multipart([frames[0], *reply])


def serve_floor(bind: str) -> None:
    """The least a server of the specified framing does: unpack the msgpack header, view the array
    frames, pack a reply header (given by b"SET" for each peer, its id echoed), send it with the
    reply arrays."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(bind)
    print(f"serving {sock.getsockopt_string(zmq.LAST_ENDPOINT)} instance floor", flush=True)
    replies: dict[bytes, tuple[Any, list[np.ndarray]]] = {}
    while True:
        frames = sock.recv_multipart(copy=False)
        if frames[1].bytes == b"SET":
            replies[frames[0].bytes] = (msgpack.unpackb(frames[2].bytes), [np.frombuffer(f.bytes) for f in frames[3:]])
            sock.send_multipart([frames[0], b"ok"])
            continue
        _floor_answer(sock, frames, replies[frames[0].bytes])


# -- measurements ----------------------------------------------------------------------------------------


def _dealer(endpoint: str, ident: bytes | None = None) -> zmq.Socket:
    """A DEALER with a receive timeout (a dead peer fails the run, never hangs it); ``ident``
    routes it inside the shared server (raw:, scan:, floor:)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
    if ident is not None:
        sock.setsockopt(zmq.ROUTING_ID, ident)
    sock.connect(endpoint)
    return sock


def _floor_clients(floor_ep: str, req_head: dict[str, Any], rep_head: dict[str, Any], req_arrays: list[np.ndarray],
                   rep_arrays: list[np.ndarray]) -> dict[str, Any]:
    """Round trips doing only what the framing forces (see the module docstring, 1d): with our
    header, and with a compact one (positional lists, defaults left out)."""
    compact_req = [1, "step", 0, req_head["session"], 0, {"duration": 0.1, "drift": "diagonal"},
                   [[d["name"], d["dtype"], d["shape"]] for d in req_head["arrays"]]]
    compact_rep = [1, 0, rep_head["seq"], rep_head["instance"], "ok", rep_head["result"],
                   [[d["name"], d["dtype"], d["shape"]] for d in rep_head["arrays"]]]
    fns = {}
    for name, req, rep in (("floor_same_header", dict(req_head), rep_head),
                           ("floor_compact_header", compact_req, compact_rep)):
        sock = _dealer(floor_ep, f"floor:{name}".encode())
        sock.send_multipart([b"SET", msgpack.packb(rep), *rep_arrays])
        sock.recv_multipart()
        compact = type(req) is list

        def rt(sock: zmq.Socket = sock, req: Any = req, compact: bool = compact) -> None:
            if compact:
                req[2] += 1
            else:
                req["id"] += 1
            sock.send_multipart([msgpack.packb(req), *req_arrays])
            frames = sock.recv_multipart(copy=False)
            h = msgpack.unpackb(frames[0].buffer)
            for d, f in zip(h[-1] if compact else h["arrays"], frames[1:], strict=True):
                np.frombuffer(f.buffer, dtype=d[1] if compact else d["dtype"])

        fns[name] = rt
    return fns


def small_step(null: DeviceClient, emu: DeviceClient, ep: str, rounds: int, per_round: int) -> dict[str, Any]:
    """Every variant against the one shared server at ``ep`` (module docstring, 1)."""
    drift = Diagonal(np.linspace(1.0, 2.0, N_SMALL))
    bias = np.ones(N_SMALL)
    kw = {"duration": 0.1}
    real = emu.step(drift, bias, **kw)
    # The raw peer gets the same request bytes and answers with a reply of the same size.
    spec = {"form": "diagonal"}
    args = {"drift": spec, "duration": 0.1, "burn_in": 0.0, "delay": 0.0, "reset": False, "samples": 0,
            "second_moment": False}
    req = encode(request_header("step", 123456, null.session, 10**9, args), {"diag": drift.diag, "bias": bias})
    res, arrays = result_to_wire(real)
    rep = encode(reply_header({"op": "step", "id": 123456, "session": null.session, "seq": 10**9}, "0" * 32,
                              result=res, timing={"queue_us": 10.0, "compute_us": 50.0}), arrays)
    req_b = [f if isinstance(f, bytes) else f.tobytes() for f in req]
    rep_b = [f if isinstance(f, bytes) else f.tobytes() for f in rep]
    raw = _dealer(ep, b"raw:small")
    raw.send_multipart([b"SET", *rep_b])
    raw.recv_multipart()

    def raw_rt() -> None:
        raw.send_multipart(req_b)
        raw.recv_multipart(copy=False)

    req_head = msgpack.unpackb(req_b[0])
    req_head["id"] = 0
    fns = {"raw_pyzmq": raw_rt, "protocol_null_backend": lambda: null.step(drift, bias, **kw),
           "protocol_emulator": lambda: emu.step(drift, bias, **kw),
           **_floor_clients(ep, req_head, msgpack.unpackb(rep_b[0]), [drift.diag, bias],
                            [np.frombuffer(f) for f in rep_b[1:]])}
    samples: dict[str, list[int]] = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(300):
            f()
    for _ in range(rounds):
        for name, f in fns.items():
            out = samples[name]
            for _ in range(per_round):
                t = time.perf_counter_ns()
                f()
                out.append(time.perf_counter_ns() - t)
    raw.close(0)
    out = {k: stats_us(v) for k, v in samples.items()}
    out["request_bytes"] = sum(len(f) for f in req_b)
    out["reply_bytes"] = sum(len(f) for f in rep_b)
    _ratios(out)
    return out


SMALL_ROWS = ("raw_pyzmq", "protocol_null_backend", "protocol_emulator", "floor_same_header", "floor_compact_header")


def _ratios(out: dict[str, Any]) -> None:
    base = out["raw_pyzmq"]
    for k in SMALL_ROWS[1:]:
        out[k]["median_ratio_vs_raw"] = round(out[k]["median_us"] / base["median_us"], 3)
        out[k]["p99_ratio_vs_raw"] = round(out[k]["p99_us"] / base["p99_us"], 3)
        out[k]["added_us_over_raw"] = round(out[k]["median_us"] - base["median_us"], 1)


def emulator_step_compute_us(endpoint: str, n: int = 300) -> float:
    """Median daemon-side compute time of the small step on the Emulator (from reply timing)."""
    from protocol.messages import Op

    dev = DeviceClient(endpoint, seed=1, timeout=30)
    drift, bias = Diagonal(np.linspace(1.0, 2.0, N_SMALL)), np.ones(N_SMALL)
    spec = {"form": "diagonal"}
    args = {"drift": spec, "duration": 0.1}
    vals = [dev._call(Op.STEP, args, {"diag": drift.diag, "bias": bias}, mutating=True).header["timing"]["compute_us"]
            for _ in range(n)]
    dev.close()
    return round(float(np.median(vals)), 1)


def large_program(null: DeviceClient, ep: str, reps: int) -> dict[str, Any]:
    from protocol.messages import Op

    rng = np.random.default_rng(0)
    J = rng.standard_normal(J_SHAPE, dtype=np.float32)
    H = np.eye(J_SHAPE[0], dtype=np.float32)
    drift = Factored(J, H, 0.1)
    spec, arrays = {"form": "factored", "damping": 0.1}, {"J": J, "H": H}
    nbytes = J.nbytes + H.nbytes
    header = encode(request_header("program", 1, "x" * 32, 1, {"drift": spec}), {"J": J[:1, :1]})[0]
    socks = []
    for ident in (b"raw:big", b"scan:big"):
        sock = _dealer(ep, ident)
        sock.send_multipart([b"SET", b"ack"])
        sock.recv_multipart()
        socks.append(sock)

    def send_raw(sock: zmq.Socket) -> None:
        sock.send_multipart([header, J, H], copy=False)
        if sock.recv_multipart() != [b"ack"]:
            raise RuntimeError("the raw peer refused J")

    times: dict[str, list[float]] = {"raw": [], "scan": [], "proto": [], "compute": [], "chunked": []}
    chunk_default = null.chunk_bytes
    for i in range(reps + 2):
        t = time.perf_counter()
        send_raw(socks[0])
        dt_raw = time.perf_counter() - t
        t = time.perf_counter()
        send_raw(socks[1])
        dt_scan = time.perf_counter() - t
        t = time.perf_counter()
        msg = null._call(Op.PROGRAM, {"drift": spec}, arrays, mutating=True)  # one message
        dt_proto = time.perf_counter() - t
        null.chunk_bytes = CHUNK_BYTES
        t = time.perf_counter()
        null.program(drift)  # row blocks of CHUNK_BYTES, each scanned on arrival (``upload``)
        dt_chunked = time.perf_counter() - t
        null.chunk_bytes = chunk_default
        if i >= 2:
            times["chunked"].append(dt_chunked)
            times["raw"].append(dt_raw)
            times["scan"].append(dt_scan)
            times["proto"].append(dt_proto)
            times["compute"].append(msg.header["timing"]["compute_us"] / 1e6)
    for sock in socks:
        sock.close(0)
    del drift
    mr, ms, mp, mc, mk = (float(np.median(times[k])) for k in ("raw", "scan", "proto", "compute", "chunked"))
    return {
        "payload_bytes": nbytes,
        "raw_pyzmq_zero_copy": {"median_ms": round(mr * 1e3, 2), "GB_per_s": round(nbytes / mr / 1e9, 3)},
        "protocol_program": {"median_ms": round(mp * 1e3, 2), "GB_per_s": round(nbytes / mp / 1e9, 3),
                             "ratio_vs_raw": round(mr / mp, 3)},
        "protocol_program_chunked": {"median_ms": round(mk * 1e3, 2), "GB_per_s": round(nbytes / mk / 1e9, 3),
                                     "ratio_vs_raw": round(mr / mk, 3), "chunk_bytes": CHUNK_BYTES},
        "daemon_validation_ms": round(mc * 1e3, 2),
        "protocol_wire_only": {"median_ms": round((mp - mc) * 1e3, 2),
                               "GB_per_s": round(nbytes / (mp - mc) / 1e9, 3),
                               "ratio_vs_raw": round(mr / (mp - mc), 3)},
        "floor_raw_plus_nan_scan": {"median_ms": round(ms * 1e3, 2), "GB_per_s": round(nbytes / ms / 1e9, 3),
                                    "ratio_vs_raw": round(mr / ms, 3)},
        "reps": reps,
    }


def rss_over_programs(client: DeviceClient, pid: int, drift: Drift, n: int) -> dict[str, Any]:
    trace = []
    for i in range(n):
        client.program(drift)
        if i % 100 == 99 or i == 0:
            trace.append(round(rss_mb(pid), 1))
    payload_mb = sum(a.nbytes for a in vars(drift).values() if isinstance(a, np.ndarray)) / 2**20
    growth = max(trace[1:]) - trace[1]
    return {"programs": n, "payload_mb": round(payload_mb, 2), "rss_mb_every_100": trace,
            "growth_after_first_100_mb": round(growth, 1),
            "flat": bool(growth <= max(1.2 * payload_mb, 8.0))}


def in_process(repeats: int) -> dict[str, Any]:
    """The protocol's Python work without sockets, in a hot loop (best of 5 batches, us per call):
    what a round trip pays on top of raw pyzmq, before the 2.5-3x a ping-pong adds for cold caches.
    Plus the NaN/Inf scan of a 25.6 MB J: NumPy's isfinite against ``protocol.drift.all_finite``."""
    import timeit

    from host.client import _REPLY_LIMITS, _drift_args, _run_args
    from protocol.codec import check_request, decode, drift_from_wire, result_from_wire
    from protocol.drift import all_finite
    from protocol.messages import Limits
    from thermo_device.daemon import _bias, _run_kwargs

    drift, bias, dev, limits = Diagonal(np.linspace(1.0, 2.0, N_SMALL)), np.ones(N_SMALL), NullDevice(), Limits()

    def client_encode() -> list[Any]:
        spec, arrays = _drift_args(drift, bias)
        args = _run_args(0.1, 0.0, 0.0, False, 0, False)
        args["drift"] = spec
        return encode(request_header("step", 1, "s" * 32, 5, args), arrays)

    request = [zmq.Frame(f if isinstance(f, bytes) else f.tobytes()) for f in client_encode()]

    def daemon_path() -> list[Any]:
        msg = decode(request, limits)
        check_request(msg.header)
        args = msg.header["args"]
        d = drift_from_wire(args["drift"], msg.arrays)
        res, arrays = result_to_wire(dev.step(d, _bias(msg.arrays), **_run_kwargs(args)))
        return encode(reply_header(msg.header, "0" * 32, result=res, timing={"queue_us": 1.0, "compute_us": 2.0}),
                      arrays)

    reply = [zmq.Frame(f if isinstance(f, bytes) else f.tobytes()) for f in daemon_path()]

    def client_decode() -> RunResult:
        msg = decode(reply, _REPLY_LIMITS)
        return result_from_wire(msg.header["result"], msg.arrays)

    def best_us(fn: Any, n: int) -> float:
        return round(min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6, 2)

    j = np.random.default_rng(0).standard_normal(J_SHAPE, dtype=np.float32)
    return {
        "client_encode_us": best_us(client_encode, repeats), "daemon_decode_us": best_us(lambda: decode(request, limits),
                                                                                           repeats),
        "daemon_path_us": best_us(daemon_path, repeats), "client_decode_us": best_us(client_decode, repeats),
        "finite_scan_25MB_ms": {"numpy_isfinite": round(best_us(lambda: np.isfinite(j).all(), 5) / 1e3, 2),
                                "all_finite": round(best_us(lambda: all_finite(j), 5) / 1e3, 2)},
    }


def one_run(me: list[str], quick: bool, with_rss: bool) -> dict[str, Any]:
    """Start a fresh shared server, measure small steps and large programs, stop it."""
    rounds, per_round, reps, n_rss = (3, 200, 5, 100) if quick else (10, 500, 30, 1000)
    proc, ep = start_server([*me, "--serve-shared", "tcp://127.0.0.1:*"])
    try:
        null = DeviceClient(ep, seed=0, timeout=60)
        emu = DeviceClient(ep, seed=1, timeout=600)
        out: dict[str, Any] = {"loadavg_start": list(os.getloadavg())}
        out["small_step"] = small_step(null, emu, ep, rounds, per_round)
        out["small_step"]["emulator_daemon_compute_median_us"] = emulator_step_compute_us(ep)
        out["large_program"] = large_program(null, ep, reps)
        if with_rss:
            rng = np.random.default_rng(1)
            big = Factored(rng.standard_normal(J_SHAPE, dtype=np.float32), np.eye(64, dtype=np.float32), 0.1)
            out["daemon_rss_large_programs_null_backend"] = rss_over_programs(null, proc.pid, big, n_rss)
            m = rng.standard_normal((64, 64))
            out["daemon_rss_small_programs_emulator"] = rss_over_programs(
                emu, proc.pid, Dense(m @ m.T / 64 + np.eye(64)), n_rss)
            t = time.perf_counter()
            emu.program(big)
            out["emulator_large_program_end_to_end_s"] = round(time.perf_counter() - t, 3)
        out["loadavg_end"] = list(os.getloadavg())
        null.close()
        emu.close()
        return out
    finally:
        proc.kill()
        proc.wait()


def _median_of_runs(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Small-step and large-program rows, each statistic the median over the runs."""
    small: dict[str, Any] = {}
    for row in SMALL_ROWS:
        small[row] = {k: round(float(np.median([r["small_step"][row][k] for r in runs])), 1)
                      for k in ("median_us", "p99_us")}
        small[row]["n"] = int(sum(r["small_step"][row]["n"] for r in runs))
    _ratios(small)
    for k in ("request_bytes", "reply_bytes"):
        small[k] = runs[0]["small_step"][k]
    small["emulator_daemon_compute_median_us"] = round(float(np.median(
        [r["small_step"]["emulator_daemon_compute_median_us"] for r in runs])), 1)
    large: dict[str, Any] = {"payload_bytes": runs[0]["large_program"]["payload_bytes"]}
    for row in ("raw_pyzmq_zero_copy", "protocol_program", "protocol_program_chunked", "protocol_wire_only",
                "floor_raw_plus_nan_scan"):
        large[row] = {k: round(float(np.median([r["large_program"][row][k] for r in runs])), 3)
                      for k in runs[0]["large_program"][row]}
    large["daemon_validation_ms"] = round(float(np.median([r["large_program"]["daemon_validation_ms"]
                                                           for r in runs])), 2)
    return small, large


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke test)")
    ap.add_argument("--runs", type=int, default=None, help="fresh server processes (default 3; 1 with --quick)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "protocol.json"))
    ap.add_argument("--serve-shared")
    ap.add_argument("--serve-null")
    ap.add_argument("--serve-raw")
    ap.add_argument("--serve-raw-scan")
    ap.add_argument("--serve-floor")
    args = ap.parse_args()
    if args.serve_shared:
        return serve_shared(args.serve_shared)
    if args.serve_null:
        return serve_null(args.serve_null)
    if args.serve_raw:
        return serve_raw(args.serve_raw)
    if args.serve_raw_scan:
        return serve_raw(args.serve_raw_scan, scan=True)
    if args.serve_floor:
        return serve_floor(args.serve_floor)

    me = [sys.executable, str(Path(__file__).resolve())]
    n_runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    load_start = list(os.getloadavg())
    hot = in_process(2000 if args.quick else 20000)
    runs = [one_run(me, args.quick, with_rss=(i == n_runs - 1)) for i in range(n_runs)]
    small, large = _median_of_runs(runs)
    last = runs[-1]

    # issue 16's targets: small step median <= raw + 40 us and p99 <= 2 x raw p99 (same server
    # process, fresh runs); a 25.6 MB program with validation >= 0.9 of raw zero-copy throughput
    targets = {"small_step_added_us_max": 40.0, "small_step_p99_ratio_max": 2.0, "large_program_throughput_min": 0.9}
    ns = small["protocol_null_backend"]
    result = {
        "what": __doc__,
        "command": "python3 benchmarks/bench_protocol.py" + (" --quick" if args.quick else "") + f" --runs {n_runs}",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pyzmq": zmq.pyzmq_version(),
                    "libzmq": zmq.zmq_version(), "numpy": np.__version__, "transport": "tcp loopback",
                    "server": "one process serves raw, floor and protocol (routing id)",
                    "loadavg_start": load_start, "loadavg_end": list(os.getloadavg())},
        "small_step": small,
        "large_program": large,
        "runs": runs,
        "in_process": hot,
        "emulator_large_program_end_to_end_s": last["emulator_large_program_end_to_end_s"],
        "daemon_rss_large_programs_null_backend": last["daemon_rss_large_programs_null_backend"],
        "daemon_rss_small_programs_emulator": last["daemon_rss_small_programs_emulator"],
        "targets": targets,
        "met": {
            "small_step_added_us (null backend)": ns["added_us_over_raw"] <= targets["small_step_added_us_max"],
            "small_step_p99 (null backend)": ns["p99_ratio_vs_raw"] <= targets["small_step_p99_ratio_max"],
            "small_step_added_us (every run)": all(
                r["small_step"]["protocol_null_backend"]["added_us_over_raw"] <= targets["small_step_added_us_max"]
                for r in runs),
            "large_program_throughput (with validation)":
                large["protocol_program"]["ratio_vs_raw"] >= targets["large_program_throughput_min"],
            "large_program_throughput (chunked, with validation)":
                large["protocol_program_chunked"]["ratio_vs_raw"] >= targets["large_program_throughput_min"],
            "large_program_throughput (wire only)":
                large["protocol_wire_only"]["ratio_vs_raw"] >= targets["large_program_throughput_min"],
            "rss_flat": last["daemon_rss_large_programs_null_backend"]["flat"]
                and last["daemon_rss_small_programs_emulator"]["flat"],
        },
        # Could any implementation of the specified framing meet the targets here? (module doc, 1d, 2)
        "floor_meets": {
            "small_step_added_us (framing only, same header)":
                small["floor_same_header"]["added_us_over_raw"] <= targets["small_step_added_us_max"],
            "small_step_added_us (framing only, compact header)":
                small["floor_compact_header"]["added_us_over_raw"] <= targets["small_step_added_us_max"],
            "small_step_p99 (framing only, same header)":
                small["floor_same_header"]["p99_ratio_vs_raw"] <= targets["small_step_p99_ratio_max"],
            "large_program_throughput (raw + NaN/Inf scan)":
                large["floor_raw_plus_nan_scan"]["ratio_vs_raw"] >= targets["large_program_throughput_min"],
        },
        "quick": args.quick,
    }
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("small_step", "large_program", "met", "floor_meets")}, indent=2))


if __name__ == "__main__":
    main()
