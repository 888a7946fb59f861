"""The noisy profile's device run against the ideal one, and its step before and after the
accuracy bound (issue 15): writes benchmarks/results/noisy_step.json.

On the digits MLP's GGN at its seeded initialisation (lambda = 0.01, the gradient as bias), one
50-tau run from rest, interleaved in one process, ``--repeats`` times each:
  ideal        the ideal profile (exact path)
  noisy        the noisy profile as shipped (Heun, dt 0.1, integrator.variance_tol 0.005)
  noisy-dt002  the noisy profile with its former step (dt 0.02, no accuracy bound)
Plus the noiseless solution's change from the former step to the new one: both with kappa 0,
no injected noise and no ADC read noise, so only the step differs (the ADC still quantises).

    python3 benchmarks/bench_noisy_step.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from host import datasets
from host.curvature import torch_curvature
from host.tasks import TASKS
from protocol.drift import Factored
from thermo_device import Emulator, load_profile

FORMER = {"integrator.dt": 0.02, "integrator.variance_tol": 0.0}
QUIET = {"noise.kappa": 0.0, "noise.injected_kappa": 0.0, "adc.read_noise_std": 0.0}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ideal": ("ideal", {}),
    "noisy": ("noisy", {}),
    "noisy-dt002": ("noisy", FORMER),
}


def _problem() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = TASKS["digits"]
    ds = datasets.load(t.dataset)
    torch.manual_seed(0)
    model = t.model()
    c = torch_curvature(model, torch.from_numpy(ds.x_train[:t.batch_size]), torch.from_numpy(ds.y_train[:t.batch_size]))
    return c.J, c.H, c.grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/noisy_step.json"))
    args = ap.parse_args()
    j, h, g = _problem()
    drift = Factored(j, h, 0.01)
    devices = {k: Emulator(load_profile(p, ov), seed=0) for k, (p, ov) in VARIANTS.items()}
    for emu in devices.values():
        emu.step(drift, g, 50.0, reset=True)  # compile, warm up
    times: dict[str, list[float]] = {k: [] for k in devices}
    steps: dict[str, Any] = {}
    load = os.getloadavg()
    for _ in range(args.repeats):
        for k, emu in devices.items():
            t0 = time.perf_counter()
            r = emu.step(drift, g, 50.0, reset=True)
            times[k].append(time.perf_counter() - t0)
            steps[k] = r.diagnostics.get("dt")
    quiet = {k: Emulator(load_profile("noisy", {**QUIET, **ov}), seed=0).step(drift, g, 50.0, reset=True).mean
             for k, ov in (("new", {}), ("former", FORMER))}
    med = {k: float(np.median(v)) for k, v in times.items()}
    out = {
        "what": __doc__, "repeats": args.repeats, "cpus": os.cpu_count(),
        "loadavg_before": load, "loadavg_after": os.getloadavg(),
        "median_s_per_run": med, "dt": steps,
        "noisy_over_ideal": med["noisy"] / med["ideal"],
        "former_over_new_step": med["noisy-dt002"] / med["noisy"],
        "noiseless_rel_change_former_to_new": float(np.linalg.norm(quiet["new"] - quiet["former"])
                                                    / np.linalg.norm(quiet["former"])),
    }
    print(json.dumps({k: v for k, v in out.items() if k != "what"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
