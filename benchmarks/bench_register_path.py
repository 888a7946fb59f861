"""Per-step overhead of the register-level path; writes JSON (default
benchmarks/results/register_path.json).

The same TNGD-shaped step (program a Dense N = 16 SPD drift and a fresh bias, then run ``t`` tau
warm-started, read the window average) is timed, interleaved in one run, on:

* ``emulator``: the emulator in-process with the board's converters (12-bit DAC and coupling codes,
  14-bit ADC, auto range) — the physics alone;
* ``register``: the reference driver in-process -> TCP register link -> board simulator process
  (which runs the same physics): adds coding, ~9 link transactions, frame transfer and host-side
  averaging;
* ``daemon+emulator`` and ``daemon+register``: the same two behind ``thermo-device serve``, reached
  with host.connect (the whole host -> daemon -> driver -> link -> board path).

Overhead per step = register - emulator, paired step by step (same iteration, same problem).
Reports median and p99 of each, in microseconds, and the link traffic per step.

    python3 benchmarks/bench_register_path.py [--steps 300] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import host  # noqa: E402
from protocol.drift import Dense  # noqa: E402
from thermo_device import Emulator, load_profile  # noqa: E402
from thermo_device.hardware.board_sim import BoardConfig, BoardProcess  # noqa: E402
from thermo_device.hardware.driver import make_register_backend  # noqa: E402

N = 16
DURATIONS = (1.0, 10.0, 50.0)


def board_profile(cfg: BoardConfig) -> Any:
    return load_profile("ideal", {
        "device.cells": cfg.cells, "noise.kappa": cfg.kappa, "adc.bits": cfg.adc_bits, "adc.full_scale": 1.0,
        "adc.sample_interval": cfg.sample_interval, "dac.bits": cfg.dac_bits, "coupling.bits": cfg.coupling_bits,
        "range.auto": True, "integrator.method": "exact"})


class Daemon:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "thermo_device.cli", "serve", "--bind",
                                      "tcp://127.0.0.1:*", "--log-level", "WARNING", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        m = re.match(r"serving (\S+)", self.proc.stdout.readline().decode() if ready else "")
        if not m:
            self.stop()
            raise RuntimeError("daemon did not start")
        self.endpoint = m.group(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def stats(x: np.ndarray) -> dict[str, float]:
    return {"median_us": float(np.median(x) * 1e6), "p99_us": float(np.percentile(x, 99) * 1e6),
            "mean_us": float(np.mean(x) * 1e6)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "register_path.json"))
    args = ap.parse_args()

    cfg = BoardConfig()
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((N, N)))
    a = (q * np.linspace(1.0, 4.0, N)) @ q.T
    biases = [rng.standard_normal(N) * (1.0 + 0.2 * rng.standard_normal()) for _ in range(args.steps + args.warmup)]

    board_a = BoardProcess(cwd=str(ROOT))  # for the in-process driver
    board_b = BoardProcess(cwd=str(ROOT))  # for the driver inside the daemon (one owner per board)
    d_emu = Daemon("--backend", "emulator", "--backend-option", "profile=ideal",
                   *[f"--backend-option={k}={v}" for k, v in (("device.cells", cfg.cells), ("noise.kappa", cfg.kappa),
                                                              ("adc.bits", cfg.adc_bits), ("dac.bits", cfg.dac_bits),
                                                              ("coupling.bits", cfg.coupling_bits),
                                                              ("range.auto", "true"))])
    d_reg = Daemon("--backend", "register", "--backend-option", f"address={board_b.address}")
    results = []
    try:
        devices = {
            "emulator": Emulator(board_profile(cfg), seed=0),
            "register": make_register_backend(seed=0, address=board_a.address),
            "daemon+emulator": host.connect(d_emu.endpoint, seed=0, timeout=30.0),
            "daemon+register": host.connect(d_reg.endpoint, seed=0, timeout=30.0),
        }
        for duration in DURATIONS:
            times = {k: [] for k in devices}
            link = devices["register"].link.counters
            c0 = (link.transactions, link.words_written, link.words_read)
            for i, b in enumerate(biases):
                for name, dev in devices.items():
                    t0 = time.perf_counter()
                    dev.step(Dense(a), b, duration)
                    dt = time.perf_counter() - t0
                    if i >= args.warmup:
                        times[name].append(dt)
            c1 = (link.transactions, link.words_written, link.words_read)
            per = [(y - x) / len(biases) for x, y in zip(c0, c1, strict=True)]
            t = {k: np.array(v) for k, v in times.items()}
            row = {"n": N, "duration_tau": duration, "steps": args.steps,
                   "adc_frames_per_step": int(round(duration / cfg.sample_interval)),
                   **{k: stats(v) for k, v in t.items()},
                   "overhead_register_vs_emulator": stats(t["register"] - t["emulator"]),
                   "overhead_daemon_register_vs_daemon_emulator": stats(t["daemon+register"] - t["daemon+emulator"]),
                   "link_per_step": {"transactions": per[0], "bytes_written": 4 * per[1], "bytes_read": 4 * per[2]}}
            results.append(row)
            o = row["overhead_register_vs_emulator"]
            print(f"t = {duration:5.1f} tau: emulator {row['emulator']['median_us']:8.0f} us, register "
                  f"{row['register']['median_us']:8.0f} us, overhead median {o['median_us']:7.0f} us p99 "
                  f"{o['p99_us']:7.0f} us; via daemon {row['daemon+emulator']['median_us']:7.0f} / "
                  f"{row['daemon+register']['median_us']:7.0f} us; {per[0]:.0f} transactions/step")
        for dev in devices.values():
            dev.close()
    finally:
        d_emu.stop()
        d_reg.stop()
        board_a.stop()
        board_b.stop()

    out = {"benchmark": "register_path", "board": {"cells": cfg.cells, "dac_bits": cfg.dac_bits, "adc_bits": cfg.adc_bits,
                                                  "coupling_bits": cfg.coupling_bits, "kappa": cfg.kappa,
                                                  "sample_interval": cfg.sample_interval},
           "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
           "method": "interleaved per step, same problem and bias sequence, wall time of step() on the caller; "
                     "overhead = paired difference register - emulator",
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
