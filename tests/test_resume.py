"""An interrupted training run resumes from its checkpoint and ends exactly where the
uninterrupted run ends: parameters, optimizer state, device state and noise stream, data order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from host.tasks import train
from protocol.errors import InvalidInputError

NOISY = {"noise.kappa": 1e-3}  # the device's noise stream matters: only a snapshot can resume it


def _params(path) -> np.ndarray:
    sd = torch.load(path, weights_only=True)["model"]
    return torch.cat([v.reshape(-1) for v in sd.values()]).numpy()


@pytest.mark.parametrize("optimizer", ["tngd", "tngd-adam", "adam", "kfac"])
def test_resume_gives_the_uninterrupted_result_bit_for_bit(optimizer, tmp_path):
    kw = {"steps": 12, "eval_every": 4, "device_overrides": NOISY if optimizer.startswith("tngd") else None}
    whole = train("digits", optimizer, checkpoint=tmp_path / "whole.pt", **kw)
    part = tmp_path / "part.pt"
    # the "interrupted" run: it checkpoints every 5 steps and dies after its step-10 checkpoint
    train("digits", optimizer, checkpoint=part, checkpoint_every=5, **{**kw, "steps": 10})
    resumed = train("digits", optimizer, checkpoint=tmp_path / "resumed.pt", resume=part, **kw)
    assert resumed.loss == whole.loss  # every step's loss, the first 10 carried by the checkpoint
    assert np.array_equal(_params(tmp_path / "resumed.pt"), _params(tmp_path / "whole.pt"))
    assert resumed.test_accuracy[-1] == whole.test_accuracy[-1]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    ck = tmp_path / "adam.pt"
    train("digits", "adam", steps=2, checkpoint=ck)
    with pytest.raises(InvalidInputError, match="adam"):
        train("digits", "sgd", steps=4, resume=ck)
    with pytest.raises(InvalidInputError, match="no checkpoint"):
        train("digits", "adam", steps=4, resume=tmp_path / "missing.pt")


def test_the_train_command_resumes_a_killed_run(tmp_path):
    from host.cli import main

    common = ["train", "--task", "digits", "--optimizer", "tngd", "--kappa", "1e-3", "--eval-every", "3"]
    assert main([*common, "--steps", "6", "--out", str(tmp_path / "whole.json")]) == 0
    assert main([*common, "--steps", "3", "--out", str(tmp_path / "part.json")]) == 0
    assert main([*common, "--steps", "6", "--resume", str(tmp_path / "part.pt"),
                 "--out", str(tmp_path / "resumed.json")]) == 0
    assert np.array_equal(_params(tmp_path / "resumed.pt"), _params(tmp_path / "whole.pt"))
