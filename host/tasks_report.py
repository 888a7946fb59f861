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

from .connect import connect
from .pool import PoolConfig
from .tasks import (
    DEVICE_OPTIMIZERS,
    OPTIMIZERS,
    DivergedError,
    Divergence,
    RunRecord,
    Task,
    profile_projected_step_s,
    task_named,
    task_output_size,
    train,
    write_json,
)

# Learning-rate grids of ``--sweep lr`` (half-decade, as benchmarks/bench_tngd_sweep.py, whose
# picks docs/results.md records); the rule is the docs': lowest final training loss.
SWEEP_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
SWEEP_GRIDS: dict[str, tuple[float, ...]] = {
    "tngd": (0.01, 0.03, 0.1, 0.3, 1.0), "ngd": (0.01, 0.03, 0.1, 0.3, 1.0), "ngd-cg": (0.01, 0.03, 0.1, 0.3, 1.0),
    "kfac": (0.01, 0.03, 0.1, 0.3, 1.0), "tngd-adam": (3e-4, 1e-3, 3e-3, 1e-2)}
# Methods that time-step (no exact propagator): seconds per TNGD step instead of milliseconds.
_STEPPING = ("euler_maruyama", "heun", "baoab")

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


def describe_run(label: str, optimizer: str, hparams: dict[str, Any]) -> str:
    """What a run label means, for legends and tables ("tngd-noisy" is not self-explanatory)."""
    over = hparams.get("device_overrides") or {}
    if label == "tngd-noisy":
        return f"tngd-noisy (TNGD, device noise.kappa = {over.get('noise.kappa', '?'):g})"
    return label


