"""A change measured against the code before it, in one session: embedded TNGD step time and the
NaN/Inf scans a step costs, for two source trees run alternately on the same CPUs.

Each round runs one child process per tree (``--before`` first, then this tree), pinned to the
same CPU set, with the tree first on ``sys.path``; rounds interleave so that machine load hits
both alike. A child trains ``--steps`` steps of the task with each optimizer of ``--runs`` via
that tree's ``benchmarks/bench_tngd_timing.py`` (median per-step wall time after ``--skip``), and
counts calls of ``protocol.drift.all_finite`` (every NaN/Inf scan of an array) over 3 embedded
TNGD steps, with their array sizes.

    git worktree add ../before <commit>
    python benchmarks/bench_before_after.py --before ../before [--rounds 3] [--cpus 0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent

CHILD = r"""
import collections, json, os, runpy, sys
tree = sys.argv[1]
sys.path.insert(0, tree)
import numpy as np
import torch
torch.set_num_threads(1)
import protocol.drift as pd
from host.tasks import train

calls = []
_orig = pd.all_finite
def _count(arr):
    calls.append(int(arr.size))
    return _orig(arr)
pd.all_finite = _count
task, runs, steps, skip = sys.argv[2], sys.argv[3].split(","), int(sys.argv[4]), int(sys.argv[5])
train(task, "tngd", steps=1, eval_every=10**9)  # compile and warm up before counting
calls.clear()
train(task, "tngd", steps=3, eval_every=10**9)
scans = {"per_step": len(calls) / 3, "sizes": sorted(collections.Counter(calls).items())}
pd.all_finite = _orig
timing = runpy.run_path(os.path.join(tree, "benchmarks", "bench_tngd_timing.py"))
rows = [timing["measure"](task, r, steps, skip, {}) for r in runs]
print("RESULT " + json.dumps({"scans": scans, "rows": rows}))  # no machine paths in the JSON
"""


def child(tree: Path, task: str, runs: str, steps: int, skip: int, cpus: str) -> dict:
    cmd = [sys.executable, "-c", CHILD, str(tree), task, runs, str(steps), str(skip)]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=tree, env=env, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, type=Path, help="a checkout of the code before the change")
    ap.add_argument("--task", default="digits")
    ap.add_argument("--runs", default="tngd,tngd-noisy,ngd")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus", default="0", help="taskset CPU list for both trees ('' = no pinning)")
    ap.add_argument("--out", type=Path, default=HERE / "benchmarks" / "results" / "before_after.json")
    args = ap.parse_args()
    trees = {"before": args.before.resolve(), "after": HERE}
    results: dict[str, list[dict]] = {k: [] for k in trees}
    load = [os.getloadavg()]
    for _ in range(args.rounds):
        for name, tree in trees.items():
            results[name].append(child(tree, args.task, args.runs, args.steps, args.skip, args.cpus))
            load.append(os.getloadavg())
    summary = {}
    for label in args.runs.split(","):
        med = {k: float(np.median([next(r["wall_ms_median"] for r in res["rows"] if r["label"] == label)
                                   for res in results[k]])) for k in trees}
        summary[label] = {"before_ms": med["before"], "after_ms": med["after"], "after_over_before": med["after"] / med["before"]}
    summary["scans_per_step"] = {k: results[k][0]["scans"] for k in trees}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"task": args.task, "steps": args.steps, "skip": args.skip, "rounds": args.rounds,
                                    "cpus": args.cpus, "loadavg": load, "summary": summary, "raw": results},
                                   indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
