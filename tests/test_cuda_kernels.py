"""The CUDA kernels (csrc/cuda/) against the float64 oracle.

drep::merge_weights_fwd / _bwd (docs/method.md M1..M5) and drep::denoise_loss_fwd (L1, L2, N1),
called directly and through the public ops with DREP_BACKEND=cuda. Every test but
``test_cuda_kernels_registered`` needs a GPU and is skipped without one; on a GPU machine run
``pytest -m gpu tests/test_cuda_kernels.py`` (add ``-m "gpu and not slow"`` to skip the
> 2^32-element noise test).

Comparisons use the dtype's (rtol, atol) from conftest with atol taken relative to the expected
tensor's largest magnitude, so that it means the same for a (K, K) gradient of size 1e-6 as for
a loss of size 2. The L2 gradients also allow for sign(D) flipping where D is within rounding of
0 (``oracle.sign_flip_slack``). Tolerances were checked against a CPU emulation of the kernels'
roundings (eps, x_noisy and G' in the input dtype: the oracle's own, ``gemm_dtype``) before any
GPU run; ``test_denoise_loss_rounds_eps_and_x_noisy_to_nearest`` holds the kernel to those
roundings exactly.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import drep_kernels
import oracle
from conftest import CLAMP_SEED, CLAMPED_COUNTERS, TOLERANCES, assert_close, poison
from drep_kernels import rng
from drep_kernels.backends import extension_error, implements, kernels
from drep_kernels.ops.denoise_loss import denoise_loss_op
from drep_kernels.ops.merge_weights import merge_weights_op

CUDA_OPS = ("merge_weights_fwd", "merge_weights_bwd", "denoise_loss_fwd", "_denoise_noise")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SIZES = (1, 7, 127, 768, 1536)
# Reverse-step and noising scales far from 1 and 0, so that every term of M1..M5 and L1 matters.
C1, C3 = 0.37, 1.02
A, S = 0.8, 0.6


def _registered() -> list[bool]:
    return [torch._C._dispatch_has_kernel_for_dispatch_key(f"drep::{op}", "CUDA") for op in CUDA_OPS]


def _links_cuda_runtime() -> bool:
    """Whether drep_kernels._C was linked against the CUDA runtime, i.e. built from .cu files."""
    import drep_kernels._C as ext

    with open(ext.__file__, "rb") as f:
        data = f.read()
    return b"libcudart" in data or b"libc10_cuda" in data


def _cuda_kernels_built() -> bool:
    return torch.version.cuda is not None and extension_error() is None and all(_registered())


def needs_gpu(test):
    """GPU-only test: marked `gpu`, skipped without a device or without the CUDA kernels."""
    test = pytest.mark.skipif(not _cuda_kernels_built(), reason="drep_kernels._C has no CUDA kernels")(test)
    test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test)
    return pytest.mark.gpu(test)


@pytest.fixture
def cuda_backend(monkeypatch):
    monkeypatch.setenv("DREP_BACKEND", "cuda")


def _randn(*shape, dtype, scale=1.0, seed=0, device="cuda"):
    """Seeded normal values rounded to dtype (made on the CPU: the same on every GPU)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def _check(actual, expected, dtype, name, slack=None):
    """|actual - expected| <= atol * scale + rtol * |expected| (+ slack), with the dtype's
    tolerances and scale = max |expected|: atol is relative to the tensor's scale."""
    rtol, atol = TOLERANCES[dtype]
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values in the result"
    if e.numel() == 0:
        return
    scale = max(e.abs().max().item(), 1e-30)
    bound = atol * scale + rtol * e.abs() + (0 if slack is None else slack.detach().double().cpu())
    err = (a - e).abs()
    if (err > bound).any():
        i = int(torch.argmax(err - bound))
        raise AssertionError(
            f"{name}: {(err > bound).sum().item()} of {err.numel()} elements out of tolerance (rtol={rtol}, "
            f"atol={atol} x scale {scale:.3e}); worst at flat index {i}: {a.reshape(-1)[i].item()!r} vs "
            f"{e.reshape(-1)[i].item()!r} (bound {bound.reshape(-1)[i].item():.3e})"
        )


# --- CPU-runnable: the build registers the kernels --------------------------------------------

