"""Thermodynamic Natural Gradient Descent (TNGD), framework-free: NumPy in, NumPy out.

One step (DESIGN section 1; TNGD paper, Algorithm 1):

1. the host hands over the gradient g and the undamped curvature G as a drift description
   (``Factored(J, H)`` for the GGN or empirical Fisher, or ``Dense``);
2. the device is programmed with A = G + lambda I and bias g, and runs for ``analog_time`` tau,
   after ``delay`` tau during which the previous drift and bias still act (the host's compute
   time: the state keeps relaxing towards the previous step's solution);
3. the device returns x_bar, the time average of its state over the readout window
   [burn_in, analog_time];
4. delta = -lr * x_bar (SGD, optional momentum) or Adam's step fed with x_bar (TNGD-Adam).

Where the device starts each solve (``init``):

* ``"warm"`` (the default, as in Algorithm 1 and the hardware): the device continues from the
  state the previous step left, so x_k = e^{-At} x_{k-1} + (I - e^{-At}) A^-1 g_k in the mean;
  small t gives a curvature-aware momentum. The very first solve starts from g_0, like the
  paper's g~_0 = grad l(theta_0).
* ``"grad"``: the device state is set to g before every solve (the paper's x0 = g), so t -> 0 is
  exactly SGD and t -> infinity is NGD.
* ``"reset"``: every solve starts from zero.

Readout: ``burn_in`` = 0 averages the whole run; ``burn_in`` = ``analog_time`` reads one snapshot
of the final state. With long t and no noise x_bar -> (G + lambda I)^-1 g, the exact natural
gradient (tested to 1e-6 against ``host.baselines.ExactNGD``).

The solve and the Levenberg-Marquardt rule live in ``host.tngd_core`` over an explicit state;
``TNGD`` adds the digital update and keeps that state for its caller.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from protocol.device import Device
from protocol.drift import Drift
from protocol.errors import InvalidInputError

from .adapt import DriftAdapter
from .baselines import SGD, Adam
from .guard import StabilityGuard
from .tngd_core import INITS, LevenbergMarquardt, StepStats, TNGDCore, TNGDState

__all__ = ["INITS", "TNGD", "LevenbergMarquardt", "StepStats"]


class TNGD:
    """TNGD against any ``protocol.Device``.

    Args:
        device: from ``host.connect(...)``.
        lr: learning rate eta.
        analog_time: t, the duration of each solve in tau (includes ``burn_in``).
        damping: lambda, added to the curvature passed to ``step``.
        delay: t_d in tau: the previous drift keeps acting this long before the new one.
        burn_in: start of the readout window within the run, in tau (see the module docstring).
        init: "warm" (default), "grad" or "reset": where each solve starts.
        optimizer: "sgd" (theta -= lr * v, v = momentum * v + x_bar) or "adam" (TNGD-Adam).
        momentum, betas, eps: of the digital optimizer x_bar is fed to.
        lm: a ``LevenbergMarquardt`` schedule for lambda; call ``adapt_damping`` after a step.
        guard: the ``StabilityGuard`` (on by default; ``host.guard``): on a chip whose mismatch
            makes the realised drift unstable, it retries with more damping and keeps a floor.
        offset_cancel: solve with g and -g and take the half difference (cancels the cells' offsets).
        refine: passes of iterative refinement on the host's exact residual, or "auto" (from the
            device's declared DAC bits; ``TNGDCore``).
        target_rel_error, min_analog_time, max_analog_time: with ``analog_time="auto"``, the readout is planned from
            the device's declared noise for this relative error of x_bar (``host.readout_plan``).

    ``engine`` is the ``TNGDCore`` that solves, ``state`` its ``TNGDState`` (steps, damping, the
    last step for LM); ``inner`` the digital optimizer (its ``lr`` follows ``self.lr``).
    """

    def __init__(self, device: Device, lr: float, analog_time: float | str, damping: float,
                 delay: float = 0.0, burn_in: float = 0.0, *, init: str = "warm", optimizer: str = "sgd",
                 momentum: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 lm: LevenbergMarquardt | None = None, guard: StabilityGuard | None = None,
                 target_rel_error: float = 0.1, min_analog_time: float = 50.0,
                 max_analog_time: float = 1e4, offset_cancel: bool | str = False,
                 refine: int | str = 0) -> None:
        self.engine = TNGDCore(device, analog_time, delay, burn_in, init=init, lm=lm, guard=guard,
                               target_rel_error=target_rel_error, min_analog_time=min_analog_time,
                               max_analog_time=max_analog_time, offset_cancel=offset_cancel,
                               refine=refine)
        if lr <= 0.0:
            raise InvalidInputError(f"lr must be > 0, got {lr}")
        if optimizer == "sgd":
            self.inner: SGD | Adam = SGD(lr, momentum)
        elif optimizer == "adam":
            self.inner = Adam(lr, betas, eps)
        else:
            raise InvalidInputError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        self.state: TNGDState = self.engine.init(damping)
        self.lr = lr

    # the solve settings are the engine's; read them here as before
    @property
    def device(self) -> Device:
        return self.engine.device

    @property
    def analog_time(self) -> float:
        return self.engine.analog_time

    @property
    def delay(self) -> float:
        return self.engine.delay

    @property
    def burn_in(self) -> float:
        return self.engine.burn_in

    @property
    def init(self) -> str:
        return self.engine.init_mode

    @property
    def lm(self) -> LevenbergMarquardt | None:
        return self.engine.lm

    @property
    def adapt(self) -> DriftAdapter:
        return self.engine.adapt

    @property
    def damping(self) -> float:
        """lambda for the next step (``adapt_damping`` moves it)."""
        return self.state.damping

    @damping.setter
    def damping(self, value: float) -> None:
        self.state = replace(self.state, damping=float(value))

    @property
    def steps(self) -> int:
        """Device solves so far."""
        return self.state.steps

    @steps.setter
    def steps(self, value: int) -> None:
        self.state = replace(self.state, steps=int(value))

    @property
    def last(self) -> StepStats:
        """What the last step cost."""
        return self.state.stats

    def direction(self, grad: np.ndarray, curvature: Drift) -> np.ndarray:
        """x_bar: the device's estimate of (curvature + damping I)^-1 grad for this step."""
        x_bar, self.state = self.engine.solve(self.state, grad, curvature)
        return x_bar

    def step(self, grad: np.ndarray, curvature: Drift) -> np.ndarray:
        """delta (theta_new = theta + delta) for the gradient and undamped curvature at theta."""
        x_bar = self.direction(grad, curvature)
        self.inner.lr = self.lr
        delta = self.inner.update(x_bar)
        self.state = self.engine.record(self.state, grad, delta, curvature)
        return delta

    def adapt_damping(self, loss_before: float, loss_after: float) -> float:
        """Levenberg-Marquardt update of lambda from the last step's losses on the same batch.

        Returns rho. Costs one curvature-vector product (no extra device run).
        """
        self.state, rho = self.engine.lm_update(self.state, loss_before, loss_after)
        return rho
