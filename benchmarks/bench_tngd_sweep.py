"""Learning-rate sweep: which lr each optimizer gets in ``host.tasks.DEFAULTS`` (digits), and the
digital baselines' lrs on MNIST (``--task mnist --out benchmarks/results/tngd_sweep_mnist.json``).

Each optimizer runs the task's default steps at every lr of a half-decade grid (seed 0, the same
batches); the pick is the lowest final training loss (mean mini-batch loss over the last 10% of
steps), and the held-out accuracy is reported alongside. TNGD takes NGD's lr (it approximates
NGD); TNGD-Adam is swept on the device like the rest.

    python benchmarks/bench_tngd_sweep.py [--task digits] [--optimizers adam,sgd,...] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

GRID = [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]
PER_OPT = {"ngd": [0.01, 0.03, 0.1, 0.3, 1.0], "kfac": [0.01, 0.03, 0.1, 0.3, 1.0],
           "tngd-adam": [3e-4, 1e-3, 3e-3, 1e-2]}


def main() -> None:
    from host.tasks import train

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", default="digits")
    ap.add_argument("--optimizers", default="adam,sgd,kfac,shampoo,soap,ngd")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lrs", default=None, help="comma-separated grid (default: per optimizer)")
    ap.add_argument("--out", default="benchmarks/results/sweep_digits.json", help="merged into if it exists")
    args = ap.parse_args()
    results = {}
    for name in args.optimizers.split(","):
        rows = []
        grid = [float(v) for v in args.lrs.split(",")] if args.lrs else PER_OPT.get(name, GRID)
        for lr in grid:
            t0 = time.perf_counter()
            try:
                s = train(args.task, name, steps=args.steps, lr=lr).summary()
            except (FloatingPointError, RuntimeError) as exc:  # diverged (NaN loss, failed SVD)
                s = {"final_loss_avg10pct": float("inf"), "test_accuracy": float("nan"), "error": str(exc)}
            rows.append({"lr": lr, "final_loss": s["final_loss_avg10pct"], "test_accuracy": s["test_accuracy"],
                         "wall_s": time.perf_counter() - t0, "loadavg": os.getloadavg()})
            print(name, rows[-1], flush=True)
        best = min(rows, key=lambda r: r["final_loss"])
        results[name] = {"best_lr": best["lr"], "rows": rows}
        print(f"== {name}: best lr {best['lr']}", flush=True)
        _merge(Path(args.out), name, rows)  # after every optimizer: partial sweeps survive


def _merge(out: Path, name: str, new_rows: list[dict]) -> None:
    """Merge one optimizer's rows into ``out``; a rerun on a wider grid extends the earlier rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(out.read_text()) if out.exists() else {}
    rows = {r["lr"]: r for r in merged.get(name, {}).get("rows", [])}
    rows.update({r["lr"]: r for r in new_rows})
    best = min(rows.values(), key=lambda r: r["final_loss"])
    merged[name] = {"best_lr": best["lr"], "rows": sorted(rows.values(), key=lambda r: r["lr"])}
    out.write_text(json.dumps(merged, indent=1))


if __name__ == "__main__":
    main()
