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
from typing import Any

import numpy as np

from protocol.capabilities import PRECISION_COND
from protocol.errors import DeviceError, InvalidInputError, NotStableError

from .connect import connect
from .linalg import inverse, solve


def _spd(n: int, cond: float, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.logspace(0.0, np.log10(cond), n)) @ q.T


def cmd_solve(args: argparse.Namespace) -> int:
    """Solve A x = b on an overdamped device; invert A by sampling on an underdamped one."""
    overrides = {"noise.kappa": args.kappa} if args.kappa is not None else None
    embedded = args.device.startswith("embedded")
    with (connect(args.device, seed=args.seed, overrides=overrides) if embedded
          else connect(args.device, seed=args.seed)) as dev:
        info = dev.info()
        caps = info.get("capabilities") or {}
        underdamped = info.get("dynamics") == "underdamped"
        op = args.op if args.op != "auto" else ("inverse" if underdamped else "solve")
        if op == "solve" and underdamped:
            raise InvalidInputError(f"{args.device} is an underdamped RLC array: inductors short DC, so it cannot "
                                    "hold a bias b and solve A x = b; it inverts A by sampling its voltage "
                                    "covariance: use --op inverse (the default there)")
        # the 8-cell board programs its capacitance matrix with 4-bit couplings: a condition number
        # much above a few rounds it to an indefinite matrix, so its default problem is milder
        cond = args.cond if args.cond is not None else (3.0 if underdamped else 50.0)
        cells = int(caps.get("cells", info.get("cells", 64)) or 64)
        n = args.n if args.n is not None else min(64, cells)
        if n > cells:
            raise InvalidInputError(f"--n {n} is more than the {cells} cells of {args.device}: use --n {cells} or less")
        rng = np.random.default_rng(args.seed)
        a = _spd(n, cond, rng)
        b = rng.standard_normal(n)
        t0 = time.perf_counter()
        try:
            if op == "solve":
                res = solve(a, b, duration=args.duration, burn_in=args.burn_in, batches=args.batches, device=dev)
                exact = np.linalg.solve(a, b)
            else:
                res = inverse(a, duration=args.duration, burn_in=args.burn_in, batches=args.batches, device=dev)
                exact = np.linalg.inv(a)
        except NotStableError as exc:
            raise NotStableError(f"{exc}: the device's programmed matrix at --cond {cond:g} is not stable "
                                 f"(converter rounding); try a smaller --cond, e.g. --cond 3") from None
        wall = time.perf_counter() - t0
    err = float(np.linalg.norm(res.value - exact) / np.linalg.norm(exact))
    precision = float(caps.get("precision", 0.0) or 0.0)
    report = {
        "operation": "A^-1 b (time average)" if op == "solve" else "A^-1 (sampled covariance)",
        "n": n, "condition": cond, "device": args.device, "kappa": info["kappa"],
        "duration_tau": args.duration, "relative_error_vs_direct": err,
        # the batch-means standard error sees only what averaging removes (thermal and read noise)
        "estimated_relative_error_noise_part": res.rel_error_estimate,
        # what it cannot see: the device's declared bound on the systematic error (converter
        # rounding, programming error, mismatch; protocol.capabilities), max-norm relative
        "declared_systematic_relative_error": precision,
        "declared_systematic_valid_up_to_condition": PRECISION_COND,
        "estimated_relative_error_bound": res.rel_error_estimate + precision,
        "analog_time_s": res.analog_time_s, "wall_s": wall,
    }
    print(json.dumps(report, indent=2))
    if cond > PRECISION_COND and precision > 0.0:
        print(f"thermo-host: note: the device declares its systematic error for condition <= {PRECISION_COND:g} "
              f"only; at {cond:g} the error can exceed the estimate", file=sys.stderr)
    return 0


def _overrides(args: argparse.Namespace) -> dict | None:
    over = json.loads(args.overrides) if args.overrides else {}
    if args.kappa is not None:
        over["noise.kappa"] = args.kappa
    return over or None


