"""Tasks, data sets, the training loop and the train / compare commands (a few steps each)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sklearn  # noqa: E402,F401
import torch  # noqa: E402,F401

from host import datasets
from host.cli import main  # noqa: E402
from host.tasks import Task, mlp, train  # noqa: E402
from protocol.errors import InvalidInputError


def test_digits_dataset_and_a_users_own_data() -> None:
    ds = datasets.load("digits")
    assert ds.x_train.shape[1:] == (64,) and ds.x_train.dtype == np.float32
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert set(np.unique(ds.y_test)) == set(range(10))  # stratified held-out split
    rng = np.random.default_rng(0)
    mine = datasets.Dataset("blobs", rng.standard_normal((40, 3)), rng.integers(0, 2, 40),
                            rng.standard_normal((10, 3)), rng.integers(0, 2, 10), 2)
    datasets.register("blobs", lambda: mine)
    assert datasets.load("blobs") is mine
    with pytest.raises(InvalidInputError):
        datasets.load("imagenet")


def test_mnist_loader_reads_the_wheel_archive() -> None:
    ds = datasets.load("mnist", n_train=64, n_test=32)  # the mnist extra is installed by CI
    assert ds.x_train.shape == (64, 1, 28, 28) and ds.x_test.shape == (32, 1, 28, 28)
    assert ds.x_train.max() <= 1.0 and ds.y_train.max() <= 9


@pytest.mark.parametrize("optimizer", ["tngd", "tngd-adam", "ngd", "ngd-cg", "adam", "sgd"])
def test_every_core_optimizer_trains_a_few_steps(optimizer: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    data = datasets.Dataset("toy", x[:160], y[:160], x[160:], y[160:], 2)
    task = Task("toy", "toy", lambda: mlp(5, 4, 2), batch_size=16, steps=30, eval_every=10)
    lr = {"tngd-adam": 0.03, "adam": 0.03, "sgd": 0.5}.get(optimizer, 0.3)
    rec = train(task, optimizer, data=data, lr=lr)
    assert len(rec.loss) == 30 and rec.eval_steps == [10, 20, 30]
    assert np.mean(rec.loss[-5:]) < np.mean(rec.loss[:5])
    assert rec.test_accuracy[-1] > 0.7
    if optimizer.startswith("tngd"):
        assert rec.analog_s[-1] == pytest.approx(30 * 50e-6)  # 50 tau of 1 us per step
        assert 0.0 < rec.emulator_s[-1] < rec.wall_s[-1]


@pytest.mark.parametrize("optimizer", ["kfac", "shampoo", "soap"])
def test_library_second_order_optimizers(optimizer: str) -> None:
    rec = train("digits", optimizer, steps=8, eval_every=8)
    assert np.isfinite(rec.loss).all() and rec.test_accuracy


def test_cli_train_writes_results_and_a_loadable_checkpoint(tmp_path) -> None:
    out = tmp_path / "run.json"
    rc = main(["train", "--task", "digits", "--optimizer", "tngd", "--steps", "4", "--eval-every", "2",
               "--kappa", "1e-3", "--no-progress", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert len(res["loss"]) == 4 and res["eval_steps"] == [2, 4]
    assert res["hparams"]["device_overrides"] == {"noise.kappa": 1e-3}
    ckpt = torch.load(tmp_path / "run.pt", weights_only=True)
    assert ckpt["steps"] == 4 and ckpt["optimizer"]["extra"]["steps"] == 4
    from host.tasks import TASKS

    model = TASKS["digits"].model()
    model.load_state_dict(ckpt["model"])


def test_cli_compare_writes_table_json_and_plot(tmp_path) -> None:
    rc = main(["compare", "--task", "digits", "--optimizers", "tngd,tngd-noisy,adam", "--steps", "3",
               "--eval-every", "3", "--no-progress", "--out-dir", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["label"] for r in res["runs"]] == ["tngd", "tngd-noisy", "adam"]
    assert res["runs"][1]["hparams"]["device_overrides"]["noise.kappa"] == 1e-3
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == 5 and "tngd-noisy" in table
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_solve_still_works(capsys) -> None:
    assert main(["solve", "--n", "8", "--duration", "50", "--batches", "5"]) == 0
    assert "relative_error_vs_direct" in capsys.readouterr().out
