"""Tiles: a parameter vector split into blocks that fit a device, and the block solves over them.

A real chip has a few cells (8 on the SPU board, 16 on the register board simulator) and a model
has thousands of parameters. ``plan_tiles`` splits the parameter vector (the concatenation of the
model's parameters in ``named_parameters`` order, as ``host.curvature`` builds it) into tiles of
at most ``cells`` parameters:

* ``"layer"`` (default): the parameters of one layer (module: ``0.weight`` and ``0.bias``) form a
  group; a group larger than ``cells`` is cut into the fewest chunks that fit, of balanced sizes
  (so tiles running in parallel take about the same time);
* ``"param"``: the same, with each parameter tensor its own group;
* ``"chunk"``: layers ignored, the whole vector cut into the fewest balanced chunks.

Tile t gets its diagonal block of the damped curvature, ``A_tt = J_t^T H J_t + lambda I`` (for
``Factored(J, H, lambda)``: ``Factored(J[:, t], H, lambda)``, no N x N matrix) and its slice of the
gradient. Solving every tile with b_t = g_t is block-diagonal TNGD (``sweeps=0``). Refinement
sweeps move toward the full direction A^-1 g: block-Jacobi solves every tile against

    b_t = g_t - sum_{s != t} A_ts x_s = g_t - J_t^T H (J x - J_t x_t)

(one pass over J for the m-vector J x), all tiles at once; Gauss-Seidel does the tiles in order,
each seeing the tiles already updated in this sweep (always converges for SPD A; Jacobi need not
with many tiles, see docs/tiling.md). The residual ||A x - g|| / ||g|| (A x by ``matvec``, never
an N x N matrix) is recorded after every sweep.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from protocol.drift import Dense, Drift, drift_form
from protocol.errors import CapacityError, InvalidInputError

POLICIES = ("layer", "param", "chunk")
METHODS = ("jacobi", "gauss-seidel")


@dataclass(frozen=True)
class Tile:
    """Parameters [start, stop) of the vector; ``group`` names the layer or tensor it came from."""

    index: int
    start: int
    stop: int
    group: str

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)


@dataclass(frozen=True)
class TilePlan:
    """Tiles covering [0, n) in order, without gaps or overlap."""

    n: int
    tiles: tuple[Tile, ...]
    policy: str = "custom"

    def __post_init__(self) -> None:
        pos = 0
        for k, t in enumerate(self.tiles):
            if t.index != k or t.start != pos or t.stop <= t.start:
                raise InvalidInputError(f"tile plan: tile {k} covers [{t.start}, {t.stop}), expected to start "
                                        f"at {pos} with index {k} and be non-empty")
            pos = t.stop
        if pos != self.n or not self.tiles:
            raise InvalidInputError(f"tile plan: tiles cover [0, {pos}) but the vector has {self.n} entries")

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def largest(self) -> int:
        return max(t.size for t in self.tiles)

    def check_fits(self, cells: int, where: str = "the device") -> None:
        """CapacityError naming the first tile larger than ``cells`` and how to re-plan."""
        for t in self.tiles:
            if t.size > cells:
                raise CapacityError(f"tile {t.index} ({t.group}, {t.size} parameters) does not fit {where} "
                                    f"({cells} cells): plan tiles with cells <= {cells} "
                                    f"(plan_tiles(..., cells={cells}) or --tiles layer)")

    def split(self, x: np.ndarray) -> list[np.ndarray]:
        return [x[t.slice] for t in self.tiles]

    def describe(self) -> dict[str, object]:
        sizes = [t.size for t in self.tiles]
        return {"policy": self.policy, "n": self.n, "tiles": len(sizes), "largest": max(sizes),
                "smallest": min(sizes), "groups": sorted({t.group for t in self.tiles})}

    @classmethod
    def from_bounds(cls, bounds: Sequence[int], group: str = "custom") -> TilePlan:
        """A plan from cut points [0, b1, ..., n] (for tests and hand-made plans)."""
        b = [int(v) for v in bounds]
        tiles = tuple(Tile(k, b[k], b[k + 1], group) for k in range(len(b) - 1))
        return cls(b[-1] if b else 0, tiles, "custom")


def _chunks(size: int, cells: int) -> list[int]:
    """The fewest balanced chunk sizes of at most ``cells`` summing to ``size``."""
    k = math.ceil(size / cells)
    base, extra = divmod(size, k)
    return [base + 1] * extra + [base] * (k - extra)


def plan_tiles(named_sizes: Sequence[tuple[str, int]], cells: int, policy: str = "layer") -> TilePlan:
    """Tiles of at most ``cells`` parameters over parameters given as (name, numel) in vector order.

    ``named_sizes`` is ``[(name, p.numel()) for name, p in model.named_parameters()]`` for a torch
    model (``plan_for_model``); see the module docstring for the policies.
    """
    if policy not in POLICIES:
        raise InvalidInputError(f"tile policy must be one of {POLICIES}, got {policy!r}")
    if isinstance(cells, bool) or not isinstance(cells, (int, np.integer)) or cells < 1:
        raise InvalidInputError(f"cells must be a positive integer, got {cells!r}")
    groups: list[tuple[str, int]] = []
    for name, size in named_sizes:
        if size < 1:
            raise InvalidInputError(f"parameter {name!r} has {size} entries")
        key = {"layer": name.rpartition(".")[0] or name, "param": name, "chunk": "all"}[policy]
        if groups and groups[-1][0] == key:
            groups[-1] = (key, groups[-1][1] + int(size))
        else:
            groups.append((key, int(size)))
    tiles: list[Tile] = []
    pos = 0
    for key, size in groups:
        for c in _chunks(size, int(cells)):
            tiles.append(Tile(len(tiles), pos, pos + c, key))
            pos += c
    return TilePlan(pos, tuple(tiles), policy)


def plan_for_model(model: object, cells: int, policy: str = "layer") -> TilePlan:
    """``plan_tiles`` over a torch model's trainable parameters (the vector TNGD optimises)."""
    named = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]  # type: ignore[attr-defined]
    return plan_tiles(named, cells, policy)


