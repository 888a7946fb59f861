"""TNGD's regimes on the digits task (TNGD paper, Figs. 4a and 4b; DESIGN section 1).

1. Analog time t in {0.5, 5, 50} tau, each solve started from x0 = g (``init="grad"``, the paper's
   interpolation) and warm-started (``init="warm"``, the default): how far x_bar is from the
   gradient (SGD's direction) and from the exact natural gradient (G + lambda I)^-1 g computed on
   the same batch, and what that does to training. SGD and exact NGD at the same lr bracket them.
2. Delay t_d at small t (warm start): t_d in {0.2, 1} tau at t = 5 tau (the paper's Fig. 4b) and
   t_d in {0.5, 2} tau at t = 0.5 tau. The previous drift keeps acting for t_d, so the device
   carries more of the last step into this one. Momentum shows as a higher cosine between
   successive parameter steps, and in the loss; SGD with torch's heavy-ball momentum (0.5, 0.9)
   at the same lr is the digital reference for "acts like momentum". Controls: t = 1 and 2.5 tau
   without delay (the same analog time per step as t = 0.5 with t_d = 0.5 and 2).

All runs: the same seed, initial weights and batches; lr = host.tasks DEFAULTS["tngd"] (0.1),
lambda = 0.01, ideal device (kappa = kT/C ~ 4e-12, exact integrator), readout = the final state.

    python benchmarks/bench_tngd_regimes.py [--steps 150] [--out benchmarks/results/tngd_regimes.json]
"""

from __future__ import annotations

import argparse
import json
import os
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
    losses, to_sgd, to_ngd, cos_prev, cos_step = [], [], [], [], []
    prev = prev_step = None
    params = [p for p in model.parameters() if p.requires_grad]

    def flat() -> np.ndarray:
        return torch.cat([p.detach().reshape(-1) for p in params]).to(torch.float64).numpy()
    t0 = time.perf_counter()
    for _ in range(steps):
        if pos + task.batch_size > len(order):
            order, pos = rng.permutation(len(x)), 0
        idx = torch.from_numpy(order[pos:pos + task.batch_size])
        pos += task.batch_size
        before = flat()
        losses.append(float(opt.step(model, x[idx], y[idx])))
        step = flat() - before  # the parameter step actually taken (includes any momentum buffer)
        if prev_step is not None:
            cos_step.append(float(step @ prev_step / (np.linalg.norm(step) * np.linalg.norm(prev_step))))
        prev_step = step
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
           "cos_successive_steps": float(np.mean(cos_step)),
           "wall_s": time.perf_counter() - t0, "loadavg_after": os.getloadavg(), "loss": losses}
    print(f"{label:>24}: loss {out['final_loss']:.4f} (25%: {out['loss_at_25pct']:.4f})  test acc {acc:.4f}  "
          f"|x-g|/|g| {out['rel_dist_to_sgd_dir']:.3f}  |x-n|/|n| {out['rel_dist_to_ngd_dir']:.3f}  "
          f"cos(prev x) {out['cos_successive_updates']:.3f}  cos(prev step) {out['cos_successive_steps']:.3f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=DEFAULTS["tngd"]["lr"])
    ap.add_argument("--out", default="benchmarks/results/tngd_regimes.json")
    args = ap.parse_args()
    lam = DEFAULTS["tngd"]["damping"]

    def tngd(t: float, init: str, delay: float = 0.0):
        return lambda m: TNGDOptimizer(m.parameters(), connect("embedded:ideal", seed=0), lr=args.lr,
                                       analog_time=t, damping=lam, delay=delay, burn_in=t, init=init)

    results = {"lr": args.lr, "damping": lam, "steps": args.steps, "readout": "final-state snapshot (burn_in = t)",
               "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "runs": []}
    add = results["runs"].append

    def save() -> None:  # after every run, so a partial set survives an interrupted session
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))

    add(run("sgd", lambda m: _SGDAdapter(m, args.lr), args.steps))
    for beta in (0.5, 0.9):
        add(run(f"sgd momentum={beta}", lambda m, b=beta: _SGDAdapter(m, args.lr, b), args.steps))
    save()
    for t in (0.5, 5.0, 50.0):
        add(run(f"tngd t={t} x0=g", tngd(t, "grad"), args.steps))
        save()
    for t in (0.5, 5.0, 50.0):
        add(run(f"tngd t={t} warm", tngd(t, "warm"), args.steps))
        save()
    for t, delays in ((0.5, (0.5, 2.0)), (5.0, (0.2, 1.0))):
        for td in delays:
            add(run(f"tngd t={t} warm t_d={td}", tngd(t, "warm", td), args.steps))
            save()
    # Controls for the delay rows at t = 0.5: the same analog time per step (t + t_d) without a
    # delay, so that "more relaxation per step" and "relaxation towards the stale target" separate.
    for t in (1.0, 2.5):
        add(run(f"tngd t={t} warm", tngd(t, "warm"), args.steps))
        save()
    add(run("exact ngd", lambda m: NGDOptimizer(m.parameters(), lr=args.lr, damping=lam), args.steps))
    save()


class _SGDAdapter(NGDOptimizer):
    """torch.optim.SGD through the same interface (so the same direction metrics apply): x = g."""

    def __init__(self, model: torch.nn.Module, lr: float, momentum: float = 0.0) -> None:
        super().__init__(model.parameters(), lr=lr, damping=1.0, momentum=momentum)

    def _direction(self, grad: np.ndarray, curvature) -> np.ndarray:
        return grad


if __name__ == "__main__":
    main()
