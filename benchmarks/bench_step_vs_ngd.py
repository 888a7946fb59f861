"""An embedded TNGD step against exact NGD by Woodbury on the same batches (issue 15).

For each task (digits; the MNIST CNN, m = 640, N = 4510) and each of ``--batches`` mini-batches
of the task's model at its initial parameters: the GGN factors and gradient from PyTorch (shared
by both optimizers, timed as "curvature"), then, interleaved and in alternating order, the ideal
emulator's step on Factored(J, H, lambda) with the gradient as bias (set-up = ``program``,
readout = ``run`` over 50 tau, the TNGD default there) and ``host.baselines.natural_direction``
(Woodbury). Medians over batches; a step's ratio is (curvature + device) / (curvature + Woodbury).
The emulator's set-up is split further by profiling one extra batch (``--split``).

    python3 benchmarks/bench_step_vs_ngd.py [--tasks digits,mnist] [--batches 15]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from host import datasets
from host.baselines import natural_direction
from host.curvature import torch_curvature
from host.tasks import TASKS
from protocol.drift import Factored
from thermo_device import Emulator, load_profile

DAMPING = 0.01
ANALOG_TIME = 50.0


def _batches(task: str, count: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    t = TASKS[task]
    ds = datasets.load(t.dataset)
    torch.manual_seed(0)
    model = t.model()
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        idx = rng.choice(ds.x_train.shape[0], t.batch_size, replace=False)
        c = torch_curvature(model, torch.from_numpy(ds.x_train[idx]), torch.from_numpy(ds.y_train[idx]))
        out.append((c.J, c.H, c.grad))
    return out


def _curvature_s(task: str, count: int) -> float:
    t = TASKS[task]
    ds = datasets.load(t.dataset)
    torch.manual_seed(0)
    model = t.model()
    times = []
    for k in range(count):
        x = torch.from_numpy(ds.x_train[k * t.batch_size:(k + 1) * t.batch_size])
        y = torch.from_numpy(ds.y_train[k * t.batch_size:(k + 1) * t.batch_size])
        t0 = time.perf_counter()
        torch_curvature(model, x, y)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def measure(task: str, count: int) -> dict[str, Any]:
    batches = _batches(task, count + 1)
    # one device that holds the whole model (the MNIST CNN's N = 4510 exceeds the default 4096 cells)
    emu = Emulator(load_profile("ideal", {"device.cells": max(4096, int(batches[0][0].shape[1]))}), seed=0)
    j, h, g = batches[0]
    emu.step(Factored(j, h, DAMPING), g, ANALOG_TIME)  # compile and warm up
    natural_direction(g, Factored(j, h, DAMPING))
    setup, readout, woodbury, err = [], [], [], []
    for k, (j, h, g) in enumerate(batches[1:]):
        drift = Factored(j, h, DAMPING)

        def device(drift: Factored = drift, g: np.ndarray = g) -> np.ndarray:
            t0 = time.perf_counter()
            emu.program(drift, g)
            t1 = time.perf_counter()
            r = emu.run(ANALOG_TIME, reset=True)
            t2 = time.perf_counter()
            setup.append(t1 - t0)
            readout.append(t2 - t1)
            return r.mean

        def digital(drift: Factored = drift, g: np.ndarray = g) -> np.ndarray:
            t0 = time.perf_counter()
            x = natural_direction(g, drift)
            woodbury.append(time.perf_counter() - t0)
            return x

        if k % 2:
            x_dev, x_ngd = device(), digital()
        else:
            x_ngd, x_dev = digital(), device()
        err.append(float(np.linalg.norm(x_dev - x_ngd) / np.linalg.norm(x_ngd)))
    curv = _curvature_s(task, min(count, 8) + 1)
    dev = float(np.median(np.add(setup, readout)))
    wood = float(np.median(woodbury))
    j, h, g = batches[1]
    prof = cProfile.Profile()
    prof.enable()
    emu.program(Factored(j, h, DAMPING), g)
    emu.run(ANALOG_TIME, reset=True)
    prof.disable()
    stats = pstats.Stats(prof).sort_stats("tottime")
    top = sorted(((v[2], f"{k[0].rsplit('/', 1)[-1]}:{k[2]}") for k, v in stats.stats.items()), reverse=True)[:8]
    return {
        "task": task, "m": int(j.shape[0]), "n": int(j.shape[1]), "batches": count,
        "curvature_ms": curv * 1e3, "device_setup_ms": float(np.median(setup)) * 1e3,
        "device_readout_ms": float(np.median(readout)) * 1e3, "device_ms": dev * 1e3,
        "woodbury_ms": wood * 1e3, "device_over_woodbury": dev / wood,
        "step_ratio": (curv + dev) / (curv + wood),
        "rel_diff_device_vs_woodbury_median": float(np.median(err)),
        "profile_top_self_ms": [{"where": w, "ms": t * 1e3} for t, w in top],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="digits,mnist")
    ap.add_argument("--batches", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results/step_vs_ngd.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    load = os.getloadavg()
    for task in args.tasks.split(","):
        row = measure(task, args.batches)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "profile_top_self_ms"}), flush=True)
    out = {"what": __doc__, "blas_threads": 1, "torch_threads": 1, "cpus": os.cpu_count(),
           "loadavg_before": load, "loadavg_after": os.getloadavg(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
