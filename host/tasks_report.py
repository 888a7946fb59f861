"""Running, tabulating and plotting training runs: what ``thermo-host train`` / ``compare`` do.

``compare`` trains every requested optimizer on the same task, seed and batch order, then writes
``results.json`` (every per-step number), ``table.md`` (a markdown summary) and ``curves.png``
(training loss per step, test accuracy per step, loss against wall-clock with TNGD's clock as host
time plus emulated analog time, and each run's per-step time split into host, analog and emulator
compute).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .pool import PoolConfig
from .tasks import (
    DEVICE_OPTIMIZERS,
    OPTIMIZERS,
    RunRecord,
    profile_projected_step_s,
    task_named,
    train,
    write_json,
)

# Optional libraries behind some baselines: left out of a comparison (and said so) when missing.
_NEEDS = {"kfac": "asdl", "shampoo": "pytorch_optimizer", "soap": "pytorch_optimizer"}


def available(name: str) -> bool:
    mod = _NEEDS.get(name)
    return mod is None or importlib.util.find_spec(mod) is not None


def _run_specs(names: list[str], device: str, overrides: dict | None, noisy_kappa: float) -> list[dict]:
    specs = []
    for name in names:
        if name == "tngd-noisy":
            specs.append({"label": "tngd-noisy", "optimizer": "tngd", "device": device,
                          "device_overrides": {**(overrides or {}), "noise.kappa": noisy_kappa}})
        elif name in OPTIMIZERS:
            specs.append({"label": name, "optimizer": name, "device": device, "device_overrides": overrides})
        else:
            raise SystemExit(f"thermo-host: unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)}, tngd-noisy)")
    return specs


def pool_config(args: argparse.Namespace) -> PoolConfig | None:
    """The tile pool the command line asks for (``--tiles`` and the ``--pool-*`` options), or None."""
    pool_flags = (args.pool_devices, args.pool_backend, args.sweeps, args.tile_cells)
    if args.tiles is None:
        if any(v is not None for v in pool_flags):
            raise SystemExit("thermo-host: --pool-devices, --pool-backend, --sweeps and --tile-cells need --tiles "
                             "(e.g. --tiles layer)")
        return None
    resources = json.loads(args.ray_resources) if args.ray_resources else None
    return PoolConfig(tiles=args.tiles, devices=args.pool_devices or 1, backend=args.pool_backend or "local",
                      cells=args.tile_cells, sweeps=args.sweeps or 0, method=args.sweep_method,
                      relax=args.relax, timeout=args.pool_timeout, resources=resources,
                      ray_address=args.ray_address)


def _train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
            "eval_every": args.eval_every, "progress": not args.no_progress, "pool": pool_config(args)}


def _hp_for(optimizer: str, hparams: dict) -> dict:
    """Command-line hyperparameters apply where they mean something (lr to all when given)."""
    device_only = ("analog_time", "delay", "burn_in", "init")
    if optimizer in DEVICE_OPTIMIZERS:
        return hparams
    out = {k: v for k, v in hparams.items() if k not in device_only}
    if optimizer in ("adam", "shampoo", "soap"):
        out.pop("damping", None)
        out.pop("momentum", None)
    if optimizer in ("ngd", "ngd-cg", "kfac"):
        out.pop("momentum", None)
    return out


def run_train(args: argparse.Namespace, overrides: dict | None, hparams: dict) -> int:
    task = task_named(args.task)
    out = Path(args.out or f"{args.task}-{args.optimizer}.json")
    ckpt = None if (args.checkpoint or "").lower() == "none" else Path(args.checkpoint or out.with_suffix(".pt"))
    rec = train(task, args.optimizer, device=args.device, device_overrides=overrides, checkpoint=ckpt,
                checkpoint_every=args.checkpoint_every, resume=args.resume,
                **_train_kwargs(args), **_hp_for(args.optimizer, hparams))
    write_json(out, rec.to_json())
    print(json.dumps({**rec.summary(), "results": str(out), "checkpoint": str(ckpt) if ckpt else None}, indent=1))
    return 0


def markdown_table(records: list[RunRecord], projections: dict[str, dict[str, Any]]) -> str:
    """The summary table; ``projections`` by run label (device runs) from ``profile_projected_step_s``."""
    head = ("| run | lr | steps | final train loss (last 10%) | full train loss | test acc (final) | "
            "test acc (best) | wall ms/step | host ms/step | emulator ms/step | analog us/step | "
            "projected ms/step (tngd-paper HW) |")
    rows = [head, "|" + "---|" * 12]
    for r in records:
        s = r.summary()
        proj = f"{1e3 * projections[r.label]['total_s']:.2f}" if r.label in projections else "-"
        rows.append(f"| {r.label} | {r.hparams.get('lr')} | {s['steps']} | {s['final_loss_avg10pct']:.4f} | "
                    f"{s['train_loss_full']:.4f} | {s['test_accuracy']:.4f} | {s['best_test_accuracy']:.4f} | "
                    f"{s['wall_ms_per_step']:.1f} | {s['host_ms_per_step']:.1f} | {s['emulator_ms_per_step']:.1f} | "
                    f"{s['analog_us_per_step']:.1f} | {proj} |")
    return "\n".join(rows) + "\n"


def _smooth(y: list[float], w: int) -> np.ndarray:
    a = np.asarray(y, dtype=float)
    if len(a) < w or w <= 1:
        return a
    c = np.cumsum(np.insert(a, 0, 0.0))
    head = c[1:w] / np.arange(1, w)
    return np.concatenate([head, (c[w:] - c[:-w]) / w])


def plot(records: list[RunRecord], path: Path, title: str) -> bool:
    """Four panels; returns False (and writes nothing) when matplotlib is not installed.

    Loss per step; test accuracy per step; loss against wall-clock, where a device run's clock is
    host time plus emulated analog time (what a real device would take; solid) and, dotted, the
    measured wall-clock with the emulator's own compute; and per-step time split into host,
    analog and emulator compute (log scale: the analog part is microseconds).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(1, 4, figsize=(21, 4.8))
    w = max(1, len(records[0].loss) // 30)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(records):
        c = colors[i % len(colors)]
        ls = "-" if r.optimizer in DEVICE_OPTIMIZERS else "--"
        ax[0].plot(r.steps, _smooth(r.loss, w), ls, color=c, label=r.label)
        ax[1].plot(r.eval_steps, r.test_accuracy, ls + "o", ms=3, color=c, label=r.label)
        host = np.asarray(r.wall_s) - np.asarray(r.emulator_s)
        ax[2].plot(host + np.asarray(r.analog_s), _smooth(r.loss, w), ls, color=c, label=r.label)
        if r.optimizer in DEVICE_OPTIMIZERS:
            ax[2].plot(r.wall_s, _smooth(r.loss, w), ":", lw=1, color=c)
    ax[0].set(xlabel="step", ylabel=f"training loss (mini-batch, {w}-step mean)", yscale="log", title=title)
    ax[1].set(xlabel="step", ylabel="test accuracy (held-out split)", ylim=(0.5, 1.0))
    ax[2].set(xlabel="wall-clock s (TNGD solid: host + analog; dotted: with emulator compute)",
              ylabel="training loss", xscale="log", yscale="log")
    labels = [r.label for r in records]
    y = np.arange(len(records))
    parts = (("host", lambda s: s["host_ms_per_step"], "tab:blue"),
             ("analog (emulated)", lambda s: 1e-3 * s["analog_us_per_step"], "tab:red"),
             ("emulator compute", lambda s: s["emulator_ms_per_step"], "tab:gray"))
    for k, (name, get, color) in enumerate(parts):
        vals = [get(r.summary()) for r in records]
        ax[3].barh(y + (k - 1) * 0.27, [v if v > 0 else np.nan for v in vals], height=0.27, color=color, label=name)
    ax[3].set(yticks=y, yticklabels=labels, xscale="log", xlabel="ms per step (measured on this machine)")
    ax[3].invert_yaxis()
    ax[3].legend(fontsize=8, loc="lower right")
    for a in ax:
        a.grid(alpha=0.3)
    ax[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_compare(args: argparse.Namespace, overrides: dict | None, hparams: dict) -> int:
    task = task_named(args.task)
    out_dir = Path(args.out_dir or f"results/compare-{args.task}")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    skipped = [n for n in names if not available(n)]
    for n in skipped:
        print(f"thermo-host: skipping {n}: needs the {_NEEDS[n]!r} package", file=sys.stderr)
    specs = _run_specs([n for n in names if n not in skipped], args.device, overrides, args.noisy_kappa)
    records = []
    t0 = time.perf_counter()
    for spec in specs:
        rec = train(task, spec["optimizer"], device=spec["device"], device_overrides=spec["device_overrides"],
                    label=spec["label"], **_train_kwargs(args), **_hp_for(spec["optimizer"], hparams))
        records.append(rec)
        s = rec.summary()
        print(f"{rec.label:>11}: loss {s['final_loss_avg10pct']:.4f}  test acc {s['test_accuracy']:.4f}  "
              f"{s['wall_ms_per_step']:.1f} ms/step", file=sys.stderr, flush=True)
    batch = args.batch_size or task.batch_size
    projections = {r.label: profile_projected_step_s(r, batch, 10) for r in records
                   if r.optimizer in DEVICE_OPTIMIZERS}
    table = markdown_table(records, projections)
    (out_dir / "table.md").write_text(table)
    write_json(out_dir / "results.json", {"task": task.name, "seed": args.seed, "skipped": skipped,
                                          "total_wall_s": time.perf_counter() - t0,
                                          "loadavg": os.getloadavg(), "cpus": os.cpu_count(),
                                          "projected_step_s_tngd_paper": projections,
                                          "runs": [r.to_json() for r in records]})
    plotted = plot(records, out_dir / "curves.png", f"{task.name}: seed {args.seed}")
    print(table)
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'table.md'}"
          + (f", {out_dir / 'curves.png'}" if plotted else " (no plot: matplotlib is not installed)"))
    return 0
