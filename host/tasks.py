"""Training tasks: a data set, a model, and a loop that runs any optimizer on them.

``train(task, optimizer, ...)`` returns a ``RunRecord`` with the per-step training loss (the
mini-batch loss at theta_k, before the step), held-out test accuracy and loss at regular steps,
and wall-clock per step split into host time and the emulator's time (the part a real device
replaces by its analog time, which is recorded too).

Optimizers by name (``OPTIMIZERS``): "tngd", "tngd-adam" (on a device), "ngd" (exact, Woodbury),
"ngd-cg", and the digital ones, all from libraries: "adam", "sgd" (torch.optim), "kfac" (asdl's
``KfacGradientMaker`` with torch.optim.SGD), "shampoo" and "soap" (pytorch-optimizer).
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from protocol.errors import CapacityError, InvalidInputError

from . import checkpoint as checkpoint_io
from . import datasets
from .connect import connect
from .pool import DeviceSpec, PoolConfig, TiledDevice, device_cells, open_pool
from .tiling import plan_for_model
from .torch_optimizer import NGDOptimizer, TNGDOptimizer

OPTIMIZERS = ("tngd", "tngd-adam", "ngd", "ngd-cg", "adam", "sgd", "kfac", "shampoo", "soap")
DEVICE_OPTIMIZERS = ("tngd", "tngd-adam")

# The TNGD paper's projection of its hardware (App. C): 16-bit converters and 50 Gb/s transfer.
PAPER_TRANSFER_BPS = 50e9


def mlp(n_in: int, hidden: int, n_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


def small_cnn(n_out: int = 10, channels: int = 2, hidden: int = 32) -> nn.Module:
    """One conv layer and two dense layers, as the TNGD paper's MNIST model; kept small (a few
    thousand parameters) so that each parameter is one emulated cell."""
    return nn.Sequential(nn.Conv2d(1, channels, 5, stride=3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(channels * 8 * 8, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


@dataclass(frozen=True)
class Task:
    """A model factory, a data set and a loss: what ``train`` and ``thermo-host train/compare`` run.

    Attributes:
        name: used in labels and output file names.
        dataset: a registered data set name (``host.datasets.load``), a ``Dataset``, or a callable
            returning one (called once per run; load lazily there, not at import).
        model: builds a fresh ``nn.Module`` (called after ``torch.manual_seed(seed)``).
        batch_size, steps, eval_every: the run's defaults (the command line overrides them).
        loss: the training loss; "cross_entropy" (class-index targets) is what the training loop,
            the curvature and every baseline implement.
        defaults: per-optimizer hyperparameters for this task, over ``DEFAULTS``, e.g.
            ``{"ngd": {"lr": 0.03}}`` (the digits defaults do not carry over to every model).
    """

    name: str
    dataset: str | datasets.Dataset | Callable[[], datasets.Dataset]
    model: Callable[[], nn.Module]
    batch_size: int = 32
    steps: int = 300
    eval_every: int = 25
    loss: str = "cross_entropy"
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss not in TASK_LOSSES:
            raise InvalidInputError(f"task {self.name!r}: loss {self.loss!r} is not supported (supported: "
                                    f"{', '.join(TASK_LOSSES)})")
        for key in ("batch_size", "steps", "eval_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidInputError(f"task {self.name!r}: {key} must be a positive integer, got {value!r}")
        if not callable(self.model):
            raise InvalidInputError(f"task {self.name!r}: model must be a callable returning an nn.Module")

    def load_data(self) -> datasets.Dataset:
        """The task's data set (loaded now)."""
        src = self.dataset
        if isinstance(src, datasets.Dataset):
            return src
        if isinstance(src, str):
            return datasets.load(src)
        if callable(src):
            out = src()
            if not isinstance(out, datasets.Dataset):
                raise InvalidInputError(f"task {self.name!r}: its dataset callable returned "
                                        f"{type(out).__name__}, not a host.datasets.Dataset")
            return out
        raise InvalidInputError(f"task {self.name!r}: dataset must be a name, a Dataset or a callable, "
                                f"got {type(src).__name__}")


