"""GGN / empirical-Fisher factors against dense references built another way."""

from __future__ import annotations

import numpy as np
import pytest
import torch  # noqa: E402

from host.curvature import block_diag, from_jacobians, output_hessians, torch_curvature

F = torch.nn.functional


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


def _cnn() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(2 * 3 * 3, 3)).double()


def _flat_fn(model: torch.nn.Module, x: torch.Tensor):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    p0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(v: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = int(np.prod(s))
            parts[n] = v[i:i + k].view(s)
            i += k
        return torch.func.functional_call(model, parts, (x,))

    return f, p0


def _loss(z: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "cross_entropy":
        return F.cross_entropy(z, y)
    return 0.5 * ((z - y) ** 2).sum(-1).mean()


def _dense_reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str):
    """GGN by full (non-vmapped) Jacobians and autograd Hessians of each sample's loss."""
    f, p0 = _flat_fn(model, x)
    jac = torch.autograd.functional.jacobian(f, p0)  # (b, d, N)
    z = f(p0).detach()
    b = x.shape[0]
    g = torch.zeros(p0.numel(), p0.numel(), dtype=torch.float64)
    for i in range(b):  # a loop is fine in the reference
        h = torch.autograd.functional.hessian(lambda zi, i=i: _loss(zi[None], y[i:i + 1], loss), z[i])
        g += jac[i].T @ h @ jac[i] / b
    p = p0.clone().requires_grad_()
    grad = torch.autograd.grad(_loss(f(p), y, loss), p)[0]
    return g.numpy(), grad.numpy(), float(_loss(z, y, loss))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_ggn_factors_match_dense_ggn(loss: str, make) -> None:
    model = make()
    gen = torch.Generator().manual_seed(2)
    b = 5
    x = torch.randn(b, 6, dtype=torch.float64, generator=gen) if make is _mlp else \
        torch.randn(b, 1, 7, 7, dtype=torch.float64, generator=gen)
    y = torch.tensor([0, 2, 1, 2, 0]) if loss == "cross_entropy" else torch.randn(b, 3, dtype=torch.float64,
                                                                                   generator=gen)
    curv = torch_curvature(model, x, y, loss=loss)
    g_ref, grad_ref, loss_ref = _dense_reference(model, x, y, loss)
    n = sum(p.numel() for p in model.parameters())
    assert curv.J.shape == (b * 3, n) and curv.H.shape == (b * 3, b * 3)
    np.testing.assert_allclose(curv.dense(), g_ref, atol=1e-12 * max(1.0, np.abs(g_ref).max()))
    np.testing.assert_allclose(curv.grad, grad_ref, atol=1e-12)
    assert curv.loss == pytest.approx(loss_ref, rel=1e-12)
    # H is block diagonal: no coupling between samples
    h = curv.H.reshape(b, 3, b, 3)
    off = h.copy()
    off[np.arange(b), :, np.arange(b), :] = 0.0
    assert not off.any()


def test_ggn_of_a_linear_model_with_squared_error_is_the_hessian() -> None:
    torch.manual_seed(3)
    model = torch.nn.Linear(4, 2).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    f, p0 = _flat_fn(model, x)
    hess = torch.autograd.functional.hessian(lambda v: _loss(f(v), y, "mse"), p0).numpy()
    np.testing.assert_allclose(torch_curvature(model, x, y, loss="mse").dense(), hess, atol=1e-12)


def test_empirical_fisher_is_mean_outer_product_of_per_sample_gradients() -> None:
    model = _mlp()
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([1, 0, 2, 1])
    curv = torch_curvature(model, x, y, kind="empirical")
    f, p0 = _flat_fn(model, x)
    rows = []
    for i in range(4):
        p = p0.clone().requires_grad_()
        rows.append(torch.autograd.grad(F.cross_entropy(f(p)[i:i + 1], y[i:i + 1]), p)[0].numpy())
    per = np.stack(rows)
    np.testing.assert_allclose(curv.dense(), per.T @ per / 4, atol=1e-12)
    np.testing.assert_allclose(curv.grad, per.mean(axis=0), atol=1e-12)
    assert curv.J.shape == (4, p0.numel())


def test_frozen_parameters_are_left_out() -> None:
    model = _mlp()
    model[0].weight.requires_grad_(False)
    x = torch.randn(3, 6, dtype=torch.float64)
    curv = torch_curvature(model, x, torch.tensor([0, 1, 2]))
    assert curv.J.shape[1] == 5 + 15 + 3


def test_numpy_helpers() -> None:
    blocks = np.arange(2 * 3 * 3, dtype=float).reshape(2, 3, 3)
    m = block_diag(blocks, 0.5)
    np.testing.assert_array_equal(m[:3, :3], 0.5 * blocks[0])
    np.testing.assert_array_equal(m[3:, 3:], 0.5 * blocks[1])
    assert not m[:3, 3:].any()
    h = output_hessians(np.array([[0.3, -1.0, 2.0]]), "cross_entropy")[0]
    np.testing.assert_allclose(h @ np.ones(3), 0.0, atol=1e-15)  # softmax CE: singular along 1
    assert np.linalg.eigvalsh(h).min() > -1e-15
    # saturated softmax: tiny blocks must stay PSD relative to their own size (devices check that)
    for z in ([40.0, 0.0, 0.0], [35.0, 1.0, 0.0]):
        e = np.linalg.eigvalsh(output_hessians(np.array([z]), "cross_entropy")[0])
        assert e.min() >= -1e-12 * np.abs(e).max()
    # from_jacobians on a linear map: J = the weight, any framework
    w = np.random.default_rng(0).standard_normal((3, 5))
    xs = np.random.default_rng(1).standard_normal((4, 5))
    jac = np.zeros((4, 3, 15))
    for i in range(4):
        jac[i] = np.kron(np.eye(3), xs[i])
    curv = from_jacobians(jac, xs @ w.T, np.array([0, 1, 2, 0]))
    assert curv.J.shape == (12, 15) and curv.H.shape == (12, 12)
