"""The CUDA kernels' own code (csrc/cuda/*.cu) run on the CPU, against the torch backend.

tests/cuda_host builds the .cu files, unchanged, as host C++: a launch runs one host thread per
CUDA thread of a block and the blocks in turn, and __syncthreads is a barrier of the block's
threads (tests/cuda_host/cuda_host.h). So the whole CUDA loss pipeline (noise prologue, GEMM,
epilogue, chunk reductions, dL/dW_d summed over chunks) and the merge (GEMMs and elementwise
kernels, M1..M5) are checked on any machine, GPU or not, at every change to a .cu file.
What only a GPU can show (cuBLAS, the __CUDA_ARCH__ branches of csrc/philox.h, blocks running
at the same time, speed) is left to tests/test_cuda_kernels.py.

The host build gives the loss a chunk budget of 16 KiB (tests/cuda_host/denoise_loss.cpp):
max(16384 // (bytes of x_noisy and p per element) // K // 128 * 128, 128) rows per chunk, so the
shapes below run 1 to 3 chunks; and its epilogue aims at 5 stripes per chunk, so that those
chunks run stripes of 1, 2, 4 and 8 rows per lane (the GPU build aims at 512 stripes: 1 row per
lane up to 4096 rows, 8 from 28673 rows on).
The build takes about a minute on 2 cores the first time (cached per checkout afterwards).
"""
from __future__ import annotations

import math

import pytest
import torch

import oracle
from conftest import CLAMP_SEED, CLAMPED_COUNTERS, TOLERANCES, assert_close
from cuda_host.build import LOSS_TARGET_STRIPES, load_host_ops, loss_chunk_rows
from drep_kernels import rng
from drep_kernels.backends import extension_error, kernels

if extension_error() is not None:
    pytest.skip("drep_kernels._C is not loaded (the host build takes drep's schemas from it)", allow_module_level=True)

# The kernels allocate their outputs, chunk buffers and partials with at::empty: poisoned here
# (conftest.poisoned_empty), so an element a kernel fails to write cannot pass as leftover memory.
# (G' is written over p: an element of G' left unwritten holds p's bits, not NaN; the float64
# comparison of dL/dW_d catches that.)
pytestmark = pytest.mark.usefixtures("poisoned_empty")

A, S = 0.8, 0.6  # noising scales far from 1 and 0: every term of L1 matters
C1, C3 = 0.37, 1.02  # reverse-step scales, likewise for M1..M5
MARGIN = 10.0
TORCH = kernels("torch")
SEED = torch.tensor(0, dtype=torch.int64)  # unused when noise is given


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.fixture(scope="module")
def host():
    return load_host_ops()


