"""The C++ CPU kernel of drep::denoise_loss_fwd (csrc/cpu/denoise_loss.cpp).

Checked against the float64 oracle (tests/oracle.py) with explicit noise, against the torch
backend and drep_kernels.rng with in-kernel noise (docs/method.md N1), for bitwise
determinism across runs and thread counts, with gradcheck through the public op, and with
torch.library.opcheck.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from drep_kernels import rng
from drep_kernels.backends import implements, kernels, select

if not implements("cpu", "denoise_loss", "cpu"):
    pytest.skip("the C++ CPU kernel of denoise_loss is not built", allow_module_level=True)

from conftest import CLAMP_SEED, CLAMPED_COUNTERS, TOLERANCES, assert_close, cpu_flags  # noqa: E402
from oracle import denoise_loss_grads  # noqa: E402

from drep_kernels.ops.denoise_loss import denoise_loss, denoise_loss_op  # noqa: E402

fwd = torch.ops.drep.denoise_loss_fwd
A, S = 0.9, 0.4  # noising scales of a mid-chain step
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Inputs are exact in float32 and the kernel computes in float32, so half-precision inputs are
# held to float32 accuracy (conftest's half entries allow for rounding intermediates to half).
TOL = {dt: TOLERANCES[torch.float64 if dt == torch.float64 else torch.float32] for dt in DTYPES}
MARGIN = 10.0


def make_inputs(M, K, dtype, *, bias=True, seed=0, layout=None):
    """(x, W_d, b_d, eps) with every D = p - eps at least ~MARGIN - 5 away from 0.

    sign(D) is discontinuous at 0: a float32 kernel and the float64 oracle would disagree on
    elements within rounding of 0, and each disagreement moves dL/dW_d by 1/(M K). So each
    output column j gets a fixed offset of +-MARGIN: through b_d when there is a bias, else
    through a constant input feature x[:, 0] = 100 with W_d[j, 0] = +-MARGIN / (100 a).
    Both signs of D still occur (half the columns each)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    w = torch.randn(K, K, generator=g, dtype=torch.float64) / math.sqrt(K)
    eps = torch.randn(M, K, generator=g, dtype=torch.float64)
    signs = torch.where(torch.rand(K, generator=g) < 0.5, -1.0, 1.0).double()
    if bias:
        b = MARGIN * signs + 0.1 * torch.randn(K, generator=g, dtype=torch.float64)
    else:
        b = None
        x[:, 0] = 100.0
        w[:, 0] = MARGIN * signs / (100.0 * A)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), cast(eps)


def check_against_oracle(out, x, w, b, eps, dtype, compute_grad=True):
    loss, gw, gb = out
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    ref_loss, ref_gw, ref_gb = denoise_loss_grads(x, w, b, A, S, eps)
    rtol, atol = TOL[dtype]
    assert loss.dtype == cdt and loss.shape == ()
    assert_close(loss, ref_loss, rtol, atol, "loss")
    if not compute_grad:
        assert gw.shape == (0,) and gb.shape == (0,)
        return
    assert gw.dtype == cdt and gb.dtype == cdt
    assert_close(gw, ref_gw, rtol, atol, "grad_weight")
    if b is None:
        assert gb.shape == (0,)
    else:
        assert_close(gb, ref_gb, rtol, atol, "grad_bias")


SEED = torch.tensor(0, dtype=torch.int64)  # unused when noise is given


# --- against the float64 oracle, explicit noise ------------------------------------------

# K = 768 with small M only (time).
SIZES = [(M, K) for K in (1, 7, 127, 768) for M in (0, 1, 7, 130) if K < 768 or M <= 7]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K", SIZES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_oracle(dtype, M, K, bias):
    x, w, b, eps = make_inputs(M, K, dtype, bias=bias, seed=K * 1000 + M)
    out = fwd(x, w, b, A, S, eps, SEED, True)
    check_against_oracle(out, x, w, b, eps, dtype)


