"""Tiles (host.tiling): plans that fit a device, block solves and refinement sweeps, and training
a model larger than a device (no silent enlargement)."""

from __future__ import annotations

import numpy as np
import pytest

from host.tiling import TilePlan, exact_tiles, plan_tiles, solve_tiles, tile_drift
from protocol import Dense, Factored
from protocol.errors import CapacityError, InvalidInputError

DIGITS = [("0.weight", 2048), ("0.bias", 32), ("2.weight", 320), ("2.bias", 10)]


def _problem(n: int = 90, m: int = 30, damping: float = 0.1, seed: int = 0) -> tuple[Factored, np.ndarray]:
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((m, n)) / np.sqrt(n)
    L = rng.standard_normal((m, m)) / np.sqrt(m)
    return Factored(J, L @ L.T + 0.1 * np.eye(m), damping), rng.standard_normal(n)


@pytest.mark.parametrize("cells", [16, 100, 2080, 4096])
def test_layer_plan_covers_the_vector_with_balanced_tiles_that_fit(cells: int) -> None:
    plan = plan_tiles(DIGITS, cells)
    assert plan.n == 2410 and plan.tiles[0].start == 0 and plan.tiles[-1].stop == 2410
    assert plan.largest <= cells
    # a layer is never mixed with another, and is cut into the fewest chunks of balanced sizes
    assert {t.group for t in plan.tiles} == {"0", "2"}
    for group, size in (("0", 2080), ("2", 330)):
        sizes = [t.size for t in plan.tiles if t.group == group]
        assert sum(sizes) == size and len(sizes) == -(-size // cells) and max(sizes) - min(sizes) <= 1
    if cells >= 2080:
        assert len(plan) == 2  # one tile per layer when the device holds a layer


def test_param_and_chunk_policies() -> None:
    assert [t.group for t in plan_tiles(DIGITS, 4096, "param").tiles] == [n for n, _ in DIGITS]
    chunk = plan_tiles(DIGITS, 1000, "chunk")
    assert [t.size for t in chunk.tiles] == [804, 803, 803]


def test_bad_plans_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="policy"):
        plan_tiles(DIGITS, 16, "rows")
    with pytest.raises(InvalidInputError, match="cells"):
        plan_tiles(DIGITS, 0)
    with pytest.raises(InvalidInputError, match="tile 1"):
        TilePlan(10, TilePlan.from_bounds([0, 4]).tiles + TilePlan.from_bounds([0, 5, 10]).tiles[1:])
    with pytest.raises(CapacityError, match=r"tile 1 \(custom, 20 parameters\).*16 cells.*--tiles layer"):
        TilePlan.from_bounds([0, 10, 30]).check_fits(16)


def test_tile_blocks_are_the_diagonal_blocks_of_the_drift() -> None:
    drift, _ = _problem()
    plan = plan_tiles([("a.w", 50), ("b.w", 40)], 32)
    for t in plan.tiles:
        blk = tile_drift(drift, t)
        assert isinstance(blk, Factored) and blk.dim == t.size  # no N x N matrix for a factored drift
        np.testing.assert_allclose(blk.dense(), drift.dense()[t.slice, t.slice], atol=1e-14)
        np.testing.assert_allclose(tile_drift(Dense(drift.dense()), t).dense(), blk.dense(), atol=1e-14)


def test_one_tile_is_the_full_solve() -> None:
    drift, g = _problem()
    x, rep = solve_tiles(drift, g, TilePlan.from_bounds([0, 90]), exact_tiles(drift, TilePlan.from_bounds([0, 90])))
    np.testing.assert_allclose(x, np.linalg.solve(drift.dense(), g), rtol=1e-10)
    assert rep.residuals[0] < 1e-12


def test_gauss_seidel_sweeps_converge_to_the_full_damped_direction() -> None:
    """Block Gauss-Seidel on an SPD matrix converges (its error contracts in the A-norm every
    sweep); with exact block solves the residual falls monotonically to round-off."""
    drift, g = _problem()
    plan = plan_tiles([("a.w", 50), ("b.w", 40)], 16)
    exact = np.linalg.solve(drift.dense(), g)
    a = drift.dense()
    errs = []
    for sweeps in (0, 1, 2, 4, 8, 60):
        x, rep = solve_tiles(drift, g, plan, exact_tiles(drift, plan), sweeps=sweeps, method="gauss-seidel")
        errs.append(float(np.sqrt((x - exact) @ a @ (x - exact))))
        assert len(rep.residuals) == sweeps + 1 and rep.runs == len(plan) * (sweeps + 1)
    assert all(b < a_ for a_, b in zip(errs, errs[1:], strict=False))
    assert errs[-1] < 1e-3 * errs[0]  # measured 3.7e-4: slow (lambda = 0.1), but it converges
    # the residual reported is ||A x - g|| / ||g||, recomputed (not the increments' bookkeeping)
    assert rep.residuals[-1] == pytest.approx(np.linalg.norm(a @ x - g) / np.linalg.norm(g), rel=1e-6, abs=1e-14)


