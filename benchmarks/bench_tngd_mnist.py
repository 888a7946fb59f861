"""The TNGD paper's MNIST setting on the emulator: small CNN, 10k training images, batch 64.

10 epochs = 1570 steps (the paper's run); ``--steps`` runs fewer and extrapolates the time. Each
step builds J (640 x N) and H (640 x 640) with torch.func and programs them as a Factored drift:
no N x N matrix is formed on either side. Reports wall time per step (host vs emulator), the
emulated analog time, peak resident memory, training loss and held-out test accuracy, next to
Adam (lr 1e-3, the paper's) on the same batches.

    python benchmarks/bench_tngd_mnist.py [--steps 1570] [--optimizers tngd,adam]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from host.tasks import TASKS, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=TASKS["mnist"].steps)
    ap.add_argument("--optimizers", default="tngd,adam")
    ap.add_argument("--out", default="benchmarks/results/tngd_mnist.json")
    args = ap.parse_args()
    full = TASKS["mnist"].steps
    out = {"steps": args.steps, "full_run_steps": full, "runs": []}
    for name in args.optimizers.split(","):
        hp = {"lr": 1e-3} if name == "adam" else {}
        rec = train("mnist", name, steps=args.steps, eval_every=max(1, args.steps // 5), progress=True, **hp)
        s = rec.summary()
        row = {**s, "n_params": rec.n_params, "peak_rss_mb": rec.peak_rss_mb,
               "wall_s": rec.wall_s[-1], "projected_full_run_s": rec.wall_s[-1] * full / args.steps,
               "eval_steps": rec.eval_steps, "test_accuracy_curve": rec.test_accuracy}
        out["runs"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