def environment() -> dict[str, Any]:
    """Versions and machine facts that explain why a rerun differs from docs/results.md: Python
    and the numerical libraries, this package, the git commit of a source checkout (None in an
    installed wheel), the 1-minute load averages and the CPU count."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("numpy", "scipy", "numba", "torch", "thermo-ngd"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    out["git_commit"] = _git_commit()
    out["loadavg"] = list(os.getloadavg())
    out["cpus"] = os.cpu_count()
    return out


def _git_commit() -> str | None:
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def stepping_warning(device: str, overrides: dict | None) -> str | None:
    """One line when ``device`` is likely to time-step its dynamics (a stepping integrator, or
    ``auto`` with rails, as on the noisy profile, whose mismatch leaves no exact propagator), which
    makes every TNGD step seconds long; None otherwise."""
    embedded = device == "embedded" or device.startswith("embedded:")
    try:
        dev = connect(device, overrides=overrides) if embedded else connect(device)
    except Exception:  # noqa: BLE001 - the run itself reports a device it cannot reach
        return None
    try:
        info = dev.info()
    finally:
        dev.close()
    method = str(info.get("integrator", ""))
    rail = float((info.get("range") or {}).get("rail", 0.0) or 0.0)
    if method in _STEPPING or (method == "auto" and rail > 0.0):
        why = f"integrator {method}" + (f" with rails at {rail:g}" if rail > 0.0 else "")
        return (f"thermo-host: warning: device {device} time-steps its dynamics ({why}): TNGD will take "
                "seconds per step (the ideal and tngd-paper profiles integrate exactly, in milliseconds)")
    return None


class PerRun(dict):
    """A hyperparameter given once for every run ("0.05") or per optimizer / run label
    ("tngd=0.03,adam=0.01"; a bare number among them is the value for the rest)."""

    def for_run(self, label: str, optimizer: str) -> Any:
        for key in (label, optimizer, "*"):
            if key in self:
                return self[key]
        return None


def parse_per_run(text: str) -> PerRun:
    """``--lr`` and friends: "0.1" or "tngd=0.03,adam=0.01[,0.1]"."""
    out = PerRun()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, raw = part.rpartition("=")
        try:
            value = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or name=number, got {part!r}") from None
        out[key.strip() if sep else "*"] = value
    if not out:
        raise argparse.ArgumentTypeError("expected a number or name=number[,name=number...]")
    return out


def _check_names(hparams: dict, runs: list[tuple[str, str]]) -> None:
    """Refuse a per-run hyperparameter for a run that is not in the command (a typo)."""
    names = {n for pair in runs for n in pair} | {"*"}
    for key, value in hparams.items():
        if isinstance(value, PerRun):
            unknown = sorted(set(value) - names)
            if unknown:
                raise SystemExit(f"thermo-host: --{key.replace('_', '-')} names {', '.join(map(repr, unknown))}, "
                                 f"not a run of this command (runs: {', '.join(sorted(names - {'*'}))})")


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
                      ray_address=args.ray_address, failover=not getattr(args, "no_failover", False))


def _train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
            "eval_every": args.eval_every, "progress": not args.no_progress, "pool": pool_config(args)}


def _hp_for(optimizer: str, hparams: dict, label: str | None = None) -> dict:
    """Command-line hyperparameters apply where they mean something (a single lr to all runs;
    a per-run one, ``PerRun``, to the runs it names)."""
    label = label or optimizer
    hparams = {k: (v.for_run(label, optimizer) if isinstance(v, PerRun) else v) for k, v in hparams.items()}
    hparams = {k: v for k, v in hparams.items() if v is not None}
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
    _check_names(hparams, [(args.optimizer, args.optimizer)])
    if args.optimizer in DEVICE_OPTIMIZERS and args.tiles is None:
        warning = stepping_warning(args.device, overrides)
        if warning:
            print(warning, file=sys.stderr, flush=True)
    # default: under --out-dir (runs/), never loose files in the working directory
    out = Path(args.out) if args.out else Path(args.out_dir) / f"{task.name}-{args.optimizer}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = None if (args.checkpoint or "").lower() == "none" else Path(args.checkpoint or out.with_suffix(".pt"))
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    rec = train(task, args.optimizer, device=args.device, device_overrides=overrides, checkpoint=ckpt,
                checkpoint_every=args.checkpoint_every, resume=args.resume,
                **_train_kwargs(args), **_hp_for(args.optimizer, hparams))
    write_json(out, {**rec.to_json(), "environment": environment()})
    print(json.dumps({**rec.summary(), "results": str(out), "checkpoint": str(ckpt) if ckpt else None}, indent=1))
    return 0


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None or not np.isfinite(value) else format(value, spec)


def markdown_table(records: list[RunRecord], projections: dict[str, dict[str, Any]]) -> str:
    """The summary table; ``projections`` by run label (device runs) from ``profile_projected_step_s``.

    ms/step leaves out the first step (numba's compilation on device runs), shown on its own; the
    status column says "ok", "diverged at step K: why" or "failed: why".
    """
    head = ("| run | lr | steps | final train loss (last 10%) | full train loss | test acc (final) | "
            "test acc (best) | wall ms/step (after step 1) | first step ms | host ms/step | emulator ms/step | "
            "analog us/step | projected ms/step (tngd-paper HW) | status |")
    rows = [head, "|" + "---|" * 14]
    for r in records:
        s = r.summary()
        proj = f"{1e3 * projections[r.label]['total_s']:.2f}" if r.label in projections else "-"
        ran = bool(r.loss)
        rows.append(f"| {describe_run(r.label, r.optimizer, r.hparams)} | {r.hparams.get('lr')} | {s['steps']} | "
                    f"{_fmt(s['final_loss_avg10pct'], '.4f')} | {_fmt(s['train_loss_full'], '.4f')} | "
                    f"{_fmt(s['test_accuracy'], '.4f')} | {_fmt(s['best_test_accuracy'], '.4f')} | "
                    f"{_fmt(s['wall_ms_per_step'] if ran else None, '.1f')} | "
                    f"{_fmt(s['first_step_ms'] if ran else None, '.0f')} | "
                    f"{_fmt(s['host_ms_per_step'] if ran else None, '.1f')} | "
                    f"{_fmt(s['emulator_ms_per_step'] if ran else None, '.1f')} | "
                    f"{_fmt(s['analog_us_per_step'] if ran else None, '.1f')} | {proj} | "
                    f"{r.status.replace('|', '/')} |")
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
    analog and emulator compute (log scale: the analog part is microseconds). A run keeps one
    colour in every panel; in the last panel the time parts differ by hatching, not colour.
    Runs that failed before their first step are left out (the table says why).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return False
    records = [r for r in records if r.loss]
    if not records:
        return False
    fig, ax = plt.subplots(1, 4, figsize=(22, 5.2))
    w = max(1, len(records[0].loss) // 30)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {r.label: cycle[i % len(cycle)] for i, r in enumerate(records)}
    for r in records:
        c = color[r.label]
        name = describe_run(r.label, r.optimizer, r.hparams) + ("" if r.status == "ok" else " [diverged]")
        ls = "-" if r.optimizer in DEVICE_OPTIMIZERS else "--"
        ax[0].plot(r.steps, _smooth(r.loss, w), ls, color=c, label=name)
        ax[1].plot(r.eval_steps, r.test_accuracy, ls + "o", ms=3, color=c, label=name)
        host = np.asarray(r.wall_s) - np.asarray(r.emulator_s)
        ax[2].plot(host + np.asarray(r.analog_s), _smooth(r.loss, w), ls, color=c, label=name)
        if r.optimizer in DEVICE_OPTIMIZERS:
            ax[2].plot(r.wall_s, _smooth(r.loss, w), ":", lw=1, color=c)
    ax[0].set(xlabel="step", ylabel=f"training loss (mini-batch, {w}-step mean)", yscale="log", title=title)
    ax[1].set(xlabel="step", ylabel="test accuracy (held-out split)", ylim=(0.5, 1.0),
              title="solid: on a device (TNGD); dashed: digital")
    ax[2].set(xlabel="wall-clock s (TNGD solid: host + analog; dotted: with emulator compute)",
              ylabel="training loss", xscale="log", yscale="log")
    labels = [r.label for r in records]
    y = np.arange(len(records))
    parts = (("host", lambda s: s["host_ms_per_step"], "", 1.0),
             ("analog (emulated)", lambda s: 1e-3 * s["analog_us_per_step"], "////", 0.55),
             ("emulator compute", lambda s: s["emulator_ms_per_step"], "....", 0.3))
    for k, (_, get, hatch, alpha) in enumerate(parts):
        vals = [get(r.summary()) for r in records]
        ax[3].barh(y + (k - 1) * 0.27, [v if v > 0 else np.nan for v in vals], height=0.27,
                   color=[color[r.label] for r in records], alpha=alpha, hatch=hatch, edgecolor="black", lw=0.3)
    ax[3].set(yticks=y, yticklabels=labels, xscale="log", xlabel="ms per step, after step 1 (measured here)")
    ax[3].invert_yaxis()
    ax[3].legend(handles=[Patch(facecolor="white", edgecolor="black", hatch=h, label=n) for n, _, h, _ in parts],
                 fontsize=8, loc="lower right")
    for a in ax:
        a.grid(alpha=0.3)
    ax[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _failed_record(task: Task, spec: dict, hparams: dict, exc: BaseException) -> RunRecord:
    """The row of a run that raised: its status says why; the comparison goes on."""
    rec = RunRecord(task.name, spec["optimizer"], spec["label"], {k: v for k, v in hparams.items()
                                                                  if isinstance(v, (int, float, str))},
                    spec["device"] if spec["optimizer"] in DEVICE_OPTIMIZERS else None)
    if spec.get("device_overrides") and spec["optimizer"] in DEVICE_OPTIMIZERS:
        rec.hparams["device_overrides"] = dict(spec["device_overrides"])
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    if isinstance(exc, DivergedError):
        rec.divergence = {"step": exc.step, "reason": first.partition(": ")[2] or first}
    else:
        rec.failed = f"{type(exc).__name__}: {first}"
    return rec


def _run_one(task: Task, spec: dict, hparams: dict, kwargs: dict[str, Any]) -> RunRecord:
    """One run of a comparison; an optimizer that raises (a library's numerical failure, a NaN
    loss) ends as a failed row instead of ending the command."""
    try:
        return train(task, spec["optimizer"], device=spec["device"], device_overrides=spec["device_overrides"],
                     label=spec["label"], **kwargs, **hparams)
    except Exception as exc:  # noqa: BLE001 - reported in the table, with its type and message
        return _failed_record(task, spec, hparams, exc)


def sweep_lr(task: Task, specs: list[dict], hparams: dict, kwargs: dict[str, Any], steps: int,
             grid: tuple[float, ...] | None = None) -> dict[str, dict[str, Any]]:
    """``--sweep lr``: each run's lr on a short run (``steps``), by the lowest final training loss
    (mean mini-batch loss over the last 10% of steps; a run that diverges or fails scores +inf).
    Returns {label: {"steps", "rows": [{lr, final_loss, status}], "best_lr"}}. A run whose lr the
    command line fixed per optimizer (``--lr adam=0.01``) is not swept."""
    out: dict[str, dict[str, Any]] = {}
    fixed = hparams.get("lr")
    for spec in specs:
        label, name = spec["label"], spec["optimizer"]
        if isinstance(fixed, PerRun) and (label in fixed or name in fixed):
            continue
        rows = []
        for lr in grid or SWEEP_GRIDS.get(name, SWEEP_GRID):
            hp = {**_hp_for(name, hparams, label), "lr": lr}
            kw = {**kwargs, "steps": steps, "progress": False, "eval_every": steps,
                  "divergence": Divergence(stop=True)}
            rec = _run_one(task, spec, hp, kw)
            s = rec.summary()
            score = s["final_loss_avg10pct"] if rec.status == "ok" and rec.loss else float("inf")
            rows.append({"lr": lr, "final_loss": score, "status": rec.status})
            print(f"sweep {label:>11}: lr {lr:g}  final loss {score:.4f}  {rec.status}", file=sys.stderr, flush=True)
        best = min(rows, key=lambda r: r["final_loss"])
        out[label] = {"steps": steps, "rows": rows,
                      "best_lr": best["lr"] if np.isfinite(best["final_loss"]) else None}
    return out


def run_compare(args: argparse.Namespace, overrides: dict | None, hparams: dict) -> int:
    task = task_named(args.task)
    data = task.load_data()  # once for every run (and the projection's output size)
    out_dir = Path(args.out_dir or f"results/compare-{task.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    skipped = [n for n in names if not available(n)]
    for n in skipped:
        print(f"thermo-host: skipping {n}: needs the {_NEEDS[n]!r} package", file=sys.stderr)
    specs = _run_specs([n for n in names if n not in skipped], args.device, overrides, args.noisy_kappa)
    _check_names(hparams, [(sp["label"], sp["optimizer"]) for sp in specs])
    if any(sp["optimizer"] in DEVICE_OPTIMIZERS for sp in specs) and args.tiles is None:
        warning = stepping_warning(args.device, overrides)
        if warning:
            print(warning, file=sys.stderr, flush=True)
    kwargs = {**_train_kwargs(args), "data": data}
    t0 = time.perf_counter()
    sweep: dict[str, dict[str, Any]] = {}
    if args.sweep == "lr":
        steps = args.sweep_steps or min(100, args.steps or task.steps)
        grid = tuple(float(v) for v in args.sweep_grid.split(",")) if args.sweep_grid else None
        sweep = sweep_lr(task, specs, hparams, kwargs, steps, grid)
    records = []
    for spec in specs:
        hp = _hp_for(spec["optimizer"], hparams, spec["label"])
        picked = sweep.get(spec["label"], {}).get("best_lr")
        if picked is not None:
            hp["lr"] = picked
        rec = _run_one(task, spec, hp, kwargs)
        records.append(rec)
        s = rec.summary()
        print(f"{rec.label:>11}: loss {_fmt(s['final_loss_avg10pct'], '.4f')}  test acc "
              f"{_fmt(s['test_accuracy'], '.4f')}  {_fmt(s['wall_ms_per_step'] if rec.loss else None, '.1f')} "
              f"ms/step  {rec.status}", file=sys.stderr, flush=True)
    batch = args.batch_size or task.batch_size
    n_out = task_output_size(task, data)
    projections = {r.label: profile_projected_step_s(r, batch, n_out) for r in records
                   if r.optimizer in DEVICE_OPTIMIZERS and r.loss}
    table = markdown_table(records, projections)
    (out_dir / "table.md").write_text(table)
    write_json(out_dir / "results.json", {"task": task.name, "seed": args.seed, "skipped": skipped,
                                          "total_wall_s": time.perf_counter() - t0, "output_size": n_out,
                                          "environment": environment(), "loadavg": os.getloadavg(),
                                          "cpus": os.cpu_count(), "sweep": sweep,
                                          "projected_step_s_tngd_paper": projections,
                                          "runs": [r.to_json() for r in records]})
    plotted = plot(records, out_dir / "curves.png", f"{task.name}: seed {args.seed}")
    print(table)
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'table.md'}"
          + (f", {out_dir / 'curves.png'}" if plotted else " (no plot: matplotlib is not installed or no run trained)"))
    return 0 if any(r.loss for r in records) else 1
