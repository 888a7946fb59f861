"""Exact sampling at N = 1024 (issue 15, item 5): ours against thermox, set-up and sampling apart.

One trajectory of T = 1000 tau with 1e4 readouts (h = 0.1, every step stored) of
dx = -(A x - b) dt + sqrt(2 kappa) dW, kappa = 1, started from a draw of the stationary law, for

* ``spd``: A symmetric, eigenvalues log-spaced in [0.2, 2] (ours: the modal path, one ``eigh``);
* ``nonnormal``: the same A plus 0.3 G / sqrt(N), G Gaussian (non-normal, positive-stable).

Methods, run round-robin in one process (``--rounds`` times; the first thermox call of each shape
compiles and is timed apart as ``compile_s``):

* ``ours``: set-up = ``dynamics.overdamped_system`` (what programming does: ``eigh``, or
  ``eigvals`` for the stability margin of a non-symmetric drift) + the propagator's transition
  (non-normal: the real eigenbasis and the block-basis coefficients); sampling = one window;
* ``ours_van_loan`` (non-normal): the previous set-up (2N x 2N Van Loan) and per-step gemv kernel;
* ``ours_dense`` (non-normal): the Lyapunov set-up (blocked Bartels-Stewart S, expm, S - Phi S
  Phi^T) that serves when the eigenbasis is ill-conditioned; set-up only (it samples with the
  same gemv kernel as ``ours_van_loan``);
* ``thermox``: ``thermox.preprocess`` (set-up) and ``thermox.sample`` with the preprocessed
  matrices (sampling), float64. Skipped with a note when thermox is not importable.

Correctness, for every trajectory: the transition residuals e_k = z_{k+1} - Phi z_k - shift are
i.i.d. N(0, Q) under the exact law (Phi, Q from the Van Loan reference). Whitened by chol(Q) they
are i.i.d. standard normal, so with K residuals in n dimensions the sample covariance C satisfies
E ||C - I||_F^2 = n (n + 1) / K: ``cov_ratio`` = ||C - I||_F / sqrt(n (n + 1) / K) is 1 (+- ~0.5 %)
for a correct sampler, and ``msq_z`` = (mean of the squared whitened residuals - 1) / sqrt(2 /
(n K)) is a standard normal z-score. thermox's own transition covariance (from its symmetric-part
formula) is compared with the exact one analytically as ``law_rel_error``.

One BLAS thread (threadpoolctl, after scipy is imported) and, for thermox, XLA's CPU runtime on one
thread. Run with an interpreter that has thermox installed next to this project's packages:

    python benchmarks/bench_general_exact.py [--n 1024] [--t 1000] [--samples 10000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

# XLA reads its flags when jax is first imported: one CPU thread, like our one BLAS thread.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.drift import Dense  # noqa: E402
from thermo_device.dynamics import GeneralSystem, overdamped_system  # noqa: E402
from thermo_device.exact import GeneralPropagator, ModalPropagator  # noqa: E402
from thermo_device.general_basis import stationary_covariance  # noqa: E402

threadpool_limits(1, user_api="blas")

HAVE_THERMOX = importlib.util.find_spec("thermox") is not None


def problems(n: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = (q * np.logspace(np.log10(0.2), np.log10(2.0), n)) @ q.T
    a = 0.5 * (a + a.T)
    nonnormal = a + 0.3 * rng.standard_normal((n, n)) / np.sqrt(n)
    mu = 0.1 * rng.standard_normal(n)
    return {"spd": (a, mu), "nonnormal": (nonnormal, mu)}


def reference(a: np.ndarray, mu: np.ndarray, h: float, kappa: float) -> dict[str, Any]:
    """The exact law by the Van Loan path, and a stationary start (untimed)."""
    n = a.shape[0]
    sysm = GeneralSystem(F=a, c=a @ mu, D=2.0 * np.eye(n), n_out=n, target=mu.copy())
    vl = GeneralPropagator(sysm, method="van_loan")
    phi, shift, _ = vl.coefficients(h, 1.0, kappa)
    q_ref = vl._van_loan(h, 1.0, kappa)[1]
    s, resid = stationary_covariance(a, 2.0 * np.eye(n))
    return {"phi": phi, "shift": shift, "chol_q": np.linalg.cholesky(q_ref), "q": q_ref,
            "s": kappa * s, "lyapunov_residual": resid}


def check(z: np.ndarray, ref: dict[str, Any]) -> dict[str, float]:
    """Whitened transition residuals against the exact law (see the module docstring)."""
    e = z[1:] - z[:-1] @ ref["phi"].T - ref["shift"]
    w = scipy.linalg.solve_triangular(ref["chol_q"], e.T, lower=True)  # n x K
    n, k = w.shape
    c = w @ w.T / k
    c[np.diag_indices(n)] -= 1.0
    return {"cov_ratio": float(np.linalg.norm(c) / np.sqrt(n * (n + 1) / k)),
            "msq_z": float((np.mean(w * w) - 1.0) / np.sqrt(2.0 / (n * k)))}


def run_ours(form: str, a: np.ndarray, mu: np.ndarray, x0: np.ndarray, h: float, k: int, kappa: float,
             seed: int, method: str) -> tuple[dict[str, Any], np.ndarray]:
    rng = np.random.default_rng(seed)
    c0 = time.process_time()
    t0 = time.perf_counter()
    sysm = overdamped_system(Dense(a), a @ mu)
    t1 = time.perf_counter()
    if form == "spd":
        prop = ModalPropagator(sysm)
        path = "modal"
    else:
        prop = GeneralPropagator(sysm, method=method)
        path = prop.prepare(h, 1.0, kappa)
    t2, c2 = time.perf_counter(), time.process_time()
    res = prop.window(x0, h, k, 1, rng, False, 1.0, kappa)
    t3, c3 = time.perf_counter(), time.process_time()
    row = {"path": path, "program_s": t1 - t0, "transition_s": t2 - t1, "setup_s": t2 - t0,
           "sample_s": t3 - t2, "total_s": t3 - t0, "setup_cpu_s": c2 - c0, "sample_cpu_s": c3 - c2}
    return row, np.vstack([x0[None, :], res.samples])


def run_dense_setup(a: np.ndarray, mu: np.ndarray, h: float, kappa: float) -> dict[str, Any]:
    c0 = time.process_time()
    t0 = time.perf_counter()
    sysm = overdamped_system(Dense(a), a @ mu)
    t1 = time.perf_counter()
    prop = GeneralPropagator(sysm, method="dense")
    path = prop.prepare(h, 1.0, kappa)
    t2 = time.perf_counter()
    return {"path": path, "program_s": t1 - t0, "transition_s": t2 - t1, "setup_s": t2 - t0,
            "setup_cpu_s": time.process_time() - c0}


class Thermox:
    """thermox in this process, float64, imported only when present."""

    def __init__(self) -> None:
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        import thermox

        self.jax, self.jnp, self.thermox = jax, jnp, thermox
        self.compiled: set[tuple[str, int]] = set()

    def run(self, form: str, a: np.ndarray, mu: np.ndarray, x0: np.ndarray, h: float, k: int,
            kappa: float, seed: int) -> tuple[dict[str, Any], np.ndarray]:
        jax, jnp, tx = self.jax, self.jnp, self.thermox
        n = a.shape[0]
        ts = jnp.asarray(h * np.arange(k + 1))
        args = (jnp.asarray(a), jnp.asarray(2.0 * kappa * np.eye(n)))
        row: dict[str, Any] = {"path": "thermox"}
        if (form, n) not in self.compiled:  # the first call of a shape traces and compiles
            t0 = time.perf_counter()
            pa, pd = tx.preprocess(*args)
            xs = tx.sample(jax.random.PRNGKey(seed + 1), ts, jnp.asarray(x0), pa, jnp.asarray(mu), pd)
            jax.block_until_ready(xs)
            row["compile_s"] = time.perf_counter() - t0
            self.compiled.add((form, n))
        t0, c0 = time.perf_counter(), time.process_time()
        pa, pd = tx.preprocess(*args)
        jax.block_until_ready((pa, pd))
        t1, c1 = time.perf_counter(), time.process_time()
        xs = tx.sample(jax.random.PRNGKey(seed), ts, jnp.asarray(x0), pa, jnp.asarray(mu), pd)
        jax.block_until_ready(xs)
        t2, c2 = time.perf_counter(), time.process_time()
        row.update({"setup_s": t1 - t0, "sample_s": t2 - t1, "total_s": t2 - t0, "setup_cpu_s": c1 - c0,
                    "sample_cpu_s": c2 - c1})
        # its transition covariance (symmetric-part formula; D = 2 kappa I, so no whitening)
        lam, v = np.linalg.eigh(0.5 * (a + a.T))
        q_tx = (v * (2.0 * kappa * -np.expm1(-2.0 * lam * h) / (2.0 * lam))) @ v.T
        row["q_thermox"] = q_tx
        return row, np.asarray(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--t", type=float, default=1000.0)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-thermox", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "general_exact.json")
    args = ap.parse_args()
    n, k, kappa = args.n, args.samples, 1.0
    h = args.t / k
    probs = problems(n)
    refs = {form: reference(a, mu, h, kappa) for form, (a, mu) in probs.items()}
    starts = {}
    for i, (form, (_, mu)) in enumerate(probs.items()):
        ls = np.linalg.cholesky(refs[form]["s"])
        starts[form] = mu + ls @ np.random.default_rng(100 + i).standard_normal(n)
    tx = Thermox() if HAVE_THERMOX and not args.no_thermox else None
    methods = {"spd": ["ours"] + (["thermox"] if tx else []),
               "nonnormal": ["ours", "ours_van_loan", "ours_dense"] + (["thermox"] if tx else [])}
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {f: {m: [] for m in ms} for f, ms in methods.items()}
    # compile (or load from cache) every numba kernel outside the timed region
    for form, (a, mu) in problems(8, seed=1).items():
        for method in ("auto", "van_loan"):
            run_ours(form, a, mu, mu.copy(), h, 10, kappa, 0, method)
    load = [os.getloadavg()]
    for rnd in range(args.rounds):
        for f_i, (form, (a, mu)) in enumerate(probs.items()):
            for i, m in enumerate(methods[form]):
                # different streams per run: the whitened-residual statistics of two exact
                # samplers fed the same normals would agree to the last digit (an orthogonal map)
                seed = 1000 * rnd + 100 * f_i + 10 * i + 7
                if m == "ours_dense":
                    row, z = run_dense_setup(a, mu, h, kappa), None
                elif m == "thermox":
                    row, z = tx.run(form, a, mu, starts[form], h, k, kappa, seed)
                    q_tx = row.pop("q_thermox")
                    row["law_rel_error"] = float(np.linalg.norm(q_tx - refs[form]["q"]) / np.linalg.norm(refs[form]["q"]))
                else:
                    method = "van_loan" if m == "ours_van_loan" else "auto"
                    row, z = run_ours(form, a, mu, starts[form], h, k, kappa, seed, method)
                if z is not None:
                    row.update(check(z, refs[form]))
                rows[form][m].append({key: (round(v, 4) if isinstance(v, float) else v) for key, v in row.items()})
                load.append(os.getloadavg())
                print(form, m, rnd, rows[form][m][-1], flush=True)
    summary: dict[str, Any] = {}
    for form, by in rows.items():
        keys = ("setup_s", "sample_s", "total_s", "setup_cpu_s", "sample_cpu_s")
        med = {m: {key: float(np.median([r[key] for r in rs])) for key in keys if key in rs[0]}
               for m, rs in by.items()}
        summary[form] = med
        if "thermox" in med:
            for m in by:
                if m != "thermox" and "total_s" in med[m]:
                    med[m]["thermox_over_this_total"] = med["thermox"]["total_s"] / med[m]["total_s"]
                    med[m]["thermox_over_this_sample"] = med["thermox"]["sample_s"] / med[m]["sample_s"]
                    med[m]["thermox_over_this_total_cpu"] = ((med["thermox"]["setup_cpu_s"] + med["thermox"]["sample_cpu_s"])
                                                             / (med[m]["setup_cpu_s"] + med[m]["sample_cpu_s"]))
        if "ours_van_loan" in med:
            med["ours"]["van_loan_over_this_total"] = med["ours_van_loan"]["total_s"] / med["ours"]["total_s"]
            med["ours"]["van_loan_over_this_setup"] = med["ours_van_loan"]["setup_s"] / med["ours"]["setup_s"]
            med["ours"]["van_loan_over_this_total_cpu"] = (
                (med["ours_van_loan"]["setup_cpu_s"] + med["ours_van_loan"]["sample_cpu_s"])
                / (med["ours"]["setup_cpu_s"] + med["ours"]["sample_cpu_s"]))
    result = {
        "config": {"n": n, "T_tau": args.t, "samples": k, "h_tau": h, "kappa": kappa, "rounds": args.rounds,
                   "blas_threads": 1, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                   "python": platform.python_version(), "numpy": np.__version__,
                   "thermox": _version("thermox") if tx else None, "jax": _version("jax") if tx else None},
        "note": ("wall (perf_counter) and process CPU (process_time) seconds; on a loaded shared machine "
                 "wall/CPU > 1 is time spent waiting for a core, so compare ratios of both")
        + ("" if tx else "; thermox not importable in this interpreter: its column is skipped"),
        "reference_lyapunov_residual": {f: r["lyapunov_residual"] for f, r in refs.items()},
        "summary_median": summary,
        "runs": rows,
        "loadavg": load,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - a version is informative only
        return None


if __name__ == "__main__":
    main()