TASK_LOSSES = ("cross_entropy",)
# Entry-point group under which installed packages register tasks (as backends register under
# "thermo_device.backends"): ``[project.entry-points."thermo_ngd.tasks"] fashion = "pkg.mod:task"``.
TASK_GROUP = "thermo_ngd.tasks"


class TaskRegistry(dict):
    """Built-in tasks by name. A value is a ``Task`` or, for a built-in whose module is heavy or
    optional, a lazy ``"module:attribute"`` string imported (and replaced by its Task) on first use;
    ``TASKS["x"]`` always returns a Task."""

    def __getitem__(self, name: str) -> Task:
        value = super().__getitem__(name)
        if isinstance(value, str):
            value = _resolve_task(_import_target(value, name), value)
            super().__setitem__(name, value)
        return value

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return self[name] if name in self else default

    def values(self) -> Any:  # type: ignore[override]
        return [self[k] for k in self]

    def items(self) -> Any:  # type: ignore[override]
        return [(k, self[k]) for k in self]


TASKS: TaskRegistry = TaskRegistry({
    "digits": Task("digits", "digits", lambda: mlp(64, 32, 10), batch_size=32, steps=300, eval_every=25),
    "mnist": Task("mnist", "mnist", lambda: small_cnn(10), batch_size=64, steps=1570, eval_every=157),
    # MiniLM + LoRA on WordNet glosses (issue 17; the [lm] extra): lazy, so transformers loads only when it runs
    "wordnet-minilm": "host.tasks_lm:wordnet_minilm_task",
})


def _import_target(target: str, what: str) -> Any:
    """Import ``"module:attribute"`` (dots in the attribute walk into it)."""
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise InvalidInputError(f"task {what!r}: expected 'module:callable', got {target!r}")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise InvalidInputError(f"task {what!r}: cannot import module {module!r} ({exc}); is its package "
                                "installed or on PYTHONPATH?") from exc
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise InvalidInputError(f"task {what!r}: module {module!r} has no attribute {attr!r}") from None
    return obj


def _resolve_task(obj: Any, what: str) -> Task:
    """A Task from a Task or a zero-argument callable returning one."""
    if callable(obj) and not isinstance(obj, Task):
        obj = obj()
    if not isinstance(obj, Task):
        raise InvalidInputError(f"task {what!r} is a {type(obj).__name__}, not a host.tasks.Task (or a "
                                "callable returning one)")
    return obj


