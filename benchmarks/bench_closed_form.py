"""The closed-form readout window against the sampled one, on the readouts it was built for: digits
TNGD on a kappa = 1e-3 device with the noise-aware readout (1e4 tau per step, 1e5 ADC samples).

Both windows run the same steps alternately in one process (``integrator.window`` = closed_form |
sampled), after one warm-up step each; the median per-step wall time and the emulator's share are
reported, with the load.

    python benchmarks/bench_closed_form.py [--steps 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from host.tasks import train

WINDOWS = ("closed_form", "sampled")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/closed_form_window.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    per_step: dict[str, list[float]] = {w: [] for w in WINDOWS}
    analog: dict[str, float] = {}
    load = [os.getloadavg()]
    for _ in range(args.rounds):
        for w in WINDOWS:
            rec = train("digits", "tngd", steps=args.steps + 1, eval_every=10**9,
                        device_overrides={"noise.kappa": 1e-3, "integrator.window": w})
            wall = np.diff(np.concatenate([[0.0], rec.wall_s]))[1:]  # the first step compiles
            per_step[w] += list(wall)
            analog[w] = rec.analog_s[-1] / len(rec.analog_s) / 1e-6
            load.append(os.getloadavg())
    rows = {w: {"median_ms": 1e3 * float(np.median(v)), "steps": len(v), "analog_tau_per_step": analog[w]}
            for w, v in per_step.items()}
    rows["sampled_over_closed_form"] = rows["sampled"]["median_ms"] / rows["closed_form"]["median_ms"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "loadavg": load}, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
