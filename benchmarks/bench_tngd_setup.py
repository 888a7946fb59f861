"""Set-up of the exact Factored propagator: thin SVD of J (before) vs ``factored.factored_eigenbasis``.

For A = J^T H J + lambda I the exact integrator needs the eigenbasis of J^T H J on the row space of
J. The former set-up took a thin SVD of J (LAPACK gesdd, O(N m^2) with a large constant); the
current one takes the Gram matrix J J^T (SYRK), two m x m eigh and one GEMM, certified a
posteriori, with a Householder-QR fallback (see thermo_device/exact.py). Both are timed here on
one BLAS thread (as ``host.tasks.train`` runs the emulator) on:

* ``mnist``: J and H of the TNGD paper's MNIST CNN at its seed-0 initialisation on the first batch
  (m = 64 x 10 = 640, N = 4510), built with torch.func as in training;
* ``digits``: the digits MLP (m = 320, N = 2410);
* ``rank-deficient``: a J with repeated rows (forces the QR path).

Accuracy against the SVD: the largest eigenvalue difference relative to the largest, and the
relative difference of A^-1 g (lambda = 0.01).

    python benchmarks/bench_tngd_setup.py [--out benchmarks/results/tngd_setup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from thermo_device.factored import factored_eigenbasis

DAMPING = 0.01


def svd_eigenbasis(j: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The former set-up (dynamics._factored_system before this change), for the comparison."""
    m, n = j.shape
    us, s, vt = np.linalg.svd(j, full_matrices=False)
    tol = max(m, n) * np.finfo(np.float64).eps * (s[0] if s.size else 0.0)
    keep = s > tol
    us, s, vt = us[:, keep], s[keep], vt[keep]
    k = (s[:, None] * (us.T @ h @ us)) * s[None, :]
    mu, w = np.linalg.eigh(0.5 * (k + k.T))
    return np.ascontiguousarray(vt.T @ w), mu


def _solve(u: np.ndarray, mu: np.ndarray, g: np.ndarray) -> np.ndarray:
    y = u.T @ g
    return u @ (y / (np.maximum(mu, 0.0) + DAMPING)) + (g - u @ y) / DAMPING


def _best(f: Callable[[], Any], repeats: int) -> float:
    f()  # warm-up (BLAS buffers, page faults)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return float(best)


def _torch_problem(task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torch

    from host import datasets
    from host.curvature import torch_curvature
    from host.tasks import TASKS

    t = TASKS[task]
    ds = datasets.load(t.dataset)
    torch.manual_seed(0)
    model = t.model()
    x = torch.from_numpy(ds.x_train[:t.batch_size])
    y = torch.from_numpy(ds.y_train[:t.batch_size])
    c = torch_curvature(model, x, y)
    return c.J, c.H, c.grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/tngd_setup.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    problems = {"mnist": _torch_problem("mnist"), "digits": _torch_problem("digits")}
    j = rng.standard_normal((256, 3000))
    j[128:] = j[:128]  # rank 128: the Gram test refuses it, the QR path handles it
    problems["rank-deficient"] = (j, np.eye(256) / 256, rng.standard_normal(3000))
    rows = []
    with threadpool_limits(1, user_api="blas"):
        for name, (jm, hm, g) in problems.items():
            t_svd = _best(lambda jm=jm, hm=hm: svd_eigenbasis(jm, hm), args.repeats)
            t_new = _best(lambda jm=jm, hm=hm: factored_eigenbasis(jm, hm), args.repeats)
            u0, mu0 = svd_eigenbasis(jm, hm)
            b1, mu1, path = factored_eigenbasis(jm, hm)
            u1 = b1.dense()
            x0, x1 = _solve(u0, mu0, g), _solve(u1, mu1, g)
            top = max(float(mu0.max()), 1e-300)
            # compare the spectra where both are non-zero (the SVD drops null rows, QR keeps zeros)
            k = min(mu0.size, mu1.size)
            row = {"problem": name, "m": jm.shape[0], "n": jm.shape[1], "path": path,
                   "svd_s": t_svd, "new_s": t_new, "speedup": t_svd / t_new,
                   "max_rel_eig_diff": float(np.abs(np.sort(mu0)[-k:] - np.sort(mu1)[-k:]).max() / top),
                   "orthonormality_err": float(np.abs(u1.T @ u1 - np.eye(u1.shape[1])).max()),
                   "rel_diff_solution": float(np.linalg.norm(x1 - x0) / np.linalg.norm(x0))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"blas_threads": 1, "cpus": os.cpu_count(), "loadavg_after": os.getloadavg(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
