"""Tiles and device pools (issue 14): refinement, bit-identity of pools, parallel vs multiplexed,
and digits on the 16-cell register board simulator through its daemon.

    python3 benchmarks/bench_tiles.py refine  [--steps 300]          -> results/tiles_refine.json
    python3 benchmarks/bench_tiles.py bits    [--steps 20] [--ray]   -> results/tiles_bits.json
    python3 benchmarks/bench_tiles.py mnist   [--steps 300]          -> results/tiles_mnist.json
    python3 benchmarks/bench_tiles.py board   [--steps 300]          -> results/tiles_board.json

refine: digits; the relative error of the tiled direction to the full damped NGD direction
(G + lambda I)^-1 g at three points of a training run, for 0, 1, 2, 4 sweeps, with exact block
solves (the t -> infinity device) and on the ideal emulator; then the training loss with each.
bits: the same tiled digits run on K embedded devices, on one device multiplexing every tile and
(--ray) on K Ray actors: the per-step losses compared bit for bit.
mnist: the CNN with per-layer tiles on 2 parallel devices and multiplexed on 1, and full-matrix
TNGD (cells given explicitly), interleaved step by step on the same batches: accuracy and step time.
board: digits, tiled to 16 cells, time-multiplexed on the register board simulator (dense-only)
behind a daemon, against full-matrix ideal TNGD over the same steps.
BLAS and torch run one thread everywhere (the machine has 2 shared cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from host import datasets  # noqa: E402
from host.baselines import damped  # noqa: E402
from host.curvature import torch_curvature  # noqa: E402
from host.pool import DeviceSpec, PoolConfig, open_pool  # noqa: E402
from host.tasks import DEFAULTS, TASKS, evaluate, make_stepper, train  # noqa: E402
from host.tiling import exact_tiles, plan_for_model, solve_tiles  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "loadavg": os.getloadavg()}


def write(name: str, obj: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(obj, indent=1, default=float))
    print(f"wrote {RESULTS / name}", file=sys.stderr)


# -- refine ----------------------------------------------------------------------------------------------

def refine(args: argparse.Namespace) -> None:
    task = TASKS["digits"]
    ds = datasets.load("digits")
    lam = DEFAULTS["tngd"]["damping"]
    sweeps_list = [0, 1, 2, 4]
    cells = args.cells
    # theta at steps 0, 100, 300 of the full-matrix run (the directions are measured there)
    snaps: dict[int, dict[str, torch.Tensor]] = {}

    torch.manual_seed(0)
    model = task.model()
    plan = plan_for_model(model, cells, "layer")
    print(f"plan: {plan.describe()}", file=sys.stderr)
    stepper = make_stepper("tngd", model, batch_size=task.batch_size, seed=0)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ds.x_train))
    x_tr, y_tr = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    points = [0, 100, 300]
    pos = 0
    for k in range(max(points) + 1):
        if k in points:
            snaps[k] = {n: p.detach().clone() for n, p in model.named_parameters()}
        if k == max(points):
            break
        if pos + task.batch_size > len(order):
            order, pos = rng.permutation(len(x_tr)), 0
        idx = torch.from_numpy(order[pos:pos + task.batch_size])
        pos += task.batch_size
        stepper.step(model, x_tr[idx], y_tr[idx])
    xb, yb = x_tr[:task.batch_size], y_tr[:task.batch_size]  # a fixed batch to measure on
    rows = []
    spec = DeviceSpec("embedded:ideal")
    for k in points:
        model.load_state_dict(snaps[k])
        curv = torch_curvature(model, xb, yb, "cross_entropy", "ggn")
        drift = damped(curv.drift(0.0), lam)
        g = curv.grad
        full = np.linalg.solve(drift.dense(), g)
        for method in ("jacobi", "gauss-seidel"):
            for sweeps in sweeps_list:
                x, rep = solve_tiles(drift, g, plan, exact_tiles(drift, plan), sweeps=sweeps, method=method)
                err_exact = float(np.linalg.norm(x - full) / np.linalg.norm(full))
                # the device: a long solve from the gradient, so that each block solve is near exact
                with open_pool(plan, spec, PoolConfig(devices=len(plan), sweeps=sweeps, method=method), seed=0) as dev:
                    dev.state = g
                    res = dev.step(drift, g, args.analog_time, burn_in=args.analog_time / 2)
                err_dev = float(np.linalg.norm(res.mean - full) / np.linalg.norm(full))
                # the A-norm weighs each direction by its curvature (the residual's norm is A^2)
                e = x - full
                err_a = float(np.sqrt(e @ drift.matvec(e) / (full @ drift.matvec(full))))
                rows.append({"theta_step": k, "method": method, "sweeps": sweeps, "rel_err_exact_blocks": err_exact, "rel_err_A_norm_exact_blocks": err_a,
                             "residuals_exact_blocks": rep.residuals, "rel_err_device": err_dev,
                             "residuals_device": res.diagnostics["residuals"]})
                print(f"theta@{k:3d} {method:12s} sweeps {sweeps}: rel err {err_exact:.4f} (exact blocks) "
                      f"{err_dev:.4f} (device), residual {rep.residuals[-1]:.4f}", file=sys.stderr, flush=True)
    training = []
    for method in ("jacobi", "gauss-seidel"):
        for sweeps in sweeps_list:
            if method == "gauss-seidel" and sweeps == 0:
                continue  # the same as Jacobi's 0 sweeps
            t0 = time.perf_counter()
            try:
                rec = train("digits", "tngd", steps=args.steps, seed=0,
                            pool=PoolConfig(tiles="layer", devices=len(plan), cells=cells, sweeps=sweeps,
                                            method=method))
            except FloatingPointError as exc:  # Jacobi with more than two tiles can diverge
                training.append({"method": method, "sweeps": sweeps, "diverged": str(exc)})
                print(f"train {method} sweeps {sweeps}: {exc}", file=sys.stderr, flush=True)
                continue
            s = rec.summary()
            res = np.array([r[-1] for r in rec.tiles["residuals"]])
            training.append({"method": method, "sweeps": sweeps, **s, "median_final_residual": float(np.median(res)),
                             "wall_s": time.perf_counter() - t0})
            print(f"train {method} sweeps {sweeps}: loss {s['final_loss_avg10pct']:.4f} test acc "
                  f"{s['test_accuracy']:.4f} residual {np.median(res):.4f}", file=sys.stderr, flush=True)
    rec = train("digits", "tngd", steps=args.steps, seed=0)
    s = rec.summary()
    training.append({"method": "full-matrix", "sweeps": None, **s})
    print(f"train full: loss {s['final_loss_avg10pct']:.4f} test acc {s['test_accuracy']:.4f}", file=sys.stderr)
    write(args.out or "tiles_refine.json", {
        "benchmark": "tiles_refine", "machine": machine(), "plan": plan.describe(), "damping": lam,
        "device": "embedded:ideal, one device per tile, init from g, analog_time "
                  f"{args.analog_time} tau, readout window [{args.analog_time / 2}, {args.analog_time}]",
        "directions": rows, "training": training, "steps": args.steps})


# -- bits ------------------------------------------------------------------------------------------------

def bits(args: argparse.Namespace) -> None:
    over = {"noise.kappa": args.kappa}
    runs: dict[str, Any] = {}
    configs = [(f"local x{args.devices}", PoolConfig(devices=args.devices, cells=args.cells)),
               ("local x1 (multiplexed)", PoolConfig(devices=1, cells=args.cells))]
    if args.ray:
        configs.append((f"ray x{args.devices}", PoolConfig(devices=args.devices, cells=args.cells, backend="ray",
                                                           ray_cpus=2.0 / args.devices, timeout=120.0)))
    for label, pool in configs:
        if pool.backend == "ray":
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        t0 = time.perf_counter()
        rec = train("digits", "tngd", steps=args.steps, seed=0, device_overrides=over, pool=pool, eval_every=10**9)
        runs[label] = {"loss": rec.loss, "wall_s": time.perf_counter() - t0, "tiles": rec.tiles["info"]["tiles"],
                       "wall_ms_per_step": rec.summary()["wall_ms_per_step"]}
        if pool.backend == "ray":
            import ray

            ray.shutdown()
        print(f"{label}: {rec.loss[-1]!r}", file=sys.stderr, flush=True)
    ref = runs[configs[0][0]]["loss"]
    same = {k: bool(np.array_equal(v["loss"], ref)) for k, v in runs.items()}
    print(json.dumps(same), file=sys.stderr)
    write(args.out or "tiles_bits.json", {"benchmark": "tiles_bits", "machine": machine(), "kappa": args.kappa,
                                          "steps": args.steps, "bit_identical_to_first": same, "runs": runs})


# -- mnist -----------------------------------------------------------------------------------------------

def _matmul(_: int = 0) -> tuple[float, float]:
    with threadpool_limits(1, user_api="blas"):
        a = np.random.default_rng(0).random((1200, 1200))
        t0 = time.time()
        for _ in range(4):
            a @ a
        return t0, time.time()


def parallelism_probe() -> float:
    """How much two-way parallelism the machine offers right now: the speed-up of two processes
    doing single-threaded matmuls over doing them one after the other (2.0 on two idle cores)."""
    import multiprocessing as mp

    a, b = _matmul(), _matmul()
    serial = (a[1] - a[0]) + (b[1] - b[0])
    with mp.get_context("spawn").Pool(2) as p:
        p.map(abs, [0, 1])  # the workers are up before the timed work (spawn imports this module)
        spans = p.map(_matmul, [0, 1])
    # the work's own span: process start-up is not what is measured
    return serial / (max(e for _, e in spans) - min(s for s, _ in spans))


def mnist(args: argparse.Namespace) -> None:
    task = TASKS["mnist"]
    ds = datasets.load("mnist")
    hp = {"lr": 0.01, "analog_time": 50.0, "damping": 0.01}  # bench_tngd_mnist's paper settings
    configs = {"full (cells 4510)": {"device_overrides": {"device.cells": 4510}},
               "tiles, 2 parallel devices": {"pool": PoolConfig(tiles="layer", devices=2)},
               "tiles, 1 device multiplexed": {"pool": PoolConfig(tiles="layer", devices=1)}}
    probe_before = parallelism_probe()
    print(f"machine parallelism now: {probe_before:.2f}x", file=sys.stderr, flush=True)
    models, steppers = {}, {}
    for label, kw in configs.items():
        torch.manual_seed(0)
        models[label] = task.model()
        steppers[label] = make_stepper("tngd", models[label], batch_size=task.batch_size, seed=0, **kw, **hp)
    x_tr, y_tr = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    x_te, y_te = torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x_tr))
    pos = 0
    times: dict[str, list[float]] = {k: [] for k in configs}
    losses: dict[str, list[float]] = {k: [] for k in configs}
    for k in range(args.steps):
        if pos + task.batch_size > len(order):
            order, pos = rng.permutation(len(x_tr)), 0
        idx = torch.from_numpy(order[pos:pos + task.batch_size])
        pos += task.batch_size
        labels = list(configs) if k % 2 == 0 else list(configs)[::-1]  # alternate who goes first
        for label in labels:
            t0 = time.perf_counter()
            losses[label].append(steppers[label].step(models[label], x_tr[idx], y_tr[idx]))
            times[label].append(time.perf_counter() - t0)
        if (k + 1) % 50 == 0:
            print(f"step {k + 1}: " + ", ".join(f"{lb}: {np.median(times[lb][5:]) * 1e3:.0f} ms"
                                                for lb in configs), file=sys.stderr, flush=True)
    out = {}
    for label in configs:
        acc, tl = evaluate(models[label], x_te, y_te)
        t = np.array(times[label][5:])
        out[label] = {"test_accuracy": acc, "test_loss": tl, "final_loss_avg10pct": float(np.mean(losses[label][-30:])),
                      "step_ms_median": float(np.median(t) * 1e3), "step_ms_mean": float(t.mean() * 1e3)}
        dev = steppers[label].opt.engine.device
        if hasattr(dev, "info") and "tiles" in dev.info():
            out[label]["tiles"] = dev.info()["tiles"]
            dev.close()
    par, mux = out["tiles, 2 parallel devices"], out["tiles, 1 device multiplexed"]
    summary = {"machine_parallelism_probe_before_after": [probe_before, parallelism_probe()],"speedup_parallel_vs_multiplexed_median": mux["step_ms_median"] / par["step_ms_median"],
               "parallel_equals_multiplexed_losses": losses["tiles, 2 parallel devices"]
               == losses["tiles, 1 device multiplexed"],
               "accuracy_gap_tiled_vs_full_points": 100 * (out["full (cells 4510)"]["test_accuracy"]
                                                           - par["test_accuracy"])}
    print(json.dumps({**out, **summary}, indent=1, default=float), file=sys.stderr)
    write(args.out or "tiles_mnist.json", {"benchmark": "tiles_mnist", "machine": machine(), "steps": args.steps,
                                           "hparams": hp, "method": "interleaved per step, same batches; "
                                           "median step time over steps 5..", "runs": out, "summary": summary})


# -- board -----------------------------------------------------------------------------------------------

def board(args: argparse.Namespace) -> None:
    import tempfile

    from tests.test_wire_daemon import DaemonProcess
    from thermo_device.hardware.board_sim import BoardProcess

    logs = Path(tempfile.mkdtemp(prefix="bench_tiles_board_"))  # the daemon logs every re-staged state
    log = open(logs / "board.log", "ab")
    brd = BoardProcess("--kappa", str(args.board_kappa), log=log, cwd=str(ROOT))
    daemon = DaemonProcess(logs / "daemon.log", "--backend", "register", "--backend-option",
                           f"address={brd.address}", "--backend-option", "timeout=10")
    try:
        t0 = time.perf_counter()
        rec = train("digits", "tngd", steps=args.steps, seed=0, device=daemon.endpoint,
                    pool=PoolConfig(tiles="layer", devices=1, timeout=120.0))
        wall = time.perf_counter() - t0
    finally:
        daemon.stop()
        brd.stop()
        log.close()
    s = rec.summary()
    full = train("digits", "tngd", steps=args.steps, seed=0).summary()
    share = rec.emulator_s[-1] / rec.wall_s[-1]
    out = {"benchmark": "tiles_board", "machine": machine(), "steps": args.steps, "board_kappa": args.board_kappa,
           "tiles": rec.tiles["info"]["tiles"], "devices": rec.tiles["info"]["devices"],
           "board_tiled": {**s, "steps_per_s": args.steps / rec.wall_s[-1], "device_share_of_step": share,
                           "process_wall_s": wall},
           "ideal_full_matrix": full,
           "accuracy_gap_points": 100 * (full["test_accuracy"] - s["test_accuracy"])}
    print(json.dumps(out, indent=1, default=float), file=sys.stderr)
    write(args.out or "tiles_board.json", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("refine", "bits", "mnist", "board"))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cells", type=int, default=1024, help="refine/bits: tile size limit (digits: 4 tiles)")
    ap.add_argument("--analog-time", type=float, default=2000.0, help="refine: device solve length, tau")
    ap.add_argument("--devices", type=int, default=4, help="bits: pool size")
    ap.add_argument("--kappa", type=float, default=1e-4, help="bits: noise.kappa (noise that matters)")
    ap.add_argument("--ray", action="store_true", help="bits: also on Ray actors (cluster extra)")
    ap.add_argument("--board-kappa", type=float, default=1e-7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.steps is None:
        args.steps = {"refine": 300, "bits": 20, "mnist": 300, "board": 300}[args.what]
    torch.set_num_threads(1)
    with threadpool_limits(1, user_api="blas"):
        {"refine": refine, "bits": bits, "mnist": mnist, "board": board}[args.what](args)


if __name__ == "__main__":
    main()
