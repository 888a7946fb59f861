"""thermo-host: the host side's command line.

``thermo-host train`` trains a task's model with one optimizer (TNGD on a device, or a digital
baseline) and writes JSON results and a checkpoint; ``thermo-host compare`` runs several
optimizers on the same task, seed and batches and writes a table (JSON and markdown) and a
loss/accuracy plot; ``thermo-host solve`` solves a random SPD system on a device and compares the
thermodynamic answer with a direct solve.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from protocol.errors import DeviceError

from .connect import connect
from .linalg import solve


def _spd(n: int, cond: float, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.logspace(0.0, np.log10(cond), n)) @ q.T


def cmd_solve(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.seed)
    a = _spd(args.n, args.cond, rng)
    b = rng.standard_normal(args.n)
    overrides = {"noise.kappa": args.kappa} if args.kappa is not None else None
    dev = connect(args.device, seed=args.seed, overrides=overrides) if args.device.startswith("embedded") \
        else connect(args.device, seed=args.seed)
    t0 = time.perf_counter()
    res = solve(a, b, duration=args.duration, burn_in=args.burn_in, batches=args.batches, device=dev)
    wall = time.perf_counter() - t0
    x_direct = np.linalg.solve(a, b)
    err = float(np.linalg.norm(res.value - x_direct) / np.linalg.norm(x_direct))
    report = {
        "n": args.n, "condition": args.cond, "device": args.device, "kappa": dev.info()["kappa"],
        "duration_tau": args.duration, "relative_error_vs_direct": err,
        "estimated_relative_error": res.rel_error_estimate, "analog_time_s": res.analog_time_s,
        "wall_s": wall,
    }
    print(json.dumps(report, indent=2))
    dev.close()
    return 0


def _overrides(args: argparse.Namespace) -> dict | None:
    over = json.loads(args.overrides) if args.overrides else {}
    if args.kappa is not None:
        over["noise.kappa"] = args.kappa
    return over or None


def _hparams(args: argparse.Namespace) -> dict:
    keys = ("lr", "analog_time", "damping", "delay", "burn_in", "init", "momentum")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def cmd_train(args: argparse.Namespace) -> int:
    from .tasks_report import run_train

    return run_train(args, _overrides(args), _hparams(args))


def cmd_compare(args: argparse.Namespace) -> int:
    from .tasks_report import run_compare

    return run_compare(args, _overrides(args), _hparams(args))


def _analog_time(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tau or 'auto', got {text!r}") from None


def _training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="digits", help="digits (MLP, quick) or mnist (small CNN, 10k images)")
    p.add_argument("--device", default="embedded:ideal", help="embedded[:profile], tcp://..., ipc://...")
    p.add_argument("--kappa", type=float, default=None, help="noise.kappa override (embedded devices)")
    p.add_argument("--overrides", default=None, help='profile overrides as JSON, e.g. \'{"noise.kappa": 1e-3}\'')
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the task's)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the task's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="default: host.tasks.DEFAULTS")
    p.add_argument("--analog-time", type=_analog_time, default=None,
                   help="TNGD: t in tau, or 'auto' (the default): 50 tau when the device's declared noise "
                        "allows, else a readout planned for a 10%% relative error of x_bar")
    p.add_argument("--damping", type=float, default=None, help="lambda")
    p.add_argument("--delay", type=float, default=None, help="TNGD: t_d in tau")
    p.add_argument("--burn-in", type=float, default=None, help="TNGD: readout window start in tau")
    p.add_argument("--init", choices=("warm", "grad", "reset"), default=None, help="TNGD: solve start")
    p.add_argument("--momentum", type=float, default=None, help="SGD / TNGD momentum")
    p.add_argument("--eval-every", type=int, default=None, help="test-set evaluation interval")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("tiles and device pools (docs/tiling.md)")
    g.add_argument("--tiles", choices=("layer", "param", "chunk"), default=None,
                   help="TNGD: split the model into tiles that fit the device (by layer, then chunks)")
    g.add_argument("--pool-devices", type=int, default=None, metavar="K",
                   help="devices in the pool (default 1: every tile time-multiplexed on one device)")
    g.add_argument("--pool-backend", choices=("local", "ray"), default=None,
                   help="local threads (default) or Ray actors (needs the cluster extra)")
    g.add_argument("--tile-cells", type=int, default=None, help="tile size limit (default: the device's cells)")
    g.add_argument("--sweeps", type=int, default=None, help="refinement sweeps toward the full direction")
    g.add_argument("--sweep-method", choices=("jacobi", "gauss-seidel"), default="gauss-seidel",
                   help="gauss-seidel (default: always converges) or jacobi (parallel; may diverge "
                        "beyond two tiles, see --relax)")
    g.add_argument("--relax", type=float, default=1.0, help="under-relaxation of Jacobi sweeps, in (0, 1]")
    g.add_argument("--pool-timeout", type=float, default=600.0, help="seconds one pool call may take")
    g.add_argument("--ray-address", default=None, help="Ray cluster address (default: a local Ray)")
    g.add_argument("--ray-resources", default=None, help='Ray resources per actor as JSON, e.g. \'{"spu": 1}\'')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thermo-host", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("solve", help="thermodynamic linear solve of a random SPD system")
    s.add_argument("--device", default="embedded:ideal", help="embedded[:profile], tcp://..., ipc://...")
    s.add_argument("--n", type=int, default=64, help="dimension")
    s.add_argument("--cond", type=float, default=50.0, help="condition number of A")
    s.add_argument("--kappa", type=float, default=0.01, help="noise strength (embedded devices)")
    s.add_argument("--duration", type=float, default=500.0, help="averaging time in tau")
    s.add_argument("--burn-in", type=float, default=20.0, help="burn-in in tau")
    s.add_argument("--batches", type=int, default=10, help="batches for the error estimate")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_solve)

    t = sub.add_parser("train", help="train a task with one optimizer; JSON results and a checkpoint")
    t.add_argument("--optimizer", default="tngd",
                   help="tngd, tngd-adam, ngd, ngd-cg, adam, sgd, kfac, shampoo, soap")
    _training_args(t)
    t.add_argument("--out", default=None, help="results JSON (default: <task>-<optimizer>.json)")
    t.add_argument("--checkpoint", default=None, help="checkpoint (default: <out stem>.pt; 'none' to skip)")
    t.add_argument("--checkpoint-every", type=int, default=None, metavar="K",
                   help="also write the checkpoint every K steps (a run killed in between resumes from it)")
    t.add_argument("--resume", default=None, metavar="PATH",
                   help="continue from a checkpoint of the same task and optimizer; ends exactly where "
                        "the uninterrupted run would")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compare", help="several optimizers on one task: table and plot")
    c.add_argument("--optimizers", default="tngd,tngd-noisy,tngd-adam,ngd,ngd-cg,adam,sgd,kfac,shampoo,soap",
                   help="comma-separated; tngd-noisy is TNGD on the device with noise.kappa = --noisy-kappa")
    c.add_argument("--noisy-kappa", type=float, default=1e-3, help="kappa of the tngd-noisy run")
    _training_args(c)
    c.add_argument("--out-dir", default=None, help="default: results/compare-<task>")
    c.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DeviceError as exc:
        print(f"thermo-host: error [{exc.code.value}]: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
