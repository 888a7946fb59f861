"""What each error mitigation buys on the `noisy` chip: the relative error of one TNGD direction
against the exact damped natural gradient, for the digits MLP's real curvature (issue 13).

The curvature is the GGN of the digits MLP (64-32-10, N = 2410) at its seeded initialisation on
one batch of 32 (m = 320). Each configuration solves (G + lambda I) x = g on a fresh device
started at g, with a long readout (burn-in then a window, so the transient is gone) and reports
|x_bar - x*| / |x*|, x* by Woodbury. The `noisy` profile with everything the host offers is the
reference row; every other row switches one thing off (or on), and the ideal chip gives the floor.

    python benchmarks/bench_mitigations.py [--dampings 0.01,0.1] [--time 150] [--burn 100]
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

import host
from host import datasets
from host.baselines import natural_direction
from host.curvature import torch_curvature
from host.guard import StabilityGuard
from host.tasks import TASKS

# label -> (profile, overrides, TNGD options)
CONFIGS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # the ideal chip: the floor
    "ideal": ("ideal", {}, {}),
    # noisy with every mitigation the host offers: guard, auto range (the profile's), offset cancellation
    "all": ("noisy", {}, {"offset_cancel": True}),
    # then one thing off (or on) at a time
    "no-offset-cancel": ("noisy", {}, {}),
    "no-auto-range": ("noisy", {"range.auto": False}, {"offset_cancel": True}),
    "stochastic-rounding": ("noisy", {"dac.rounding": "stochastic", "coupling.rounding": "stochastic"},
                            {"offset_cancel": True}),
    "no-guard": ("noisy", {}, {"offset_cancel": True, "guard": StabilityGuard(enabled=False)}),
    # attribution: what is left with exact couplings (no coupling mismatch, no coupling codes)
    "exact-couplings": ("noisy", {"mismatch.coupling_rel_std": 0.0, "coupling.bits": 0}, {"offset_cancel": True}),
    "exact-dac": ("noisy", {"dac.bits": 0}, {"offset_cancel": True}),
    # iterative refinement on the host's exact residual, 1 and 2 passes (on top of "all")
    "refine-1": ("noisy", {}, {"offset_cancel": True, "refine": 1}),
    "refine-2": ("noisy", {}, {"offset_cancel": True, "refine": 2}),
    "exact-adc": ("noisy", {"adc.bits": 0, "adc.read_noise_std": 0.0}, {"offset_cancel": True}),
}


def problem(seed: int = 0) -> tuple[np.ndarray, Any]:
    task = TASKS["digits"]
    data = datasets.load(task.dataset)
    torch.manual_seed(seed)
    model = task.model().double()
    idx = np.random.default_rng(seed).choice(data.x_train.shape[0], task.batch_size, replace=False)
    x = torch.as_tensor(data.x_train[idx], dtype=torch.float64)
    y = torch.as_tensor(data.y_train[idx])
    curv = torch_curvature(model, x, y)
    return curv.grad, curv.drift(0.0)


def solve(label: str, g: np.ndarray, curv: Any, damping: float, total: float, burn: float) -> dict[str, Any]:
    profile, overrides, opts = CONFIGS[label]
    dev = host.connect(f"embedded:{profile}", seed=0, overrides=overrides or None)
    opt = host.TNGD(dev, lr=1.0, analog_time=total, burn_in=burn, damping=damping, init="grad", **opts)
    exact = natural_direction(g, curv.damped(damping))
    t0 = time.perf_counter()
    try:
        x, opt.state = opt.engine.solve(opt.state, g, curv)
    except Exception as exc:  # noqa: BLE001 - a failure is a row of the table
        return {"config": label, "damping": damping, "error": f"{type(exc).__name__}: {exc}"[:200]}
    st = opt.last
    return {"config": label, "damping": damping, "rel_error": float(np.linalg.norm(x - exact) / np.linalg.norm(exact)),
            "damping_used": st.damping, "retries": st.retries, "stability_margin": st.stability_margin,
            "est_noise_rel_error": st.est_rel_error, "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dampings", default="0.01,0.1")
    ap.add_argument("--time", type=float, default=150.0, help="analog time per solve, tau (includes burn-in)")
    ap.add_argument("--burn", type=float, default=100.0)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mitigations_digits.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    g, curv = problem()
    rows = []
    load = [os.getloadavg()]
    for damping in (float(d) for d in args.dampings.split(",")):
        for label in args.configs.split(","):
            rows.append(solve(label, g, curv, damping, args.time, args.burn))
            print(json.dumps(rows[-1]), flush=True)
    load.append(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"n": int(g.shape[0]), "m": int(curv.J.shape[0]), "analog_time": args.time,
                                    "burn_in": args.burn, "loadavg": load, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