def task_entry_points() -> dict[str, str]:
    """Installed plug-in tasks: name -> "module:attribute" (the ``thermo_ngd.tasks`` group)."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=TASK_GROUP)}


# Learning rates from the sweep in benchmarks/bench_tngd_sweep.py (digits, 300 steps, seed 0; the
# lowest final training loss on a half-decade grid; results in benchmarks/results/sweep_digits.json).
# TNGD's lr is not NGD's best (0.3): at t = 50 tau with warm start the flat directions keep ~60% of
# the previous step (e^{-lambda t} = e^{-0.5}), an extra momentum that made lr 0.3 diverge, so TNGD
# runs at 0.1 (see docs/results.md). t = 50 tau and lambda = 0.01 are the paper's MNIST values.
DEFAULTS: dict[str, dict[str, Any]] = {
    # "auto": 50 tau when the device's declared noise lets 50 tau meet the 10 % target (the ideal
    # chip: exactly the fixed readout), a longer, planned readout otherwise (host.readout_plan)
    "tngd": {"lr": 0.1, "analog_time": "auto", "damping": 0.01, "offset_cancel": "auto"},
    "tngd-adam": {"lr": 1e-2, "analog_time": "auto", "damping": 0.01, "offset_cancel": "auto"},
    "ngd": {"lr": 0.3, "damping": 0.01},
    "ngd-cg": {"lr": 0.3, "damping": 0.01, "cg_maxiter": 20},
    "adam": {"lr": 3e-2},
    "sgd": {"lr": 1.0},
    "kfac": {"lr": 0.1, "damping": 0.01},
    "shampoo": {"lr": 1.0},
    "soap": {"lr": 3e-2},
}


class Stepper:
    """Uniform face for the training loop: ``step(model, x, y) -> loss`` plus timing of the last step."""

    emulator_s: float = 0.0
    analog_s: float = 0.0

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)  # type: ignore[attr-defined]

    def close(self) -> None:
        """Release what the optimizer holds (a device optimizer: its device or daemon session)."""


class _Curvature(Stepper):
    def __init__(self, opt: TNGDOptimizer | NGDOptimizer) -> None:
        self.opt = opt
        self.residuals: list[list[float]] = []

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = float(self.opt.step(model, x, y))
        if isinstance(self.opt, TNGDOptimizer) and self.opt.engine.lm is not None:
            # the LM schedule: one forward pass on the same batch moves lambda for the next step
            self.opt.adapt_damping(model, x, y)
        if isinstance(self.opt, TNGDOptimizer):
            self.emulator_s = self.opt.last.device_wall_s
            self.analog_s = self.opt.last.analog_time_s
            dev = self.opt.engine.device
            if isinstance(dev, TiledDevice):  # the refinement's residual after each sweep
                self.residuals.append(list(dev.last.get("residuals", [])))
        return loss

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def close(self) -> None:
        if isinstance(self.opt, TNGDOptimizer):
            self.opt.close()


class _Torch(Stepper):
    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        self.opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()


class _Kfac(Stepper):
    """asdl's K-FAC: it preconditions ``.grad`` in place; torch.optim.SGD takes the step."""

    def __init__(self, model: nn.Module, lr: float, damping: float, batch_size: int) -> None:
        from asdl import KfacGradientMaker, PreconditioningConfig

        # asdl keys its factors by module name, and a bare layer (nn.Linear as the whole model) is
        # named "": it raises KeyError. A container around the same module names it "0" and
        # computes the same function with the same parameters.
        self.wrapped = nn.Sequential(model) if not any(True for _ in model.children()) else model
        self.maker = KfacGradientMaker(self.wrapped, PreconditioningConfig(data_size=batch_size, damping=damping),
                                       fisher_type="fisher_exact", loss_type="cross_entropy")
        self.opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        self.opt.zero_grad()
        dummy = self.maker.setup_model_call(self.wrapped, x)
        self.maker.setup_loss_call(F.cross_entropy, dummy, y)
        _, loss = self.maker.forward_and_backward()
        self.opt.step()
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"sgd": self.opt.state_dict(), "asdl": dict(self.maker.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # asdl recomputes its Kronecker factors from each batch (fisher_exact, no running average),
        # so the SGD state is all that carries over
        self.opt.load_state_dict(state["sgd"])


def make_stepper(name: str, model: nn.Module, *, batch_size: int, device: str = "embedded:ideal",
                 device_overrides: dict[str, Any] | None = None, seed: int = 0, pool: PoolConfig | None = None,
                 **hparams: Any) -> Stepper:
    """An optimizer by name with ``DEFAULTS[name]`` updated by ``hparams``.

    A device optimizer runs on one device of ``device``, which must have a cell per parameter
    (an embedded device keeps its profile's cells: it is never enlarged to fit), or, with
    ``pool``, on tiles of the model over a pool of such devices (``host.pool``).
    """
    if name not in OPTIMIZERS:
        raise InvalidInputError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")
    hp = {**DEFAULTS[name], **{k: v for k, v in hparams.items() if v is not None}}
    _check_options(name, hp)
    params = model.parameters()
    if name in DEVICE_OPTIMIZERS:
        dev = _open_device(model, device, device_overrides, seed, pool)
        inner = "adam" if name == "tngd-adam" else "sgd"
        try:
            return _Curvature(TNGDOptimizer(params, dev, inner=inner, **hp))
        except BaseException:
            dev.close()  # a daemon session must not outlive a constructor that refused its options
            raise
    if name in ("ngd", "ngd-cg"):
        return _Curvature(NGDOptimizer(params, method="exact" if name == "ngd" else "cg", **hp))
    if name == "kfac":
        return _Kfac(model, hp["lr"], hp["damping"], batch_size)
    if name in ("adam", "sgd"):
        cls: Any = torch.optim.Adam if name == "adam" else torch.optim.SGD
    else:
        import pytorch_optimizer

        cls = pytorch_optimizer.Shampoo if name == "shampoo" else pytorch_optimizer.SOAP
    try:
        return _Torch(cls(params, **hp))
    except TypeError as exc:  # an option the library's optimizer does not take
        raise InvalidInputError(f"optimizer {name!r}: {exc}") from None


def _check_options(name: str, hp: dict[str, Any]) -> None:
    """Refuse an option the optimizer would not apply, naming the ones it takes (an option that
    is accepted and silently ignored is worse than an error)."""
    if name in DEVICE_OPTIMIZERS:
        return _check_signature(name, TNGDOptimizer.__init__, hp, skip=("params", "device", "inner"))
    if "lm" in hp:
        raise InvalidInputError(f"optimizer {name!r} has no damping schedule: lm= applies to tngd and tngd-adam")
    if name in ("ngd", "ngd-cg"):
        return _check_signature(name, NGDOptimizer.__init__, hp, skip=("params", "method"))
    if name == "kfac":
        extra = set(hp) - {"lr", "damping"}
        if extra:
            raise InvalidInputError(f"optimizer 'kfac' does not take {', '.join(sorted(extra))} (it takes lr, damping)")
    return None


def _check_signature(name: str, fn: Callable[..., Any], hp: dict[str, Any], skip: tuple[str, ...]) -> None:
    import inspect

    taken = [p for p in inspect.signature(fn).parameters if p not in ("self", *skip)]
    extra = sorted(set(hp) - set(taken))
    if extra:
        raise InvalidInputError(f"optimizer {name!r} does not take {', '.join(extra)} (it takes {', '.join(taken)})")


def _open_device(model: nn.Module, device: str, overrides: dict[str, Any] | None, seed: int,
                 pool: PoolConfig | None) -> Any:
    """The device (or tiled pool) a device optimizer runs on; refuses a model that does not fit."""
    embedded = device == "embedded" or device.startswith("embedded:")
    # profile overrides mean something to an embedded device only (a daemon has its own profile)
    spec = DeviceSpec(device, dict(overrides) if overrides and embedded else None)
    if pool is not None:
        cells = pool.cells if pool.cells is not None else device_cells(spec, seed)
        return open_pool(plan_for_model(model, cells, pool.tiles), spec, pool, seed)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dev = spec.open(seed)
    cells = dev.capabilities().cells
    if n > cells:
        dev.close()
        raise CapacityError(f"the model has N = {n} parameters but device {device!r} has {cells} cells: tile it "
                            "(thermo-host train --tiles layer [--pool-devices K]; train(..., pool=PoolConfig())) "
                            "or, for an embedded device, give the cells explicitly "
                            f"(--overrides '{{\"device.cells\": {n}}}')")
    return dev


class DivergedError(FloatingPointError):
    """The loss became NaN or infinite (no later step can mean anything); ``step`` says when."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass(frozen=True)
class Divergence:
    """When a run counts as diverging (reported in ``RunRecord.divergence`` with the step).

    * blow-up: the mini-batch loss averaged over the last ``window`` steps exceeds ``factor`` x
      its value at the initial parameters (step 0);
    * rising for many steps: the mean loss of the last ``patience`` steps exceeds ``rise`` x the
      lowest mean of any earlier ``patience``-step stretch that ends before this one begins.
      Mini-batch noise alone does not trigger it: with per-step relative spread s = std / mean of
      a flat loss, both means are within 3 s / sqrt(patience) of the mean (3 sigma), so it stays
      quiet while rise (1 - 3 r) > 1 + 3 r, r = s / sqrt(patience): for the defaults (rise 2,
      patience 50) up to s = 0.78, noisier than a converged mini-batch loss.
    ``stop=True`` ends the run at the first sign (a sweep does); by default the run goes on so that
    every optimizer's curve has all its steps.
    """

    factor: float = 10.0
    rise: float = 2.0
    patience: int = 50
    window: int = 10
    stop: bool = False

    def __post_init__(self) -> None:
        if not (self.factor > 1.0 and self.rise > 1.0 and self.patience >= 1 and self.window >= 1):
            raise InvalidInputError("Divergence needs factor > 1, rise > 1, patience >= 1 and window >= 1")

    def check(self, loss: list[float]) -> str | None:
        """Why ``loss`` (per step so far) looks divergent at its last step, or None."""
        if len(loss) < 2:
            return None
        w, p = self.window, self.patience
        start = float(loss[0])
        now = float(np.mean(loss[-w:]))
        if now > self.factor * start:
            return f"loss {now:.4g} (mean of last {min(w, len(loss))} steps) > {self.factor:g} x its start {start:.4g}"
        if len(loss) < 2 * p:
            return None
        c = np.cumsum(np.insert(np.asarray(loss, dtype=float), 0, 0.0))
        means = (c[p:] - c[:-p]) / p  # means[j]: steps j .. j + p - 1
        earlier = means[:len(means) - p]  # stretches that end before the last one begins
        best = int(np.argmin(earlier))
        if means[-1] > self.rise * earlier[best]:
            return (f"loss rising: mean {means[-1]:.4g} over the last {p} steps > {self.rise:g} x {earlier[best]:.4g} "
                    f"over steps {best}-{best + p - 1}")
        return None


@dataclass
class RunRecord:
    """Everything a run measured; ``to_json`` for the results file."""

    task: str
    optimizer: str
    label: str
    hparams: dict[str, Any]
    device: str | None
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)  # mini-batch loss at theta_k
    wall_s: list[float] = field(default_factory=list)  # cumulative wall time after step k
    emulator_s: list[float] = field(default_factory=list)  # cumulative time inside the emulator
    analog_s: list[float] = field(default_factory=list)  # cumulative emulated analog time
    eval_steps: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_loss_full: float = float("nan")
    train_accuracy: float = float("nan")
    n_params: int = 0
    peak_rss_mb: float = 0.0
    tiles: dict[str, Any] = field(default_factory=dict)  # a tiled run: plan, pool, residuals per step
    # None while training is healthy; else {"step", "reason"} of the first sign (see Divergence)
    divergence: dict[str, Any] | None = None
    failed: str | None = None  # "<ExceptionType>: <message>" when the optimizer raised (compare)
    final_damping: float | None = None  # lambda after the run (moves with an LM schedule)

    @property
    def status(self) -> str:
        """"ok", "diverged at step K: <why>" or "failed: <why>" (one line, for tables)."""
        if self.failed is not None:
            return f"failed: {self.failed}"
        if self.divergence is not None:
            return f"diverged at step {self.divergence['step']}: {self.divergence['reason']}"
        return "ok"

    def summary(self) -> dict[str, Any]:
        """Per-run numbers. Times per step leave out the first step, whose wall time (numba's
        just-in-time compilation on a device run: seconds) is ``first_step_ms`` on its own."""
        k = max(1, len(self.loss))
        tail = self.loss[-max(1, k // 10):]
        total = self.wall_s[-1] if self.wall_s else 0.0
        emu = self.emulator_s[-1] if self.emulator_s else 0.0
        analog = self.analog_s[-1] if self.analog_s else 0.0
        first, first_emu = (self.wall_s[0], self.emulator_s[0]) if len(self.wall_s) > 1 else (0.0, 0.0)
        rest = max(1, k - 1) if len(self.wall_s) > 1 else k
        return {
            "label": self.label, "optimizer": self.optimizer, "steps": len(self.loss), "status": self.status,
            "final_loss_avg10pct": float(np.mean(tail)) if self.loss else float("nan"),
            "train_loss_full": self.train_loss_full, "train_accuracy": self.train_accuracy,
            "test_accuracy": self.test_accuracy[-1] if self.test_accuracy else float("nan"),
            "best_test_accuracy": max(self.test_accuracy) if self.test_accuracy else float("nan"),
            "first_step_ms": 1e3 * (self.wall_s[0] if self.wall_s else 0.0),
            "wall_ms_per_step": 1e3 * (total - first) / rest,
            "host_ms_per_step": 1e3 * ((total - emu) - (first - first_emu)) / rest,
            "emulator_ms_per_step": 1e3 * (emu - first_emu) / rest, "analog_us_per_step": 1e6 * analog / k,
        }

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on a whole split."""
    out = model(x)
    return float((out.argmax(1) == y).float().mean()), float(F.cross_entropy(out, y))


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train(task: str | Task, optimizer: str, *, steps: int | None = None, batch_size: int | None = None,
          seed: int = 0, device: str = "embedded:ideal", device_overrides: dict[str, Any] | None = None,
          label: str | None = None, eval_every: int | None = None, progress: bool = False,
          checkpoint: str | Path | None = None, data: datasets.Dataset | None = None,
          blas_threads: int | None = 1, torch_threads: int | None = 1, checkpoint_every: int | None = None,
          resume: str | Path | None = None, pool: PoolConfig | None = None,
          divergence: Divergence | None = None, **hparams: Any) -> RunRecord:
    """Train ``task``'s model from a seeded initialisation with one optimizer; see the module doc.

    ``blas_threads`` caps NumPy's BLAS threads for the run (None: leave them). Why: once torch has
    run, its idle OpenMP workers compete with OpenBLAS's threads, and on this 2-core machine under
    load the emulator's SVD then took 1-4 s instead of ~0.2 s single-threaded. It also fixes the
    numbers: multi-threaded BLAS rounds differently, and a daemon (``thermo-device serve
    --blas-threads``, default 1) gives the embedded emulator's bits only with the same count.
    ``torch_threads`` likewise sets torch's intra-op threads for the run (restored afterwards;
    None: leave them). Why: these models are small, and with two threads on 2 shared cores a
    busy neighbour made per-step times 5-20x worse (MNIST Adam 67 ms/step at load 3-4 against
    3.4 ms with one thread; docs/results.md, Timing).
    ``checkpoint_every=K`` also writes ``checkpoint`` every K steps; ``resume=PATH`` continues a
    run from such a checkpoint and ends exactly where the uninterrupted run would have
    (``host.checkpoint``: model, optimizer and device state, data order, RNGs, the record so far).
    ``task`` is a Task or any name ``task_named`` resolves (built-in, plug-in, "module:callable").
    ``divergence`` (default ``Divergence()``) flags a run whose loss blows up or keeps rising, in
    ``RunRecord.divergence``; a NaN or infinite loss raises ``DivergedError``. Every option in
    ``hparams`` is applied or refused with InvalidInputError: ``lm=LevenbergMarquardt()`` (tngd,
    tngd-adam) moves lambda after every step (one extra forward pass on the batch). A device the
    run opened (a daemon session included) is closed when it ends, by success or by error.
    """
    threads_before = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    limiter = None
    if blas_threads is not None:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(blas_threads, user_api="blas")
    try:
        return _train(task, optimizer, steps=steps, batch_size=batch_size, seed=seed, device=device,
                      device_overrides=device_overrides, label=label, eval_every=eval_every,
                      progress=progress, checkpoint=checkpoint, data=data,
                      checkpoint_every=checkpoint_every, resume=resume, pool=pool,
                      divergence=divergence if divergence is not None else Divergence(), **hparams)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
        torch.set_num_threads(threads_before)


def _train(task: str | Task, optimizer: str, *, steps: int | None, batch_size: int | None, seed: int,
           device: str, device_overrides: dict[str, Any] | None, label: str | None, eval_every: int | None,
           progress: bool, checkpoint: str | Path | None, data: datasets.Dataset | None,
           checkpoint_every: int | None = None, resume: str | Path | None = None,
           pool: PoolConfig | None = None, divergence: Divergence | None = None, **hparams: Any) -> RunRecord:
    t = task_named(task)
    ds = data if data is not None else t.load_data()
    # the task's own defaults sit between DEFAULTS and what the caller passes (None: not passed)
    hparams = {**t.defaults.get(optimizer, {}), **{k: v for k, v in hparams.items() if v is not None}}
    steps = t.steps if steps is None else steps
    bs = t.batch_size if batch_size is None else batch_size
    every = t.eval_every if eval_every is None else eval_every
    torch.manual_seed(seed)
    model = t.model()
    stepper = make_stepper(optimizer, model, batch_size=bs, device=device, device_overrides=device_overrides,
                           seed=seed, pool=pool if optimizer in DEVICE_OPTIMIZERS else None, **hparams)
    try:
        return _run(t, ds, model, stepper, optimizer, steps=steps, bs=bs, every=every, seed=seed, device=device,
                    device_overrides=device_overrides, label=label, progress=progress, checkpoint=checkpoint,
                    checkpoint_every=checkpoint_every, resume=resume, pool=pool, divergence=divergence,
                    hparams=hparams)
    finally:
        # the device (a daemon session: a board behind it stays locked while it is open) and a
        # tile pool's threads or actors end with the run, whether it succeeded or raised
        tiled = _tiled_device(stepper)
        if tiled is not None:
            tiled.close()
        stepper.close()


def _run(t: Task, ds: datasets.Dataset, model: nn.Module, stepper: Stepper, optimizer: str, *, steps: int,
         bs: int, every: int, seed: int, device: str, device_overrides: dict[str, Any] | None,
         label: str | None, progress: bool, checkpoint: str | Path | None, checkpoint_every: int | None,
         resume: str | Path | None, pool: PoolConfig | None, divergence: Divergence | None,
         hparams: dict[str, Any]) -> RunRecord:
    hp = {k: _plain(v) for k, v in {**DEFAULTS[optimizer], **hparams}.items() if v is not None}
    rec = RunRecord(t.name, optimizer, label or optimizer, hp,
                    device if optimizer in DEVICE_OPTIMIZERS else None,
                    n_params=sum(p.numel() for p in model.parameters()))
    if device_overrides and optimizer in DEVICE_OPTIMIZERS:
        rec.hparams["device_overrides"] = dict(device_overrides)
    if pool is not None and optimizer in DEVICE_OPTIMIZERS:
        rec.hparams["pool"] = pool.to_plain()
    x_tr, y_tr = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    x_te, y_te = torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)
    rng = np.random.default_rng(seed)  # the batch order: the same for every optimizer at one seed
    order = rng.permutation(len(x_tr))
    pos = 0
    wall = emu = analog = 0.0
    start = 0
    if resume is not None:
        ck = checkpoint_io.load(resume, task=t.name, optimizer=optimizer)
        model.load_state_dict(ck["model"])
        stepper.load_state_dict(ck["optimizer"])
        rng, order, pos = checkpoint_io.rng_from_plain(ck["rng"]), ck["order"].numpy(), int(ck["pos"])
        torch.set_rng_state(ck["torch_rng"])
        for name in checkpoint_io.RECORD_LISTS:
            setattr(rec, name, list(ck["record"][name]))
        start = int(ck["step"])
        wall, emu, analog = (rec.wall_s[-1], rec.emulator_s[-1], rec.analog_s[-1]) if start else (0.0, 0.0, 0.0)

    def save_checkpoint(done: int) -> None:
        checkpoint_io.save(checkpoint, {
            "model": model.state_dict(), "optimizer": stepper.state_dict(), "step": done, "steps": steps,
            "task": t.name, "optimizer_name": optimizer, "hparams": rec.hparams,
            "rng": checkpoint_io.rng_to_plain(rng), "order": torch.from_numpy(order.copy()), "pos": pos,
            "torch_rng": torch.get_rng_state(),
            "record": {name: list(getattr(rec, name)) for name in checkpoint_io.RECORD_LISTS}})

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc=rec.label, unit="step", leave=False)
    for k in range(start, steps):
        if pos + bs > len(order):
            order, pos = rng.permutation(len(x_tr)), 0
        idx = torch.from_numpy(order[pos:pos + bs])
        pos += bs
        t0 = time.perf_counter()
        loss = stepper.step(model, x_tr[idx], y_tr[idx])
        wall += time.perf_counter() - t0
        emu += stepper.emulator_s
        analog += stepper.analog_s
        if not np.isfinite(loss):
            raise DivergedError(f"{rec.label}: loss became {loss} at step {k}", k)
        rec.steps.append(k)
        rec.loss.append(loss)
        rec.wall_s.append(wall)
        rec.emulator_s.append(emu)
        rec.analog_s.append(analog)
        if divergence is not None and rec.divergence is None:
            why = divergence.check(rec.loss)
            if why is not None:
                rec.divergence = {"step": k, "reason": why}
                if divergence.stop:
                    break
        if (k + 1) % every == 0 or k + 1 == steps:
            acc, tl = evaluate(model, x_te, y_te)
            rec.eval_steps.append(k + 1)
            rec.test_accuracy.append(acc)
            rec.test_loss.append(tl)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", test_acc=f"{acc:.3f}")
        if bar is not None:
            bar.update(1)
        if checkpoint is not None and checkpoint_every and (k + 1) % checkpoint_every == 0 and k + 1 < steps:
            save_checkpoint(k + 1)
    if bar is not None:
        bar.close()
    rec.train_accuracy, rec.train_loss_full = evaluate(model, x_tr, y_tr)
    rec.peak_rss_mb = _peak_rss_mb()
    if checkpoint is not None:
        save_checkpoint(steps)
    tiled = _tiled_device(stepper)
    if tiled is not None:  # closed by the caller, after this
        rec.tiles = {"info": tiled.info(), "residuals": list(getattr(stepper, "residuals", []))}
    if isinstance(getattr(stepper, "opt", None), TNGDOptimizer):
        rec.final_damping = float(stepper.opt.damping)  # type: ignore[attr-defined]
    return rec


