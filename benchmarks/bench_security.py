"""The cost of CURVE: the same daemon and client, plaintext vs CURVE (ironhouse), in one run.

Two ``thermo-device serve`` subprocesses on tcp loopback, identical but for CURVE (keys made with
``thermo-device keygen`` in a temporary directory), each driven by a ``DeviceClient``:

1. small ``step`` round trip (N = 64, Diagonal drift + bias, duration 0.1 tau) and ``ping``;
   interleaved in rounds (plaintext, CURVE, plaintext, ...) so machine load hits both alike;
   median and p99;
2. a 25.6 MB ``program`` (Diagonal drift of 3.2 million float64 cells; the daemons are started
   with ``device.cells`` raised to that) so the payload dominates; interleaved; median time and
   throughput;
3. the CURVE handshake: time to a connected client (hello + open_session) for both.

One run; the ratios are the result. Run: python3 benchmarks/bench_security.py [--quick]
Writes benchmarks/results/security.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import start_server, stats_us, write_json  # noqa: E402

from host.client import DeviceClient  # noqa: E402
from protocol import Diagonal  # noqa: E402

N_SMALL = 64
N_LARGE = 3_200_000  # 25.6 MB of float64


def start(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    with open(log, "ab") as err:
        return start_server([sys.executable, "-m", "thermo_device.cli", "serve", "--bind", "tcp://127.0.0.1:*",
                             "--log-level", "WARNING", "--set", f"device.cells={N_LARGE}", *args], stderr=err)


def interleaved(fns: dict[str, Any], rounds: int, per_round: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for name in order:
            fn = fns[name]
            for _ in range(per_round):
                t0 = time.perf_counter_ns()
                fn()
                out[name].append(time.perf_counter_ns() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "security.json"))
    opts = ap.parse_args()
    rounds, per_round, big_reps = (4, 50, 3) if opts.quick else (20, 250, 10)

    with tempfile.TemporaryDirectory(prefix="thermo-curve-") as tmp:
        keys = Path(tmp)
        for out, name in ((keys, "daemon"), (keys / "allow", "host")):
            subprocess.run([sys.executable, "-m", "thermo_device.cli", "keygen", "--out", str(out), "--name", name],
                           cwd=ROOT, check=True, capture_output=True, timeout=60)
        procs = []
        try:
            plain_proc, plain_ep = start([], keys / "plain.log")
            procs.append(plain_proc)
            curve_proc, curve_ep = start(["--curve-secret-key", str(keys / "daemon.key_secret"),
                                          "--allow-keys", str(keys / "allow")], keys / "curve.log")
            procs.append(curve_proc)
            curve_kw = {"curve_server_key": keys / "daemon.key",
                        "curve_secret_key_file": keys / "allow" / "host.key_secret"}

            connect_ns: dict[str, list[int]] = {"plaintext": [], "curve": []}
            for _ in range(5 if opts.quick else 20):
                for name, ep, kw in (("plaintext", plain_ep, {}), ("curve", curve_ep, curve_kw)):
                    t0 = time.perf_counter_ns()
                    DeviceClient(ep, seed=0, timeout=30, **kw).close()
                    connect_ns[name].append(time.perf_counter_ns() - t0)

            plain = DeviceClient(plain_ep, seed=1, timeout=60)
            curve = DeviceClient(curve_ep, seed=1, timeout=60, **curve_kw)
            rng = np.random.default_rng(0)
            d, b = rng.uniform(1.0, 2.0, N_SMALL), rng.standard_normal(N_SMALL)
            drift = Diagonal(d)
            # same seed, same calls: the two must agree bit for bit (CURVE changes nothing but the wire)
            r1, r2 = plain.step(drift, b, 0.1), curve.step(drift, b, 0.1)
            assert np.array_equal(r1.mean, r2.mean) and np.array_equal(r1.state, r2.state)
            for dev in (plain, curve):  # warm-up
                for _ in range(200):
                    dev.step(drift, b, 0.1)
            steps = interleaved({"plaintext": lambda: plain.step(drift, b, 0.1),
                                 "curve": lambda: curve.step(drift, b, 0.1)}, rounds, per_round)
            pings = interleaved({"plaintext": plain.ping, "curve": curve.ping}, rounds, per_round)

            big = Diagonal(rng.uniform(1.0, 2.0, N_LARGE))
            for dev in (plain, curve):
                dev.program(big)
            programs = interleaved({"plaintext": lambda: plain.program(big), "curve": lambda: curve.program(big)},
                                   big_reps, 1)
            plain.close()
            curve.close()
        finally:
            for p in procs:
                p.kill()
                p.wait(10)
                p.stdout.close()

    def ratio(section: dict[str, dict[str, float]], key: str) -> float:
        return round(section["curve"][key] / section["plaintext"][key], 3)

    small = {k: stats_us(v) for k, v in steps.items()}
    ping = {k: stats_us(v) for k, v in pings.items()}
    nbytes = N_LARGE * 8
    large = {}
    for k, v in programs.items():
        med_s = float(np.median(v)) / 1e9
        large[k] = {"median_ms": round(med_s * 1e3, 1), "GB_per_s": round(nbytes / med_s / 1e9, 3), "n": len(v)}
    result = {
        "what": "plaintext vs CURVE (ironhouse) through DeviceClient and thermo-device serve, tcp loopback",
        "command": "python3 benchmarks/bench_security.py" + (" --quick" if opts.quick else ""),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pyzmq": zmq.pyzmq_version(),
                    "libzmq": zmq.zmq_version(), "numpy": np.__version__,
                    "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
        "small_step": {**small, "ratio_median": ratio(small, "median_us"), "ratio_p99": ratio(small, "p99_us"),
                       "n_cells": N_SMALL},
        "ping": {**ping, "ratio_median": ratio(ping, "median_us"), "ratio_p99": ratio(ping, "p99_us")},
        "program_25MB": {**large, "bytes": nbytes,
                         "ratio_time": round(large["curve"]["median_ms"] / large["plaintext"]["median_ms"], 2),
                         # the plaintext time includes the emulator's own program work; the difference
                         # is what encryption adds per 25.6 MB
                         "curve_added_ms": round(large["curve"]["median_ms"] - large["plaintext"]["median_ms"], 1)},
        "connect": {k: stats_us(v) for k, v in connect_ns.items()},
        "goal": {"small_message_ratio_max": 1.15,
                 "small_step_met": ratio(small, "median_us") <= 1.15, "ping_met": ratio(ping, "median_us") <= 1.15},
    }
    out = Path(opts.out)
    write_json(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
