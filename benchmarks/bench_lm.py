"""Language-model fine-tuning (issue 17): MiniLM + LoRA on WordNet glosses with TNGD-Adam, TNGD,
Adam and a second-order baseline; the TNGD paper's second experiment at this machine's size.

    python3 benchmarks/bench_lm.py run     # the comparison (8.5 min at load 2): seed 0 for every optimizer,
                                           # then seeds 1 and 2 for the two best -> lm_compare.json
    python3 benchmarks/bench_lm.py sweep   # lr grid per optimizer (seed 0, 40 steps) -> lm_sweep.json
    python3 benchmarks/bench_lm.py check   # one batch: block (tile) directions vs the full one
    python3 benchmarks/bench_lm.py plot    # lm_compare.png from lm_compare.json

Needs the ``[lm]`` extra and Debian's ``wordnet-base``. Every run uses ``host.tasks.train`` on the
``wordnet-minilm`` task (same initial weights and batches per seed for every optimizer), the
task's settings (batch 16, 24 tokens, 80 steps) unless given, and its per-optimizer defaults
(``host.tasks_lm.LM_DEFAULTS``: the swept lrs; the paper's t = 0.4 tau, lambda = 1 and TNGD-Adam's
beta1 = beta2 = 0). Device optimizers run on the ideal embedded emulator (4096 cells) in tiles
(N = 39,174 > 4096; ``--tiles``, default "chunk": see ``check``).

Per-step time of a device optimizer is split by timing ``host.curvature``'s two stages in place
(the functions are wrapped for the run, not changed): the Jacobian pass (``torch_jacobians``: one
vmapped forward and b d_z backward passes; it gives the outputs, J and so the gradient, so there
is no separate forward/backward), the factors (``from_jacobians``: loss Hessian blocks, residuals,
gradient J^T r), the device (the emulator's wall time, over all tiles) and the rest (drift checks,
tiling glue, the inner Adam/SGD update). A digital optimizer's step is one forward/backward plus
its update.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
DEVICE = ("tngd", "tngd-adam")
GRIDS: dict[str, list[float]] = {
    "tngd-adam": [3e-4, 1e-3, 3e-3],
    "tngd": [1e-2, 3e-2, 0.1],
    "adam": [3e-4, 1e-3, 3e-3, 1e-2],
    "soap": [1e-3, 3e-3, 1e-2],
    "kfac": [3e-3, 1e-2, 3e-2],
    "shampoo": [1e-3, 3e-3, 1e-2],
}
SWEEP_STEPS = 40  # half the task's 80: the sweep is ~13 runs on a shared 2-core machine
# labels beyond plain optimizer names: (optimizer, extra hyperparameters)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "tngd-adam-ef": ("tngd-adam", {"kind": "empirical"}),  # empirical Fisher instead of the GGN
    # a control: TNGD-Adam's inner Adam (beta1 = beta2 = 0, lr 1e-3) on the raw gradient, i.e.
    # sign descent without the device (what is left of TNGD-Adam if the curvature did nothing)
    "adam-sign": ("adam", {"betas": (0.0, 0.0), "lr": 1e-3}),
    # a control for TNGD: in directions the GGN does not reach (all but b (d_z - 1) = 80 of N) the
    # warm-started device at t = 0.4 tau, lambda = 1 is x_k = e^-0.4 x_(k-1) + (1 - e^-0.4) g_k:
    # heavy-ball momentum 0.670 with TNGD's lr 0.1 times 0.330
    "sgd-momentum": ("sgd", {"lr": 0.1 * 0.3297, "momentum": 0.6703}),
    "sgd-momentum-0.01": ("sgd", {"lr": 0.01, "momentum": 0.6703}),  # its own best lr (sweep, 40 steps)
}


class StageClock:
    """Seconds spent per step in host.curvature's stages (wrapped while a run is active)."""

    def __init__(self) -> None:
        self.jac: list[float] = []
        self.jac_cpu: list[float] = []  # CPU seconds of the same calls (robust to a shared machine)
        self.factors: list[float] = []

    @contextmanager
    def active(self) -> Any:
        import host.curvature as hc

        orig_jac, orig_fac = hc.torch_jacobians, hc.from_jacobians

        def jac(*a: Any, **k: Any) -> Any:
            t0, c0 = time.perf_counter(), time.process_time()
            out = orig_jac(*a, **k)
            self.jac.append(time.perf_counter() - t0)
            self.jac_cpu.append(time.process_time() - c0)
            return out

        def fac(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            out = orig_fac(*a, **k)
            self.factors.append(time.perf_counter() - t0)
            return out

        hc.torch_jacobians, hc.from_jacobians = jac, fac
        try:
            yield self
        finally:
            hc.torch_jacobians, hc.from_jacobians = orig_jac, orig_fac


def run_one(label: str, data: Any, *, seed: int, steps: int | None, batch_size: int | None, tiles: str,
            progress: bool, **hp: Any) -> dict[str, Any]:
    """One training run; its RunRecord JSON plus the per-step time split."""
    from host.pool import PoolConfig
    from host.tasks import train

    optimizer, extra = VARIANTS.get(label, (label, {}))
    hp = {**extra, **hp}
    pool = PoolConfig(tiles=tiles) if optimizer in DEVICE else None
    clock = StageClock()
    t0, cpu0 = time.perf_counter(), time.process_time()
    with clock.active():
        rec = train("wordnet-minilm", optimizer, seed=seed, steps=steps, batch_size=batch_size, data=data,
                    label=label, pool=pool, progress=progress, **hp)
    total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    out = rec.to_json()
    out.pop("tiles", None)  # the plan's 10 tiles and per-tile pool details: not needed here
    wall = np.diff(np.concatenate([[0.0], rec.wall_s]))
    dev = np.diff(np.concatenate([[0.0], rec.emulator_s]))
    split: dict[str, float] = {"wall": float(np.mean(wall[1:]))}  # step 0 carries numba's compilation
    if optimizer in DEVICE and clock.jac:
        # the training loop's evaluations run the model without torch.func: every wrapped call is a step's
        j, f = np.asarray(clock.jac), np.asarray(clock.factors)
        split.update(jacobian_pass=float(np.mean(j[1:])), factors=float(np.mean(f[1:])),
                     device=float(np.mean(dev[1:])))
        split["other"] = split["wall"] - split["jacobian_pass"] - split["factors"] - split["device"]
        split["jacobian_pass_cpu"] = float(np.mean(np.asarray(clock.jac_cpu)[1:]))
    else:
        split["forward_backward_and_update"] = split["wall"]
    out["time_split_s"] = split
    out["run_s"] = total
    out["run_cpu_s"] = cpu  # this process's CPU time: what the run costs on an unshared core
    out["loadavg"] = os.getloadavg()
    return out


def load_data(args: argparse.Namespace) -> Any:
    from host.tasks_lm import load_wordnet

    return load_wordnet(n_train=args.n_train, n_test=args.n_test, max_len=args.max_len)


def _brief(r: dict[str, Any]) -> str:
    s = r["summary"]
    return (f"{r['label']:14s} seed {r.get('seed', 0)} lr {r['hparams'].get('lr')}: loss(last10%) "
            f"{s['final_loss_avg10pct']:.4f} full {s['train_loss_full']:.4f} test acc {s['test_accuracy']:.4f} "
            f"{1e3 * r['time_split_s']['wall']:.0f} ms/step {s['status']}")


def _merge(path: Path, key: str, value: Any) -> None:
    """Merge one entry into a JSON file under an exclusive lock (parallel sweeps share the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        doc = json.loads(path.read_text()) if path.exists() else {}
        doc[key] = value
        path.write_text(json.dumps(doc, indent=1, default=float) + "\n")


@contextmanager
def _locked(path: Path) -> Any:
    """An exclusive lock for read-modify-write of ``path`` by parallel runs (the lock file lives in
    the temporary directory and is never removed, so every process locks the same inode)."""
    with open(Path(tempfile.gettempdir()) / f"bench_lm_{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def settings(args: argparse.Namespace) -> dict[str, Any]:
    from host.tasks_lm import BATCH_SIZE, STEPS

    return {"steps": args.steps or STEPS, "batch_size": args.batch_size or BATCH_SIZE, "max_len": args.max_len,
            "n_train_per_class": args.n_train, "n_test_per_class": args.n_test, "tiles": args.tiles,
            "device": "embedded:ideal", "model": "all-MiniLM-L6-v2 + LoRA r=2 alpha=32 (Q, K, V, attn out)"}


def cmd_sweep(args: argparse.Namespace) -> None:
    data = load_data(args)
    args.steps = args.steps or SWEEP_STEPS
    out = Path(args.out or RESULTS / "lm_sweep.json")
    for label in args.optimizers.split(","):
        grid = [float(v) for v in args.lrs.split(",")] if args.lrs else GRIDS[VARIANTS.get(label, (label,))[0]]
        rows = []
        for lr in grid:
            try:
                r = run_one(label, data, seed=0, steps=args.steps, batch_size=args.batch_size, tiles=args.tiles,
                            progress=not args.no_progress, lr=lr)
                row = {"lr": lr, **{k: r["summary"][k] for k in ("final_loss_avg10pct", "train_loss_full",
                                                                   "test_accuracy", "status")},
                       "loss": r["loss"], "eval_steps": r["eval_steps"], "test_accuracy_curve": r["test_accuracy"],
                       "ms_per_step": 1e3 * r["time_split_s"]["wall"], "loadavg": r["loadavg"]}
                print(_brief(r), flush=True)
            except (FloatingPointError, RuntimeError) as exc:  # a NaN loss: diverged at this lr
                row = {"lr": lr, "final_loss_avg10pct": float("inf"), "status": f"failed: {exc}"}
                print(label, lr, "failed", exc, flush=True)
            rows.append(row)
        with _locked(out):  # rows of an earlier sweep of this label at other lrs stay (a grid extended)
            doc = json.loads(out.read_text()) if out.exists() else {}
            mine = {r["lr"] for r in rows}
            rows = sorted([r for r in doc.get(label, {}).get("rows", []) if r["lr"] not in mine] + rows,
                          key=lambda r: r["lr"])
            ok = [r for r in rows if r["status"] == "ok"] or rows
            best = min(ok, key=lambda r: r["final_loss_avg10pct"])
            doc[label] = {"best_lr": best["lr"], "rule": "lowest mean mini-batch loss over the last 10% of steps "
                          "among runs not flagged as diverging", "settings": settings(args), "rows": rows}
            out.write_text(json.dumps(doc, indent=1, default=float) + "\n")
        print(f"== {label}: best lr {best['lr']}", flush=True)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The two best labels at seed 0 (final test accuracy, then final training loss) and, for
    each label with several seeds, the mean and spread over them."""
    seed0 = [r for r in runs if r["seed"] == 0 and r["label"] not in VARIANTS]  # optimizers, not controls
    ranked = sorted(seed0, key=lambda r: (-r["summary"]["test_accuracy"], r["summary"]["final_loss_avg10pct"]))
    out: dict[str, Any] = {"top_two": [r["label"] for r in ranked[:2]], "seeds": {}}
    for label in dict.fromkeys(r["label"] for r in runs):
        rs = sorted((r for r in runs if r["label"] == label), key=lambda r: r["seed"])
        if len(rs) < 2:
            continue
        acc = [r["summary"]["test_accuracy"] for r in rs]
        loss = [r["summary"]["final_loss_avg10pct"] for r in rs]
        full = [r["summary"]["train_loss_full"] for r in rs]
        out["seeds"][label] = {"seeds": [r["seed"] for r in rs], "test_accuracy": acc,
                               "test_accuracy_mean": float(np.mean(acc)), "test_accuracy_std": float(np.std(acc)),
                               "final_loss_avg10pct": loss, "final_loss_mean": float(np.mean(loss)),
                               "train_loss_full": full, "train_loss_full_mean": float(np.mean(full))}
    return out


def cmd_run(args: argparse.Namespace) -> None:
    """Seed 0 for every label, then ``--seeds`` - 1 more seeds for the two best. With
    ``--seed-list`` only those seeds of the given labels run, and with ``--append`` the runs are
    merged into the results file (by label and seed): pieces of one comparison can run in
    parallel processes."""
    data = load_data(args)
    labels = args.optimizers.split(",")
    out = Path(args.out or RESULTS / "lm_compare.json")
    t_start = time.perf_counter()
    runs: list[dict[str, Any]] = []

    def one(label: str, seed: int) -> None:
        r = run_one(label, data, seed=seed, steps=args.steps, batch_size=args.batch_size, tiles=args.tiles,
                    progress=not args.no_progress)
        r["seed"] = seed
        runs.append(r)
        print(_brief(r), flush=True)

    if args.seed_list:
        for label in labels:
            for seed in (int(v) for v in args.seed_list.split(",")):
                one(label, seed)
    else:
        for label in labels:
            one(label, 0)
        for label in summarize(runs)["top_two"]:
            for seed in range(1, args.seeds):
                one(label, seed)
    elapsed = time.perf_counter() - t_start
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        doc = json.loads(out.read_text()) if args.append and out.exists() else {"pieces": []}
        keep = {(r["label"], r["seed"]) for r in runs}
        doc["runs"] = [r for r in doc.get("runs", []) if (r["label"], r["seed"]) not in keep] + runs
        doc["pieces"].append({"labels": labels, "seeds": args.seed_list or f"0, then 1..{args.seeds - 1} for "
                              "the top two", "wall_s": elapsed, "loadavg_end": os.getloadavg()})
        doc["settings"] = settings(args)
        doc.update(summarize(doc["runs"]))
        out.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    print(f"wrote {out} ({elapsed:.0f} s)", flush=True)
    if not args.no_plot:
        plot(doc["runs"], out.with_suffix(".png"))


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Seed-0 training loss per step (10-step moving average) and test accuracy per step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", flush=True)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        if r["seed"] != 0:
            continue
        y = np.asarray(r["loss"])
        w = min(10, len(y))
        smooth = np.convolve(y, np.ones(w) / w, mode="valid")
        a.plot(np.arange(w - 1, len(y)) + 1, smooth, label=r["label"])
        b.plot(r["eval_steps"], r["test_accuracy"], marker="o", label=r["label"])
    a.set(xlabel="step", ylabel="mini-batch loss (10-step mean)", title="training loss, seed 0")
    b.set(xlabel="step", ylabel="test accuracy", title="held-out accuracy, seed 0")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", flush=True)


def cmd_plot(args: argparse.Namespace) -> None:
    """The plot of a results file written by ``run`` (pieces run with ``--no-plot``), and its
    summary fields recomputed from all its runs."""
    out = Path(args.out or RESULTS / "lm_compare.json")
    with _locked(out):
        doc = json.loads(out.read_text())
        doc.update(summarize(doc["runs"]))
        out.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    plot(doc["runs"], out.with_suffix(".png"))


def cmd_check(args: argparse.Namespace) -> None:
    """On one batch after a few Adam steps: how close the block (tile) directions are to the full
    damped natural gradient (exact solves), for each tiling policy."""
    import torch

    from host.curvature import torch_curvature
    from host.tasks_lm import minilm_lora_classifier
    from host.tiling import plan_for_model

    torch.set_num_threads(1)
    data = load_data(args)
    bs = args.batch_size or 16
    torch.manual_seed(0)
    model = minilm_lora_classifier()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    for k in range(5):  # B = 0 at initialisation: move off it so that the LoRA factors couple
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[k * bs:(k + 1) * bs]), y[k * bs:(k + 1) * bs]).backward()
        opt.step()
    c = torch_curvature(model, x[5 * bs:6 * bs], y[5 * bs:6 * bs])
    w, v = np.linalg.eigh(c.H)
    keep = w > 1e-12 * w.max()
    root = (v[:, keep] * np.sqrt(w[keep])).T  # H = root^T root

    def solve(J: np.ndarray, g: np.ndarray, lam: float) -> np.ndarray:  # (J^T H J + lam I)^-1 g, Woodbury
        u = root @ J
        return (g - u.T @ np.linalg.solve(lam * np.eye(u.shape[0]) + u @ u.T, u @ g)) / lam

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    rows = {}
    for lam in (1.0, 0.01):
        full = solve(c.J, c.grad, lam)
        row: dict[str, Any] = {"cos_full_vs_gradient": cos(full, c.grad)}
        for policy in ("layer", "chunk"):
            plan = plan_for_model(model, 4096, policy)
            d = np.zeros_like(c.grad)
            for t in plan.tiles:
                d[t.slice] = solve(c.J[:, t.slice], c.grad[t.slice], lam)
            row[policy] = {"tiles": len(plan), "cos_block_vs_full": cos(d, full),
                           "rel_error": float(np.linalg.norm(d - full) / np.linalg.norm(full))}
        rows[f"lambda={lam:g}"] = row
        print(lam, row, flush=True)
    sv = np.linalg.svd(root @ c.J, compute_uv=False) ** 2  # nonzero GGN eigenvalues
    doc = {"settings": settings(args), "ggn_top_eigenvalues": sv[:5].tolist(), "ggn_median_eigenvalue":
           float(np.median(sv)), "ggn_rank": int((sv > 1e-12 * sv[0]).sum()), "directions": rows}
    _merge(Path(args.out or RESULTS / "lm_tiles_check.json"), "check", doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", default="run", choices=("run", "sweep", "check", "plot"))
    ap.add_argument("--optimizers", default="tngd-adam,tngd,adam,soap",
                    help="labels: optimizer names or tngd-adam-ef (empirical Fisher)")
    ap.add_argument("--lrs", default=None, help="sweep: comma-separated grid (default: per optimizer)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--max-len", type=int, default=24)
    ap.add_argument("--n-train", type=int, default=300, help="training glosses per category")
    ap.add_argument("--n-test", type=int, default=60, help="test glosses per category")
    ap.add_argument("--seeds", type=int, default=3, help="run: seeds for the two best")
    ap.add_argument("--seed-list", default=None, help="run: only these seeds (comma-separated) of --optimizers")
    ap.add_argument("--append", action="store_true", help="run: merge into the results file")
    ap.add_argument("--tiles", default="chunk", help="tiling policy for the device optimizers")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    {"run": cmd_run, "sweep": cmd_sweep, "check": cmd_check, "plot": cmd_plot}[args.command](args)


if __name__ == "__main__":
    main()
