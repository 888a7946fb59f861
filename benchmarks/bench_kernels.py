"""Emulator kernel benchmarks; writes JSON (default benchmarks/results/kernels.json).

Measured in one run, on the same inputs:
  1. Euler-Maruyama steps/s, dense N in {16, 64, 256, 1024}: our numba kernel (noise drawn in
     blocks, whole loop in the kernel) vs a plain NumPy loop of BLAS gemv steps with the same
     block-drawn noise. Targets: >= NumPy for N >= 256, >= 3x NumPy for N <= 64.
  2. Exact mode vs time stepping for a long window (T = 1000 tau, 10^4 readout samples).
     Target: exact at N = 1024 under 0.5 s after the eigendecomposition.
  3. Factored (m = 64) vs Dense at N = 2000: program + run of the same A.

    python3 benchmarks/bench_kernels.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
from harness import write_json

from protocol.drift import Dense, Factored
from thermo_device import Emulator, load_profile
from thermo_device.exact import ModalPropagator
from thermo_device.stepping import OverdampedStepper


def spd(n: int, cond: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.logspace(0.0, np.log10(cond), n)) @ q.T


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def numpy_em(a: np.ndarray, b: np.ndarray, x: np.ndarray, dt: float, sig: float, n_steps: int,
             rng: np.random.Generator) -> np.ndarray:
    """The reference: a plain NumPy loop of gemv steps, noise drawn in the same blocks as ours."""
    block = max(1, (1 << 20) // x.shape[0])
    done = 0
    while done < n_steps:
        k = min(block, n_steps - done)
        noise = rng.standard_normal((k, x.shape[0]))
        for j in range(k):
            x = x + dt * (b - a @ x) + sig * noise[j]
        done += k
    return x


def bench_em(sizes: list[int], seconds: float) -> list[dict]:
    rows = []
    for n in sizes:
        a = spd(n, 10.0, n)
        b = np.ones(n)
        dt, kappa = 0.01, 0.01
        stepper = OverdampedStepper(Dense(a), b, dt, "euler_maruyama")
        rng = np.random.default_rng(0)
        stepper.window(np.zeros(n), dt, 10, 0, rng, False, 1.0, kappa)  # compile / warm
        sig = np.sqrt(2 * kappa * dt)
        # size the runs to about `seconds` of NumPy time: short runs measure thread start-up
        t0 = time.perf_counter()
        numpy_em(a, b, np.zeros(n), dt, sig, 200, rng)
        steps = max(2000, int(seconds * 200 / (time.perf_counter() - t0)))
        t_ours = best_of(partial(stepper.window, np.zeros(n), dt, steps, 0, rng, False, 1.0, kappa), 3)
        t_np = best_of(partial(numpy_em, a, b, np.zeros(n), dt, sig, steps, rng), 3)
        rows.append({"n": n, "steps": steps, "ours_steps_per_s": steps / t_ours,
                     "numpy_steps_per_s": steps / t_np, "ratio": t_np / t_ours,
                     "target_ratio": 3.0 if n <= 64 else 1.0})
        print(f"EM dense N={n:5d}: ours {steps / t_ours:12.0f} steps/s  numpy {steps / t_np:12.0f}  "
              f"ratio {t_np / t_ours:.2f}", flush=True)
    return rows


def bench_exact_vs_stepping(n: int, n_step_cmp: int, window: float, n_samples: int) -> dict:
    a = spd(n, 10.0, 1)
    b = np.ones(n)
    kappa = 0.01
    h = window / n_samples
    t0 = time.perf_counter()
    emu = Emulator(load_profile("ideal", {"noise.kappa": kappa}), seed=0)
    emu.program(Dense(a), b)
    t_eigh = time.perf_counter() - t0
    prop: ModalPropagator = emu.propagator  # the kernel itself
    rng = np.random.default_rng(0)
    prop.window(np.zeros(n), h, 10, 0, rng, False, 1.0, kappa)
    t_exact = best_of(partial(prop.window, np.zeros(n), h, n_samples, 0, rng, False, 1.0, kappa), 3)
    print(f"exact N={n}: T={window} tau, {n_samples} samples: {t_exact:.3f} s after eigh ({t_eigh:.3f} s)")

    # Same window by Euler-Maruyama at dt = 0.01 on a smaller N (measured), vs exact on that N.
    a2 = spd(n_step_cmp, 10.0, 2)
    b2 = np.ones(n_step_cmp)
    stepper = OverdampedStepper(Dense(a2), b2, 0.01, "euler_maruyama")
    stepper.window(np.zeros(n_step_cmp), h, 2, 0, rng, False, 1.0, kappa)
    t_em = best_of(partial(stepper.window, np.zeros(n_step_cmp), h, n_samples, 0, rng, False, 1.0, kappa), 1)
    emu2 = Emulator(load_profile("ideal", {"noise.kappa": kappa}), seed=0)
    t0 = time.perf_counter()
    emu2.program(Dense(a2), b2)
    t_eigh2 = time.perf_counter() - t0
    prop2 = emu2.propagator
    t_exact2 = best_of(partial(prop2.window, np.zeros(n_step_cmp), h, n_samples, 0, rng, False, 1.0, kappa), 3)
    print(f"N={n_step_cmp}, T={window}: exact {t_exact2:.3f} s (+eigh {t_eigh2:.3f}) vs EM dt=0.01 {t_em:.2f} s "
          f"-> {t_em / (t_exact2 + t_eigh2):.0f}x")
    return {"n": n, "window_tau": window, "samples": n_samples, "exact_s_after_eigh": t_exact,
            "eigh_s": t_eigh, "target_s": 0.5,
            "compare": {"n": n_step_cmp, "exact_s": t_exact2, "eigh_s": t_eigh2, "em_dt": 0.01, "em_s": t_em,
                        "speedup_exact_incl_eigh": t_em / (t_exact2 + t_eigh2)}}


def bench_factored_vs_dense(n: int, m: int, duration: float) -> dict:
    rng = np.random.default_rng(3)
    j = rng.standard_normal((m, n)) / np.sqrt(n)
    h = np.eye(m)
    damping = 0.1
    g = rng.standard_normal(n)
    prof = load_profile("ideal", {"noise.kappa": 1e-4})

    def run(drift):
        emu = Emulator(prof, seed=0)
        emu.program(drift, g)
        return emu.run(duration, burn_in=duration / 10).mean

    run(Factored(j, h, damping))
    t_fact = best_of(lambda: run(Factored(j, h, damping)), 3)
    a_dense = j.T @ h @ j + damping * np.eye(n)
    t_dense = best_of(lambda: run(Dense(a_dense)), 1)
    print(f"N={n} m={m}: factored {t_fact:.3f} s, dense {t_dense:.3f} s -> {t_dense / t_fact:.1f}x")
    return {"n": n, "m": m, "duration_tau": duration, "factored_s": t_fact, "dense_s": t_dense,
            "speedup": t_dense / t_fact}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels.json"))
    args = parser.parse_args()
    sizes = [16, 64] if args.quick else [16, 64, 256, 1024]
    result = {
        "benchmark": "kernels",
        "command": "python3 benchmarks/bench_kernels.py" + (" --quick" if args.quick else ""),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
                    "numpy": np.__version__},
        "em_dense": bench_em(sizes, 0.5 if args.quick else 2.0),
        "exact_vs_stepping": bench_exact_vs_stepping(128 if args.quick else 1024, 64 if args.quick else 256,
                                                     1000.0, 10_000),
        "factored_vs_dense": bench_factored_vs_dense(400 if args.quick else 2000, 64, 100.0),
    }
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
