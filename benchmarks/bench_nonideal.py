"""Non-ideality benchmarks; writes JSON (default benchmarks/results/nonideal.json).

1. Cost of each non-ideality relative to the ideal run of the same problem (Dense N = 64 SPD,
   condition 20, program + run of 220 tau with 20 tau burn-in), one model switched on at a time.
2. Accuracy table: relative error of a thermodynamic solve (Dense N = 32, condition 10) against
   mismatch spread and converter bits (DAC, conductance codes and ADC all at that depth, auto
   range, ADC read noise of half an LSB), averaged over 3 chip ids. Printed as a markdown table
   for docs/physics.md.

    python3 benchmarks/bench_nonideal.py [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from harness import write_json

from protocol.drift import Dense
from thermo_device import Emulator, load_profile

MODELS = {
    "ideal (exact)": {},
    "ideal (heun)": {"integrator.method": "heun"},
    "coupling mismatch 1% (non-symmetric, Van Loan)": {"mismatch.coupling_rel_std": 0.01},
    "capacitance mismatch 2%": {"mismatch.capacitance_rel_std": 0.02},
    "input gain 1% + offset 2 mV": {"mismatch.gain_rel_std": 0.01, "mismatch.offset_V_std": 0.002},
    "temperature drift (10 tau chunks)": {"temperature.walk_K_per_sqrt_tau": 1e-3,
                                          "temperature.conductance_tempco_per_K": 1e-4},
    "8-bit DAC + conductance codes": {"dac.bits": 8, "coupling.bits": 8, "range.auto": True},
    "8-bit ADC + read noise": {"adc.bits": 8, "adc.read_noise_std": 0.004, "range.auto": True},
    "rails (heun)": {"range.rail": 1.0, "range.auto": True, "integrator.method": "auto"},
    "1/f noise, 6 poles (heun)": {"noise.flicker_corner": 0.1, "integrator.method": "auto"},
}


def spd(n: int, cond: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.logspace(0.0, np.log10(cond), n)) @ q.T


def bench_costs() -> list[dict]:
    a = spd(64, 20.0, 0)
    b = np.random.default_rng(1).standard_normal(64) * 0.1
    rows = []
    base = None
    for name, ov in MODELS.items():
        prof = load_profile("ideal", {"noise.kappa": 1e-4, **ov})

        def once(prof=prof) -> float:
            emu = Emulator(prof, seed=0)
            t0 = time.perf_counter()
            emu.program(Dense(a), b)
            emu.run(220.0, burn_in=20.0)
            return time.perf_counter() - t0

        once()
        t = float(np.median([once() for _ in range(3)]))
        base = base or t
        rows.append({"model": name, "seconds": t, "relative_to_ideal": t / base})
        print(f"{name:50s} {t * 1e3:9.1f} ms  x{t / base:7.1f}", flush=True)
    noisy = Emulator("noisy", seed=0)
    t0 = time.perf_counter()
    noisy.program(Dense(a), b)
    noisy.run(220.0, burn_in=20.0)
    t = time.perf_counter() - t0
    rows.append({"model": "noisy profile (all of its models)", "seconds": t, "relative_to_ideal": t / base})
    print(f"{'noisy profile (all of its models)':50s} {t * 1e3:9.1f} ms  x{t / base:7.1f}")
    return rows


def accuracy_table() -> dict:
    a = spd(32, 10.0, 2)
    rng = np.random.default_rng(3)
    b = rng.standard_normal(32)
    x_star = np.linalg.solve(a, b)
    spreads = [0.0, 0.001, 0.003, 0.01, 0.03]
    bits_list = [6, 8, 10, 12, 16, 0]
    table = {}
    for bits in bits_list:
        row = []
        for std in spreads:
            errs = []
            for chip in range(3):
                ov = {"noise.kappa": 1e-8, "mismatch.seed": chip, "mismatch.coupling_rel_std": std,
                      "dac.bits": bits, "coupling.bits": bits, "adc.bits": bits, "range.auto": True,
                      "adc.read_noise_std": (0.5 * 2.0 / 2**bits) if bits else 0.0}
                emu = Emulator(load_profile("ideal", ov), seed=chip)
                emu.program(Dense(a), b)
                r = emu.run(520.0, burn_in=20.0)
                errs.append(np.linalg.norm(r.mean - x_star) / np.linalg.norm(x_star))
            row.append(float(np.mean(errs)))
        table["ideal" if bits == 0 else f"{bits}-bit"] = row
    header = "| converters \\ coupling mismatch | " + " | ".join(f"{s:.1%}" for s in spreads) + " |"
    lines = [header, "|" + "---|" * (len(spreads) + 1)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{e:.1e}" for e in row) + " |")
    md = "\n".join(lines)
    print(md)
    return {"spreads": spreads, "rows": table, "markdown": md,
            "problem": "Dense N=32, condition 10, kappa 1e-8, 500 tau window, mean over chips 0-2"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "nonideal.json"))
    args = parser.parse_args()
    result = {"benchmark": "nonideal", "command": "python3 benchmarks/bench_nonideal.py",
              "costs": bench_costs(), "accuracy": accuracy_table()}
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
