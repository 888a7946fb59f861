"""thermo-host: the host side's command line.

``thermo-host solve`` solves a random SPD system on a device and compares the thermodynamic
answer with a direct solve (the demo main job until the training host lands).
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