def _plain(value: Any) -> Any:
    """A hyperparameter as results JSON and checkpoints hold it (an object such as an LM schedule
    by its repr, which names its settings)."""
    return value if isinstance(value, (int, float, str, bool, list, tuple, dict)) else repr(value)


def _tiled_device(stepper: Stepper) -> TiledDevice | None:
    dev = getattr(getattr(getattr(stepper, "opt", None), "engine", None), "device", None)
    return dev if isinstance(dev, TiledDevice) else None


def _analog_tau_per_step(rec: RunRecord) -> float:
    """The analog time a run used per step, in tau: measured (a noise-aware readout varies it) on
    an embedded device, whose tau its profile gives; else the settings."""
    fixed = rec.hparams.get("analog_time", 0.0)
    if rec.analog_s and rec.device and rec.device.startswith("embedded"):
        dev = connect(rec.device)
        try:
            run_tau = float(dev.info()["tau_s"])
        finally:
            dev.close()
        return rec.analog_s[-1] / len(rec.analog_s) / run_tau
    return (float(fixed) if not isinstance(fixed, str) else 0.0) + float(rec.hparams.get("delay", 0.0))


def task_named(name: str | Task) -> Task:
    """The task ``name``: a built-in (``TASKS``), an installed plug-in (entry-point group
    ``thermo_ngd.tasks``), or ``"module:callable"`` naming a Task or a callable returning one;
    otherwise an InvalidInputError that lists the known names and the two other forms."""
    if isinstance(name, Task):
        return name
    if name in TASKS:
        return TASKS[name]
    plugins = task_entry_points()
    if name in plugins:
        return _resolve_task(_import_target(plugins[name], name), name)
    if ":" in name:
        return _resolve_task(_import_target(name, name), name)
    known = sorted(set(TASKS) | set(plugins))
    raise InvalidInputError(f"unknown task {name!r} (known: {', '.join(known)}; or module:callable for your "
                            "own, see docs/tasks.md)")