# Tiles hold at most about 2^20 elements, and at least 2 chunks of at most 800 rows (at most
# 12800 rows at K = 33, 1600 rows at K >= 656); M is cut into equal tiles and a tile into an
# even number of equal chunks (make_plan). These shapes span 2 tiles with ragged ends:
# 24001 = 12001 + 12000 rows in chunks of 751, 1601 = 801 + 800 rows in chunks of 401;
# K = 1540 has 3 gradient blocks of 514 (the last 512).
MULTI_TILE = [(24001, 33), (1601, 1540)]


@pytest.mark.parametrize("M,K", MULTI_TILE, ids=["2-tiles", "2-tiles-3-blocks"])
def test_matches_oracle_across_tiles_and_blocks(M, K):
    x, w, b, eps = make_inputs(M, K, torch.float32, seed=M + K)
    check_against_oracle(fwd(x, w, b, A, S, eps, SEED, True), x, w, b, eps, torch.float32)


def test_unsmoothed_data_float64():
    # Plain random data (D crosses 0 freely): in float64 no sign of D can flip.
    g = torch.Generator().manual_seed(7)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x, eps, w, b = randn(130, 127), randn(130, 127), randn(127, 127) / 11, randn(127)
    check_against_oracle(fwd(x, w, b, A, S, eps, SEED, True), x, w, b, eps, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compute_grad_false(dtype):
    x, w, b, eps = make_inputs(130, 7, dtype)
    out = fwd(x, w, b, A, S, eps, SEED, False)
    check_against_oracle(out, x, w, b, eps, dtype, compute_grad=False)
    # The loss does not depend on whether gradients are computed.
    assert torch.equal(out[0], fwd(x, w, b, A, S, eps, SEED, True)[0])


def test_empty_batch_gives_zero_loss_and_gradients():
    for dtype in DTYPES:
        x, w, b, eps = make_inputs(0, 7, dtype)
        loss, gw, gb = fwd(x, w, b, A, S, None, torch.tensor(3), True)
        assert loss.item() == 0.0 and torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))
        assert gw.shape == (7, 7) and gb.shape == (7,)


def test_sign_of_zero_is_zero():
    # D = 0 everywhere: the L1 part contributes sign(0) = 0, so all gradients vanish.
    x = torch.randn(9, 5)
    loss, gw, gb = fwd(x, torch.zeros(5, 5), torch.zeros(5), 0.0, 0.0, torch.zeros(9, 5), SEED, True)
    assert loss.item() == 0.0 and not gw.any() and not gb.any()


@pytest.mark.parametrize("view", ["transposed", "sliced", "expanded"])
def test_non_contiguous_inputs(view):
    x, w, b, eps = make_inputs(130, 127, torch.float32, seed=3)
    if view == "transposed":
        xv, ev = x.T.contiguous().T, eps.T.contiguous().T
    elif view == "sliced":
        big = torch.zeros(3 * 130, 127 + 9)
        big[1::3, 4 : 4 + 127] = x
        xv = big[1::3, 4 : 4 + 127]
        ev = torch.zeros(130, 2 * 127)
        ev[:, ::2] = eps
        ev = ev[:, ::2]
        x = x.clone()
    else:  # one row repeated by a zero stride
        x = x[:1].expand(130, 127).contiguous()
        xv, ev = x[:1].expand(130, 127), eps
    assert not xv.is_contiguous() and (view == "expanded" or not ev.is_contiguous())
    out = fwd(xv, w, b, A, S, ev, SEED, True)
    check_against_oracle(out, x, w, b, eps, torch.float32)
    # Strided rows are gathered into the same buffers: bitwise the contiguous result.
    for got, want in zip(out, fwd(x.contiguous(), w, b, A, S, eps.contiguous(), SEED, True)):
        assert torch.equal(got, want)


def test_mixed_dtypes_and_strided_weight():
    # The weight, bias and noise are cast to the compute dtype, whatever their dtype or layout.
    x, w, b, eps = make_inputs(50, 31, torch.float32, seed=5)
    out = fwd(x, w.double().T.contiguous().T, b.double(), A, S, eps.double(), SEED, True)
    check_against_oracle(out, x, w, b, eps, torch.float32)


