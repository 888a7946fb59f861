"""Load on one daemon: 1, 4 and 16 concurrent training hosts, plus misbehaving peers; writes JSON.

Each host is its own process (spawned, so no ZeroMQ context crosses a fork) running ``host.TNGD``
on a least-squares problem of its own (N = 256 parameters, Factored curvature with m = 32 rows,
5 tau of analog time per step) against one ``thermo-device serve --profile ideal`` daemon over tcp
loopback. Every host runs the same number of steps; the run is bounded in count and in time.

Reported per scenario: aggregate steps/s, per-host steps/s (min/max = fairness), step latency
p50/p99 over all hosts, "busy" replies seen (the client backs off and re-sends), daemon RSS before
and after. Scenario "4 hosts + bad peers" adds, for the whole run, a client that sends a burst of step
requests and never reads a reply, and a raw TCP peer that opens a connection and sends half a
greeting: the well-behaved hosts' throughput is compared with the plain 4-host scenario.

Run: python3 benchmarks/bench_load.py [--quick] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import rss_mb, start_server, write_json  # noqa: E402

N, M, ANALOG_T = 256, 32, 5.0


def host_worker(endpoint: str, seed: int, steps: int, deadline_s: float, out: Any) -> None:
    """One training host: TNGD steps on its own least-squares problem; reports latencies."""
    import host
    from protocol import Factored

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((M, N)) / np.sqrt(N)
    y = rng.standard_normal(M)
    theta = np.zeros(N)
    dev = host.connect(endpoint, seed=seed, timeout=30.0)
    opt = host.TNGD(dev, lr=0.5, analog_time=ANALOG_T, damping=0.1)
    lat: list[float] = []
    stop = time.monotonic() + deadline_s
    try:
        for _ in range(steps):
            if time.monotonic() > stop:
                break
            grad = a.T @ (a @ theta - y)
            t = time.perf_counter()
            theta = theta + opt.step(grad, Factored(a, np.eye(M), 0.1))  # "busy" is retried inside
            lat.append(time.perf_counter() - t)
        loss = float(0.5 * np.sum((a @ theta - y) ** 2))
        busy = dev.busy_retries
    finally:
        dev.close()
    out.put({"seed": seed, "latencies": lat, "busy": busy, "loss": loss})


def bad_peers(endpoint: str, stop: Any) -> None:
    """A client that sends requests and then never reads, and a raw TCP peer stuck in the handshake.

    (A client that floods is a different matter: it gets its fair share of messages, and on a
    2-core machine its own sending competes for the CPU; see docs/load.md.)
    """
    import zmq

    from protocol import Factored
    from protocol.codec import drift_to_wire, encode, request_header

    host_port = endpoint[len("tcp://"):].rpartition(":")
    raw = socket.create_connection((host_port[0], int(host_port[2])), timeout=5)
    raw.sendall(b"\xff\x00\x00\x00")  # the first bytes of a ZMTP greeting, then silence
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, 100)
    s.connect(endpoint)
    rng = np.random.default_rng(0)
    spec, arrays = drift_to_wire(Factored(rng.standard_normal((M, N)), np.eye(M), 0.1))
    s.send_multipart(encode(request_header("open_session", 1, "stuck", 0, {"seed": 0})))
    for seq in range(1, 9):  # a burst of steps (the second onwards answered "busy"), replies never read
        s.send_multipart(encode(request_header("step", seq + 1, "stuck", seq,
                                               {"drift": spec, "duration": ANALOG_T}), arrays))
    stop.wait(600)
    s.close(0)
    ctx.term()
    raw.close()


def start_daemon(queue_size: int | None, blas_threads: int | None = None) -> tuple[subprocess.Popen, str]:
    extra = [] if queue_size is None else ["--queue-size", str(queue_size)]
    extra += [] if blas_threads is None else ["--blas-threads", str(blas_threads)]
    return start_server([sys.executable, "-m", "thermo_device.cli", "serve", "--profile", "ideal",
                         "--bind", "tcp://127.0.0.1:*", "--log-level", "WARNING", *extra])


def scenario(endpoint: str, pid: int, hosts: int, steps: int, deadline_s: float, bad: bool) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    stop = ctx.Event()
    rss0 = rss_mb(pid)
    peers = ctx.Process(target=bad_peers, args=(endpoint, stop)) if bad else None
    if peers:
        peers.start()
        time.sleep(0.5)
    procs = [ctx.Process(target=host_worker, args=(endpoint, 1000 + i, steps, deadline_s, out)) for i in range(hosts)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = [out.get(timeout=deadline_s + 120) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join(timeout=10)
    if peers:
        stop.set()
        peers.join(timeout=10)
        if peers.is_alive():
            peers.kill()
    lat = np.concatenate([r["latencies"] for r in results]) * 1e3
    # per-host rate over its own active time: start-up (spawn + imports) is not the daemon's doing
    rates = [len(r["latencies"]) / sum(r["latencies"]) for r in results]
    total_steps = int(sum(len(r["latencies"]) for r in results))
    return {
        "hosts": hosts, "bad_peers": bad, "steps_per_host": steps, "completed_steps": total_steps,
        "wall_s": round(wall, 2),
        "aggregate_steps_per_s": round(sum(rates), 1),
        "per_host_steps_per_s": {"min": round(min(rates), 1), "max": round(max(rates), 1),
                                 "fairness_min_over_max": round(min(rates) / max(rates), 3)},
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 3),
                       "p99": round(float(np.percentile(lat, 99)), 3)},
        "busy_replies": int(sum(r["busy"] for r in results)),
        "final_loss_max": float(max(r["loss"] for r in results)),
        "daemon_rss_mb": {"before": round(rss0, 1), "after": round(rss_mb(pid), 1)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke test)")
    ap.add_argument("--steps", type=int, default=200, help="TNGD steps per host")
    ap.add_argument("--deadline", type=float, default=300.0, help="seconds a scenario may take")
    ap.add_argument("--queue-size", type=int, default=None,
                    help="the daemon's --queue-size (default: its own; 8 reproduces the earlier busy storm)")
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="the daemon's --blas-threads (default: its own, 1; 0 is the library's default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load.json"))
    args = ap.parse_args()
    steps = 20 if args.quick else args.steps
    proc, endpoint = start_daemon(args.queue_size, args.blas_threads)
    try:
        runs = [scenario(endpoint, proc.pid, h, steps, args.deadline, False) for h in (1, 4, 16)]
        runs.append(scenario(endpoint, proc.pid, 4, steps, args.deadline, True))
        alive = proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    four, four_bad = runs[1], runs[3]
    result = {
        "what": __doc__,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_at_end": list(os.getloadavg())},
        "problem": {"N": N, "m": M, "analog_time_tau": ANALOG_T, "profile": "ideal"},
        "daemon_queue_size": args.queue_size,
        "daemon_blas_threads": args.blas_threads,
        "scenarios": runs,
        "bad_peers_slowdown": round(four["aggregate_steps_per_s"] / four_bad["aggregate_steps_per_s"], 3),
        "daemon_alive_at_end": alive,
        "quick": args.quick,
    }
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("scenarios", "bad_peers_slowdown", "daemon_alive_at_end")}, indent=1))


if __name__ == "__main__":
    main()
