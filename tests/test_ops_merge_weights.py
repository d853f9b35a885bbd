"""drep::merge_weights on every CPU backend: exactness (M1, M2) and gradients (M3..M5)."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import oracle
from conftest import TOLERANCES, assert_close, cpu_backends
from drep_kernels import Schedule, ops

BACKENDS = cpu_backends("merge_weights")
CO = Schedule().coefficients(7)


def _params(out, k, dtype, bias, dbias, requires_grad=False):
    g = torch.Generator().manual_seed(out * 1000 + k)
    mk = lambda *shape: (torch.randn(*shape, generator=g, dtype=torch.float64) / k**0.5).to(dtype).requires_grad_(requires_grad)
    return mk(out, k), (mk(out) if bias else None), mk(k, k), (mk(k) if dbias else None)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("DREP_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("out,k", [(1, 1), (7, 5), (127, 33), (40, 768)])
@pytest.mark.parametrize("bias,dbias", [(True, True), (False, False), (True, False), (False, True)])
def test_merged_layer_equals_denoise_then_layer_float64(backend, out, k, bias, dbias):
    w, b, wd, bd = _params(out, k, torch.float64, bias, dbias)
    mw, mb = ops.merge_weights(w, b, wd, bd, CO.c1, CO.c3)
    assert (mb is None) == (b is None and bd is None)
    x = torch.randn(3, 9, k, dtype=torch.float64)
    y = F.linear(x, mw, mb)
    expected = oracle.two_step(x, w, b, wd, bd, CO.c1, CO.c3)
    rel = ((y - expected).norm() / expected.norm().clamp_min(1e-300)).item()
    assert rel < 1e-12, rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_low_precision_vs_float64(backend, dtype):
    w, b, wd, bd = _params(33, 130, dtype, True, True)
    # A denoiser scaled by 0.5 / c1: c1 W W_d and c1 W b_d are then about half of W' and b',
    # far above the tolerance below, so a merge that drops or mangles the denoiser fails.
    wd, bd = ((t.double() * (0.5 / CO.c1)).to(dtype) for t in (wd, bd))
    mw, mb = ops.merge_weights(w, b, wd, bd, CO.c1, CO.c3)
    assert mw.dtype == dtype and mb.dtype == dtype
    ew, eb = oracle.merge(w.double(), b.double(), wd.double(), bd.double(), CO.c1, CO.c3)
    dropped = (ew - CO.c3 * w.double()).abs().max() / ew.abs().max()
    assert dropped > 0.1, "the denoiser must be a large part of W' for this test to see it"
    for name, got, want in (("merged weight", mw, ew), ("merged bias", mb, eb)):
        # Computed in float32 from inputs it holds exactly, then rounded once to dtype: at most
        # half an ulp, |W'| finfo(dtype).eps / 2 (rtol with a factor 2 to spare), plus float32's
        # accumulation error over K = 130 products, of the tensor's scale (atol).
        scale = float(want.abs().max())
        assert_close(got, want, torch.finfo(dtype).eps, 1e-5 * scale, name)


def test_merge_non_contiguous(backend):
    w, b, wd, bd = _params(130, 33, torch.float64, True, True)
    wt = w.T.contiguous().T  # column-major storage, same values
    wd_view = torch.randn(66, 33, dtype=torch.float64)[::2]
    mw, mb = ops.merge_weights(wt, b, wd_view, bd, CO.c1, CO.c3)
    ew, eb = oracle.merge(w, b, wd_view, bd, CO.c1, CO.c3)
    assert mw.is_contiguous(), mw.stride()  # W' is row-major whatever W's layout
    assert_close(mw, ew, *TOLERANCES[torch.float64], "merged weight")
    assert_close(mb, eb, *TOLERANCES[torch.float64], "merged bias")


@pytest.mark.parametrize("bias,dbias", [(True, True), (False, False), (True, False)])
def test_gradcheck(backend, bias, dbias):
    params = _params(6, 5, torch.float64, bias, dbias, requires_grad=True)
    fn = lambda *p: tuple(o for o in ops.merge_weights(*p, CO.c1, CO.c3) if o is not None)
    assert torch.autograd.gradcheck(fn, params)


def test_grads_match_autograd_of_formula(backend):
    w, b, wd, bd = _params(9, 7, torch.float64, True, True, requires_grad=True)
    gw, gb = torch.randn(9, 7, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    mw, mb = ops.merge_weights(w, b, wd, bd, CO.c1, CO.c3)
    got = torch.autograd.grad((mw * gw).sum() + (mb * gb).sum(), [w, b, wd, bd])
    ew, eb = oracle.merge(w, b, wd, bd, CO.c1, CO.c3)
    want = torch.autograd.grad((ew * gw).sum() + (eb * gb).sum(), [w, b, wd, bd])
    for name, g, e in zip(("dW", "db", "dW_d", "db_d"), got, want):
        assert_close(g, e, 1e-12, 1e-12, name)


def test_only_requested_grads(backend):
    w, b, wd, bd = _params(4, 3, torch.float64, True, True)
    w.requires_grad_(True)
    mw, mb = ops.merge_weights(w, b, wd, bd, CO.c1, CO.c3)
    (mw.sum() + mb.sum()).backward()
    assert wd.grad is None and bd.grad is None
    w_ref = w.detach().clone().requires_grad_(True)
    ew, eb = oracle.merge(w_ref, b, wd, bd, CO.c1, CO.c3)
    (ew.sum() + eb.sum()).backward()
    assert_close(w.grad, w_ref.grad, 1e-12, 1e-13, "dW")


@pytest.mark.parametrize("requested", ["denoise_weight", "denoise_bias"])
def test_one_denoiser_grad_alone(backend, requested):
    # Label-augmented training with W_d or b_d frozen: the other's gradient (M4 / M5) must
    # still be computed, not left at zero because its sibling was not asked for.
    names = ("weight", "bias", "denoise_weight", "denoise_bias")
    params = dict(zip(names, _params(9, 7, torch.float64, True, True)))
    params[requested].requires_grad_(True)
    gw, gb = torch.randn(9, 7, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    mw, mb = ops.merge_weights(*params.values(), CO.c1, CO.c3)
    got = torch.autograd.grad((mw * gw).sum() + (mb * gb).sum(), params[requested])[0]
    ref = {k: v.detach().clone().requires_grad_(k == requested) for k, v in params.items()}
    ew, eb = oracle.merge(*ref.values(), CO.c1, CO.c3)
    want = torch.autograd.grad((ew * gw).sum() + (eb * gb).sum(), ref[requested])[0]
    assert_close(got, want, 1e-12, 1e-13, f"d/d{requested}")


def test_opcheck(backend):
    w, b, wd, bd = _params(6, 5, torch.float32, True, True, requires_grad=True)
    opcheck(torch.ops.drep.merge_weights.default, (w, b, wd, bd, CO.c1, CO.c3, backend))
    opcheck(torch.ops.drep.merge_weights.default, (w, None, wd, None, CO.c1, CO.c3, backend))
    column_major = w.detach().T.contiguous().T.requires_grad_(True)  # fake and real layouts must agree
    opcheck(torch.ops.drep.merge_weights.default, (column_major, b, wd, bd, CO.c1, CO.c3, backend))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="C++ CPU merge not built")
def test_opcheck_kernel_ops():
    w, b, wd, bd = _params(6, 5, torch.float32, True, True)
    opcheck(torch.ops.drep.merge_weights_fwd.default, (w, b, wd, bd, CO.c1, CO.c3))
    g = torch.randn(6, 5)
    for need_weight, need_denoise in ((True, True), (True, False), (False, True), (False, False)):
        args = (g, torch.randn(6), w, wd, bd, CO.c1, CO.c3, need_weight, need_denoise)
        opcheck(torch.ops.drep.merge_weights_bwd.default, args)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda p: (p[0][:, :-1], *p[1:]), ValueError, "denoise_weight must have shape"),
        (lambda p: (p[0], p[1][:-1], *p[2:]), ValueError, "bias must have shape"),
        (lambda p: (p[0], p[1], p[2].double(), p[3]), TypeError, "denoise_weight has dtype"),
        (lambda p: (p[0], p[1], p[2].to("meta"), p[3]), ValueError, "denoise_weight is on meta"),
        (lambda p: (p[0].int(), *p[1:]), TypeError, "weight must be float16"),
        (lambda p: (p[0].numpy(), *p[1:]), TypeError, "weight must be a torch.Tensor"),
        (lambda p: (p[0][None], *p[1:]), ValueError, "weight must be 2-D"),
    ],
)
def test_bad_input(mutate, exc, match):
    p = _params(4, 3, torch.float32, True, True)
    with pytest.raises(exc, match=match):
        ops.merge_weights(*mutate(p), CO.c1, CO.c3)


@pytest.mark.parametrize("c1,c3", [(float("nan"), 1.0), (0.1, float("inf"))])
def test_non_finite_coefficients(c1, c3):
    p = _params(4, 3, torch.float32, True, True)
    with pytest.raises(ValueError, match="must be finite"):
        ops.merge_weights(*p, c1, c3)