def _hparams(args: argparse.Namespace) -> dict:
    keys = ("lr", "analog_time", "damping", "delay", "burn_in", "init", "momentum")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _per_run(text: str) -> Any:
    from .tasks_report import parse_per_run

    return parse_per_run(text)


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
    p.add_argument("--task", default="digits",
                   help="digits (MLP, quick), mnist (small CNN, 10k images), wordnet-minilm (MiniLM + LoRA; the "
                        "lm extra), a plug-in task's name (entry-point group thermo_ngd.tasks) or module:callable "
                        "for your own model and data (docs/tasks.md)")
    p.add_argument("--device", default="embedded:ideal", help="embedded[:profile], tcp://..., ipc://...")
    p.add_argument("--kappa", type=float, default=None, help="noise.kappa override (embedded devices)")
    p.add_argument("--overrides", default=None, help='profile overrides as JSON, e.g. \'{"noise.kappa": 1e-3}\'')
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the task's)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the task's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=_per_run, default=None,
                   help="learning rate: one for every run, or per optimizer / run label, e.g. "
                        "'tngd=0.03,adam=0.01' (a bare number among them is the rest's); default: the "
                        "task's, else host.tasks.DEFAULTS")
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
    g.add_argument("--no-failover", action="store_true",
                   help="fail the step when a pool device fails instead of moving its tiles to the others")
    g.add_argument("--ray-address", default=None, help="Ray cluster address (default: a local Ray)")
    g.add_argument("--ray-resources", default=None, help='Ray resources per actor as JSON, e.g. \'{"spu": 1}\'')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thermo-host", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("solve", help="thermodynamic linear solve (or inverse) of a random SPD system",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Solve A x = b for a random SPD A on a device and compare with a direct "
                                   "solve. Prints the actual error, the noise part the device's batch means "
                                   "estimate, and the systematic part the device declares (its precision). "
                                   "An underdamped device (spu-8cell, the 8-cell RLC board) cannot hold a bias: "
                                   "there it inverts A by sampling the voltage covariance.")
    s.add_argument("--device", default="embedded:ideal", help="embedded[:profile], tcp://..., ipc://...")
    s.add_argument("--op", choices=("auto", "solve", "inverse"), default="auto",
                   help="solve A x = b or invert A; auto: solve on overdamped devices, inverse on underdamped")
    s.add_argument("--n", type=int, default=None, help="dimension (None: 64, or the device's cells if fewer)")
    s.add_argument("--cond", type=float, default=None,
                   help="condition number of A (None: 50, or 3 on an underdamped device, whose 4-bit "
                        "couplings cannot realise much more)")
    s.add_argument("--kappa", type=float, default=0.01, help="noise strength (embedded devices)")
    s.add_argument("--duration", type=float, default=500.0, help="averaging time in tau")
    s.add_argument("--burn-in", type=float, default=20.0, help="burn-in in tau")
    s.add_argument("--batches", type=int, default=10, help="batches for the error estimate")
    s.add_argument("--seed", type=int, default=0, help="seed of the problem and of the device's noise")
    s.set_defaults(func=cmd_solve)

    t = sub.add_parser("train", help="train a task with one optimizer; JSON results and a checkpoint")
    t.add_argument("--optimizer", default="tngd",
                   help="tngd, tngd-adam, ngd, ngd-cg, adam, sgd, kfac, shampoo, soap")
    _training_args(t)
    t.add_argument("--out-dir", default="runs",
                   help="directory for the results JSON and the checkpoint (default: runs/, created)")
    t.add_argument("--out", default=None, help="results JSON path (default: <out-dir>/<task>-<optimizer>.json)")
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
    c.add_argument("--sweep", choices=("lr",), default=None,
                   help="lr: first pick each run's learning rate on a short run (lowest final training "
                        "loss over a half-decade grid; recorded in results.json under 'sweep'), then compare; "
                        "a run given its own --lr (e.g. adam=0.01) is not swept")
    c.add_argument("--sweep-steps", type=int, default=None,
                   help="steps of each sweep run (default: min(100, the run's steps))")
    c.add_argument("--sweep-grid", default=None,
                   help="comma-separated lrs for every run (default: per optimizer, host.tasks_report.SWEEP_GRIDS)")
    c.set_defaults(func=cmd_compare)

    m = sub.add_parser("spec-map", help="what precision does TNGD need: one spec axis at a time against the "
                                        "ideal chip; JSON and a heat-map PNG",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train TNGD (default settings) on a task with one device specification moved "
                                   "away from the ideal chip at a time: gradient DAC bits, coupling bits, ADC bits, "
                                   "coupling mismatch and kappa (host/spec_map.py). Writes <out>.json and <out>.png.")
    m.add_argument("--task", default="digits", help="a task name or module:callable")
    m.add_argument("--steps", type=int, default=150, help="TNGD steps per point")
    m.add_argument("--seeds", default="0", help="comma-separated seeds (each point is their mean)")
    m.add_argument("--axes", default=None,
                   help="comma-separated subset of: " + ", ".join(a.key for a in _spec_axes()))
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a TNGD option over its defaults for every run, e.g. offset_cancel=false (repeatable)")
    m.add_argument("--out", default="runs/spec_map", help="output path without extension")
    m.set_defaults(func=cmd_spec_map)
    return parser


def _option_value(text: str) -> object:
    """true/false, a number, or the text itself."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _spec_axes() -> tuple:
    from .spec_map import AXES

    return AXES


def cmd_spec_map(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .spec_map import run_map, write_map

    axes = _spec_axes()
    if args.axes:
        wanted = [k.strip() for k in args.axes.split(",") if k.strip()]
        unknown = sorted(set(wanted) - {a.key for a in axes})
        if unknown:
            raise SystemExit(f"thermo-host: unknown --axes {unknown}: choose from {[a.key for a in axes]}")
        axes = tuple(a for a in axes if a.key in wanted)
    seeds = [int(s) for s in args.seeds.split(",")]
    options = {}
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"thermo-host: --set wants KEY=VALUE, got {item!r}")
        options[key.strip()] = _option_value(text.strip())
    result = run_map(args.task, steps=args.steps, seeds=seeds, axes=axes, progress=print, options=options)
    js, png = write_map(result, Path(args.out))
    print(f"wrote {js}" + (f" and {png}" if png else " (no PNG: matplotlib is not installed)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DeviceError as exc:
        print(f"thermo-host: error [{exc.code.value}]: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output or checkpoint path that cannot be written
        print(f"thermo-host: error: {_one_line(exc)}: check --out-dir / --out / --checkpoint", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # a NaN loss (DivergedError) in train
        print(f"thermo-host: error [diverged]: {_one_line(exc)}: lower --lr or raise --damping", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
