"""Curvature factors for TNGD: the GGN (or empirical Fisher) as J^T H J, never as N x N.

For a batch of b samples with model outputs z_i (d_z each) and the mean loss
L = (1/b) sum_i l(z_i, y_i), the generalised Gauss-Newton matrix is

    G = (1/b) sum_i J_i^T H_i J_i = J^T H J,   J = [J_1; ...; J_b]  (b d_z x N),
                                               H = blockdiag(H_1, ..., H_b) / b  (b d_z x b d_z)

with J_i = dz_i/dtheta and H_i = d^2 l / dz_i^2. The 1/b lives in H, so J^T H J is the GGN of the
*mean* loss, the same scaling as the gradient. Losses:

* ``"cross_entropy"``: softmax cross-entropy on logits, H_i = diag(p_i) - p_i p_i^T (singular:
  rank d_z - 1), and the GGN equals the Fisher;
* ``"mse"``: l = ||z_i - y_i||^2 / 2 per sample, H_i = I. (``torch.nn.functional.mse_loss`` with
  mean reduction is 2/d_z times this loss.)

The empirical Fisher (``kind="empirical"``) is F = (1/b) sum_i g_i g_i^T with per-sample gradients
g_i = J_i^T dl/dz_i: J has the b rows g_i^T and H = I/b. It needs no extra model calls.

The gradient comes out too: grad = J^T r with r_i = (dl/dz_i) / b, again with no extra pass.

PyTorch models go through ``torch.func`` (``vmap`` over samples of ``jacrev`` of a
``functional_call``), so the per-sample Jacobians come from one vectorised call and never from a
Python loop over samples. torch is imported lazily: the NumPy part needs only NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from protocol.drift import Factored, as_finite_scalar
from protocol.errors import InvalidInputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

LOSSES = ("cross_entropy", "mse")
KINDS = ("ggn", "empirical")


@dataclass(frozen=True, eq=False)
class Curvature:
    """J (m x N), H (m x m), the gradient of the mean loss, the loss, and the outputs (b x d_z)."""

    J: np.ndarray
    H: np.ndarray
    grad: np.ndarray
    loss: float
    outputs: np.ndarray
    # Factored(J, H, 0), built (so J and H scanned for NaN/Inf) at the first drift() call only
    _undamped: Factored | None = field(default=None, init=False, repr=False, compare=False)

    def drift(self, damping: float = 0.0) -> Factored:
        """The curvature as a drift description, A = J^T H J + damping I.

        J and H come from a model and may hold NaN (a diverging run): they are checked once per
        Curvature, at the first call (NonFiniteError then, and at every call while they are bad);
        later calls reuse the checked arrays.
        """
        base = self._undamped
        if base is None:
            base = Factored(self.J, self.H, 0.0)
            object.__setattr__(self, "_undamped", base)
        return Factored.trusted(base.J, base.H, as_finite_scalar(damping, "Factored.damping", minimum=0.0))

    def dense(self) -> np.ndarray:
        """J^T H J as an N x N matrix (exactly symmetric): for tests and small N only."""
        return self.drift().dense()


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def output_hessians(outputs: np.ndarray, loss: str) -> np.ndarray:
    """Per-sample d^2 l / dz^2, shape (b, d_z, d_z)."""
    b, d = outputs.shape
    if loss == "cross_entropy":
        # diag(p) - p p^T as the Gram matrix L L^T, L = diag(sqrt p) - p sqrt(p)^T (uses sum p = 1):
        # PSD to round-off relative to its own size even when the softmax saturates, where the
        # direct difference cancels and can leave eigenvalues of -1e-20 next to a 1e-12 block.
        p = softmax(outputs)
        sq = np.sqrt(p)
        low = sq[:, None, :] * (np.eye(d) - p[:, :, None])
        return low @ low.transpose(0, 2, 1)
    if loss == "mse":
        return np.broadcast_to(np.eye(d), (b, d, d)).copy()
    raise InvalidInputError(f"loss must be one of {LOSSES}, got {loss!r}")


def output_residuals(outputs: np.ndarray, targets: np.ndarray, loss: str) -> np.ndarray:
    """Per-sample dl/dz, shape (b, d_z); targets are class indices (cross_entropy) or (b, d_z)."""
    if loss == "cross_entropy":
        r = softmax(outputs)
        r[np.arange(outputs.shape[0]), np.asarray(targets, dtype=np.int64)] -= 1.0
        return r
    if loss == "mse":
        return outputs - np.asarray(targets, dtype=outputs.dtype).reshape(outputs.shape)
    raise InvalidInputError(f"loss must be one of {LOSSES}, got {loss!r}")


def loss_value(outputs: np.ndarray, targets: np.ndarray, loss: str) -> float:
    """The mean loss over the batch (the loss the GGN and gradient refer to)."""
    if loss == "cross_entropy":
        z = outputs - outputs.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(outputs.shape[0]), np.asarray(targets, dtype=np.int64)].mean())
    if loss == "mse":
        r = outputs - np.asarray(targets, dtype=outputs.dtype).reshape(outputs.shape)
        return float(0.5 * (r**2).sum(axis=1).mean())
    raise InvalidInputError(f"loss must be one of {LOSSES}, got {loss!r}")


def block_diag(blocks: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """(b, d, d) blocks -> the (b d) x (b d) block-diagonal matrix times ``scale``."""
    b, d, _ = blocks.shape
    out = np.zeros((b * d, b * d))
    idx = np.arange(b)
    out.reshape(b, d, b, d)[idx, :, idx, :] = blocks * scale
    return out


def from_jacobians(jac: np.ndarray, outputs: np.ndarray, targets: np.ndarray, loss: str = "cross_entropy",
                   kind: str = "ggn") -> Curvature:
    """Curvature from per-sample output Jacobians ``jac`` (b, d_z, N) and the outputs (b, d_z).

    This is the framework-free core: any autodiff (or a hand-written model) supplies ``jac``.
    """
    if kind not in KINDS:
        raise InvalidInputError(f"kind must be one of {KINDS}, got {kind!r}")
    jac = np.asarray(jac, dtype=np.float64)
    outputs = np.asarray(outputs, dtype=np.float64)
    b, d, n = jac.shape
    if outputs.shape != (b, d):
        raise InvalidInputError(f"outputs must have shape {(b, d)}, got {outputs.shape}")
    r = output_residuals(outputs, targets, loss)
    grad = np.einsum("bdn,bd->n", jac, r) / b
    if kind == "ggn":
        j = jac.reshape(b * d, n)
        h = block_diag(output_hessians(outputs, loss), 1.0 / b)
    else:
        j = np.einsum("bdn,bd->bn", jac, r)  # per-sample gradients g_i
        h = np.eye(b) / b
    return Curvature(j, h, grad, loss_value(outputs, targets, loss), outputs)


# -- PyTorch ---------------------------------------------------------------------------------------


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, by name, in ``named_parameters`` order (J's columns)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def flatten(tensors: dict[str, torch.Tensor] | list[torch.Tensor]) -> np.ndarray:
    """Concatenate tensors (in order) into one float64 NumPy vector."""
    import torch

    vals = tensors.values() if isinstance(tensors, dict) else tensors
    return torch.cat([t.detach().reshape(-1) for t in vals]).to(torch.float64).cpu().numpy()


def torch_jacobians(model: torch.nn.Module, inputs: torch.Tensor,
                    params: dict[str, torch.Tensor] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample output Jacobians (b, d_z, N) and outputs (b, d_z) by torch.func (vmap + jacrev).

    Each sample is run through the model as a batch of one (so layers that expect a batch dimension
    work); models whose output for one sample depends on the others (BatchNorm in training mode)
    have no per-sample Jacobian and are not supported.
    """
    import torch
    from torch.func import functional_call, jacrev, vmap

    params = trainable(model) if params is None else params
    names = list(params)
    detached = {k: v.detach() for k, v in params.items()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def single(p: dict[str, Any], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),)).squeeze(0)
        return out, out  # jacrev(has_aux) returns the output alongside its Jacobian

    jac, out = vmap(jacrev(single, has_aux=True), in_dims=(None, 0))(detached, inputs)
    b, d = out.shape
    flat = torch.cat([jac[k].reshape(b, d, -1) for k in names], dim=2)
    return flat.to(torch.float64).cpu().numpy(), out.detach().to(torch.float64).cpu().numpy()


def torch_curvature(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                    loss: str = "cross_entropy", kind: str = "ggn",
                    params: dict[str, torch.Tensor] | None = None) -> Curvature:
    """GGN or empirical-Fisher factors, gradient and loss of a PyTorch model on one batch."""
    jac, out = torch_jacobians(model, inputs, params)
    return from_jacobians(jac, out, targets.detach().cpu().numpy(), loss, kind)
