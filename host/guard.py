"""The stability guard: a curvature the host hands over positive definite never fails mid-training
because of what the chip does to it.

On a real chip every conductance is off by its own static error (mismatch) and rounded to its
codes, so the realised drift C^-1 (J_out^T H' J_in + lambda' I) is neither A nor symmetric, and its
smallest eigenvalues move by about the size of those errors times the curvature's scale. With a
small damping lambda they can cross zero: the realised dynamics are then unstable and the chip runs
into its rails. The device reports what it realised (``diagnostics["stability_margin"]``: the
smallest real part of the realised drift's eigenvalues, 1/tau; ``diagnostics["unstable"]``); a
device that predates those keys raises ``NotStableError`` instead. The guard:

* retries a step whose realised drift was unstable (or refused as such), from the analog state the
  step started with, with the damping raised by ``growth`` each time (at most ``max_retries``);
* keeps a damping floor: when the realised margin falls below ``margin_fraction`` of the damping
  the host asked for, the floor rises by the shortfall (a damping delta moves every realised
  eigenvalue by about delta), so the next steps keep their margin without a retry;
* records every raise (``events``), so the user sees what the chip cost.

The damping the LM schedule moves stays the user's; the device gets max(damping, floor).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.errors import InvalidInputError


@dataclass(frozen=True)
class StabilityGuard:
    """Settings of the guard (module docstring). ``enabled=False`` passes every step through."""

    margin_fraction: float = 0.5
    growth: float = 2.0
    max_retries: int = 8
    enabled: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin_fraction < 1.0:
            raise InvalidInputError(f"margin_fraction must lie in [0, 1), got {self.margin_fraction}")
        if not self.growth > 1.0:
            raise InvalidInputError(f"growth must be > 1, got {self.growth}")
        if self.max_retries < 0:
            raise InvalidInputError(f"max_retries must be >= 0, got {self.max_retries}")

    def retry_damping(self, damping: float) -> float:
        """The damping of the next attempt after an unstable one (0 damping starts at 1e-3)."""
        return damping * self.growth if damping > 0.0 else 1e-3

    def floor_after(self, floor: float, damping: float, margin: float | None) -> float:
        """The damping floor after a stable step that realised ``margin`` at ``damping``."""
        if margin is None or not self.enabled:
            return floor
        want = self.margin_fraction * damping
        if margin >= want:
            return floor
        return max(floor, damping + (want - margin))


@dataclass(frozen=True)
class GuardEvent:
    """One raise of the damping by the guard."""

    step: int
    reason: str  # "unstable" (retried) or "margin" (floor raised for later steps)
    damping_before: float
    damping_after: float
    margin: float | None