def test_bad_arguments_raise():
    x, w, b, eps = make_inputs(4, 3, torch.float32)
    with pytest.raises(RuntimeError, match="2-D"):
        fwd(x[None], w, b, A, S, eps, SEED, True)
    with pytest.raises(RuntimeError, match="denoise_weight"):
        fwd(x, w[:2], b, A, S, eps, SEED, True)
    with pytest.raises(RuntimeError, match="noise"):
        fwd(x, w, b, A, S, eps[:2], SEED, True)
    with pytest.raises(RuntimeError, match="seed"):
        fwd(x, w, b, A, S, None, torch.tensor([1, 2]), True)


# --- the public op ------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_public_op_3d_input(monkeypatch, bias):
    monkeypatch.setenv("DREP_BACKEND", "cpu")
    assert select("denoise_loss", torch.device("cpu")) == "cpu"
    x, w, b, eps = make_inputs(2 * 65, 127, torch.float32, bias=bias, seed=11)
    x3, eps3 = x.reshape(2, 65, 127), eps.reshape(2, 65, 127)
    x3.requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    loss = denoise_loss(x3, w, b, A, S, noise=eps3)
    (3.0 * loss).backward()
    ref_loss, ref_gw, ref_gb = denoise_loss_grads(x, w, b, A, S, eps)
    rtol, atol = TOL[torch.float32]
    assert_close(loss, ref_loss, rtol, atol, "loss")
    assert_close(w.grad, 3.0 * ref_gw, rtol, atol, "W_d.grad")
    if b is not None:
        assert_close(b.grad, 3.0 * ref_gb, rtol, atol, "b_d.grad")
    assert x3.grad is None  # the loss never pulls the backbone


def test_selected_by_default_on_cpu():
    assert select("denoise_loss", torch.device("cpu")) == "cpu"


# --- in-kernel noise (N1) -----------------------------------------------------------------

def kernel_noise(seed: int, row0: int, rows: int, cols: int) -> torch.Tensor:
    seed_t = torch.tensor(seed, dtype=torch.int64)
    return torch.ops.drep._denoise_noise(torch.empty(0), seed_t, row0, rows, cols, False)