def tile_drift(drift: Drift, tile: Tile) -> Drift:
    """The diagonal block A_tt of ``drift`` as a drift of the same form (no N x N matrix for
    Factored). Slices of a validated drift: built trusted, not scanned again."""
    drift_form(drift)  # a typed error for anything that is not a drift description
    return drift.block(tile.slice)


def compact(block: Drift) -> Drift:
    """A tile block in the cheaper form for the device: a Factored block with no more columns than
    rows (N_t <= m) saves nothing over its N_t x N_t matrix, and its set-up on the emulator costs
    O(m^3) whatever N_t is (measured with m = 640: 0.55 s factored against 0.01 s dense for
    N_t = 52, 0.54 s against 0.15 s for N_t = 640), so it goes as ``Dense``."""
    if block.form == "factored" and block.dim <= block.J.shape[0]:
        return Dense.trusted(block.dense())
    return block


class Coupling:
    """The off-tile bias b_t = g_t - sum_{s != t} A_ts x_s for one drift, kept incrementally.

    For Factored, u = J x (an m-vector) is kept and updated by J_t dx_t when tile t changes, so a
    Gauss-Seidel sweep costs one pass over J like a Jacobi sweep does; other forms use matvec.
    """

    def __init__(self, drift: Drift, plan: TilePlan, blocks: Sequence[Drift]) -> None:
        self.drift, self.plan, self.blocks = drift, plan, blocks
        self.x = np.zeros(plan.n)
        self.factored = drift.form == "factored"
        self.u = np.zeros(drift.J.shape[0]) if self.factored else None  # type: ignore[union-attr]

    def set(self, t: int, xt: np.ndarray) -> None:
        s = self.plan.tiles[t].slice
        if self.factored:
            dx = xt - self.x[s]
            self.u += self.drift.J[:, s] @ dx  # type: ignore[union-attr, operator]
        self.x[s] = xt

    def bias(self, t: int, g: np.ndarray) -> np.ndarray:
        s = self.plan.tiles[t].slice
        xt = self.x[s]
        if self.factored:
            J = self.drift.J  # type: ignore[union-attr]
            return g[s] - J[:, s].T @ (self.drift.H @ (self.u - J[:, s] @ xt))  # type: ignore[union-attr]
        ax = self.drift.matvec(self.x)
        return g[s] - ax[s] + self.blocks[t].matvec(xt)

    def residual(self, g: np.ndarray) -> float:
        """||A x - g|| / ||g|| (A x recomputed from scratch: the record does not trust the increments)."""
        gn = float(np.linalg.norm(g))
        r = self.drift.matvec(self.x) - g
        return float(np.linalg.norm(r) / gn) if gn > 0 else float(np.linalg.norm(r))