def chunks(m: int, k: int, dtype: torch.dtype = torch.float32) -> int:
    """How many chunks the host build's loss runs for an m x k input."""
    return -(-m // loss_chunk_rows(m, k, dtype))


def rows_per_lane(rows: int) -> int:
    """The epilogue's rows per lane for a chunk of ``rows`` rows (denoise_loss.cu stripe_lanes):
    ceil(rows / (8 LOSS_TARGET_STRIPES)) rounded up to a power of two, at most 8."""
    want, lanes = -(-rows // (8 * LOSS_TARGET_STRIPES)), 1
    while lanes < min(want, 8):
        lanes *= 2
    return lanes


def stripes(rows: int) -> int:
    return -(-rows // (8 * rows_per_lane(rows)))


def d(t):
    return None if t is None else t.double()


# --- denoise_loss (L1, L2, N1) ----------------------------------------------------------------

def loss_inputs(m, k, dtype, *, bias, seed=0):
    """(x, W_d, b_d, eps) with every D = p + b_d - eps about MARGIN away from 0.

    sign(D) is discontinuous at 0, where a float32 kernel and the float64 reference could take
    different signs (each moving dL/dW_d by 2 |x_noisy| / (M K)): so each output column j gets
    an offset of +-MARGIN (half the columns each sign), through b_d with a bias, else through a
    constant feature x[:, 0] = 100 with W_d[j, 0] = +-MARGIN / (100 a)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    w = torch.randn(k, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    eps = torch.randn(m, k, generator=g, dtype=torch.float64)
    signs = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0).double()
    b = None
    if bias:
        b = MARGIN * signs + 0.1 * torch.randn(k, generator=g, dtype=torch.float64)
    else:
        x[:, 0] = 100.0
        w[:, 0] = MARGIN * signs / (100.0 * A)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), eps.float()


def check_loss(got, want, dtype, *, bias, compute_grad=True, tol=None, atol_of_largest=False):
    """(loss, dL/dW_d, dL/db_d) against want with the dtype's (rtol, atol), or `tol`.

    atol_of_largest scales atol by each output's largest |want|: for inputs whose G' is far
    larger than 1, where an element of dL/dW_d sums large terms of either sign and the roundings
    of those terms (eps, x_noisy and G' in the input dtype) scale with the terms, not with their sum."""
    rtol, atol = tol or TOLERANCES[dtype]
    cdt = torch.float64 if dtype == torch.float64 else torch.float32

    def check(actual, expected, name):
        assert actual.dtype == cdt, f"{name}: dtype {actual.dtype}, expected {cdt}"
        scale = expected.abs().max().item() if atol_of_largest else 1.0
        assert_close(actual, expected, rtol, atol * scale, name)

    loss, gw, gb = got
    assert loss.shape == ()
    check(loss, want[0], "loss")
    if not compute_grad:
        assert gw.shape == (0,) and gb.shape == (0,)
        return
    check(gw, want[1], "dL/dW_d")
    if bias:
        check(gb, want[2], "dL/db_d")
    else:
        assert gb.shape == (0,)


LOSS_SHAPES = [(1, 1), (7, 7), (1, 127), (127, 1), (7, 127), (127, 127), (200, 7), (300, 7), (257, 127), (300, 127),
               (168, 127)]


def test_loss_shapes_cover_one_to_three_chunks():
    for dtype in (torch.float32, torch.float64):  # the dtypes they run in
        assert {chunks(m, k, dtype) for m, k in LOSS_SHAPES} == {1, 2, 3}, dtype
    # 168 x 127: a last chunk of 40 rows with more stripes (5) than the full one (4), which sizes
    # the kernel's partial buffers.
    assert loss_chunk_rows(168, 127) == 128 and stripes(128) == 4 and stripes(40) == 5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("m,k", LOSS_SHAPES, ids=[f"{m}x{k}-{chunks(m, k)}chunks" for m, k in LOSS_SHAPES])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_loss_given_noise_matches_torch_backend(host, dtype, m, k, bias):
    x, w, b, eps = loss_inputs(m, k, dtype, bias=bias, seed=m + k)
    got = host.denoise_loss_fwd(x, w, b, A, S, eps, SEED, True)
    want = TORCH.denoise_loss_fwd(d(x), d(w), d(b), A, S, d(eps), SEED, True)
    check_loss(got, want, dtype, bias=bias)


@pytest.mark.parametrize("lanes", [1, 2, 4, 8])
def test_loss_every_stripe_height(host, lanes):
    # One float32 chunk of 40 L - 1 rows: L rows per lane, the last stripe cut short. K = 130 where
    # such a chunk has room for it (L <= 2): two column tiles, the second one group of two
    # columns (G' of tile 1 lies over p's column 64); else K = 5.
    m, k = 40 * lanes - 1, 130 if lanes <= 2 else 5
    assert chunks(m, k) == 1 and rows_per_lane(m) == lanes
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b, eps = loss_inputs(m, k, dtype, bias=True, seed=lanes)
        got = host.denoise_loss_fwd(x, w, b, A, S, eps, SEED, True)
        want = TORCH.denoise_loss_fwd(d(x), d(w), d(b), A, S, d(eps), SEED, True)
        check_loss(got, want, dtype, bias=True)


@pytest.mark.parametrize("m,k", [(7, 7), (127, 1), (300, 7), (300, 127)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_loss_seeded_matches_torch_backend(host, m, k, bias):
    # In-kernel noise (N1) against drep_kernels.rng's: the same integer stream, log, sin and cos
    # rounded differently (a few float32 ulps), then float32 GEMMs either side.
    x, w, b, _ = loss_inputs(m, k, torch.float32, bias=bias, seed=m * k)
    seed = torch.tensor(2**40 + 3, dtype=torch.int64)
    got = host.denoise_loss_fwd(x, w, b, A, S, None, seed, True)
    want = TORCH.denoise_loss_fwd(d(x), d(w), d(b), A, S, None, seed, True)
    check_loss(got, want, torch.float32, bias=bias, tol=(1e-5, 1e-7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("m,k", [(127, 127), (300, 127), (300, 261)])
def test_seeded_loss_equals_its_noise_given_explicitly(host, m, k, dtype):
    # The prologue and the epilogue each draw eps four at a time, in their own thread layouts:
    # both must be N1's eps[m, k] in every tile and chunk, so the seeded run is bitwise the run
    # given the epilogue hook's noise (float32: bf16 rounds the drawn and the given eps alike).
    # K = 261: three 128-column epilogue tiles, the last group cut to one column; 300 rows:
    # several stripes and three chunks.
    x, w, b, _ = loss_inputs(m, k, dtype, bias=True, seed=5)
    seed = torch.tensor(2**33 + 12345, dtype=torch.int64)
    eps = host._denoise_noise(torch.empty(0), seed, 0, m, k, True)
    got = host.denoise_loss_fwd(x, w, b, A, S, None, seed, True)
    want = host.denoise_loss_fwd(x, w, b, A, S, eps, SEED, True)
    for name, g, r in zip(("loss", "dL/dW_d", "dL/db_d"), got, want):
        assert torch.equal(g, r), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_loss_rounds_eps_and_x_noisy_to_nearest(host, dtype):
    # The policy's roundings, exactly (docs/method.md, Precision): eps to the GEMM dtype, then
    # x_noisy formed from it. x = 0, a = 0, s = 0.625, W_d = w I with w = 1.6 rounded to the
    # dtype (s w is 1 within 2^-10): D = w round(0.625 eps) - eps is mostly rounding error, so
    # the oracle applying the same roundings is met at 1e-4, while the loss with eps left
    # unrounded (x_noisy still rounded) differs from it by 1 to 2 %.
    m, k, s = 96, 40, 0.625
    x = torch.zeros(m, k, dtype=dtype)
    w = (1.6 * torch.eye(k)).to(dtype)
    eps = rng.normal(7, m, k)
    got = host.denoise_loss_fwd(x, w, None, 0.0, s, eps, SEED, True)
    want = oracle.denoise_loss_grads(x, w, None, 0.0, s, eps, dtype)
    d = (s * eps.double()).float().to(dtype).double() @ w.double().T - eps.double()  # eps not rounded
    assert abs(float(d.abs().mean() + d.square().mean() - want[0])) > 5e-3 * float(want[0])
    check_loss(got[:2] + (torch.empty(0),), want, dtype, bias=False, tol=(1e-4, 1e-6), atol_of_largest=True)


def strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values as a non-contiguous view: column-major, every other column of a wider tensor,
    or (for "expanded") its first row repeated with row stride 0."""
    m, k = t.shape
    if layout == "column-major":
        return t.T.contiguous().T
    if layout == "every-other-column":
        wide = torch.full((m, 2 * k), float("nan"), dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    assert layout == "expanded"
    return t[:1].expand(m, k)


@pytest.mark.parametrize("layout", ["column-major", "every-other-column", "expanded"])
@pytest.mark.parametrize("m,k", [(127, 7), (300, 127)])
def test_loss_strided_inputs(host, layout, m, k):
    x, w, b, eps = loss_inputs(m, k, torch.float32, bias=True, seed=3)
    x, eps = strided(x, layout), strided(eps, layout)
    w = w.T.contiguous().T  # W_d read through its transpose by the GEMM
    got = host.denoise_loss_fwd(x, w, b, A, S, eps, SEED, True)
    want = TORCH.denoise_loss_fwd(d(x), d(w), d(b), A, S, d(eps), SEED, True)
    check_loss(got, want, torch.float32, bias=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_loss_without_gradients(host, dtype):
    x, w, b, eps = loss_inputs(300, 127, dtype, bias=True, seed=8)
    got = host.denoise_loss_fwd(x, w, b, A, S, eps, SEED, False)
    want = TORCH.denoise_loss_fwd(d(x), d(w), d(b), A, S, d(eps), SEED, False)
    check_loss(got, want, dtype, bias=True, compute_grad=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("k", [127, 261])
def test_loss_half_precision(host, dtype, bias, k):
    # eps, x_noisy and G' are rounded to the input dtype (docs/method.md, Precision): the
    # reference does not round, so the input dtype's tolerance applies. K = 261: three column
    # tiles, so G' of tile 2 lies over p of tile 1 (G' is written over p: loss_epilogue_kernel).
    x, w, b, eps = loss_inputs(300, k, dtype, bias=bias, seed=11)
    got = host.denoise_loss_fwd(x, w, b, A, S, eps, SEED, True)
    want = TORCH.denoise_loss_fwd(d(x), d(w), d(b), A, S, d(eps), SEED, True)
    check_loss(got, want, dtype, bias=bias)


def test_fp16_gradient_beyond_fp16_range(host):
    # |D| ~ 4e4, so G' = sign(D) + 2 D ~ 8e4 > 65504, float16's largest value: stored as it is,
    # G' would be inf and so would dL/dW_d. float16 stores G' 2^-14 instead (exact), in range.
    m, k = 300, 127
    x, w, b, eps = loss_inputs(m, k, torch.float16, bias=True, seed=12)
    b = (b.double().sign() * 40000).half()
    got = host.denoise_loss_fwd(x, w, b, A, S, eps, SEED, True)
    want = TORCH.denoise_loss_fwd(d(x), d(w), d(b), A, S, d(eps), SEED, True)
    check_loss(got, want, torch.float16, bias=True, atol_of_largest=True)


def test_fp16_gradient_saturates_past_the_scaled_range(host):
    # Where |G'| > 65504 2^14 (|D| > ~5.4e8) the stored G' 2^-14 saturates at 65504: that
    # element's contribution to dL/dW_d is clipped to 65504 2^14 |x_noisy| / n, finite.
    # dL/db_d sums G' in float32 before any rounding and is not clipped. Columns of even j
    # saturate (D ~ 5e9), odd ones do not (D ~ 2e5, beyond 65504 unscaled).
    m, k = 300, 7
    x = torch.full((m, k), 30000.0, dtype=torch.float64)
    w = torch.where(torch.arange(k) % 2 == 0, 30000.0, 1.0).double()[:, None].expand(k, k).contiguous()
    b = torch.zeros(k, dtype=torch.float64)
    eps = torch.randn(m, k, generator=torch.Generator().manual_seed(13)).float()
    x, w, b = x.half(), w.half(), b.half()
    got = host.denoise_loss_fwd(x, w, b, A, S, eps, SEED, True)

    # The kernel's roundings: x_noisy in float32 then float16; p, D and G' in float64 here.
    xn = (torch.tensor(A, dtype=torch.float32) * x.float() + torch.tensor(S, dtype=torch.float32) * eps).half()
    p = xn.double() @ w.double().T + b.double()
    dd = p - eps.double()
    g = torch.sign(dd) + 2 * dd
    scale = 2.0**-14
    g_stored = (g * scale).clamp(-65504, 65504).half().double() / scale
    n = m * k
    assert (g.abs() > 65504 / scale)[:, ::2].all() and (g.abs() < 65504 / scale)[:, 1::2].all()
    want = ((dd.abs() + dd.square()).mean(), g_stored.T @ xn.double() / n, g.sum(0) / n)
    check_loss(got, want, torch.float16, bias=True, atol_of_largest=True)


def test_loss_empty_batch(host):
    # Loss 0 (not 0/0) and zero gradients, without a launch: CUDA refuses a grid of 0 blocks,
    # and so does the host build.
    w, b = torch.randn(7, 7), torch.randn(7)
    loss, gw, gb = host.denoise_loss_fwd(torch.empty(0, 7), w, b, A, S, None, torch.tensor(1), True)
    assert loss.shape == () and loss.item() == 0.0
    assert torch.equal(gw, torch.zeros(7, 7)) and torch.equal(gb, torch.zeros(7))


# --- the noise (N1): the CUDA kernels' two paths against rng and the CPU kernel ---------------

@pytest.mark.parametrize("per_element", [False, True], ids=["prologue", "epilogue"])
@pytest.mark.parametrize("seed", [0, 2**62 + 3])
@pytest.mark.parametrize("row0", [0, 2**38 + 5])
@pytest.mark.parametrize("cols", [1, 3, 37])
def test_noise_matches_rng_and_cpu_kernel(host, per_element, seed, row0, cols):
    # 64-bit seeds (the key's high word) and counters (row0 ceil(cols / 4) past 2^32); 37
    # columns end on a cut counter. The same integer stream everywhere; log, sin and cos round
    # differently (a few float32 ulps).
    seed_t = torch.tensor(seed, dtype=torch.int64)
    got = host._denoise_noise(torch.empty(0), seed_t, row0, 3, cols, per_element)
    torch.testing.assert_close(got, rng.normal(seed, 3, cols, row0=row0), rtol=2e-6, atol=2e-6)
    cpu = torch.ops.drep._denoise_noise(torch.empty(0), seed_t, row0, 3, cols, False)
    torch.testing.assert_close(got, cpu, rtol=2e-6, atol=2e-6)


def test_epilogue_noise_in_every_tile(host):
    # The epilogue's layout (stripes of whole rows, 4 rows per lane here, in 128-column tiles,
    # groups of four columns per thread) over 5 stripes x 3 tiles, the last stripe and group cut,
    # at counters past 2^32: the same Philox outputs as the prologue's (bitwise: the same host
    # arithmetic) and as rng.
    seed_t = torch.tensor(2**62 + 3, dtype=torch.int64)
    row0, rows, cols = 2**38 + 5, 130, 261
    assert rows_per_lane(rows) == 4 and stripes(rows) == 5
    epilogue = host._denoise_noise(torch.empty(0), seed_t, row0, rows, cols, True)
    prologue = host._denoise_noise(torch.empty(0), seed_t, row0, rows, cols, False)
    assert torch.equal(epilogue, prologue)
    torch.testing.assert_close(epilogue, rng.normal(2**62 + 3, rows, cols, row0=row0), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("per_element", [False, True], ids=["prologue", "epilogue"])
def test_noise_radius_clamp(host, per_element):
    # Counters whose radius uniform N1 clamps at 1e-7 (tests/conftest.py): rows of 4 columns.
    seed_t = torch.tensor(CLAMP_SEED, dtype=torch.int64)
    for counter in CLAMPED_COUNTERS:
        got = host._denoise_noise(torch.empty(0), seed_t, counter, 1, 4, per_element)
        torch.testing.assert_close(got, rng.normal(CLAMP_SEED, 1, 4, row0=counter), rtol=2e-6, atol=2e-6)


# --- merge_weights (M1..M5) -------------------------------------------------------------------

def merge_inputs(out, k, dtype, *, has_b, has_bd, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    w = r(out, k, scale=k**-0.5)
    wd = r(k, k, scale=k**-0.5)
    b = r(out) if has_b else None
    bd = r(k) if has_bd else None
    gw = r(out, k)
    gb = r(out)
    return w, b, wd, bd, gw, gb


def check_merge(host, dtype, w, b, wd, bd, gw, gb, need=(True, True)):
    """Forward (W', b') and backward (dW, dW_d, db_d) against the torch backend in float64."""
    rtol, atol = TOLERANCES[dtype]
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    got_w, got_b = host.merge_weights_fwd(w, b, wd, bd, C1, C3)
    want_w, want_b = TORCH.merge_weights_fwd(d(w), d(b), d(wd), d(bd), C1, C3)
    assert got_w.dtype == dtype and got_w.is_contiguous()
    assert_close(got_w, want_w, rtol, atol, "W'")
    assert got_b.shape == want_b.shape and (got_b.numel() == 0 or got_b.dtype == dtype)
    assert_close(got_b, want_b, rtol, atol, "b'")
    got = host.merge_weights_bwd(gw, gb, w, wd, bd, C1, C3, *need)
    want = TORCH.merge_weights_bwd(d(gw), d(gb), d(w), d(wd), d(bd), C1, C3, *need)
    for name, g, r in zip(("dW", "dW_d", "db_d"), got, want):
        assert g.numel() == 0 or g.dtype == cdt, name
        assert_close(g, r, rtol, atol, name)


# K = 300: more columns than merge_prep_kernel's 256 threads (its strided loop and full tree).
MERGE_SHAPES = [(1, 1), (7, 127), (127, 7), (127, 127), (5, 300)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("out,k", MERGE_SHAPES)
@pytest.mark.parametrize("has_b,has_bd", [(True, True), (True, False), (False, True), (False, False)])
def test_merge_matches_torch_backend(host, dtype, out, k, has_b, has_bd):
    w, b, wd, bd, gw, gb = merge_inputs(out, k, dtype, has_b=has_b, has_bd=has_bd, seed=out + k)
    check_merge(host, dtype, w, b, wd, bd, gw, gb if has_b else None)


@pytest.mark.parametrize("need", [(True, False), (False, True)], ids=["dW-only", "denoiser-only"])
def test_merge_backward_parts(host, need):
    w, b, wd, bd, gw, gb = merge_inputs(127, 7, torch.float32, has_b=True, has_bd=True, seed=2)
    check_merge(host, torch.float32, w, b, wd, bd, gw, gb, need)


def every_other(v: torch.Tensor) -> torch.Tensor:
    """v's values as a vector view of stride 2."""
    return torch.stack([v, torch.full_like(v, float("nan"))], 1)[:, 0]


@pytest.mark.parametrize("layout", ["column-major", "every-other-column"])
def test_merge_strided_inputs(host, layout):
    w, b, wd, bd, gw, gb = merge_inputs(127, 7, torch.float32, has_b=True, has_bd=True, seed=4)
    s = lambda t: strided(t, layout)  # noqa: E731
    check_merge(host, torch.float32, s(w), every_other(b), s(wd), every_other(bd), s(gw), every_other(gb))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_merge_half_precision(host, dtype):
    # Computed in float32, W' and b' rounded once to the weight's dtype.
    w, b, wd, bd, gw, gb = merge_inputs(127, 127, dtype, has_b=True, has_bd=True, seed=6)
    check_merge(host, dtype, w, b, wd, bd, gw, gb)
    # Once: every element of W' within half a unit in the last place of dtype of the exact
    # float64 value, plus float32's error in forming it (K terms, each within 2^-24 of the
    # magnitudes summed). The product rounded to dtype before c3 W is added (two roundings)
    # misses by hundreds of units here.
    got, _ = host.merge_weights_fwd(w, b, wd, bd, C1, C3)
    exact = C3 * d(w) - C1 * d(w) @ d(wd)
    info = torch.finfo(dtype)  # below its smallest normal (float16's 2^-14) the unit is fixed
    ulp = info.eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp(min=info.tiny))))
    float32_error = w.shape[1] * 2.0**-24 * (C3 * d(w).abs() + C1 * d(w).abs() @ d(wd).abs())
    assert bool(((d(got) - exact).abs() <= 0.5 * ulp + float32_error).all())


@pytest.mark.parametrize("has_b,has_bd", [(True, True), (False, True), (True, False)])
def test_merge_without_columns(host, has_b, has_bd):
    # K = 0 with rows: W' is out x 0 and b' = b (0 without b): W b_d is an empty sum.
    w = torch.empty(5, 0)
    b = torch.randn(5) if has_b else None
    bd = torch.empty(0) if has_bd else None
    merged_w, merged_b = host.merge_weights_fwd(w, b, torch.empty(0, 0), bd, C1, C3)
    assert merged_w.shape == (5, 0)
    assert torch.equal(merged_b, b if has_b else torch.zeros(5))


def test_merge_empty_layer(host):
    # out = 0: empty (W', b') and gradients, without a launch (a grid of 0 blocks is refused).
    w, b, wd, bd = torch.empty(0, 7), torch.empty(0), torch.randn(7, 7), torch.randn(7)
    merged_w, merged_b = host.merge_weights_fwd(w, b, wd, bd, C1, C3)
    assert merged_w.shape == (0, 7) and merged_b.shape == (0,)
    dw, dwd, dbd = host.merge_weights_bwd(torch.empty(0, 7), torch.empty(0), w, wd, bd, C1, C3, True, True)
    assert dw.shape == (0, 7)
    assert torch.equal(dwd, torch.zeros(7, 7)) and torch.equal(dbd, torch.zeros(7))
