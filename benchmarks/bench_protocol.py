"""Protocol overhead against raw pyzmq, measured in one run; writes benchmarks/results/protocol.json.

What is measured (all over tcp loopback, daemons in separate processes started with subprocess):

1. Small ``step`` round trip (N = 64, Diagonal drift, bias, duration 0.1 tau: one ADC sample)
   through ``DeviceClient`` against
   a. a daemon serving a *null* backend (program/run do no physics): the protocol alone, i.e.
      client encode + daemon decode, validation (drift constructor, bias and run arguments),
      dispatch, reply encode + client decode;
   b. a daemon serving the Emulator (``ideal`` profile): what a host really sees;
   c. raw pyzmq: a DEALER sending the very same request frames to a ROUTER that answers with a
      reply of the very same bytes (no parsing);
   d. the *floor* of the specified framing: both ends do only what any implementation of it must
      (the client packs the same msgpack request header, the server unpacks it, views the array
      frames with np.frombuffer, packs the same reply header; the client unpacks it and views the
      reply arrays), with no checks, sessions or dispatch; the same with a compact header
      (positional msgpack arrays, default arguments left out) shows what a leaner header buys.
   All are interleaved in rounds so machine load hits them alike; median and p99.
2. Large ``program`` (Factored, J 64 x 100,000 float32 + H 64 x 64, 25.6 MB) through the client
   against the null daemon, vs raw pyzmq sending the same J buffer zero-copy to a ROUTER that
   views it with np.frombuffer and answers a short frame. Interleaved; median throughput.
   The daemon reports ``compute_us`` (drift validation incl. the NaN/Inf scan of J, plus the
   backend's no-op program); "wire" throughput subtracts it. The *floor* with validation: the raw
   ROUTER also scans the received J for NaN/Inf (``protocol.drift.all_finite``) before answering,
   the one check the daemon cannot skip.
3. In process, without sockets (``in_process``): the client's encode and decode and the daemon's
   decode-check-dispatch-encode path of that small step in a hot loop, and the NaN/Inf scan of the
   25.6 MB J (NumPy's isfinite vs ``protocol.drift.all_finite``).
4. Daemon RSS over 1,000 large programs (null daemon) and 1,000 small programs (Emulator
   daemon, Dense 64).

Run: python3 benchmarks/bench_protocol.py [--quick]
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
        head, arrays = replies[frames[0].bytes]
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


# -- measurements ----------------------------------------------------------------------------------------


def _floor_clients(floor_ep: str, req_head: dict[str, Any], rep_head: dict[str, Any], req_arrays: list[np.ndarray],
                   rep_arrays: list[np.ndarray]) -> dict[str, Any]:
    """Round trips doing only what the framing forces (see the module docstring, 1d): with our
    header, and with a compact one (positional lists, defaults left out)."""
    ctx = zmq.Context.instance()
    compact_req = [1, "step", 0, req_head["session"], 0, {"duration": 0.1, "drift": "diagonal"},
                   [[d["name"], d["dtype"], d["shape"]] for d in req_head["arrays"]]]
    compact_rep = [1, 0, rep_head["seq"], rep_head["instance"], "ok", rep_head["result"],
                   [[d["name"], d["dtype"], d["shape"]] for d in rep_head["arrays"]]]
    fns = {}
    for name, req, rep in (("floor_same_header", dict(req_head), rep_head),
                           ("floor_compact_header", compact_req, compact_rep)):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)  # a dead peer fails the run, never hangs it
        sock.connect(floor_ep)
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


def small_step(null: DeviceClient, emu: DeviceClient, raw_ep: str, floor_ep: str, rounds: int,
               per_round: int) -> dict[str, Any]:
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
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)  # a dead peer fails the run, never hangs it
    raw.connect(raw_ep)
    raw.send_multipart([b"SET", *rep_b])
    raw.recv_multipart()

    def raw_rt() -> None:
        raw.send_multipart(req_b)
        raw.recv_multipart(copy=False)

    req_head = msgpack.unpackb(req_b[0])
    req_head["id"] = 0
    fns = {"raw_pyzmq": raw_rt, "protocol_null_backend": lambda: null.step(drift, bias, **kw),
           "protocol_emulator": lambda: emu.step(drift, bias, **kw),
           **_floor_clients(floor_ep, req_head, msgpack.unpackb(rep_b[0]), [drift.diag, bias],
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
    base = out["raw_pyzmq"]
    for k in ("protocol_null_backend", "protocol_emulator", "floor_same_header", "floor_compact_header"):
        out[k]["median_ratio_vs_raw"] = round(out[k]["median_us"] / base["median_us"], 3)
        out[k]["p99_ratio_vs_raw"] = round(out[k]["p99_us"] / base["p99_us"], 3)
    return out


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


def large_program(null: DeviceClient, raw_ep: str, scan_ep: str, reps: int) -> dict[str, Any]:
    from protocol.messages import Op

    rng = np.random.default_rng(0)
    J = rng.standard_normal(J_SHAPE, dtype=np.float32)
    H = np.eye(J_SHAPE[0], dtype=np.float32)
    drift = Factored(J, H, 0.1)
    spec, arrays = {"form": "factored", "damping": 0.1}, {"J": J, "H": H}
    nbytes = J.nbytes + H.nbytes
    ctx = zmq.Context.instance()
    header = encode(request_header("program", 1, "x" * 32, 1, {"drift": spec}), {"J": J[:1, :1]})[0]
    socks = []
    for ep in (raw_ep, scan_ep):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)  # a dead peer fails the run, never hangs it
        sock.connect(ep)
        sock.send_multipart([b"SET", b"ack"])
        sock.recv_multipart()
        socks.append(sock)

    def send_raw(sock: zmq.Socket) -> None:
        sock.send_multipart([header, J, H], copy=False)
        if sock.recv_multipart() != [b"ack"]:
            raise RuntimeError("the raw peer refused J")

    times: dict[str, list[float]] = {"raw": [], "scan": [], "proto": [], "compute": []}
    for i in range(reps + 2):
        t = time.perf_counter()
        send_raw(socks[0])
        dt_raw = time.perf_counter() - t
        t = time.perf_counter()
        send_raw(socks[1])
        dt_scan = time.perf_counter() - t
        t = time.perf_counter()
        msg = null._call(Op.PROGRAM, {"drift": spec}, arrays, mutating=True)
        dt_proto = time.perf_counter() - t
        if i >= 2:
            times["raw"].append(dt_raw)
            times["scan"].append(dt_scan)
            times["proto"].append(dt_proto)
            times["compute"].append(msg.header["timing"]["compute_us"] / 1e6)
    for sock in socks:
        sock.close(0)
    del drift
    mr, ms, mp, mc = (float(np.median(times[k])) for k in ("raw", "scan", "proto", "compute"))
    return {
        "payload_bytes": nbytes,
        "raw_pyzmq_zero_copy": {"median_ms": round(mr * 1e3, 2), "GB_per_s": round(nbytes / mr / 1e9, 3)},
        "protocol_program": {"median_ms": round(mp * 1e3, 2), "GB_per_s": round(nbytes / mp / 1e9, 3),
                             "ratio_vs_raw": round(mr / mp, 3)},
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke test)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "protocol.json"))
    ap.add_argument("--serve-null")
    ap.add_argument("--serve-raw")
    ap.add_argument("--serve-raw-scan")
    ap.add_argument("--serve-floor")
    args = ap.parse_args()
    if args.serve_null:
        return serve_null(args.serve_null)
    if args.serve_raw:
        return serve_raw(args.serve_raw)
    if args.serve_raw_scan:
        return serve_raw(args.serve_raw_scan, scan=True)
    if args.serve_floor:
        return serve_floor(args.serve_floor)

    me = [sys.executable, str(Path(__file__).resolve())]
    bind = "tcp://127.0.0.1:*"
    procs = []
    try:
        raw_p, raw_ep = start_server([*me, "--serve-raw", bind])
        scan_p, scan_ep = start_server([*me, "--serve-raw-scan", bind])
        floor_p, floor_ep = start_server([*me, "--serve-floor", bind])
        null_p, null_ep = start_server([*me, "--serve-null", bind])
        emu_p, emu_ep = start_server([sys.executable, "-m", "thermo_device.cli", "serve", "--profile", "ideal", "--bind", bind,
                               "--set", "device.cells=131072", "--log-level", "WARNING"])
        procs = [raw_p, scan_p, floor_p, null_p, emu_p]
        null = DeviceClient(null_ep, seed=0, timeout=60)
        emu = DeviceClient(emu_ep, seed=0, timeout=600)
        rounds, per_round, reps, n_rss = (3, 200, 5, 100) if args.quick else (10, 500, 30, 1000)

        hot = in_process(2000 if args.quick else 20000)
        small = small_step(null, emu, raw_ep, floor_ep, rounds, per_round)
        small["emulator_daemon_compute_median_us"] = emulator_step_compute_us(emu_ep)
        large = large_program(null, raw_ep, scan_ep, reps)
        rng = np.random.default_rng(1)
        big = Factored(rng.standard_normal(J_SHAPE, dtype=np.float32), np.eye(64, dtype=np.float32), 0.1)
        rss_big = rss_over_programs(null, null_p.pid, big, n_rss)
        m = rng.standard_normal((64, 64))
        rss_small = rss_over_programs(emu, emu_p.pid, Dense(m @ m.T / 64 + np.eye(64)), n_rss)
        t = time.perf_counter()
        emu.program(big)
        emu_big_program_s = time.perf_counter() - t
        null.close()
        emu.close()
    finally:
        for p in procs:
            p.kill()
            p.wait()

    targets = {
        "small_step_median_ratio_max": 1.25, "small_step_p99_ratio_max": 1.5, "large_program_throughput_min": 0.9,
    }
    ns = small["protocol_null_backend"]
    result = {
        "what": __doc__,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pyzmq": zmq.pyzmq_version(),
                    "libzmq": zmq.zmq_version(), "numpy": np.__version__, "transport": "tcp loopback",
                    "loadavg_at_end": list(os.getloadavg())},
        "small_step": small,
        "large_program": large,
        "in_process": hot,
        "emulator_large_program_end_to_end_s": round(emu_big_program_s, 3),
        "daemon_rss_large_programs_null_backend": rss_big,
        "daemon_rss_small_programs_emulator": rss_small,
        "targets": targets,
        "met": {
            "small_step_median (null backend)": ns["median_ratio_vs_raw"] <= targets["small_step_median_ratio_max"],
            "small_step_p99 (null backend)": ns["p99_ratio_vs_raw"] <= targets["small_step_p99_ratio_max"],
            "large_program_throughput (with validation)":
                large["protocol_program"]["ratio_vs_raw"] >= targets["large_program_throughput_min"],
            "large_program_throughput (wire only)":
                large["protocol_wire_only"]["ratio_vs_raw"] >= targets["large_program_throughput_min"],
            "rss_flat": rss_big["flat"] and rss_small["flat"],
        },
        # Could any implementation of the specified framing meet the targets here? (module doc, 1d, 2)
        "floor_meets": {
            "small_step_median (framing only, same header)":
                small["floor_same_header"]["median_ratio_vs_raw"] <= targets["small_step_median_ratio_max"],
            "small_step_median (framing only, compact header)":
                small["floor_compact_header"]["median_ratio_vs_raw"] <= targets["small_step_median_ratio_max"],
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