@dataclass
class SweepReport:
    """What one tiled solve did: the residual after each sweep (index 0: block-diagonal)."""

    residuals: list[float]
    runs: int
    method: str


# solve_tiles' device: (list of (tile index, bias), first) -> list of tile solutions, same order
RunTiles = Callable[[list[tuple[int, np.ndarray]], bool], list[np.ndarray]]


def solve_tiles(drift: Drift, g: np.ndarray, plan: TilePlan, run: RunTiles, *, sweeps: int = 0,
                method: str = "gauss-seidel", relax: float = 1.0) -> tuple[np.ndarray, SweepReport]:
    """x ~ A^-1 g by tiles: block-diagonal, then ``sweeps`` Jacobi or Gauss-Seidel sweeps.

    ``run(jobs, first)`` solves the listed tiles (on devices, or digitally in tests) and returns
    their solutions; ``first`` is True for the block-diagonal pass (the one a delay applies to).
    ``relax`` (0, 1] under-relaxes Jacobi: x_t <- (1 - relax) x_t + relax x_t_new.
    """
    if method not in METHODS:
        raise InvalidInputError(f"sweep method must be one of {METHODS}, got {method!r}")
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
        raise InvalidInputError(f"sweeps must be a non-negative integer, got {sweeps!r}")
    if not 0.0 < relax <= 1.0:
        raise InvalidInputError(f"relax must lie in (0, 1], got {relax}")
    blocks = [tile_drift(drift, t) for t in plan.tiles]
    c = Coupling(drift, plan, blocks)
    sols = run([(t.index, g[t.slice]) for t in plan.tiles], True)
    for t, xt in zip(plan.tiles, sols, strict=True):
        c.set(t.index, xt)
    residuals = [c.residual(g)]
    runs = len(plan)
    for _ in range(sweeps):
        if method == "jacobi":
            jobs = [(t.index, c.bias(t.index, g)) for t in plan.tiles]
            sols = run(jobs, False)
            for t, xt in zip(plan.tiles, sols, strict=True):
                c.set(t.index, xt if relax == 1.0 else (1.0 - relax) * c.x[t.slice] + relax * xt)
        else:
            for t in plan.tiles:  # one tile at a time: each sees the tiles updated before it
                (xt,) = run([(t.index, c.bias(t.index, g))], False)
                c.set(t.index, xt)
        runs += len(plan)
        residuals.append(c.residual(g))
    return c.x.copy(), SweepReport(residuals, runs, method)


def exact_tiles(drift: Drift, plan: TilePlan) -> RunTiles:
    """A ``RunTiles`` that solves each block exactly (digital; the t -> infinity device limit)."""
    blocks = [tile_drift(drift, t).dense() for t in plan.tiles]

    def run(jobs: list[tuple[int, np.ndarray]], first: bool) -> list[np.ndarray]:
        return [np.linalg.solve(blocks[t], b) for t, b in jobs]

    return run