@pytest.mark.parametrize("seed", [0, 1234, 2**32 + 7, 2**62 + 3])
@pytest.mark.parametrize("row0", [0, 2**32 // 10 - 1, 2**38 + 5])
@pytest.mark.parametrize("cols", [1, 3, 8, 12, 37, 64])  # 8, 12: short rows in one span
def test_noise_matches_rng(seed, row0, cols):
    # 64-bit counters (row0 * ceil(cols / 4) crosses 2^32 for the larger rows: the counter's
    # high word and its carry) and 64-bit seeds (the key's high word); 37 columns cover a
    # vector block, its tail and a cut last counter; 3 rows cover row starts. (This process's
    # vector path only: tests/test_cpu_vector_paths.py runs every path, with wider rows.)
    got = kernel_noise(seed, row0, 3, cols)
    want = rng.normal(seed, 3, cols, row0=row0)
    # Same integer stream; log, sin and cos round differently (a few float32 ulps).
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


def test_noise_radius_clamp():
    # Counters whose radius uniform N1 clamps at 1e-7 (tests/conftest.py): rows of 4 columns.
    for counter in CLAMPED_COUNTERS:
        want = rng.normal(CLAMP_SEED, 1, 4, row0=counter)
        torch.testing.assert_close(kernel_noise(CLAMP_SEED, counter, 1, 4), want, rtol=2e-6, atol=2e-6)


def recover_kernel_noise(M, K, seed):
    """The eps the kernel draws for an M x K input (M = K), read back from dL/dW_d.

    With W_d = 0, b_d = 0, s = 0, a = 1 and x = I: x_noisy = I, p = 0, D = -eps, so
    dL/dW_d = G^T x_noisy = G^T exactly, and eps = (v - sign v) / 2 with v = -(M K) G."""
    assert M == K
    loss, gw, _ = fwd(torch.eye(K), torch.zeros(K, K), None, 1.0, 0.0, None, torch.tensor(seed), True)
    v = -gw.T.double() * (M * K)
    return ((v - torch.sign(v)) / 2).float(), loss


@pytest.fixture(scope="module")
def recovered():
    # K = M = 1700: 2.89M samples over 2 tiles of 850 rows, each 2 chunks of 425 rows, each
    # chunk's noise one span of counters (4 divides K).
    eps, loss = recover_kernel_noise(1700, 1700, 2024)
    return eps, loss


def test_in_kernel_noise_equals_rng_normal(recovered):
    eps, loss = recovered
    K = 1700
    # Rows at chunk and tile edges (chunks of 425, tiles of 850 rows here) and a spread of
    # others: rng.normal in plain torch is slow, the whole 1700 x 1700 would take seconds.
    rows = sorted({0, 1, 424, 425, 426, 849, 850, 851, 1274, 1275, 1699} | set(range(3, K, 79)))
    want = rng.normal_at(2024, torch.tensor(rows)[:, None], torch.arange(K), K)
    torch.testing.assert_close(eps[rows], want, rtol=1e-5, atol=1e-5)
    # The loss of D = -eps is mean |eps| + mean eps^2 over all elements.
    e = eps.double()
    torch.testing.assert_close(loss.double(), e.abs().mean() + e.square().mean(), rtol=1e-6, atol=0)


def test_noise_statistics(recovered):
    scipy_stats = pytest.importorskip("scipy.stats")
    eps, _ = recovered
    flat = eps.double().reshape(-1)
    n = flat.numel()
    assert abs(flat.mean().item()) < 5 / math.sqrt(n)
    assert abs(flat.var().item() - 1) < 5 * math.sqrt(2 / n)
    # KS on 200k samples (the whole set makes the test sensitive to float32 rounding of log/cos).
    sample = flat[:: max(1, n // 200_000)].numpy()
    assert scipy_stats.kstest(sample, "norm").pvalue > 1e-3


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def test_noise_has_no_correlation_between_neighbours_and_tiles(recovered):
    eps, _ = recovered
    bound = 5 / math.sqrt(eps[:, 1:].numel())
    assert abs(corr(eps[:, :-1], eps[:, 1:])) < bound  # neighbours in a row
    assert abs(corr(eps[:-1], eps[1:])) < bound  # neighbours in a column
    # Rows of different tiles (850 rows here) and of different chunks (425 rows).
    assert abs(corr(eps[:850], eps[850:])) < 5 / math.sqrt(850 * 1700)
    assert abs(corr(eps[:425], eps[425:850])) < 5 / math.sqrt(425 * 1700)
    # The squares too (a shared uniform would correlate magnitudes).
    assert abs(corr(eps[:, :-1] ** 2, eps[:, 1:] ** 2)) < bound


def test_seeds_differ_and_reproduce():
    x, w, b, _ = make_inputs(130, 127, torch.float32)
    first = fwd(x, w, b, A, S, None, torch.tensor(5), True)
    again = fwd(x, w, b, A, S, None, torch.tensor(5), True)
    other = fwd(x, w, b, A, S, None, torch.tensor(6), True)
    for got, want, different in zip(first, again, other):
        assert torch.equal(got, want)
        assert not torch.equal(got, different)
    # Unrelated seeds give unrelated noise.
    assert abs(corr(kernel_noise(5, 0, 100, 1000), kernel_noise(6, 0, 100, 1000))) < 5 / math.sqrt(100_000)


@pytest.mark.parametrize("M,K,seed", [(130, 127, 9), (2100, 33, 2**40 + 1)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_seeded_matches_torch_backend(M, K, seed, bias):
    x, w, b, _ = make_inputs(M, K, torch.float32, bias=bias, seed=M)
    seed_t = torch.tensor(seed, dtype=torch.int64)
    got = fwd(x, w, b, A, S, None, seed_t, True)
    want = kernels("torch").denoise_loss_fwd(x, w, b, A, S, None, seed_t, True)
    for name, g, r in zip(("loss", "grad_weight", "grad_bias"), got, want):
        # The same noise to the rounding of log and cos, then float32 GEMMs either side.
        assert_close(g, r, 1e-5, 1e-7, name)


@pytest.mark.parametrize("M,K", MULTI_TILE, ids=["2-tiles", "2-tiles-3-blocks"])
def test_seeded_equals_its_noise_given_explicitly(M, K):
    # Element (m, k) of the in-kernel noise is N1's eps[m, k] in every tile and chunk: the seeded
    # run is bitwise the run with that noise passed in (test_noise_matches_rng ties the
    # kernel's eps to drep_kernels.rng; rng itself is too slow to draw 10^6 values here).
    x, w, b, _ = make_inputs(M, K, torch.float32, seed=4)
    seed = 2**33 + 12345
    eps = kernel_noise(seed, 0, M, K)
    got = fwd(x, w, b, A, S, None, torch.tensor(seed), True)
    want = fwd(x, w, b, A, S, eps, SEED, True)
    for g, r in zip(got, want):
        assert torch.equal(g, r)


@pytest.mark.slow
def test_more_than_2_31_elements():
    """M K = 2^31 + 2^20 (about 30 s on 2 cores): row and element offsets and noise counters
    past 32 bits. x is a stride-0 expanded zero tensor (no memory); with W_d = 0, b_d = 0,
    a = 0, s = 1 we have D = -eps, so n loss = sum |eps| + eps^2 and n dL/db_d = -column sums
    of sign(eps) + 2 eps, both summed in float64 by the kernel. Two calls, with M K = 2^31 and
    2^31 + 2^20, differ by the sums over the rows past element 2^31 alone, checked against
    rng.py there: noise repeated from row 0, or rows dropped, would change them by O(sqrt(2^20))."""
    k, seed = 32, 2**33 + 7
    m_low, m_high = 2**31 // k, (2**31 + 2**20) // k
    wd, bd = torch.zeros(k, k), torch.zeros(k)
    sums = []
    for m in (m_low, m_high):
        x = torch.zeros(1, k).expand(m, k)
        loss, _, gb = fwd(x, wd, bd, 0.0, 1.0, None, torch.tensor(seed), True)
        sums.append((loss.double() * m * k, gb.double() * m * k))
    e = rng.normal(seed, m_high - m_low, k, row0=m_low).double()
    want_loss = (e.abs() + e.square()).sum()
    want_gb = -(torch.sign(e) + 2 * e).sum(0)
    assert_close(sums[1][0] - sums[0][0], want_loss, 1e-3, 0.0, "loss over elements >= 2^31")
    scale = want_gb.abs().max().item()
    assert_close((sums[1][1] - sums[0][1]) / scale, want_gb / scale, 1e-3, 1e-3, "db over elements >= 2^31")


def test_seeded_float64_uses_float32_noise():
    # float64 inputs take the float32 stream widened, as the torch backend does.
    x, w, b, _ = make_inputs(40, 16, torch.float64)
    seed = torch.tensor(99)
    got = fwd(x, w, b, A, S, None, seed, True)
    want = kernels("torch").denoise_loss_fwd(x, w, b, A, S, None, seed, True)
    for name, g, r in zip(("loss", "grad_weight", "grad_bias"), got, want):
        # The two draw the same float32 noise up to the rounding of log/sin/cos (~1e-7), which
        # sums that cancel carry over in absolute terms: atol from the result's scale.
        assert_close(g, r, 1e-5, 1e-6 * r.abs().max().item(), name)


# --- determinism --------------------------------------------------------------------------

@pytest.mark.parametrize("M,K", MULTI_TILE, ids=["2-tiles", "2-tiles-3-blocks"])
@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "noise"])
def test_bitwise_same_for_1_and_2_threads(M, K, seeded):
    x, w, b, eps = make_inputs(M, K, torch.float32, seed=1)
    noise = None if seeded else eps
    seed = torch.tensor(31)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fwd(x, w, b, A, S, noise, seed, True)
        torch.set_num_threads(2)
        two = fwd(x, w, b, A, S, noise, seed, True)
        two_again = fwd(x, w, b, A, S, noise, seed, True)
    finally:
        torch.set_num_threads(before)
    for name, a_, b_, c_ in zip(("loss", "grad_weight", "grad_bias"), one, two, two_again):
        assert torch.equal(a_, b_), f"{name} differs between 1 and 2 threads"
        assert torch.equal(b_, c_), f"{name} differs between runs"


# --- scratch memory kept between calls (csrc/cpu/workspace.h) ----------------------------

def test_workspace_is_kept_and_reused_without_stale_data():
    from drep_kernels import _C

    x, w, b, eps = make_inputs(130, 127, torch.float32, seed=3)
    seed = torch.tensor(77)
    _C.cpu_workspace(True)
    fresh = fwd(x, w, b, A, S, None, seed, True)
    held = _C.cpu_workspace(False)
    assert held > 0, "the loss kept no workspace"
    # Poison: a larger call with NaN inputs leaves NaN in every buffer the next call reuses.
    big = torch.full((1000, 300), math.nan)
    wb = torch.full((300, 300), math.nan)
    assert math.isnan(fwd(big, wb, wb[0], A, S, big, seed, True)[0].item())
    assert _C.cpu_workspace(False) > held, "the larger call did not grow the workspace"
    grown = _C.cpu_workspace(False)
    again = fwd(x, w, b, A, S, None, seed, True)
    assert _C.cpu_workspace(False) == grown, "a smaller call reallocated the workspace"
    for name, f, g in zip(("loss", "grad_weight", "grad_bias"), fresh, again):
        assert torch.equal(f, g), f"{name} changed after the workspace held another call's data"
    assert _C.cpu_workspace(True) == grown
    assert _C.cpu_workspace(False) == 0


def test_workspace_is_per_calling_thread():
    import threading

    from drep_kernels import _C

    x, w, b, eps = make_inputs(300, 64, torch.float32, seed=5)
    here = fwd(x, w, b, A, S, eps, SEED, True)
    held_here = _C.cpu_workspace(False)
    seen = {}

    def other():
        seen["before"] = _C.cpu_workspace(False)
        seen["out"] = fwd(x, w, b, A, S, eps, SEED, True)
        seen["after"] = _C.cpu_workspace(True)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen["before"] == 0 and seen["after"] > 0
    assert _C.cpu_workspace(False) == held_here, "another thread's call changed this thread's workspace"
    for f, g in zip(here, seen["out"]):
        assert torch.equal(f, g)


# --- autograd and torch.library -----------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_public_op(monkeypatch, bias):
    # gradcheck differentiates numerically, which L1's sign(D) breaks wherever an element of D
    # is within the step (1e-6) of 0. make_inputs keeps every |D| >= ~5, so sign(D) is constant
    # around the point and the loss is smooth (piecewise-quadratic) there: a valid check of
    # both the L1 and the L2 part of the gradient.
    monkeypatch.setenv("DREP_BACKEND", "cpu")
    x, w, b, eps = make_inputs(13, 6, torch.float64, bias=bias, seed=21)
    x3, eps3 = x.reshape(13, 1, 6), eps.reshape(13, 1, 6)
    params = [w.requires_grad_(True)] + ([b.requires_grad_(True)] if bias else [])

    def f(w_, *rest):
        return denoise_loss(x3, w_, rest[0] if rest else None, A, S, noise=eps3)

    assert torch.autograd.gradcheck(f, params)


def opcheck_samples():
    out = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for bias in (True, False):
            x, w, b, eps = make_inputs(9, 5, dtype, bias=bias)
            out.append((x, w, b, A, S, eps, SEED, True))
            out.append((x, w, b, A, S, None, torch.tensor(17), True))
            out.append((x, w, b, A, S, None, torch.tensor(17), False))
    x, w, b, eps = make_inputs(0, 5, torch.float32)
    out.append((x, w, b, A, S, None, torch.tensor(3), True))
    return out


@pytest.mark.parametrize("args", opcheck_samples())
def test_opcheck_kernel_op(args):
    torch.library.opcheck(fwd, args)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "noise"])
def test_opcheck_public_op(bias, seeded):
    x, w, b, eps = make_inputs(9, 5, torch.float32, bias=bias)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    noise, seed = (None, torch.tensor(17)) if seeded else (eps, SEED)
    torch.library.opcheck(denoise_loss_op, (x, w, b, A, S, noise, seed, "cpu", True))


def test_compiles_fullgraph(monkeypatch):
    # Traced through the fake kernels (aot_eager: no C++ codegen, so the test stays short).
    monkeypatch.setenv("DREP_BACKEND", "cpu")
    x, w, b, eps = make_inputs(9, 5, torch.float32)
    w.requires_grad_(True)
    b.requires_grad_(True)

    def f(x_, w_, b_, eps_):
        return denoise_loss(x_, w_, b_, A, S, noise=eps_)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, w, b, eps)
    loss.backward()
    ref_loss, ref_gw, ref_gb = denoise_loss_grads(x, w, b, A, S, eps)
    rtol, atol = TOL[torch.float32]
    assert_close(loss, ref_loss, rtol, atol, "loss")
    assert_close(w.grad, ref_gw, rtol, atol, "W_d.grad")
    assert_close(b.grad, ref_gb, rtol, atol, "b_d.grad")


# --- determinism on every BLAS path ---------------------------------------------------------
# MKL picks its GEMM kernels by CPU: AVX2 ones on AMD, AVX-512 ones on Intel. Only the latter
# split a GEMM's reduction by thread count inside our parallel region (before the kernel set
# one MKL thread per work item, dL/dW_d differed between 1 and 2 threads on Intel only). MKL's
# CPU detection is an exported function of torch's MKL: a preloaded stand-in returning CPU type
# 7 (benchmarks/mkl_intel_path.sh) makes MKL run the AVX-512 kernels it runs on Intel, so an
# AMD machine with AVX-512 tests that path too (measured: GEMMs 1.4x faster, and a plain
# threaded G^T X then differs by thread count, as on Intel).
MKL_INTEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "mkl_intel_path.sh")

