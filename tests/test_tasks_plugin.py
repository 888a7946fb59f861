"""Issue 19: a user's own model and data as a task plug-in, per-run learning rates and the lr
sweep in ``compare``, divergence and failures reported per run, every ``train()`` option applied or
refused (the LM schedule), and the K-FAC baseline on a bare ``nn.Linear``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from host.cli import main
from host.datasets import Dataset
from host.tasks import TASKS, Divergence, Task, task_named, train
from host.tngd import LevenbergMarquardt
from protocol.errors import InvalidInputError

ROOT = Path(__file__).resolve().parent.parent

# A user's package: a tiny model and random data (3 classes, 6 features), defined nowhere in ours.
USER_TASKS = textwrap.dedent('''
    import numpy as np
    from torch import nn
    from host.datasets import Dataset
    from host.tasks import Task

    def _data():
        rng = np.random.default_rng(1)
        x = rng.standard_normal((120, 6)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5).astype(np.int64)
        return Dataset("blobs", x[:96], y[:96], x[96:], y[96:], n_classes=3)

    def blobs():
        return Task("blobs", _data, lambda: nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)),
                    batch_size=16, steps=12, eval_every=6)

    def linear():
        return Task("linear", _data, lambda: nn.Linear(6, 3), batch_size=16, steps=6, eval_every=3)
''')


@pytest.fixture()
def user_pkg(tmp_path: Path) -> Path:
    """``mypkg.tasks`` in a directory of its own, plus an entry point naming one of its tasks
    (the metadata pip would install), both found through PYTHONPATH only."""
    site = tmp_path / "site"
    (site / "mypkg").mkdir(parents=True)
    (site / "mypkg" / "__init__.py").write_text("")
    (site / "mypkg" / "tasks.py").write_text(USER_TASKS)
    dist = site / "mypkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[thermo_ngd.tasks]\nblobs = mypkg.tasks:blobs\n")
    return site


def _cli(argv: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "host.cli", *argv], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env)


def _table_rows(table: str) -> dict[str, list[str]]:
    rows = [ln.strip("|").split("|") for ln in table.strip().splitlines()[2:]]
    return {r[0].strip(): [c.strip() for c in r] for r in rows}


def test_compare_runs_a_users_task_by_module_callable(user_pkg: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    proc = _cli(["compare", "--task", "mypkg.tasks:blobs", "--optimizers", "tngd,adam,sgd", "--no-progress",
                 "--lr", "adam=0.02,sgd=0.3", "--out-dir", str(out)], user_pkg, tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = _table_rows((out / "table.md").read_text())
    assert set(rows) == {"tngd", "adam", "sgd"}
    assert all(r[-1] == "ok" and r[2] == "12" for r in rows.values())
    assert rows["adam"][1] == "0.02" and rows["sgd"][1] == "0.3" and rows["tngd"][1] == "0.1"
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "blobs" and res["output_size"] == 3
    # the projection's transfer counts m = batch x 3 outputs: recompute it from the profile's bits
    proj = res["projected_step_s_tngd_paper"]["tngd"]
    n = res["runs"][0]["n_params"]
    assert n == 6 * 4 + 4 + 4 * 3 + 3
    m = 16 * 3
    from host import connect

    caps = connect("embedded:tngd-paper").info()["capabilities"]
    dac, cpl, adc = (int(caps[k]) or 64 for k in ("dac_bits", "coupling_bits", "adc_bits"))
    assert proj["transfer_s"] == pytest.approx((n * dac + m * (m + 2 * n) * cpl + n * adc) / 50e9)
    env = res["environment"]
    assert {"python", "numpy", "numba", "torch", "scipy", "thermo-ngd", "git_commit", "loadavg"} <= set(env)


def test_a_plugin_task_by_entry_point_name_and_unknown_names(user_pkg: Path, tmp_path: Path) -> None:
    proc = _cli(["train", "--task", "blobs", "--optimizer", "adam", "--no-progress", "--out-dir", "r"],
                user_pkg, tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = json.loads((tmp_path / "r" / "blobs-adam.json").read_text())
    assert written["task"] == "blobs" and written["environment"]["torch"] and written["environment"]["loadavg"]
    proc = _cli(["train", "--task", "mypkg.tasks:nothing"], user_pkg, tmp_path)
    assert proc.returncode == 2 and "has no attribute 'nothing'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = _cli(["compare", "--task", "blobs", "--lr", "adm=0.1", "--optimizers", "adam"], user_pkg, tmp_path)
    assert proc.returncode != 0 and "'adm'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_sweep_picks_each_runs_lr_records_the_grid_then_compares(user_pkg: Path, tmp_path: Path) -> None:
    out = tmp_path / "sw"
    proc = _cli(["compare", "--task", "mypkg.tasks:blobs", "--optimizers", "adam,sgd", "--no-progress",
                 "--sweep", "lr", "--sweep-steps", "8", "--sweep-grid", "0.001,0.1,1e4", "--lr", "sgd=0.2",
                 "--out-dir", str(out)], user_pkg, tmp_path)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "results.json").read_text())
    sweep = res["sweep"]
    assert set(sweep) == {"adam"}  # sgd's lr was fixed on the command line
    rows = sweep["adam"]["rows"]
    assert [r["lr"] for r in rows] == [0.001, 0.1, 1e4] and sweep["adam"]["steps"] == 8
    finite = [r for r in rows if np.isfinite(r["final_loss"])]
    assert sweep["adam"]["best_lr"] == min(finite, key=lambda r: r["final_loss"])["lr"]
    runs = {r["label"]: r for r in res["runs"]}
    assert runs["adam"]["hparams"]["lr"] == sweep["adam"]["best_lr"] and runs["sgd"]["hparams"]["lr"] == 0.2


def test_divergence_and_a_failing_optimizer_are_rows_not_crashes(user_pkg: Path, tmp_path: Path) -> None:
    out = tmp_path / "bad"
    # sgd at lr 1e4 blows the loss up; tngd on the 8-cell board cannot hold the model (raises
    # CapacityError): the command completes and the table says which run failed and why
    proc = _cli(["compare", "--task", "mypkg.tasks:blobs", "--optimizers", "tngd,adam,sgd", "--no-progress",
                 "--lr", "sgd=1e4", "--device", "embedded:spu-8cell", "--steps", "40", "--out-dir", str(out)],
                user_pkg, tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = _table_rows((out / "table.md").read_text())
    assert rows["adam"][-1] == "ok"
    assert rows["tngd"][-1].startswith("failed: CapacityError:") and "cells" in rows["tngd"][-1]
    assert rows["sgd"][-1].startswith("diverged at step ")
    res = json.loads((out / "results.json").read_text())
    sgd = next(r for r in res["runs"] if r["label"] == "sgd")
    assert sgd["divergence"]["step"] >= 0


def test_a_library_failure_mid_run_is_a_failed_row(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # what Shampoo does at some learning rates: torch's SVD raises on non-finite input mid-run
    import host.tasks as tasks

    calls = {"n": 0}
    real = tasks._Torch.step

    def flaky(self: tasks._Torch, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        if isinstance(self.opt, torch.optim.SGD):
            calls["n"] += 1
            if calls["n"] == 3:
                raise torch._C._LinAlgError("linalg.svd: The algorithm failed to converge because the input "
                                            "matrix contained non-finite values.")
        return real(self, model, x, y)

    monkeypatch.setattr(tasks._Torch, "step", flaky)
    rc = main(["compare", "--task", "digits", "--optimizers", "sgd,adam", "--steps", "5", "--no-progress",
               "--out-dir", str(tmp_path)])
    assert rc == 0
    rows = _table_rows((tmp_path / "table.md").read_text())
    assert rows["sgd"][-1].startswith("failed: _LinAlgError: linalg.svd") and rows["adam"][-1] == "ok"


def test_divergence_rule() -> None:
    d = Divergence(factor=10.0, rise=2.0, patience=20, window=5)
    assert d.check([2.3] * 100) is None
    # a flat loss with 25% mini-batch noise: r = 0.25 / sqrt(20) = 0.056 and 2 (1 - 3 r) > 1 + 3 r,
    # so the rising rule stays quiet (see Divergence); no 5-step mean reaches 10 x loss[0] either
    noisy = list(2.0 + 0.5 * np.random.default_rng(0).standard_normal(300))
    assert noisy[0] > 1.0
    assert all(d.check(noisy[:k]) is None for k in range(1, 301))
    blowup = [2.0] * 3 + [30.0] * 5
    assert "10 x its start" in (d.check(blowup) or "")
    rising = [2.0 - 0.01 * k for k in range(50)] + [1.5 + 0.05 * k for k in range(60)]
    why = d.check(rising)
    assert why is not None and why.startswith("loss rising")
    # it cannot fire before the last 20 steps average above 2 x the best 20-step mean (~1.6):
    # the mean of steps k-19..k of the rising part first exceeds 3.2 at 1.5 + 0.05 (j - 9.5) > 3.2
    first = next(k for k in range(1, len(rising) + 1) if d.check(rising[:k]) is not None)
    assert first >= 50 + 34


def test_lm_schedule_is_applied_through_train_and_refused_where_meaningless() -> None:
    plain = train("digits", "tngd", steps=4, eval_every=4)
    assert plain.final_damping == pytest.approx(0.01)
    rec = train("digits", "tngd", steps=4, eval_every=4, lm=LevenbergMarquardt())
    # every step moves lambda by alpha^{+-1} = (2/3)^{+-1}: after 4 steps it is 0.01 (3/2)^k, k != 0
    # when the steps do not cancel exactly; an odd count cannot cancel
    rec5 = train("digits", "tngd", steps=5, eval_every=5, lm=LevenbergMarquardt())
    for r in (rec, rec5):
        k = np.log(r.final_damping / 0.01) / np.log(1.5)
        assert abs(k - round(k)) < 1e-9
    assert rec5.final_damping != pytest.approx(0.01)
    assert rec.hparams["lm"].startswith("LevenbergMarquardt(")
    with pytest.raises(InvalidInputError, match="lm= applies to tngd"):
        train("digits", "adam", steps=1, lm=LevenbergMarquardt())
    with pytest.raises(InvalidInputError, match="does not take"):
        train("digits", "ngd", steps=1, betas_typo=0.9)


def test_kfac_on_a_bare_linear_layer() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    task = Task("lin", Dataset("lin", x[:48], y[:48], x[48:], y[48:], 2), lambda: nn.Linear(5, 2),
                batch_size=16, steps=6, eval_every=3)
    rec = train(task, "kfac", steps=6)
    assert len(rec.loss) == 6 and np.isfinite(rec.loss).all() and rec.status == "ok"
    assert rec.loss[-1] < rec.loss[0]


def test_the_registry_holds_lazy_builtins() -> None:
    TASKS["lazy-demo"] = "host.tasks:TASKS.digits"  # not a Task: refused with a clear message
    try:
        with pytest.raises(InvalidInputError, match="lazy-demo|TASKS.digits"):
            task_named("lazy-demo")
    finally:
        dict.pop(TASKS, "lazy-demo")
    import host.tasks as tasks

    tasks._demo_task = lambda: Task("demo", "digits", lambda: nn.Linear(64, 10), steps=2)  # type: ignore[attr-defined]
    TASKS["demo"] = "host.tasks:_demo_task"
    try:
        assert isinstance(dict.__getitem__(TASKS, "demo"), str)  # nothing imported yet
        assert task_named("demo").name == "demo" and isinstance(dict.__getitem__(TASKS, "demo"), Task)
    finally:
        dict.pop(TASKS, "demo")
        del tasks._demo_task  # type: ignore[attr-defined]
