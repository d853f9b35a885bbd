"""drep::linear_denoise: the layer's training forward = merged linear + loss, and its gradient routes."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import oracle
from conftest import assert_close
from drep_kernels import Schedule, ops

CO = Schedule().coefficients(3)


def _setup(label_augmented_grads=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, out = 6, 5
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True)
    x = torch.randn(2, 4, k, generator=g, dtype=torch.float64).requires_grad_(True)
    return x, mk(out, k), mk(out), mk(k, k), mk(k), torch.randn(2, 4, k, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("label_augmented", [False, True])
def test_output_loss_and_gradient_routes(label_augmented):
    x, w, b, wd, bd, eps = _setup()
    y, loss = ops.linear_denoise(x, w, b, wd, bd, CO, noise=eps, label_augmented=label_augmented)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad((y * gy).sum() + 0.01 * loss, [x, w, b, wd, bd])

    # The same objective written from the formulas, with the routes made explicit.
    mw, mb = oracle.merge(w, b, wd if label_augmented else wd.detach(), bd if label_augmented else bd.detach(), CO.c1, CO.c3)
    y_ref = F.linear(x, mw, mb)
    loss_ref = oracle.denoise_loss(x, wd, bd, CO.a, CO.s, eps)
    want = torch.autograd.grad((y_ref * gy).sum() + 0.01 * loss_ref, [x, w, b, wd, bd])
    assert_close(y, y_ref, 1e-12, 1e-12, "y")
    assert_close(loss, loss_ref, 1e-12, 1e-12, "loss")
    for name, got, exp in zip(("dx", "dW", "db", "dW_d", "db_d"), grads, want):
        assert_close(got, exp, 1e-10, 1e-12, name)


def test_label_free_denoiser_gets_only_the_loss_gradient():
    x, w, b, wd, bd, eps = _setup()
    y, loss = ops.linear_denoise(x, w, b, wd, bd, CO, noise=eps)
    only_task = torch.autograd.grad(y.sum(), [wd, bd], allow_unused=True)
    assert only_task == (None, None)
    y, loss = ops.linear_denoise(x, w, b, wd, bd, CO, noise=eps, label_augmented=True)
    got = torch.autograd.grad(y.sum(), [wd, bd])
    # Label-augmented: the task gradient through the merge, M4 / M5.
    want = torch.autograd.grad(F.linear(x, *oracle.merge(w, b, wd, bd, CO.c1, CO.c3)).sum(), [wd, bd])
    assert_close(got[0], want[0], 1e-12, 1e-12, "dW_d")
    assert_close(got[1], want[1], 1e-12, 1e-12, "db_d")


def test_reuses_given_merged_weights(monkeypatch):
    from drep_kernels.backends import reference

    monkeypatch.setenv("DREP_BACKEND", "torch")
    x, w, b, wd, bd, eps = _setup()
    mw, mb = ops.merge_weights(w, b, wd.detach(), bd.detach(), CO.c1, CO.c3)
    merges = []
    real = reference.merge_weights_fwd
    monkeypatch.setattr(reference, "merge_weights_fwd", lambda *a: merges.append(1) or real(*a))
    y1, l1 = ops.linear_denoise(x, w, b, wd, bd, CO, noise=eps, merged=(mw, mb))
    assert merges == [], "merged weights were given: the op must not merge again"
    y2, l2 = ops.linear_denoise(x, w, b, wd, bd, CO, noise=eps)
    assert merges == [1]
    assert torch.equal(y1, y2) and torch.equal(l1, l2)


def test_opcheck():
    x, w, b, wd, bd, eps = _setup()
    args = (x, w, b, wd, bd, CO.a, CO.s, CO.c1, CO.c3, eps.reshape(-1, 6), torch.tensor(1), False, None, None)
    opcheck(torch.ops.drep.linear_denoise.default, args)


def test_loss_grads_are_the_losss_gradients():
    x, w, b, wd, bd, eps = _setup()
    y, loss, g_wd, g_bd = ops.linear_denoise(x, w, b, wd, bd, CO, noise=eps, with_loss_grads=True)
    want = torch.autograd.grad(loss, [wd, bd])
    assert_close(g_wd, want[0], 1e-12, 1e-12, "dL/dW_d")
    assert_close(g_bd, want[1], 1e-12, 1e-12, "dL/db_d")


def test_bad_input():
    x, w, b, wd, bd, eps = _setup()
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 6\)"):
        ops.linear_denoise(x[..., :5], w, b, wd, bd, CO)
    with pytest.raises(TypeError, match="bias has dtype"):
        ops.linear_denoise(x, w, b.float(), wd, bd, CO)