@pytest.mark.gpu  # runs everywhere; the mark puts it in the GPU run, which sets DREP_EXPECT_CUDA=1
def test_cuda_kernels_registered():
    """A CUDA build of _C must register all three CUDA kernels (and the backend must see them).

    Fails when the extension was built from the .cu files (or CI says so with
    DREP_EXPECT_CUDA=1) but a kernel is missing; skipped when there is nothing to check.
    """
    if torch.version.cuda is None:
        pytest.skip("torch is not a CUDA build")
    err = extension_error()
    if err is not None:
        pytest.skip(f"drep_kernels._C not loaded: {err}")
    has = dict(zip(CUDA_OPS, _registered()))
    expect = os.environ.get("DREP_EXPECT_CUDA")
    if expect == "0":
        assert not any(has.values()), f"DREP_EXPECT_CUDA=0 but CUDA kernels are registered: {has}"
        return
    if expect == "1" or _links_cuda_runtime():
        assert all(has.values()), f"_C was built with CUDA but not every CUDA kernel is registered: {has}"
        for op in ("merge_weights", "denoise_loss"):
            assert implements("cuda", op, "cuda"), f"the cuda backend does not offer {op}"
        return
    assert not any(has.values()), f"only some CUDA kernels are registered: {has}"
    pytest.skip("drep_kernels._C was built without CUDA kernels")


# --- merge_weights (M1..M5) ----------------------------------------------------------------------

def _merge_inputs(out, k, dtype, has_b, has_bd, seed=0):
    w = _randn(out, k, dtype=dtype, scale=max(k, 1) ** -0.5, seed=seed)
    b = _randn(out, dtype=dtype, seed=seed + 1) if has_b else None
    wd = _randn(k, k, dtype=dtype, scale=max(k, 1) ** -0.5, seed=seed + 2)
    bd = _randn(k, dtype=dtype, seed=seed + 3) if has_bd else None
    return w, b, wd, bd


def _d(t):
    return None if t is None else t.double()


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out,k", [(1, 1), (7, 127), (127, 7), (768, 1536), (1536, 768)])
@pytest.mark.parametrize("has_b,has_bd", [(True, True), (True, False), (False, True), (False, False)])
def test_merge_fwd_vs_oracle(dtype, out, k, has_b, has_bd):
    w, b, wd, bd = _merge_inputs(out, k, dtype, has_b, has_bd)
    mw, mb = torch.ops.drep.merge_weights_fwd(w, b, wd, bd, C1, C3)
    ew, eb = oracle.merge(_d(w), _d(b), _d(wd), _d(bd), C1, C3)
    assert mw.dtype == dtype and mw.shape == w.shape and mw.is_contiguous()
    _check(mw, ew, dtype, "merged_weight")
    if eb is None:
        assert mb.shape == (0,)
    else:
        assert mb.dtype == dtype and mb.shape == (out,)
        _check(mb, eb, dtype, "merged_bias")


@needs_gpu
def test_merge_fwd_strided_inputs():
    """Transposed / sliced parameters: any strides; W' is contiguous whatever W's layout, as on
    every backend (drep_kernels.ops.merge_weights)."""
    k, out = 127, 33
    w = _randn(k, out, dtype=torch.float32).t()  # column-major W
    b = _randn(2 * out, dtype=torch.float32)[::2]
    wd = _randn(k, 2 * k, dtype=torch.float32)[:, ::2]
    bd = _randn(3 * k, dtype=torch.float32)[1::3]
    mw, mb = torch.ops.drep.merge_weights_fwd(w, b, wd, bd, C1, C3)
    assert mw.is_contiguous() and mw.shape == w.shape, mw.stride()
    ew, eb = oracle.merge(w.double(), b.double(), wd.double(), bd.double(), C1, C3)
    _check(mw, ew, torch.float32, "merged_weight")
    _check(mb, eb, torch.float32, "merged_bias")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out,k", [(1, 1), (7, 127), (768, 1536)])
