"""Running, tabulating and plotting training runs: what ``thermo-host train`` / ``compare`` do.

``compare`` trains every requested optimizer on the same task, seed and batch order, then writes
``results.json`` (every per-step number), ``table.md`` (a markdown summary) and ``curves.png``
(training loss per step, test accuracy per step, and loss against wall-clock with TNGD's time
split: host time and emulated analog time, the emulator's own compute excluded).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .tasks import DEVICE_OPTIMIZERS, OPTIMIZERS, TASKS, RunRecord, projected_step_s, train, write_json

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


def _train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
            "eval_every": args.eval_every, "progress": not args.no_progress}


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
    task = TASKS[args.task]
    out = Path(args.out or f"{args.task}-{args.optimizer}.json")
    ckpt = None if (args.checkpoint or "").lower() == "none" else Path(args.checkpoint or out.with_suffix(".pt"))
    rec = train(task, args.optimizer, device=args.device, device_overrides=overrides, checkpoint=ckpt,
                **_train_kwargs(args), **_hp_for(args.optimizer, hparams))
    write_json(out, rec.to_json())
    print(json.dumps({**rec.summary(), "results": str(out), "checkpoint": str(ckpt) if ckpt else None}, indent=1))
    return 0


def markdown_table(records: list[RunRecord], batch: int, n_out: int) -> str:
    head = ("| run | lr | steps | final train loss (last 10%) | full train loss | test acc (final) | "
            "test acc (best) | wall ms/step | host ms/step | emulator ms/step | analog us/step | "
            "projected ms/step (paper HW) |")
    rows = [head, "|" + "---|" * 12]
    for r in records:
        s = r.summary()
        proj = f"{1e3 * projected_step_s(r, batch, n_out)['total_s']:.2f}" if r.optimizer in DEVICE_OPTIMIZERS else "-"
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
    """Three panels; returns False (and writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    w = max(1, len(records[0].loss) // 30)
    for r in records:
        ls = "-" if r.optimizer in DEVICE_OPTIMIZERS else "--"
        ax[0].plot(r.steps, _smooth(r.loss, w), ls, label=r.label)
        ax[1].plot(r.eval_steps, r.test_accuracy, ls + "o", ms=3, label=r.label)
        # device runs: host time plus the analog time a real device would take (emulator excluded)
        wall = np.asarray(r.wall_s) - np.asarray(r.emulator_s) + np.asarray(r.analog_s)
        ax[2].plot(wall, _smooth(r.loss, w), ls, label=r.label)
    ax[0].set(xlabel="step", ylabel=f"training loss (mini-batch, {w}-step mean)", yscale="log", title=title)
    ax[1].set(xlabel="step", ylabel="test accuracy (held-out split)", ylim=(0.5, 1.0))
    ax[2].set(xlabel="wall-clock s (TNGD: host + analog time)", ylabel="training loss", xscale="log",
              yscale="log")
    for a in ax:
        a.grid(alpha=0.3)
    ax[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_compare(args: argparse.Namespace, overrides: dict | None, hparams: dict) -> int:
    task = TASKS[args.task]
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
    table = markdown_table(records, batch, 10)
    (out_dir / "table.md").write_text(table)
    projections = {r.label: projected_step_s(r, batch, 10) for r in records if r.optimizer in DEVICE_OPTIMIZERS}
    write_json(out_dir / "results.json", {"task": task.name, "seed": args.seed, "skipped": skipped,
                                          "total_wall_s": time.perf_counter() - t0,
                                          "projected_step_s_paper_hw": projections,
                                          "runs": [r.to_json() for r in records]})
    plotted = plot(records, out_dir / "curves.png", f"{task.name}: seed {args.seed}")
    print(table)
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'table.md'}"
          + (f", {out_dir / 'curves.png'}" if plotted else " (no plot: matplotlib is not installed)"))
    return 0