MKL_PATH_SCRIPT = r"""
import sys, torch
import test_cpu_kernels as t
torch.manual_seed(0)
g, x = torch.randn(3500, 300), torch.randn(3500, 300)
torch.set_num_threads(1); one = g.t() @ x
torch.set_num_threads(2); two = g.t() @ x
print("plain GEMM thread-count invariant:", torch.equal(one, two))
for seeded in (True, False):
    for M, K in t.MULTI_TILE:
        t.test_bitwise_same_for_1_and_2_threads(M, K, seeded)
for dtype in (torch.float32, torch.float64):  # and right, on this BLAS path, over 2 tiles
    x, w, b, eps = t.make_inputs(3500, 300, dtype)
    t.check_against_oracle(t.fwd(x, w, b, t.A, t.S, eps, t.SEED, True), x, w, b, eps, dtype)
print("bitwise ok")
"""


def _mkl_exports(name: str) -> bool:
    import ctypes

    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        return hasattr(ctypes.CDLL(lib), name)
    except OSError:
        return False


@pytest.mark.parametrize("mkl_path", ["default", "avx2", "avx512"])
def test_bitwise_for_any_thread_count_on_every_mkl_path(mkl_path):
    import shutil
    import subprocess
    import sys

    if "mkl" not in torch.__config__.show().lower() or not _mkl_exports("mkl_serv_cpu_detect"):
        pytest.skip("torch is not built with MKL (its BLAS runs GEMMs on one thread in a parallel region)")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here] + [p for p in sys.path if p]))
    if mkl_path == "avx2":
        env["MKL_ENABLE_INSTRUCTIONS"] = "AVX2"
    command = [sys.executable, "-c", MKL_PATH_SCRIPT]
    if mkl_path == "avx512":
        if "avx512f" not in cpu_flags():
            pytest.skip("the CPU has no AVX-512")
        assert shutil.which(env.get("CC", "cc")), "a C compiler (cc, or $CC) is needed to build the MKL CPU-type shim"
        command = ["bash", MKL_INTEL_PATH] + command
    out = subprocess.run(command, env=env, cwd=here, capture_output=True, text=True)
    assert out.returncode == 0 and "bitwise ok" in out.stdout, out.stdout + out.stderr
    if mkl_path == "avx512":
        # The shim must really have switched MKL to the path that splits reductions by thread
        # count, or this case tested nothing new.
        assert "plain GEMM thread-count invariant: False" in out.stdout, out.stdout
