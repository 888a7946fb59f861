"""Training checkpoints that resume bit for bit: what is saved, and saving it safely.

A checkpoint of ``host.tasks.train`` holds everything the rest of the run depends on:

* the model's parameters and the optimizer's ``state_dict`` (for TNGD that includes the device's
  snapshot: analog state, programs and noise stream, see ``TNGDOptimizer.state_dict``);
* the data order: the batch generator's state, the current permutation and the position in it;
* torch's global RNG (models with dropout draw from it);
* the run record so far (losses, timings, evaluations), so the results file of a resumed run
  covers the whole run.

Files are written to a temporary name and renamed, so an interruption while saving leaves the
previous checkpoint intact. They load with ``torch.load(weights_only=True)``: no pickled code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protocol.device import pcg64_from_plain, pcg64_to_plain
from protocol.errors import InvalidInputError

FORMAT = 1
RECORD_LISTS = ("steps", "loss", "wall_s", "emulator_s", "analog_s", "eval_steps", "test_accuracy", "test_loss")


def rng_to_plain(rng: np.random.Generator) -> dict[str, Any]:
    return pcg64_to_plain(rng.bit_generator.state)


def rng_from_plain(d: dict[str, Any]) -> np.random.Generator:
    rng = np.random.Generator(np.random.PCG64())
    # format-1 checkpoints written before the shared helper lack the generator's name
    rng.bit_generator.state = pcg64_from_plain({"bit_generator": "PCG64", **d}, "the checkpoint's data-order rng")
    return rng


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write keeps the previous checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)


def load(path: str | Path, *, task: str, optimizer: str) -> dict[str, Any]:
    """Read a checkpoint of ``task`` trained with ``optimizer`` (else a clear error)."""
    try:
        ckpt = torch.load(Path(path), weights_only=True)
    except FileNotFoundError:
        raise InvalidInputError(f"no checkpoint at {path}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "step" not in ckpt:
        raise InvalidInputError(f"{path} is not a resumable thermo-ngd checkpoint (format {FORMAT})")
    if ckpt.get("task") != task or ckpt.get("optimizer_name") != optimizer:
        raise InvalidInputError(f"{path} is a checkpoint of task {ckpt.get('task')!r} with optimizer "
                                f"{ckpt.get('optimizer_name')!r}, not {task!r} with {optimizer!r}")
    return ckpt