def test_jacobi_with_two_tiles_converges_and_equals_the_dense_form() -> None:
    """Two blocks: the Jacobi iteration matrix's spectral radius is the largest canonical
    correlation between the blocks (< 1 for SPD A), so Jacobi converges."""
    drift, g = _problem()
    plan = TilePlan.from_bounds([0, 45, 90])
    exact = np.linalg.solve(drift.dense(), g)
    a = drift.dense()
    d = np.zeros_like(a)
    for t in plan.tiles:
        d[t.slice, t.slice] = a[t.slice, t.slice]
    rho = max(abs(np.linalg.eigvals(np.eye(90) - np.linalg.solve(d, a))))
    assert rho < 1.0
    x, rep = solve_tiles(drift, g, plan, exact_tiles(drift, plan), sweeps=200, method="jacobi")
    # the error contracts like rho^k (rho = 0.96 here): 200 sweeps leave about 3e-4 of it
    assert np.linalg.norm(x - exact) < 10 * rho**200 * np.linalg.norm(exact)
    dense = Dense(drift.dense())
    xd, repd = solve_tiles(dense, g, plan, exact_tiles(dense, plan), sweeps=3)
    x3, rep3 = solve_tiles(drift, g, plan, exact_tiles(drift, plan), sweeps=3)
    np.testing.assert_allclose(xd, x3, rtol=1e-9)
    np.testing.assert_allclose(repd.residuals, rep3.residuals, rtol=1e-9)


def test_bad_sweep_arguments() -> None:
    drift, g = _problem()
    plan = TilePlan.from_bounds([0, 90])
    with pytest.raises(InvalidInputError, match="method"):
        solve_tiles(drift, g, plan, exact_tiles(drift, plan), method="sor")
    with pytest.raises(InvalidInputError, match="sweeps"):
        solve_tiles(drift, g, plan, exact_tiles(drift, plan), sweeps=-1)
    with pytest.raises(InvalidInputError, match="relax"):
        solve_tiles(drift, g, plan, exact_tiles(drift, plan), relax=1.5)


# -- training: no silent enlargement -------------------------------------------------------------------

torch = pytest.importorskip("torch")


def _toy():
    from host import datasets
    from host.tasks import Task, mlp

    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    data = datasets.Dataset("toy", x[:160], y[:160], x[160:], y[160:], 2)
    return Task("toy", "toy", lambda: mlp(5, 4, 2), batch_size=16, steps=20, eval_every=10), data


def test_a_model_larger_than_the_device_is_refused_with_how_to_tile() -> None:
    from host.tasks import train

    task, data = _toy()  # 34 parameters on a 16-cell device
    with pytest.raises(CapacityError, match=r"N = 34 .* 16 cells: tile it .*--tiles layer"):
        train(task, "tngd", data=data, device_overrides={"device.cells": 16}, lr=0.3)


def test_the_same_model_trains_on_tiles_of_the_small_device() -> None:
    from host.pool import PoolConfig
    from host.tasks import train

    task, data = _toy()
    rec = train(task, "tngd", data=data, device_overrides={"device.cells": 16}, lr=0.3,
                pool=PoolConfig(tiles="layer", devices=2))
    info = rec.tiles["info"]
    # layer "0" (24 parameters) -> 2 tiles of 12; layer "2" (10) -> 1 tile
    assert info["tiles"]["tiles"] == 3 and info["tiles"]["largest"] == 12 and info["cells"] == 34
    assert np.mean(rec.loss[-5:]) < np.mean(rec.loss[:5]) and rec.test_accuracy[-1] > 0.7
    assert len(rec.tiles["residuals"]) == 20 and all(len(r) == 1 for r in rec.tiles["residuals"])
    assert rec.hparams["pool"]["devices"] == 2


def test_a_tiled_run_resumes_from_a_checkpoint_with_each_tiles_warm_start(tmp_path) -> None:
    """A checkpoint of a tiled run keeps every tile's analog state; without noise (kappa = 0) the
    resumed run ends exactly where the uninterrupted one does, which needs those warm starts."""
    from host.pool import PoolConfig
    from host.tasks import train

    task, data = _toy()
    kw = {"data": data, "device_overrides": {"device.cells": 16, "noise.kappa": 0.0}, "lr": 0.3,
          "pool": PoolConfig(tiles="layer", devices=1), "steps": 10, "analog_time": 2.0}
    whole = train(task, "tngd", **kw)
    part = tmp_path / "part.pt"
    train(task, "tngd", checkpoint=part, checkpoint_every=5, **{**kw, "steps": 6})
    resumed = train(task, "tngd", resume=part, **kw)
    assert resumed.loss == whole.loss
    # and the warm start is what made it so: starting the tiles from zero after step 5 differs
    cold = train(task, "tngd", **{**kw, "init": "reset"})
    assert cold.loss[6:] != whole.loss[6:]


def test_command_line_pool_options() -> None:
    from host.cli import build_parser
    from host.tasks_report import pool_config

    p = build_parser()
    cfg = pool_config(p.parse_args(["train", "--tiles", "layer", "--pool-devices", "2", "--sweeps", "1",
                                    "--sweep-method", "gauss-seidel", "--ray-resources", '{"spu": 1}']))
    assert (cfg.tiles, cfg.devices, cfg.sweeps, cfg.method, cfg.resources) == ("layer", 2, 1, "gauss-seidel",
                                                                             {"spu": 1})
    assert pool_config(p.parse_args(["train"])) is None
    with pytest.raises(SystemExit, match="need --tiles"):
        pool_config(p.parse_args(["train", "--pool-devices", "2"]))


def test_a_block_with_no_more_columns_than_rows_goes_dense() -> None:
    from host.tiling import compact

    drift, _ = _problem(n=90, m=30)
    plan = TilePlan.from_bounds([0, 20, 90])
    small, large = (compact(tile_drift(drift, t)) for t in plan.tiles)
    assert isinstance(small, Dense) and isinstance(large, Factored)  # 20 <= m = 30 < 70
    np.testing.assert_allclose(small.matrix, drift.dense()[:20, :20], atol=1e-14)
