"""TNGD's regimes on the digits task (TNGD paper, Figs. 4a and 4b; DESIGN section 1).

1. Analog time t in {0.5, 5, 50} tau, each solve started from x0 = g (``init="grad"``, the paper's
   interpolation) and warm-started (``init="warm"``, the default): how far x_bar is from the
   gradient (SGD's direction) and from the exact natural gradient (G + lambda I)^-1 g computed on
   the same batch, and what that does to training. SGD and exact NGD at the same lr bracket them.
2. Delay t_d in {0, 0.2, 1} tau at t = 5 tau (warm start): the previous drift keeps acting for
   t_d, so the device carries more of the last step into this one. Momentum shows as a higher
   cosine between successive updates, and in the loss.

All runs: the same seed, initial weights and batches; lr = 0.3, lambda = 0.01 (host.tasks
DEFAULTS), ideal device (kappa = kT/C ~ 4e-12, exact integrator).

    python benchmarks/bench_tngd_regimes.py [--steps 200] [--out benchmarks/results/tngd_regimes.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from host import datasets
from host.baselines import ExactNGD
from host.connect import connect
from host.tasks import DEFAULTS, TASKS, evaluate
from host.torch_optimizer import NGDOptimizer, TNGDOptimizer


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run(label: str, make_opt, steps: int, seed: int = 0) -> dict:
    task = TASKS["digits"]
    ds = datasets.load("digits")
    torch.manual_seed(seed)
    model = task.model()
    opt = make_opt(model)
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(len(x)), 0
    ngd = ExactNGD(1.0, DEFAULTS["ngd"]["damping"])
    losses, to_sgd, to_ngd, cos_prev = [], [], [], []
    prev = None
    t0 = time.perf_counter()
    for _ in range(steps):
        if pos + task.batch_size > len(order):
            order, pos = rng.permutation(len(x)), 0
        idx = torch.from_numpy(order[pos:pos + task.batch_size])
        pos += task.batch_size
        losses.append(float(opt.step(model, x[idx], y[idx])))
        curv, d = opt.last_curvature, opt.last_direction
        nat = ngd.direction(curv.grad, curv.drift())
        to_sgd.append(_rel(d, curv.grad))
        to_ngd.append(_rel(d, nat))
        if prev is not None:
            cos_prev.append(float(d @ prev / (np.linalg.norm(d) * np.linalg.norm(prev))))
        prev = d
    acc, _ = evaluate(model, torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test))
    k = max(1, steps // 10)
    out = {"label": label, "final_loss": float(np.mean(losses[-k:])), "loss_at_25pct": float(np.mean(losses[steps // 4 - k // 2: steps // 4 + k // 2 + 1])),
           "test_accuracy": acc, "rel_dist_to_sgd_dir": float(np.mean(to_sgd)),
           "rel_dist_to_ngd_dir": float(np.mean(to_ngd)), "cos_successive_updates": float(np.mean(cos_prev)),
           "wall_s": time.perf_counter() - t0, "loss": losses}
    print(f"{label:>24}: loss {out['final_loss']:.4f} (25%: {out['loss_at_25pct']:.4f})  test acc {acc:.4f}  "
          f"|x-g|/|g| {out['rel_dist_to_sgd_dir']:.3f}  |x-n|/|n| {out['rel_dist_to_ngd_dir']:.3f}  "
          f"cos(prev) {out['cos_successive_updates']:.3f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=DEFAULTS["tngd"]["lr"])
    ap.add_argument("--out", default="benchmarks/results/tngd_regimes.json")
    args = ap.parse_args()
    lam = DEFAULTS["tngd"]["damping"]

    def tngd(t: float, init: str, delay: float = 0.0):
        return lambda m: TNGDOptimizer(m.parameters(), connect("embedded:ideal", seed=0), lr=args.lr,
                                       analog_time=t, damping=lam, delay=delay, burn_in=t, init=init)

    results = {"lr": args.lr, "damping": lam, "steps": args.steps, "readout": "final-state snapshot (burn_in = t)",
               "runs": []}
    add = results["runs"].append
    add(run("sgd", lambda m: _SGDAdapter(m, args.lr), args.steps))
    for t in (0.5, 5.0, 50.0):
        add(run(f"tngd t={t} x0=g", tngd(t, "grad"), args.steps))
    for t in (0.5, 5.0, 50.0):
        add(run(f"tngd t={t} warm", tngd(t, "warm"), args.steps))
    for td in (0.2, 1.0):
        add(run(f"tngd t=5 warm t_d={td}", tngd(5.0, "warm", td), args.steps))
    add(run("exact ngd", lambda m: NGDOptimizer(m.parameters(), lr=args.lr, damping=lam), args.steps))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


class _SGDAdapter(NGDOptimizer):
    """torch.optim.SGD through the same interface (so the same direction metrics apply): x = g."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        super().__init__(model.parameters(), lr=lr, damping=1.0)

    def _direction(self, grad: np.ndarray, curvature) -> np.ndarray:
        return grad


if __name__ == "__main__":
    main()