@pytest.mark.parametrize("has_b,has_bd", [(True, True), (True, False), (False, True)])
def test_merge_public_op_grads_vs_oracle(cuda_backend, dtype, out, k, has_b, has_bd):
    """M3..M5 through drep::merge_weights's autograd, against autograd of the oracle."""
    params = [t.requires_grad_(True) if t is not None else None for t in _merge_inputs(out, k, dtype, has_b, has_bd)]
    w, b, wd, bd = params
    gw_up = _randn(out, k, dtype=dtype, seed=10)
    gb_up = _randn(out, dtype=dtype, seed=11)
    mw, mb = drep_kernels.ops.merge_weights(w, b, wd, bd, C1, C3)
    total = (mw * gw_up).sum() + (mb * gb_up).sum() if mb is not None else (mw * gw_up).sum()
    names = [n for n, t in zip(("dW", "db", "dW_d", "db_d"), params) if t is not None]
    live = [t for t in params if t is not None]
    grads = torch.autograd.grad(total, live)

    dparams = [t.detach().double().requires_grad_(True) if t is not None else None for t in params]
    ew, eb = oracle.merge(*dparams, C1, C3)
    etotal = (ew * gw_up.double()).sum() + ((eb * gb_up.double()).sum() if eb is not None else 0)
    egrads = torch.autograd.grad(etotal, [t for t in dparams if t is not None])
    for name, g, e, t in zip(names, grads, egrads, live):
        assert g.dtype == dtype and g.shape == t.shape
        _check(g, e, dtype, name)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need_weight,need_denoise", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("has_gb,has_bd", [(True, True), (True, False), (False, True)])
def test_merge_bwd_kernel_matches_torch_backend(dtype, need_weight, need_denoise, has_gb, has_bd):
    """The raw kernel: the torch backend's shapes, dtypes and empty-tensor conventions."""
    out, k = 31, 127
    w, _, wd, bd = _merge_inputs(out, k, dtype, False, has_bd)
    g_w = _randn(out, k, dtype=dtype, seed=20)
    g_b = _randn(out, dtype=dtype, seed=21) if has_gb else None
    args = (g_w, g_b, w, wd, bd, C1, C3, need_weight, need_denoise)
    got = torch.ops.drep.merge_weights_bwd(*args)
    ref = kernels("torch").merge_weights_bwd(*args)
    dargs = (g_w.double(), _d(g_b), w.double(), wd.double(), _d(bd), C1, C3, need_weight, need_denoise)
    exact = kernels("torch").merge_weights_bwd(*dargs)
    for name, g, r, e in zip(("dW", "dW_d", "db_d"), got, ref, exact):
        assert g.shape == r.shape and g.dtype == r.dtype and g.device == r.device, name
        if g.numel():
            _check(g, e, dtype, name)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_empty(dtype):
    for out, k in [(0, 5), (5, 0), (0, 0)]:
        w, b, wd, bd = _merge_inputs(out, k, dtype, True, True)
        mw, mb = torch.ops.drep.merge_weights_fwd(w, b, wd, bd, C1, C3)
        ew, eb = kernels("torch").merge_weights_fwd(w, b, wd, bd, C1, C3)
        assert mw.shape == ew.shape and mb.shape == eb.shape
        assert torch.equal(mw, ew) and torch.equal(mb, eb)  # b' = b when K = 0
        grads = torch.ops.drep.merge_weights_bwd(mw, mb, w, wd, bd, C1, C3, True, True)
        egrads = kernels("torch").merge_weights_bwd(mw, mb, w, wd, bd, C1, C3, True, True)
        for g, e in zip(grads, egrads):
            assert g.shape == e.shape and g.dtype == e.dtype and torch.equal(g, e)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_deterministic(dtype):
    w, b, wd, bd = _merge_inputs(768, 1536, dtype, True, True)
    first = torch.ops.drep.merge_weights_fwd(w, b, wd, bd, C1, C3)
    second = torch.ops.drep.merge_weights_fwd(w, b, wd, bd, C1, C3)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    first = torch.ops.drep.merge_weights_bwd(first[0], first[1], w, wd, bd, C1, C3, True, True)
    second = torch.ops.drep.merge_weights_bwd(second[0], second[1], w, wd, bd, C1, C3, True, True)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


# --- denoise_loss (L1, L2, N1) ---------------------------------------------------------------

def _loss_inputs(m, k, dtype, has_bd=True, seed=0, device="cuda"):
    x = _randn(m, k, dtype=dtype, seed=seed, device=device)
    wd = _randn(k, k, dtype=dtype, scale=max(k, 1) ** -0.5, seed=seed + 1, device=device)
    # b_d = 0.5 + small: D = p + b_d - eps takes both signs but has a nonzero mean, so that
    # dL/db_d (a column sum of sign(D) + 2 D) does not cancel to a value below its rounding.
    bd = (_randn(k, dtype=torch.float64, scale=0.1, seed=seed + 2, device=device) + 0.5).to(dtype) if has_bd else None
    return x, wd, bd


