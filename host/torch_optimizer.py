"""PyTorch optimizers for TNGD and its digital natural-gradient baselines.

Switching a PyTorch loop from Adam to TNGD::

    dev = host.connect("embedded:ideal")                                       # 1
    with TNGDOptimizer(model.parameters(), dev, lr=0.01, analog_time=50.0,     # 2
                       damping=0.01) as opt:  # closes the device (a daemon session) at the end
        for x, y in batches:
            loss = opt.step(model, x, y)   # 3: replaces zero_grad / loss.backward / step

``step(model, inputs, targets)`` builds the GGN factors and the gradient of the mean loss with
torch.func (``host.curvature``), asks the device for x_bar ~ (G + lambda I)^-1 g, writes x_bar
into each parameter's ``.grad`` and lets an inner ``torch.optim.SGD`` (TNGD) or
``torch.optim.Adam`` (TNGD-Adam) take the step: the digital optimizers are torch's own.

Conventions kept: param groups (per-group ``lr``, ``momentum``, ``betas``, ``eps``,
``weight_decay`` are passed on to the inner optimizer each step, so LR schedulers work);
``state_dict`` / ``load_state_dict`` round-trip everything needed to continue bit for bit: the
inner optimizer's state, the step count, the (possibly adapted) damping, and the device's analog
state, which is restored into the device before the next solve (the warm start survives a
checkpoint). The natural gradient couples all parameters, so one device solve covers every
group; ``analog_time``, ``damping``, ``delay``, ``burn_in`` are therefore optimizer-wide.

The device solve and the Levenberg-Marquardt rule are ``host.tngd_core``'s, the same code
``host.TNGD`` runs; this module adds torch's digital update and torch's checkpoint format.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from protocol.device import Device, DeviceSnapshot
from protocol.drift import Drift
from protocol.errors import InvalidInputError

from .baselines import NGDCG, ExactNGD
from .curvature import Curvature, loss_value, torch_curvature
from .guard import StabilityGuard
from .tngd_core import DeviceCheckpoint, LevenbergMarquardt, StepStats, TNGDCore, TNGDState

_INNER_KEYS = {"sgd": ("lr", "momentum", "weight_decay", "nesterov", "dampening"),
               "adam": ("lr", "betas", "eps", "weight_decay", "amsgrad")}


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base class: curvature -> preconditioned direction -> ``.grad`` -> torch's SGD or Adam.

    Subclasses implement ``_direction(grad, curvature)`` (NumPy vectors, undamped curvature).
    """

    def __init__(self, params: Any, *, lr: float, inner: str = "sgd", momentum: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 loss: str = "cross_entropy", kind: str = "ggn") -> None:
        if inner not in _INNER_KEYS:
            raise InvalidInputError(f"inner must be 'sgd' or 'adam', got {inner!r}")
        defaults = {"lr": lr, "weight_decay": weight_decay}
        if inner == "sgd":
            defaults.update(momentum=momentum, nesterov=False, dampening=0.0)
        else:
            defaults.update(betas=betas, eps=eps, amsgrad=False)
        super().__init__(params, defaults)
        self.inner_name = inner
        cls = torch.optim.SGD if inner == "sgd" else torch.optim.Adam
        self.inner = cls([{"params": g["params"], **self._inner_hparams(g)} for g in self.param_groups])
        self.loss = loss
        self.kind = kind
        self.last_curvature: Curvature | None = None
        self.last_drift: Drift | None = None  # last_curvature as the undamped drift the solve saw
        self.last_direction: np.ndarray | None = None  # the preconditioned gradient of the last step

    def _inner_hparams(self, group: dict[str, Any]) -> dict[str, Any]:
        return {k: group[k] for k in _INNER_KEYS[self.inner_name] if k in group}

    def _managed(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        mine = {id(p) for g in self.param_groups for p in g["params"]}
        named = {n: p for n, p in model.named_parameters() if id(p) in mine}
        if len(named) != len(mine):
            raise InvalidInputError("the model passed to step() does not hold all of this optimizer's "
                                    "parameters")
        return named

    def _direction(self, grad: np.ndarray, curvature: Drift) -> np.ndarray:
        raise NotImplementedError

    @torch.no_grad()
    def _apply(self, params: dict[str, torch.Tensor], direction: np.ndarray) -> None:
        if not direction.flags.writeable:
            # x_bar straight off the wire is a read-only view of the reply's buffer: torch warns
            # about wrapping one (and the slices below are cloned anyway)
            direction = direction.copy()
        offset = 0
        for p in params.values():
            n = p.numel()
            p.grad = torch.as_tensor(direction[offset:offset + n], dtype=p.dtype,
                                     device=p.device).view_as(p).clone()
            offset += n
        for mine, theirs in zip(self.param_groups, self.inner.param_groups, strict=True):
            theirs.update(self._inner_hparams(mine))  # schedulers edit our groups
        self.inner.step()

    def step(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """One training step on the batch; returns the mean loss before the step (a 0-d tensor)."""
        params = self._managed(model)
        curv = torch_curvature(model, inputs, targets, self.loss, self.kind, params)
        self.last_curvature = curv
        # built once per step and kept (LM reuses it): each construction scans J for NaN
        self.last_drift = curv.drift(0.0)
        self.last_direction = self._direction(curv.grad, self.last_drift)
        self._apply(params, self.last_direction)
        return torch.tensor(curv.loss)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["inner"] = self.inner.state_dict()
        sd["extra"] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        inner, extra = sd.pop("inner"), sd.pop("extra")
        super().load_state_dict(sd)
        self.inner.load_state_dict(inner)
        self._load_extra_state(extra)


def snapshot_to_torch(snap: DeviceSnapshot | None) -> dict[str, Any] | None:
    """A device snapshot in a form ``torch.load(weights_only=True)`` accepts (None stays None)."""
    if snap is None:
        return None
    return {"meta": snap.meta, "arrays": {k: torch.from_numpy(np.array(v)) for k, v in snap.arrays.items()}}


def snapshot_from_torch(d: dict[str, Any] | None) -> DeviceSnapshot | None:
    """The inverse of ``snapshot_to_torch``."""
    if d is None:
        return None
    return DeviceSnapshot(dict(d["meta"]), {k: v.detach().cpu().numpy() for k, v in d["arrays"].items()})


class TNGDOptimizer(CurvatureOptimizer):
    """TNGD as a ``torch.optim.Optimizer``. Arguments as ``host.TNGD``; ``inner="adam"`` is TNGD-Adam.

    Args:
        params: parameters or param groups (as for any torch optimizer).
        device: a ``protocol.Device`` (``host.connect(...)``).
        lr, analog_time, damping, delay, burn_in, init: see ``host.tngd.TNGD``.
        inner: "sgd" (with ``momentum``) or "adam" (with ``betas``, ``eps``).
        loss: "cross_entropy" (targets are class indices) or "mse".
        kind: "ggn" or "empirical" (Fisher).
        lm: optional ``LevenbergMarquardt``; then call ``adapt_damping(model, inputs, targets)``
            after ``step`` (one extra forward pass).
        guard, target_rel_error, min_analog_time, max_analog_time: the stability guard and the noise-aware readout
            (``analog_time="auto"``): see ``host.tngd_core.TNGDCore``.

    ``engine`` is the ``TNGDCore`` that solves (``engine.device`` the device) and ``tngd_state``
    its ``TNGDState``: together with ``inner``'s state that is what ``state_dict`` saves.
    """

    def __init__(self, params: Any, device: Device, lr: float = 0.01, analog_time: float | str = 50.0,
                 damping: float = 0.01, delay: float = 0.0, burn_in: float = 0.0, *, init: str = "warm",
                 inner: str = "sgd", momentum: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, loss: str = "cross_entropy", kind: str = "ggn",
                 lm: LevenbergMarquardt | None = None, guard: StabilityGuard | None = None,
                 target_rel_error: float = 0.1, min_analog_time: float = 50.0,
                 max_analog_time: float = 1e4, offset_cancel: bool | str = False,
                 refine: int | str = 0) -> None:
        super().__init__(params, lr=lr, inner=inner, momentum=momentum, betas=betas, eps=eps,
                         weight_decay=weight_decay, loss=loss, kind=kind)
        self.engine = TNGDCore(device, analog_time, delay, burn_in, init=init, lm=lm, guard=guard,
                               target_rel_error=target_rel_error, min_analog_time=min_analog_time,
                               max_analog_time=max_analog_time, offset_cancel=offset_cancel,
                               refine=refine)
        if lr <= 0.0:
            raise InvalidInputError(f"lr must be > 0, got {lr}")
        self.tngd_state: TNGDState = self.engine.init(damping)

    def _direction(self, grad: np.ndarray, curvature: Drift) -> np.ndarray:
        x_bar, self.tngd_state = self.engine.solve(self.tngd_state, grad, curvature)
        return x_bar

    def step(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.engine.lm is None:  # only the LM rule needs the step taken
            return super().step(model, inputs, targets)
        params = self._managed(model)
        before = {n: p.detach().clone() for n, p in params.items()}
        loss = super().step(model, inputs, targets)
        # the step torch's SGD/Adam took, weight decay and momentum included
        delta = np.concatenate([(p.detach() - before[n]).reshape(-1).to(torch.float64).cpu().numpy()
                                for n, p in params.items()])
        curv, drift = self.last_curvature, self.last_drift
        assert curv is not None and drift is not None
        self.tngd_state = self.engine.record(self.tngd_state, curv.grad, delta, drift, curv.loss)
        return loss

    def close(self) -> None:
        """Close the device (a daemon session, which otherwise stays open and may hold a board
        until the daemon reclaims it). Idempotent; also ``with TNGDOptimizer(...) as opt:``."""
        self.engine.device.close()

    def __enter__(self) -> TNGDOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @torch.no_grad()
    def adapt_damping(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Levenberg-Marquardt update of lambda after ``step`` on the same batch; returns rho."""
        self.engine.lm_ready(self.tngd_state)  # refuse before spending a forward pass
        out = model(inputs).detach().to(torch.float64).cpu().numpy()
        after = loss_value(out, targets.cpu().numpy(), self.loss)
        self.tngd_state, rho = self.engine.lm_update(self.tngd_state, None, after)
        return rho

    @property
    def damping(self) -> float:
        """lambda for the next step (``adapt_damping`` moves it)."""
        return self.tngd_state.damping

    @property
    def last(self) -> StepStats:
        """What the last device solve cost."""
        return self.tngd_state.stats

    def _extra_state(self) -> dict[str, Any]:
        saved = self.engine.capture(self.tngd_state)
        dev = saved.pending or DeviceCheckpoint()
        state = np.zeros(0) if dev.state is None else dev.state
        return {"steps": saved.steps, "damping": saved.damping, "floor": saved.floor, "x_norm": saved.x_norm,
                "kappa": saved.kappa,
                # a copy: the state read off the wire is a read-only view torch warns about
                "device_state": torch.from_numpy(np.array(state, dtype=np.float64)),
                "device_snapshot": snapshot_to_torch(dev.snapshot)}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        st = extra["device_state"].detach().cpu().numpy().astype(np.float64)
        pending = DeviceCheckpoint(st if st.size else None, snapshot_from_torch(extra.get("device_snapshot")))
        has = pending.state is not None or pending.snapshot is not None
        kappa = extra.get("kappa")  # checkpoints from before the guard carry no floor, scale or kappa
        self.tngd_state = TNGDState(steps=int(extra["steps"]), damping=float(extra["damping"]),
                                    pending=pending if has else None, floor=float(extra.get("floor", 0.0)),
                                    x_norm=float(extra.get("x_norm", 0.0)),
                                    kappa=None if kappa is None else float(kappa))


class NGDOptimizer(CurvatureOptimizer):
    """Digital natural gradient on the same GGN: ``method="exact"`` (Woodbury) or ``"cg"``."""

    def __init__(self, params: Any, lr: float = 0.01, damping: float = 0.01, *, method: str = "exact",
                 cg_maxiter: int = 50, inner: str = "sgd", momentum: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 loss: str = "cross_entropy", kind: str = "ggn") -> None:
        super().__init__(params, lr=lr, inner=inner, momentum=momentum, betas=betas, eps=eps,
                         weight_decay=weight_decay, loss=loss, kind=kind)
        if method == "exact":
            self.solver: ExactNGD | NGDCG = ExactNGD(lr, damping)
        elif method == "cg":
            self.solver = NGDCG(lr, damping, maxiter=cg_maxiter)
        else:
            raise InvalidInputError(f"method must be 'exact' or 'cg', got {method!r}")

    def _direction(self, grad: np.ndarray, curvature: Drift) -> np.ndarray:
        return self.solver.direction(grad, curvature)