def task_output_size(task: Task, data: datasets.Dataset | None = None) -> int:
    """The model's output size (m = batch x this in the factored curvature): the data set's classes."""
    return int((data if data is not None else task.load_data()).n_classes)


def profile_projected_step_s(rec: RunRecord, batch: int, n_out: int, profile: str = "tngd-paper",
                             bps: float = PAPER_TRANSFER_BPS) -> dict[str, Any]:
    """Per-step time on a device profile's hardware model (TNGD App. C): measured host time +
    analog time + transfers, at the profile's tau and converter widths.

    The profile's ``info()`` gives tau_s, the gradient DAC width (N values in), the coupling
    (resistor-programming) width (m (m + 2N) values in) and the ADC width (N averaged readouts
    out). The link rate is not a profile key: the paper's 50 Gb/s is used. A device on another
    profile is only asked for its facts (no run).
    """
    dev = connect(f"embedded:{profile}")
    try:
        caps = dev.info()["capabilities"]
    finally:
        dev.close()
    n = rec.n_params
    m = batch * n_out
    # 0 bits means an ideal converter: count it as a float64 on the link
    dac, cpl, adc = (int(caps[k]) or 64 for k in ("dac_bits", "coupling_bits", "adc_bits"))
    transfer = (n * dac + m * (m + 2 * n) * cpl + n * adc) / bps
    tau = float(caps["tau_s"])
    analog = _analog_tau_per_step(rec) * tau
    host = rec.summary()["host_ms_per_step"] / 1e3
    return {"profile": profile, "tau_s": tau, "host_s": host, "analog_s": analog, "transfer_s": transfer,
            "total_s": host + analog + transfer}


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, default=float))