def _check_loss(got, x, wd, bd, eps, dtype, compute_grad=True):
    loss, gw, gb = got
    eloss, egw, egb = oracle.denoise_loss_grads(x, wd, bd, A, S, eps)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.shape == () and loss.dtype == cdt
    _check(loss, eloss, dtype, "loss")
    if not compute_grad:
        assert gw.shape == (0,) and gb.shape == (0,)
        return
    slack_w, slack_b = oracle.sign_flip_slack(x, wd, bd, eps, dtype, A, S)
    assert gw.shape == wd.shape and gw.dtype == cdt
    _check(gw, egw, dtype, "dL/dW_d", slack_w)
    if bd is None:
        assert gb.shape == (0,)
    else:
        assert gb.shape == bd.shape and gb.dtype == cdt
        _check(gb, egb, dtype, "dL/db_d", slack_b)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("k", (1, 7, 127, 768))
def test_denoise_loss_vs_oracle(dtype, m, k):
    x, wd, bd = _loss_inputs(m, k, dtype)
    eps = _randn(m, k, dtype=torch.float32, seed=7)
    got = torch.ops.drep.denoise_loss_fwd(x, wd, bd, A, S, eps, torch.tensor(0), True)
    _check_loss(got, x, wd, bd, eps, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise_dtype", DTYPES)
def test_denoise_loss_noise_dtypes_no_bias_no_grad(dtype, noise_dtype):
    """Noise of any float dtype (used as given, cast to the compute dtype), no b_d, no gradient."""
    x, wd, _ = _loss_inputs(129, 127, dtype)
    eps = _randn(129, 127, dtype=noise_dtype, seed=8)
    for compute_grad in (True, False):
        got = torch.ops.drep.denoise_loss_fwd(x, wd, None, A, S, eps, torch.tensor(0), compute_grad)
        _check_loss(got, x, wd, None, eps, dtype, compute_grad)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_denoise_loss_several_chunks(dtype):
    """More than one chunk, the last one partial (chunk boundaries, gradient sums): the 64 MiB
    workspace holds 2^23 elements of float32 (x_noisy and p, 8 bytes), 11184810 of bfloat16
    (x_noisy 2 bytes, p 4, G' over p): 16001 x 768 is 2 chunks either way."""
    m, k = 16_001, 768
    x, wd, bd = _loss_inputs(m, k, dtype)
    eps = _randn(m, k, dtype=torch.float32, seed=9)
    got = torch.ops.drep.denoise_loss_fwd(x, wd, bd, A, S, eps, torch.tensor(0), True)
    _check_loss(got, x, wd, bd, eps, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_denoise_loss_public_op_3d_and_strided(cuda_backend, dtype):
    """Through drep::denoise_loss's autograd: 3-D x and noise that are strided views."""
    k = 127
    x = _randn(6, 5, 2 * k, dtype=dtype, seed=3)[..., ::2]  # (6, 5, 127); flattens to a (30, 127) view
    noise = _randn(6, 5, 2 * k, dtype=dtype, seed=4)[..., 1::2]
    for t in (x, noise):  # the op sees (30, 127) views with row stride 254 and column stride 2
        assert t.reshape(-1, k).stride() == (2 * k, 2) and t.reshape(-1, k).data_ptr() == t.data_ptr()
    _, wd, bd = _loss_inputs(1, k, dtype)
    wd.requires_grad_(True)
    bd.requires_grad_(True)
    loss = drep_kernels.ops.denoise_loss(x, wd, bd, A, S, noise=noise)
    g_up = 1.7
    dwd, dbd = torch.autograd.grad(loss * g_up, [wd, bd])
    eloss, egw, egb = oracle.denoise_loss_grads(x, wd, bd, A, S, noise)
    slack_w, slack_b = oracle.sign_flip_slack(x, wd, bd, noise, dtype, A, S)
    _check(loss, eloss, dtype, "loss")
    _check(dwd, g_up * egw, dtype, "dW_d", g_up * slack_w)
    _check(dbd, g_up * egb, dtype, "db_d", g_up * slack_b)
    assert dwd.dtype == dtype and dbd.dtype == dtype


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_denoise_loss_rounds_eps_and_x_noisy_to_nearest(dtype):
    """The policy's roundings, exactly (docs/method.md, Precision): eps to the GEMM dtype, then
    x_noisy formed from it. x = 0, a = 0, s = 0.625, W_d = w I with w = 1.6 rounded to the dtype
    (s w is 1 within 2^-10): D = w round(0.625 eps) - eps is mostly rounding error, so the
    oracle applying the same roundings is met at 1e-4, while the loss with eps left unrounded
    differs from it by 1 to 2 % (as in tests/test_cuda_on_host.py, which runs this kernel code
    on the CPU)."""
    m, k, s = 96, 40, 0.625
    x = torch.zeros(m, k, dtype=dtype, device="cuda")
    wd = (1.6 * torch.eye(k)).to("cuda", dtype)
    eps = rng.normal(7, m, k, device="cuda")
    loss, gw, _ = torch.ops.drep.denoise_loss_fwd(x, wd, None, 0.0, s, eps, torch.tensor(0), True)
    eloss, egw, _ = oracle.denoise_loss_grads(x, wd, None, 0.0, s, eps, dtype)
    d = (s * eps.double()).float().to(dtype).double() @ wd.double().T - eps.double()  # eps not rounded
    assert abs(float(d.abs().mean() + d.square().mean() - eloss)) > 5e-3 * float(eloss)
    assert_close(loss, eloss, 1e-4, 1e-9, "loss")
    assert_close(gw, egw, 1e-4, 1e-6 * float(egw.abs().max()), "dL/dW_d")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_denoise_loss_column_major_and_expanded(dtype):
    """The kernel reads x and noise through their strides: column-major, and stride-0 rows."""
    m, k = 129, 127
    x = _randn(k, m, dtype=dtype, seed=12).t()
    noise = _randn(k, m, dtype=torch.float32, seed=13).t()
    _, wd, bd = _loss_inputs(1, k, dtype)
    got = torch.ops.drep.denoise_loss_fwd(x, wd, bd, A, S, noise, torch.tensor(0), True)
    _check_loss(got, x, wd, bd, noise, dtype)
    row = _randn(1, k, dtype=dtype, seed=14)
    got = torch.ops.drep.denoise_loss_fwd(row.expand(m, k), wd, bd, A, S, noise, torch.tensor(0), True)
    _check_loss(got, row.expand(m, k), wd, bd, noise, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_denoise_loss_empty_batch(cuda_backend, dtype):
    k = 7
    x, wd, bd = _loss_inputs(0, k, dtype)
    for compute_grad in (True, False):
        got = torch.ops.drep.denoise_loss_fwd(x, wd, bd, A, S, None, torch.tensor(3), compute_grad)
        ref = kernels("torch").denoise_loss_fwd(x, wd, bd, A, S, None, torch.tensor(3), compute_grad)
        for g, r in zip(got, ref):
            assert g.shape == r.shape and g.dtype == r.dtype and torch.equal(g, r)
    wd.requires_grad_(True)
    loss = drep_kernels.ops.denoise_loss(x.reshape(0, 1, k), wd, bd, A, S, seed=3)
    assert loss.item() == 0.0
    (dwd,) = torch.autograd.grad(loss, [wd])
    assert torch.equal(dwd, torch.zeros_like(wd))


@needs_gpu
@pytest.mark.parametrize("per_element", [False, True], ids=["prologue", "epilogue"])
@pytest.mark.parametrize("rows,cols", [(5, 1), (5, 3), (5, 37), (5, 64), (130, 261)])
@pytest.mark.parametrize("row0", [0, 2**38 + 5])
def test_noise_paths_match_rng(per_element, rows, cols, row0):
    # Both of the kernel's noise paths (the prologue's and the loss epilogue's thread layouts),
    # N1 against rng.py, at counters past 2^32 too (row0 Q); 130 x 261 spans 17 epilogue stripes
    # of 8 rows (1 row per lane) by 3 column tiles of 128, the last stripe and group of four cut.
    seed = 2**33 + 7
    like = torch.empty(0, device="cuda")
    got = torch.ops.drep._denoise_noise(like, torch.tensor(seed), row0, rows, cols, per_element)
    want = rng.normal(seed, rows, cols, device="cuda", row0=row0)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


@needs_gpu
@pytest.mark.parametrize("per_element", [False, True], ids=["prologue", "epilogue"])
def test_noise_radius_clamp(per_element):
    # Counters whose radius uniform N1 clamps at 1e-7 (tests/conftest.py): rows of 4 columns.
    like = torch.empty(0, device="cuda")
    for counter in CLAMPED_COUNTERS:
        got = torch.ops.drep._denoise_noise(like, torch.tensor(CLAMP_SEED), counter, 1, 4, per_element)
        want = rng.normal(CLAMP_SEED, 1, 4, device="cuda", row0=counter)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


@needs_gpu
@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 987, 2**63 - 1])
def test_seeded_noise_is_the_torch_backends(seed):
    """N1: one seed, one noise. With W_d = 0, b_d = 0, a = 0, s = 1 we have D = -eps, so
    db = sum over rows of (-sign(eps) - 2 eps) / n exposes eps column by column."""
    m, k = 5, 1031
    x = torch.zeros(m, k, device="cuda")
    wd = torch.zeros(k, k, device="cuda")
    bd = torch.zeros(k, device="cuda")
    seed_t = torch.tensor(seed, dtype=torch.int64)
    loss, gw, gb = torch.ops.drep.denoise_loss_fwd(x, wd, bd, 0.0, 1.0, None, seed_t, True)
    eps = rng.normal(seed, m, k, device="cuda").double()
    n = m * k
    assert_close(gb, ((-torch.sign(eps) - 2 * eps).sum(0) / n), 2e-5, 1e-9, "db (eps per column)")
    assert_close(loss, (eps.abs().mean() + eps.square().mean()), 2e-5, 1e-7, "loss")
    # x_noisy = eps (the prologue's noise) and D = -eps (the epilogue's, drawn again in its own
    # layout): dW_d = G^T x_noisy = -(sign eps + 2 eps)^T eps / n ties the two together.
    assert_close(gw, -(torch.sign(eps) + 2 * eps).T @ eps / n, 2e-5, 1e-7, "dW_d (both noise paths)")

    # Any input: the cuda backend and the torch backend see the same noise. b_d = 8 keeps D off
    # 0, where the two backends' float32 roundings could pick different signs (L2).
    x, wd, _ = _loss_inputs(67, 129, torch.float32)
    bd = torch.full((129,), 8.0, device="cuda")
    got = torch.ops.drep.denoise_loss_fwd(x, wd, bd, A, S, None, seed_t, True)
    ref = kernels("torch").denoise_loss_fwd(x, wd, bd, A, S, None, seed_t, True)
    for name, g, r in zip(("loss", "dW_d", "db_d"), got, ref):
        _check(g, r, torch.float32, name)


@needs_gpu
def test_float32_on_tf32_exactly_when_torch_is():
    """float32 GEMMs run on TF32 iff torch's float32 matmuls do (fp32_precision = "tf32"): the
    loss and the merge then change, and stay within float16's tolerances (TF32 keeps float16's
    10 mantissa bits); with the default they are float32's."""
    x, wd, bd = _loss_inputs(1536, 768, torch.float32)
    eps = _randn(1536, 768, dtype=torch.float32, seed=7)
    w, b, mwd, mbd = _merge_inputs(768, 1536, torch.float32, True, True)

    def run():
        loss = torch.ops.drep.denoise_loss_fwd(x, wd, bd, A, S, eps, torch.tensor(0), True)
        return loss, torch.ops.drep.merge_weights_fwd(w, b, mwd, mbd, C1, C3)

    ieee = run()
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        fast = run()
    finally:
        matmul.fp32_precision = saved
    ew, eb = oracle.merge(_d(w), _d(b), _d(mwd), _d(mbd), C1, C3)
    for (loss, merged), dtype in ((ieee, torch.float32), (fast, torch.float16)):
        _check_loss(loss, x, wd, bd, eps, dtype)
        _check(merged[0], ew, dtype, "merged_weight")
        _check(merged[1], eb, dtype, "merged_bias")
    assert not torch.equal(ieee[0][1], fast[0][1]), "dL/dW_d: TF32 on, yet the float32 result"
    assert not torch.equal(ieee[1][0], fast[1][0]), "W': TF32 on, yet the float32 result"
    # b' = b - c1 W b_d is a matrix-vector product (merge_prep_kernel): never TF32.
    _check(fast[1][1], eb, torch.float32, "merged_bias (TF32 on)")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_denoise_loss_bitwise_deterministic(dtype):
    x, wd, bd = _loss_inputs(16_001, 768, dtype)  # two chunks (see test_denoise_loss_several_chunks)
    seed = torch.tensor(2024)
    first = torch.ops.drep.denoise_loss_fwd(x, wd, bd, A, S, None, seed, True)
    for _ in range(2):
        again = torch.ops.drep.denoise_loss_fwd(x, wd, bd, A, S, None, seed, True)
        for name, f, a in zip(("loss", "dW_d", "db_d"), first, again):
            assert torch.equal(f, a), f"{name} differs between two identical calls"


def _poison_allocator():
    """Fill freed blocks of the caching allocator (small and large pools) with NaN, so that the
    next allocations of these sizes most likely reuse NaN memory."""
    junk = [poison(torch.empty(1 << p, device="cuda")) for p in (8, 10, 12, 14, 16, 18, 22) for _ in range(4)]
    torch.cuda.synchronize()
    del junk


@needs_gpu
def test_outputs_fully_written():
    """Every output element is written: an element a kernel skipped would come back as the NaN
    left in the allocator's freed blocks."""
    eps = _randn(300, 127, dtype=torch.float32, seed=5)
    w, b, wd2, bd2 = _merge_inputs(33, 127, torch.float32, True, True)
    for _ in range(3):
        for dtype in (torch.float32, torch.bfloat16):  # bf16: G' written over half of p's bytes
            x, wd, bd = _loss_inputs(300, 127, dtype)
            _poison_allocator()
            got = torch.ops.drep.denoise_loss_fwd(x, wd, bd, A, S, eps, torch.tensor(0), True)
            _check_loss(got, x, wd, bd, eps, dtype)
        _poison_allocator()
        mw, mb = torch.ops.drep.merge_weights_fwd(w, b, wd2, bd2, C1, C3)
        ew, eb = oracle.merge(w.double(), b.double(), wd2.double(), bd2.double(), C1, C3)
        _check(mw, ew, torch.float32, "merged_weight")
        _check(mb, eb, torch.float32, "merged_bias")
        _poison_allocator()
        # (G_W, g_b) = (W, b): any values do; the exact gradients come from the torch backend in float64.
        got = torch.ops.drep.merge_weights_bwd(w, b, w, wd2, bd2, C1, C3, True, True)
        w64, b64 = w.double(), b.double()
        exact = kernels("torch").merge_weights_bwd(w64, b64, w64, wd2.double(), bd2.double(), C1, C3, True, True)
        for name, g, e in zip(("dW", "dW_d", "db_d"), got, exact):
            _check(g, e, torch.float32, name)


@needs_gpu
@pytest.mark.slow
def test_seeded_noise_64bit_counter():
    """M K > 2^32: element offsets m K + k must not wrap at 32 bits (the noise counters
    m ceil(K / 4) + k / 4 past 2^32: test_noise_paths_match_rng).

    x is a stride-0 expanded zero tensor (no memory). With W_d = 0, b_d = 0, a = 0, s = 1,
    n dL/dW_d = -sum over rows of (sign(e_m) + 2 e_m)^T e_m. Two calls, with M K = 2^32 and
    2^32 + 2^28, share their first rows (and chunks), so their difference is the sum over the
    rows past element 2^32 alone, checked against rng.py there. Its off-diagonal entries are
    random walks: noise repeated from index 0 would change them by O(1).
    """
    k = 32
    m_low, m_high = 2**32 // k, (2**32 + 2**28) // k
    seed = 2**33 + 7
    wd = torch.zeros(k, k, device="cuda")
    sums = []
    for m in (m_low, m_high):
        x = torch.zeros(1, k, device="cuda").expand(m, k)
        loss, gw, _ = torch.ops.drep.denoise_loss_fwd(x, wd, None, 0.0, 1.0, None, torch.tensor(seed), True)
        n = m * k
        sums.append((loss.double() * n, gw.double() * n))
    loss_high = sums[1][0] - sums[0][0]
    gw_high = sums[1][1] - sums[0][1]

    ref = torch.zeros(k, k, dtype=torch.float64, device="cuda")
    loss_ref = torch.zeros((), dtype=torch.float64, device="cuda")
    step = 2**26 // k
    for r0 in range(m_low, m_high, step):
        e = rng.normal(seed, min(step, m_high - r0), k, device="cuda", row0=r0).double()
        ref -= (torch.sign(e) + 2 * e).T @ e
        loss_ref += (e.abs() + e.square()).sum()
    assert_close(loss_high, loss_ref, 1e-4, 0.0, "loss over indices >= 2^32")
    eye = torch.eye(k, dtype=torch.bool, device="cuda")
    off, off_ref = gw_high.masked_fill(eye, 0), ref.masked_fill(eye, 0)
    scale = off_ref.abs().max().item()
    assert_close(off / scale, off_ref / scale, 1e-2, 1e-2, "dW_d off the diagonal, indices >= 2^32")
    assert_close(gw_high.diagonal(), ref.diagonal(), 1e-3, 0.0, "dW_d diagonal, indices >= 2^32")


# --- registration with torch.library: opcheck and torch.compile --------------------------------

@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_public_ops(dtype):
    w, b, wd, bd = _merge_inputs(33, 64, dtype, True, True)
    for t in (w, b, wd, bd):
        t.requires_grad_(True)
    torch.library.opcheck(merge_weights_op, (w, b, wd, bd, C1, C3, "cuda"))
    torch.library.opcheck(merge_weights_op, (w, None, wd, None, C1, C3, "cuda"))
    x, _, _ = _loss_inputs(50, 64, dtype)
    seed = torch.tensor(11)
    torch.library.opcheck(denoise_loss_op, (x, wd, bd, A, S, None, seed, "cuda", True))
    torch.library.opcheck(denoise_loss_op, (x, wd, None, A, S, x.detach() * 0.5, seed, "cuda", True))
    torch.library.opcheck(denoise_loss_op, (x, wd.detach(), None, A, S, None, seed, "cuda", False))


@needs_gpu
def test_opcheck_kernel_ops():
    w, b, wd, bd = _merge_inputs(33, 64, torch.float32, True, True)
    torch.library.opcheck(torch.ops.drep.merge_weights_fwd.default, (w, b, wd, bd, C1, C3))
    torch.library.opcheck(torch.ops.drep.merge_weights_fwd.default, (w, None, wd, None, C1, C3))
    torch.library.opcheck(
        torch.ops.drep.merge_weights_bwd.default, (w, b, w, wd, bd, C1, C3, True, True)
    )
    torch.library.opcheck(
        torch.ops.drep.merge_weights_bwd.default, (w, None, w, wd, bd, C1, C3, False, True)
    )
    x, _, _ = _loss_inputs(50, 64, torch.float32)
    torch.library.opcheck(
        torch.ops.drep.denoise_loss_fwd.default, (x, wd, bd, A, S, None, torch.tensor(5), True)
    )
    torch.library.opcheck(
        torch.ops.drep.denoise_loss_fwd.default, (x, wd, None, A, S, None, torch.tensor(5), False)
    )


@needs_gpu
@pytest.mark.slow  # a cold Inductor compile: the GPU run's slow tier, after the sweep
def test_compile_converted_mlp(cuda_backend):
    """torch.compile(fullgraph=True) of a converted MLP on CUDA: the same outputs, losses and
    gradients as eager (the losses' seeds come from torch's CPU generator in both)."""
    import torch._inductor.config as inductor_config

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).cuda()
        drep_kernels.convert(model, init="linear")
        drep_kernels.set_phase(model, "joint")
        return model

    x = torch.randn(8, 64, device="cuda")

    def run(model, fn):
        torch.manual_seed(1)
        y = fn(x)
        loss = drep_kernels.denoise_loss(model)
        total = y.square().mean() + 0.01 * loss
        grads = torch.autograd.grad(total, [p for p in model.parameters() if p.requires_grad])
        return y.detach(), loss.detach(), grads

    eager_model = make()
    y_e, loss_e, grads_e = run(eager_model, eager_model)
    model = make()
    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(model, fullgraph=True)
        y_c, loss_c, grads_c = run(model, compiled)
    assert_close(y_c, y_e, 1e-5, 1e-6, "y")
    assert_close(loss_c, loss_e, 1e-5, 1e-6, "denoise loss")
    assert len(grads_c) == len(grads_e)
    for i, (gc, ge) in enumerate(zip(grads_c, grads_e)):
        assert_close(gc, ge, 1e-4, 1e-6, f"grad {i}")
