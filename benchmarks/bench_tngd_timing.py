"""Wall-clock per training step for each optimizer on this machine, and TNGD's projection on the
``tngd-paper`` hardware profile (host time + analog time from its tau + transfers at its converter
widths over the paper's 50 Gb/s link: ``host.tasks.profile_projected_step_s``).

Each optimizer trains ``--steps`` steps of a task (same seed and batches); the first ``--skip``
steps (imports, numba compilation, allocator warm-up) are dropped and the median of the rest is
reported, split into host time and the emulator's own compute. torch and BLAS run one thread each:
the machine has 2 cores shared with other jobs, and oversubscribed OpenMP/OpenBLAS pools made
per-step times swing by 10-30x under load (docs/benchmarks.md); one thread keeps them comparable.
The load average is recorded with every row.

    python benchmarks/bench_tngd_timing.py [--task digits] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from host.tasks import DEVICE_OPTIMIZERS, TASKS, profile_projected_step_s, train

DIGITS_RUNS = ("tngd", "tngd-noisy", "tngd-adam", "ngd", "ngd-cg", "adam", "sgd", "kfac", "shampoo", "soap")
NOISY_KAPPA = 1e-3  # as thermo-host compare's tngd-noisy


def _per_step(cum: list[float], skip: int) -> np.ndarray:
    d = np.diff(np.concatenate([[0.0], np.asarray(cum, dtype=float)]))
    return d[skip:]


def measure(task: str, label: str, steps: int, skip: int, hparams: dict[str, Any]) -> dict[str, Any]:
    optimizer = "tngd" if label == "tngd-noisy" else label
    overrides: dict[str, Any] = {"noise.kappa": NOISY_KAPPA} if label == "tngd-noisy" else {}
    if task == "mnist" and optimizer.startswith("tngd"):
        # 4510 parameters > the ideal profile's 4096 cells: say so (nothing enlarges it silently)
        overrides["device.cells"] = 4510
    overrides = overrides or None
    load = os.getloadavg()
    rec = train(task, optimizer, steps=steps, eval_every=10**9, device_overrides=overrides, label=label,
                **hparams)
    wall = _per_step(rec.wall_s, skip)
    emu = _per_step(rec.emulator_s, skip)
    row: dict[str, Any] = {"task": task, "label": label, "steps_timed": int(wall.size),
                           "wall_ms_median": 1e3 * float(np.median(wall)),
                           "host_ms_median": 1e3 * float(np.median(wall - emu)),
                           "emulator_ms_median": 1e3 * float(np.median(emu)),
                           "wall_ms_p90": 1e3 * float(np.percentile(wall, 90)),
                           "analog_us_per_step": 1e6 * rec.analog_s[-1] / len(rec.analog_s),
                           "loadavg_before": load, "loadavg_after": os.getloadavg(), "hparams": rec.hparams}
    if optimizer in DEVICE_OPTIMIZERS:
        # the projection takes host time per step from the record; use the median, not the mean
        rec.wall_s = list(np.cumsum(wall - emu))
        rec.emulator_s = [0.0] * wall.size
        rec.loss = rec.loss[skip:]
        t = TASKS[task]
        row["projected_tngd_paper"] = profile_projected_step_s(rec, t.batch_size, 10)
    print(json.dumps({k: v for k, v in row.items() if k != "hparams"}), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="digits")
    ap.add_argument("--runs", default=None, help="comma-separated (default: the compare list for digits, "
                                                  "tngd,adam for mnist)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/tngd_timing_<task>.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = args.runs.split(",") if args.runs else (DIGITS_RUNS if args.task == "digits" else ("tngd", "adam"))
    # MNIST: the paper's hyperparameters (they do not change the per-step cost of the digital ones)
    paper = {"adam": {"lr": 1e-3}, "tngd": {"lr": 0.01}} if args.task == "mnist" else {}
    rows = [measure(args.task, r, args.steps, args.skip, paper.get(r, {})) for r in runs]
    out = Path(args.out or f"benchmarks/results/tngd_timing_{args.task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"task": args.task, "cpus": os.cpu_count(), "torch_threads": 1, "blas_threads": 1,
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
