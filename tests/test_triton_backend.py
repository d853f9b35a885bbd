"""The triton backend (drep_kernels/triton) against the float64 oracle.

On a machine without CUDA these run the kernels on CPU tensors under TRITON_INTERPRET=1 (set
by conftest.py before anything imports triton), which is slow: shapes stay small, and the
sizes (1, 7, 33, 130) are chosen to be multiples of no block size. The backend follows the
tensor-core precision policy (drep_kernels.precision): for float16 / bfloat16 inputs eps and the
loss's GEMM operands x_noisy and G' are rounded to the input dtype, and the oracle applies the
same roundings (oracle.denoise_loss_grads(..., gemm_dtype)); outputs stored in half precision (the
merged weights) are held to their own dtype's tolerance.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import drep_kernels  # noqa: E402
from drep_kernels import rng  # noqa: E402
from drep_kernels.backends import implements, kernels, select  # noqa: E402
from drep_kernels.triton.denoise_loss import _eps_tile  # noqa: E402

import oracle  # noqa: E402
from conftest import CLAMP_SEED, CLAMPED_COUNTERS, TOLERANCES, assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

A, S = 0.8, 0.6  # noising scales (any finite values; these keep p and eps of one size)
# For bf16 / fp16 inputs, scales with 3-bit mantissas: a x + s eps is then exact in float32 and
# float64 alike, so kernel and oracle round the same x_noisy to the GEMM dtype (with 0.8 the two
# differ in the last bit of a, which decides exact ties, frequent between low-precision inputs).
A_HALF, S_HALF = 0.75, 0.625


def _scales(dtype: torch.dtype) -> tuple[float, float]:
    return (A_HALF, S_HALF) if dtype in (torch.float16, torch.bfloat16) else (A, S)
C1, C3 = 0.03, 1.01


def _tol(dtype: torch.dtype, stored: torch.dtype | None = None) -> tuple[float, float]:
    """(rtol, atol) for a result computed by this backend from inputs of ``dtype`` and stored in
    ``stored`` (default: the compute dtype)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if stored in (torch.float16, torch.bfloat16):
        # Computed in float32 from inputs it holds exactly, then rounded once to ``stored``: half
        # an ulp, rtol one ulp; plus float32's accumulation error, of the tensor's scale (atol,
        # scaled by ``_close``).
        return torch.finfo(stored).eps, 1e-5
    if dtype in (torch.float16, torch.bfloat16):
        # float32 results from operands rounded as the oracle rounds them (x_noisy formed exactly:
        # _scales), with D formed in float32 (the kernel) and float64 (the oracle): where
        # sign D + 2 D lies within float32's error of a tie between two bf16 / fp16 values the
        # two round G' apart, a rare event that moves a sum by far less than 1e-4 of its scale.
        return 1e-4, 1e-5
    return TOLERANCES[stored if stored is not None else compute]


def _gemm_dtype(dtype: torch.dtype):
    """The GEMM dtype whose roundings the oracle applies (tensor-core policy), None if none."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def _close(actual, expected, dtype, name, stored=None, slack=None, atol=None):
    # The tolerance's atol is for O(1) values; here it is scaled by the tensor's largest element:
    # gradients are O(1 / (M K)), far below any fixed atol, and their elements that cancel to
    # ~0 need a bound of the tensor's scale, not of their own. ``slack``: a per-element
    # allowance added to that bound (oracle.sign_flip_slack); ``atol`` overrides the dtype's.
    rtol, dtype_atol = _tol(dtype, stored)
    scale = float(expected.detach().abs().max()) if expected.numel() else 1.0
    bound = (dtype_atol if atol is None else atol) * scale
    if slack is not None:
        bound = bound + slack.detach().double().cpu()
    assert_close(actual, expected, rtol, bound, name)


def _denoise_inputs(M, K, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(K, K, generator=g) / max(K, 1) ** 0.5).to(DEVICE, dtype)
    b = torch.randn(K, generator=g).to(DEVICE, dtype) if bias else None
    eps = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    return x, w, b, eps


def _triton(monkeypatch):
    monkeypatch.setenv("DREP_BACKEND", "triton")


def test_registry_sees_triton():
    assert implements("triton", "denoise_loss", DEVICE)
    assert implements("triton", "merge_weights", DEVICE)
    assert "triton" in drep_kernels.backends()


# ---------------------------------------------------------------- denoising loss (L1, L2)

DENOISE_CASES = [
    # (M, K, dtype, bias)
    (1, 1, torch.float32, True),
    (7, 33, torch.float32, True),
    (130, 7, torch.float32, False),
    (33, 130, torch.float32, True),
    (130, 33, torch.float64, True),
    (7, 1, torch.float64, False),
    (33, 7, torch.bfloat16, True),
    (130, 33, torch.float16, True),
]


@pytest.mark.parametrize("M,K,dtype,bias", DENOISE_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_denoise_loss_kernel_vs_oracle(M, K, dtype, bias):
    x, w, b, eps = _denoise_inputs(M, K, dtype, bias)
    a, s = _scales(dtype)
    loss, gw, gb = kernels("triton").denoise_loss_fwd(x, w, b, a, s, eps, torch.tensor(0), True)
    ref_loss, ref_gw, ref_gb = oracle.denoise_loss_grads(x, w, b, a, s, eps, _gemm_dtype(dtype))
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == gw.dtype == compute and loss.shape == () and gw.shape == (K, K)
    _close(loss, ref_loss, dtype, "loss")
    _close(gw, ref_gw, dtype, "dL/dW_d")
    if bias:
        _close(gb, ref_gb, dtype, "dL/db_d")
    else:
        assert gb.numel() == 0


def test_denoise_loss_without_grad_does_no_gradient_work():
    x, w, b, eps = _denoise_inputs(33, 7, torch.float32)
    loss, gw, gb = kernels("triton").denoise_loss_fwd(x, w, b, A, S, eps, torch.tensor(0), False)
    assert gw.numel() == 0 and gb.numel() == 0
    _close(loss, oracle.denoise_loss(x, w, b, A, S, eps), torch.float32, "loss")


def test_denoise_loss_public_op_3d_noncontiguous(monkeypatch):
    _triton(monkeypatch)
    K = 33
    g = torch.Generator().manual_seed(1)
    # (2, 5, K) views with strides (K, 2 * 2 K, 1) and (1, 2 K..., 2): neither is contiguous.
    x = torch.randn(5, 2, 2 * K, generator=g).to(DEVICE).transpose(0, 1)[..., ::2]
    eps = torch.randn(2, 5, K, 2, generator=g).to(DEVICE)[..., 1]
    w0 = (torch.randn(K, K, generator=g) / K**0.5).to(DEVICE)
    w = w0.t().contiguous().t().requires_grad_(True)  # column-major W_d
    b = torch.randn(K, generator=g).to(DEVICE).requires_grad_(True)
    assert not x.is_contiguous() and not eps.is_contiguous() and not w.is_contiguous()
    assert select("denoise_loss", x.device) == "triton"
    loss = drep_kernels.ops.denoise_loss(x, w, b, A, S, noise=eps)
    loss.backward()
    ref_loss, ref_gw, ref_gb = oracle.denoise_loss_grads(x, w, b, A, S, eps)
    _close(loss, ref_loss, torch.float32, "loss")
    _close(w.grad, ref_gw, torch.float32, "W_d.grad")
    _close(b.grad, ref_gb, torch.float32, "b_d.grad")


def test_denoise_loss_empty_batch(monkeypatch):
    _triton(monkeypatch)
    w = torch.randn(7, 7, device=DEVICE, requires_grad=True)
    b = torch.randn(7, device=DEVICE, requires_grad=True)
    loss = drep_kernels.ops.denoise_loss(torch.randn(3, 0, 7, device=DEVICE), w, b, A, S, seed=5)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_denoise_loss_seeded_matches_torch_backend(monkeypatch):
    """In-kernel eps (N1) is drep_kernels.rng's stream: the same seed gives the torch backend's
    loss and gradients to the rounding of log / sin / cos (~4e-7 in eps)."""
    M, K = 33, 130
    x, w, b, _ = _denoise_inputs(M, K, torch.float32)
    seed = torch.tensor(2**40 + 12345)  # above 2^32: both key words of Philox in use
    out = kernels("triton").denoise_loss_fwd(x, w, b, A, S, None, seed, True)
    ref = kernels("torch").denoise_loss_fwd(x, w, b, A, S, None, seed, True)
    for got, want, name in zip(out, ref, ("loss", "dL/dW_d", "dL/db_d")):
        assert_close(got, want, 1e-5, 1e-5 * float(want.abs().max()), name)


@pytest.mark.parametrize(
    "loss_blocks,grad_blocks", [((16, 64, 16), (64, 16, 16)), ((16, 16, 64), (16, 64, 32))], ids=["wide-N", "wide-K"]
)
def test_denoise_loss_other_block_shapes(loss_blocks, grad_blocks):
    """The GPU configs have BLOCK_N != BLOCK_K; the interpreter's default has them equal. The
    plain kernels with such blocks: the epilogue's (BLOCK_N) tiles of the stored eps, K not a
    multiple of 4, dL/dW_d tiles of either shape, against the torch backend."""
    from drep_kernels.triton import denoise_loss as tdl

    loss_meta = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), loss_blocks), GROUP_M=2)
    grad_meta = dict(zip(("BLOCK_N", "BLOCK_K", "BLOCK_R"), grad_blocks), GROUP_N=2)
    x, w, b, _ = _denoise_inputs(37, 70, torch.float32)
    seed = torch.tensor(2**40 + 3)
    out = tdl._denoise_loss(
        x, w, b, A, S, None, seed, True, tdl._loss_gemm_kernel, tdl._grad_gemm_kernel, (loss_meta, grad_meta)
    )
    ref = kernels("torch").denoise_loss_fwd(x, w, b, A, S, None, seed, True)
    for got, want, name in zip(out, ref, ("loss", "dL/dW_d", "dL/db_d")):
        assert_close(got, want, 1e-5, 1e-5 * float(want.abs().max()), name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_denoise_loss_final_sums_over_several_programs(monkeypatch, dtype):
    """_finalize_kernel with 16-column programs over K = 33 (three, the last one column wide)
    and the partials of three 128-row chunks: each program sums its columns' dL/db_d partials
    over every chunk, program 0 also the loss."""
    from drep_kernels.triton import denoise_loss as tdl

    monkeypatch.setattr(tdl, "_FINALIZE_BLOCK", 16)
    monkeypatch.setattr(tdl, "CHUNK_BYTES", 128 * 33 * 2 * dtype.itemsize)
    x, w, b, eps = _denoise_inputs(300, 33, dtype)
    a, s = _scales(dtype)
    got = kernels("triton").denoise_loss_fwd(x, w, b, a, s, eps, torch.tensor(0), True)
    want = oracle.denoise_loss_grads(x, w, b, a, s, eps, _gemm_dtype(dtype))
    for u, v, name in zip(got, want, ("loss", "dL/dW_d", "dL/db_d")):
        _close(u, v, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_denoise_loss_in_chunks(monkeypatch, dtype):
    """Several row chunks (the budget lowered to 2048 elements of each buffer: 128-row chunks at
    K = 16, the last one partial): the noise and the partial sums keep their rows' global positions, dL/dW_d is
    written by the first chunk and added to by the others."""
    from drep_kernels.triton import denoise_loss as tdl

    monkeypatch.setattr(tdl, "CHUNK_BYTES", 2048 * 2 * dtype.itemsize)
    M, K = 300, 16
    assert tdl.chunk_rows(M, K, dtype.itemsize) == 128
    x, w, b, eps = _denoise_inputs(M, K, dtype)
    seed = torch.tensor(99)
    a, s = _scales(dtype)
    for noise in (eps, None):
        got = kernels("triton").denoise_loss_fwd(x, w, b, a, s, noise, seed, True)
        given = noise if noise is not None else rng.normal(99, M, K, device=DEVICE)
        want = oracle.denoise_loss_grads(x, w, b, a, s, given, _gemm_dtype(dtype))
        for u, v, name in zip(got, want, ("loss", "dL/dW_d", "dL/db_d")):
            # seeded: the kernel's eps differs from rng's in the last bits (log / sin / cos)
            _close(u, v, dtype if noise is not None else torch.float32, name)


def test_grad_splits_fill_one_wave():
    """The dL/dW_d GEMM's row splits at the benchmark's shapes on an H100 (132 SMs): splits x
    128 x 128 tiles within one wave, splits of whole 128-row blocks covering the chunk, none
    where the tiles fill the SMs or the rows are too few."""
    from drep_kernels.triton import denoise_loss as tdl

    assert tdl.grad_splits(12608, 768, 132) == (3, 4224)  # 36 tiles: 108 programs
    assert tdl.grad_splits(12608, 384, 132) == (13, 1024)  # 9 tiles: 117 programs
    assert tdl.grad_splits(12608, 1024, 132) == (2, 6400)  # 64 tiles: 128 programs
    assert tdl.grad_splits(1576, 384, 132) == (3, 640)  # at least 512 rows each: 3, not 14
    for R, K in ((12608, 1536), (3584, 3072), (511, 384), (100, 64)):
        assert tdl.grad_splits(R, K, 132) == (1, R)
    for R, K, sms in ((12608, 768, 132), (12608, 384, 108), (4099, 515, 132), (1576, 64, 132), (640, 33, 7)):
        splits, rows = tdl.grad_splits(R, K, sms)
        assert rows % 128 == 0 and (splits - 1) * rows < R <= splits * rows
        assert splits * triton.cdiv(K, 128) ** 2 <= sms and (splits == 1 or rows >= tdl.SPLIT_MIN_ROWS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda v: str(v)[6:])
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunks"])
def test_denoise_loss_split_rows(monkeypatch, dtype, chunked):
    """dL/dW_d's GEMM split over rows (splits of at least 64 rows asked: 128-row splits): one
    chunk of 300 rows in three splits, the last 44 rows; or 256-row chunks (256, 256, 88 rows):
    two splits summed into dL/dW_d (chunk 0), two added to it (chunk 1), then one split
    accumulating in place."""
    from drep_kernels.triton import denoise_loss as tdl

    monkeypatch.setattr(tdl, "SPLIT_MIN_ROWS", 64)
    M, K = (600, 33) if chunked else (300, 33)
    if chunked:
        monkeypatch.setattr(tdl, "CHUNK_BYTES", 256 * K * 2 * dtype.itemsize)
        assert tdl.chunk_rows(M, K, dtype.itemsize) == 256
        assert [tdl.grad_splits(R, K, 132)[0] for R in (256, 256, 88)] == [2, 2, 1]
    else:
        assert tdl.grad_splits(M, K, 132) == (3, 128)
    x, w, b, eps = _denoise_inputs(M, K, dtype)
    a, s = _scales(dtype)
    got = kernels("triton").denoise_loss_fwd(x, w, b, a, s, eps, torch.tensor(0), True)
    want = oracle.denoise_loss_grads(x, w, b, a, s, eps, _gemm_dtype(dtype))
    for u, v, name in zip(got, want, ("loss", "dL/dW_d", "dL/db_d")):
        _close(u, v, dtype, name)


def test_denoise_loss_last_chunk_splits_more(monkeypatch):
    """A smaller last chunk may split into more row splits than the full ones (the rows per
    split are rounded up to 128 from fewer rows): on 3 SMs, a 512-row chunk splits in two, the
    last 257 rows in three. The workspace holds the slabs of the chunk that splits most."""
    from drep_kernels.triton import _common
    from drep_kernels.triton import denoise_loss as tdl

    monkeypatch.setattr(_common, "HOST_SMS", 3)
    monkeypatch.setattr(tdl, "SPLIT_MIN_ROWS", 64)
    M, K = 769, 33
    monkeypatch.setattr(tdl, "CHUNK_BYTES", 512 * K * 2 * 4)
    assert tdl.chunk_rows(M, K, 4) == 512 and tdl.grad_splits(512, K, 3)[0] == 2 and tdl.grad_splits(257, K, 3)[0] == 3
    x, w, b, eps = _denoise_inputs(M, K, torch.float32)
    got = kernels("triton").denoise_loss_fwd(x, w, b, A, S, eps, torch.tensor(0), True)
    want = oracle.denoise_loss_grads(x, w, b, A, S, eps)
    for u, v, name in zip(got, want, ("loss", "dL/dW_d", "dL/db_d")):
        _close(u, v, torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_operands_rounded_to_nearest(dtype):
    """x = 0, a = 0, s = 0.625, W_d = w I with w = 1.6 rounded to the dtype (s w is 1 within
    2^-10): p = w round(0.625 eps) with eps itself rounded to the GEMM dtype, so D is mostly the
    rounding error of x_noisy = 0.625 eps (0.625 eps is exact in float32: the kernel and the
    oracle round the same value, ties included). Round to nearest even, as a GPU converts;
    truncation (the interpreter's own bf16 conversion) moves the loss far past the tolerance.
    dL/dW_d sees G' as rounded for GEMM 2."""
    M, K = 96, 40
    s = 0.625
    x = torch.zeros(M, K, dtype=dtype, device=DEVICE)
    w = (1.6 * torch.eye(K)).to(DEVICE, dtype)
    # float32 noise given (not drawn: the in-kernel eps differs from rng's in its last bits,
    # which may round eps to another bf16 / fp16 value, and D is small enough to show that)
    eps = rng.normal(7, M, K, device=DEVICE)
    loss, gw, _ = kernels("triton").denoise_loss_fwd(x, w, None, 0.0, s, eps, torch.tensor(0), True)
    ref_loss, ref_gw, _ = oracle.denoise_loss_grads(x, w, None, 0.0, s, eps, dtype)
    e = oracle.gemm_eps(eps, dtype)
    assert float(ref_loss) > 1e-4 and float((e - eps.double()).abs().max()) > 0  # eps was rounded
    _close(loss, ref_loss, dtype, "loss")
    _close(gw, ref_gw, dtype, "dL/dW_d")
    if dtype == torch.bfloat16:  # the loss with x_noisy truncated instead: far outside the tolerance
        xn = (s * e).float().view(torch.int32).bitwise_and(-65536).view(torch.float32).double()
        d = xn @ w.double().T - e
        truncated = d.abs().mean() + d.square().mean()
        assert abs(float(truncated - ref_loss)) > 100 * _tol(dtype)[0] * float(ref_loss)


def test_denoise_loss_bitwise_deterministic(monkeypatch):
    """Several row blocks and column blocks (the partial sums) and two row splits, twice."""
    from drep_kernels.triton import denoise_loss as tdl

    monkeypatch.setattr(tdl, "SPLIT_MIN_ROWS", 64)
    x, w, b, _ = _denoise_inputs(130, 33, torch.float32)
    run = lambda: kernels("triton").denoise_loss_fwd(x, w, b, A, S, None, torch.tensor(7), True)  # noqa: E731
    first, second = run(), run()
    for u, v in zip(first, second):
        assert torch.equal(u, v)


# ---------------------------------------------------------------- in-kernel noise (N1)


@triton.jit
def _draw_eps_kernel(out_ptr, M, K, seed, row0, BLOCK: tl.constexpr):
    # The loss kernel's own eps function, over tiles of rows row0 .. row0 + M - 1 of an
    # M x K matrix (row0 as int64, as the loss kernel makes its rows).
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    k_start = tl.program_id(1) * BLOCK
    offs_k = k_start + tl.arange(0, BLOCK)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    eps = _eps_tile(out_ptr, row0.to(tl.int64) + offs_m, k_start, mask, K, seed, 0, 0, BLOCK, False, tl.float32)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], eps, mask=mask)


def _draw(seed: int, M: int, K: int, block: int = 32, row0: int = 0) -> torch.Tensor:
    out = torch.empty(M, K, device=DEVICE)
    _draw_eps_kernel[(triton.cdiv(M, block), triton.cdiv(K, block))](out, M, K, seed, row0, BLOCK=block)
    return out


@pytest.mark.parametrize("seed", [0, 123456789, 2**62 + 17])
@pytest.mark.parametrize("K", [33, 1, 6, 64])
def test_noise_matches_rng_module(seed, K):
    got = _draw(seed, 70, K)
    want = rng.normal(seed, 70, K, device=DEVICE)
    assert (got - want).abs().max().item() < 2e-6


def test_noise_radius_clamp():
    # Counters whose radius uniform N1 clamps at 1e-7 (tests/conftest.py): rows of 4 columns.
    for counter in CLAMPED_COUNTERS:
        got = _draw(CLAMP_SEED, 1, 4, block=8, row0=counter)
        assert (got - rng.normal(CLAMP_SEED, 1, 4, device=DEVICE, row0=counter)).abs().max().item() < 2e-6


@pytest.mark.parametrize("K", [3, 37])
def test_noise_counters_past_2_32(K):
    # Rows whose counters m ceil(K / 4) + q pass 2^32 (both counter words in use).
    row0 = 2**38 + 5
    got = _draw(2**33 + 7, 9, K, block=8, row0=row0)
    want = rng.normal(2**33 + 7, 9, K, device=DEVICE, row0=row0)
    assert (got - want).abs().max().item() < 2e-6


def test_noise_is_a_function_of_the_position():
    # The same seed, row and column give the same value whatever the tiling; with 4 | K the
    # counters of consecutive rows are consecutive, so the matrix is the stream itself.
    assert torch.equal(_draw(3, 37, 50), _draw(3, 37, 50, block=16))
    assert torch.equal(_draw(3, 40, 48).reshape(-1), _draw(3, 60, 32, block=16).reshape(-1))


def test_noise_statistics():
    scipy_stats = pytest.importorskip("scipy.stats")
    eps = _draw(2024, 256, 256, block=128).double().cpu().reshape(-1)  # 65536 samples
    n = eps.numel()
    # mean ~ N(0, 1/n); variance ~ N(1, 2/n): 5 sigma bounds
    assert abs(eps.mean().item()) < 5 / n**0.5
    assert abs(eps.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert scipy_stats.kstest(eps.numpy(), "norm").pvalue > 1e-3


def test_noise_reproducible_and_distinct():
    a = _draw(11, 64, 64)
    assert torch.equal(a, _draw(11, 64, 64))
    b = _draw(12, 64, 64)
    assert (a != b).float().mean() > 0.99
    # Tiles are not copies of each other (the index, not the tile position, keys the stream).
    tiles = [a[i : i + 32, j : j + 32].reshape(-1) for i in (0, 32) for j in (0, 32)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert (tiles[i] != tiles[j]).float().mean() > 0.99
            assert abs(torch.corrcoef(torch.stack([tiles[i], tiles[j]]))[0, 1].item()) < 0.15


# ---------------------------------------------------------------- merge (M1..M5)

MERGE_CASES = [
    # (out, K, dtype, bias, denoise_bias)
    (7, 33, torch.float32, True, True),
    (33, 130, torch.float32, False, True),
    (130, 7, torch.float32, True, False),
    (1, 1, torch.float32, False, False),
    (33, 7, torch.float64, True, True),
    (7, 33, torch.bfloat16, True, True),
    (33, 7, torch.float16, False, True),
]


def _merge_inputs(out, K, dtype, bias, denoise_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_(True)  # noqa: E731
    return mk(out, K), mk(out) if bias else None, mk(K, K), mk(K) if denoise_bias else None


def _poison_on_cpu(request):
    """Uninitialized allocations come back NaN (conftest.poisoned_empty) where the kernels run in
    the interpreter: the launchers allocate their outputs, so an element no program writes
    cannot pass as leftover memory. Not on a GPU, where deterministic mode would refuse cuBLAS
    without a workspace setting."""
    if DEVICE == "cpu":
        request.getfixturevalue("poisoned_empty")


@pytest.mark.parametrize("out,K,dtype,bias,denoise_bias", MERGE_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_merge_vs_oracle(monkeypatch, request, out, K, dtype, bias, denoise_bias):
    _triton(monkeypatch)
    _poison_on_cpu(request)
    w, b, wd, bd = _merge_inputs(out, K, dtype, bias, denoise_bias)
    assert select("merge_weights", w.device) == "triton"
    mw, mb = drep_kernels.ops.merge_weights(w, b, wd, bd, C1, C3)
    params = [t for t in (w, b, wd, bd) if t is not None]
    d64 = [t.detach().double().requires_grad_(True) for t in params]
    it = iter(d64)
    w64, b64, wd64, bd64 = (next(it) if t is not None else None for t in (w, b, wd, bd))
    ref_w, ref_b = oracle.merge(w64, b64, wd64, bd64, C1, C3)
    assert mw.dtype == dtype and mw.shape == (out, K)
    _close(mw, ref_w, dtype, "W'", stored=dtype)
    assert (mb is None) == (ref_b is None)
    if mb is not None:
        _close(mb, ref_b, dtype, "b'", stored=dtype)

    g = torch.Generator().manual_seed(9)
    gw = torch.randn(out, K, generator=g).to(DEVICE, dtype)
    gb = torch.randn(out, generator=g).to(DEVICE, dtype) if mb is not None else None
    outs, grads = [mw] + ([mb] if mb is not None else []), [gw] + ([gb] if gb is not None else [])
    got = torch.autograd.grad(outs, params, grads)
    refs = [ref_w] + ([ref_b] if ref_b is not None else [])
    want = torch.autograd.grad(refs, d64, [t.double() for t in grads])
    for name, gt, wt in zip(("W", "b", "W_d", "b_d"), got, want):
        # Gradients are computed in float32 and returned in the parameter's dtype.
        _close(gt, wt, dtype, f"d/d{name}", stored=dtype)


# The interpreter's integer division by zero (a grid of no column blocks in grouped_tile) is a
# numpy warning there and garbage on a GPU: here an error.
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("has_b,has_bd", [(True, True), (False, True), (True, False)])
def test_merge_without_columns(request, has_b, has_bd):
    # K = 0 with rows: W' is out x 0 and b' = b (zeros without b): W b_d is an empty sum, which
    # a program must still write (grid and kernel keep one column block for it).
    _poison_on_cpu(request)
    b = torch.randn(5).to(DEVICE) if has_b else None
    bd = torch.empty(0, device=DEVICE) if has_bd else None
    merged_w, merged_b = kernels("triton").merge_weights_fwd(torch.empty(5, 0, device=DEVICE), b,
                                                             torch.empty(0, 0, device=DEVICE), bd, C1, C3)
    assert merged_w.shape == (5, 0)
    assert torch.equal(merged_b, b if has_b else torch.zeros(5, device=DEVICE))
    # The backward's outputs of that layer: dW (5 x 0), and dW_d, db_d with no rows (nothing to
    # launch: the launcher's early outs).
    grads = kernels("triton").merge_weights_bwd(torch.empty(5, 0, device=DEVICE), torch.randn(5).to(DEVICE),
                                                torch.empty(5, 0, device=DEVICE), torch.empty(0, 0, device=DEVICE),
                                                bd, C1, C3, True, True)
    assert [tuple(g.shape) for g in grads] == [(5, 0), (0, 0), (0,)]


def test_merge_empty_layer(request):
    # out = 0: W' and b' empty; the gradients of W_d and b_d are empty sums, zeros.
    _poison_on_cpu(request)
    w, b, wd, bd = torch.empty(0, 7), torch.empty(0), torch.randn(7, 7), torch.randn(7)
    w, b, wd, bd = (t.to(DEVICE) for t in (w, b, wd, bd))
    merged_w, merged_b = kernels("triton").merge_weights_fwd(w, b, wd, bd, C1, C3)
    assert merged_w.shape == (0, 7) and merged_b.shape == (0,)
    dw, dwd, dbd = kernels("triton").merge_weights_bwd(torch.empty(0, 7, device=DEVICE), torch.empty(0, device=DEVICE),
                                                       w, wd, bd, C1, C3, True, True)
    assert dw.shape == (0, 7)
    assert torch.equal(dwd, torch.zeros(7, 7, device=DEVICE)) and torch.equal(dbd, torch.zeros(7, device=DEVICE))


def test_merge_bwd_kernel_vs_reference():
    # M3..M5 directly, in the compute dtype (no cast back), every need_* combination.
    w, b, wd, bd = (t.detach() for t in _merge_inputs(33, 40, torch.float32, True, True))
    g = torch.Generator().manual_seed(3)
    # g_b with stride 2: M5 reduces over its 33 rows in two slices of the interpreter's 32.
    gw, gb = torch.randn(33, 40, generator=g).to(DEVICE), torch.randn(33, 2, generator=g).to(DEVICE)[:, 1]
    for need_w, need_d in ((True, True), (True, False), (False, True)):
        for g_b in (gb, None):
            got = kernels("triton").merge_weights_bwd(gw, g_b, w, wd, bd, C1, C3, need_w, need_d)
            want = kernels("torch").merge_weights_bwd(gw.double(), None if g_b is None else g_b.double(),
                                                      w.double(), wd.double(), bd.double(), C1, C3, need_w, need_d)
            for name, u, v in zip(("dW", "dW_d", "db_d"), got, want):
                assert u.shape == v.shape, name
                if v.numel():
                    _close(u, v, torch.float32, name)


@pytest.mark.parametrize("K", [7, 70])  # one K slice of the interpreter's 32, and three
def test_merge_noncontiguous(monkeypatch, K):
    _triton(monkeypatch)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(33, 2 * K, generator=g).to(DEVICE)[:, ::2]  # (33, K), row stride 2 K, col stride 2
    wd = torch.randn(K, K, generator=g).to(DEVICE).t()
    bd = torch.randn(K, 2, generator=g).to(DEVICE)[:, 0]  # stride 2: the bias column's steps use it
    b = torch.randn(33, 3, generator=g).to(DEVICE)[:, 1]
    mw, mb = drep_kernels.ops.merge_weights(w, b, wd, bd, C1, C3)
    ref_w, ref_b = oracle.merge(w.double(), b.double(), wd.double(), bd.double(), C1, C3)
    _close(mw, ref_w, torch.float32, "W'")
    _close(mb, ref_b, torch.float32, "b'")


def test_merge_function_equals_two_step():
    # y = x W'^T + b' is the denoise-then-layer function (the merge's reason to exist).
    w, b, wd, bd = (t.detach() for t in _merge_inputs(33, 7, torch.float64, True, True))
    mw, mb = kernels("triton").merge_weights_fwd(w, b, wd, bd, C1, C3)
    x = torch.randn(5, 7, dtype=torch.float64, device=DEVICE)
    _close(x @ mw.T + mb, oracle.two_step(x, w, b, wd, bd, C1, C3), torch.float64, "y")


# ---------------------------------------------------------------- registration checks


def test_opcheck_denoise_loss():
    for M, K, bias, noise, grad in ((7, 33, True, True, True), (5, 7, False, False, True), (3, 7, True, False, False)):
        x, w, b, eps = _denoise_inputs(M, K, torch.float32, bias)
        w.requires_grad_(grad)
        args = (x, w, b, A, S, eps if noise else None, torch.tensor(99), "triton", grad)
        torch.library.opcheck(torch.ops.drep.denoise_loss.default, args)


def test_opcheck_merge_weights():
    for bias, denoise_bias in ((True, True), (False, True), (True, False)):
        w, b, wd, bd = _merge_inputs(7, 33, torch.float32, bias, denoise_bias)
        torch.library.opcheck(torch.ops.drep.merge_weights.default, (w, b, wd, bd, C1, C3, "triton"))
    # The backward launcher's own op (what the merge's autograd formula reaches).
    g = torch.randn(7, 33, device=DEVICE), torch.randn(7, device=DEVICE)
    w, _, wd, bd = (t.detach() if t is not None else None for t in _merge_inputs(7, 33, torch.float32, False, True))
    torch.library.opcheck(torch.ops.drep.triton_merge_weights_bwd.default, (*g, w, wd, bd, C1, C3, True, True))


def test_compile_fullgraph_traces_through_the_ops(monkeypatch):
    # aot_eager: the graph and its backward are traced (the merge's backward reaches the
    # registered drep::triton_merge_weights_bwd, never a launcher with fake tensors) but not
    # code-generated, so this runs under the interpreter too. Inductor on CUDA: test_gpu_*.
    _triton(monkeypatch)
    x, w, b, eps = _denoise_inputs(33, 7, torch.float32)
    w.requires_grad_(True)
    b.requires_grad_(True)
    W = torch.randn(5, 7, device=DEVICE, requires_grad=True)

    def f(x, W, w, b, eps):
        mw, mb = drep_kernels.ops.merge_weights(W, None, w, b, C1, C3)
        return (x @ mw.T + mb).square().mean() + drep_kernels.ops.denoise_loss(x, w, b, A, S, noise=eps)

    eager = f(x, W, w, b, eps)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, W, w, b, eps)
    assert torch.equal(compiled, eager)
    for u, v in zip(torch.autograd.grad(compiled, [W, w, b]), torch.autograd.grad(eager, [W, w, b])):
        assert torch.equal(u, v)


# ---------------------------------------------------------------- GPU only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_large_shapes_autotuned(dtype):
    # Autotuned configs, many row-block groups, real tensor-core tiles.
    M, K = 4099, 515
    x, w, b, eps = _denoise_inputs(M, K, dtype)
    a, s = _scales(dtype)
    loss, gw, gb = kernels("triton").denoise_loss_fwd(x, w, b, a, s, eps, torch.tensor(0), True)
    ref_loss, ref_gw, ref_gb = oracle.denoise_loss_grads(x, w, b, a, s, eps, _gemm_dtype(dtype))
    # Over M K elements D falls within rounding of 0 somewhere (either sign(D) is right). The
    # oracle rounds eps and x_noisy as the kernel does, so only float32's roundings (the GEMM's
    # accumulation, p + b_d - eps) separate the two D's: the slack takes float32's unit roundoff.
    # And for bf16 G' = sign D + 2 D, formed in float32 here and float64 in the oracle, lands on
    # either side of a bf16 rounding tie for tens of elements: each moves a dL/dW_d element by
    # about 2e-5 of its scale (a CPU emulation of this shape's roundings), hence atol 1e-4 there
    # (dL/db_d sums G before that rounding).
    e = oracle.gemm_eps(eps, _gemm_dtype(dtype))
    slack_w, slack_b = oracle.sign_flip_slack(x, w, b, e, torch.float32 if dtype != torch.float64 else dtype, a, s)
    _close(loss, ref_loss, dtype, "loss")
    _close(gw, ref_gw, dtype, "dL/dW_d", slack=slack_w, atol=1e-4 if dtype in (torch.float16, torch.bfloat16) else None)
    _close(gb, ref_gb, dtype, "dL/db_d", slack=slack_b)
    wt, bt, wd, bd = (t.detach() for t in _merge_inputs(1031, K, dtype, True, True))
    mw, mb = kernels("triton").merge_weights_fwd(wt, bt, wd, bd, C1, C3)
    ref_w, ref_b = oracle.merge(wt.double(), bt.double(), wd.double(), bd.double(), C1, C3)
    _close(mw, ref_w, dtype, "W'", stored=dtype)
    _close(mb, ref_b, dtype, "b'", stored=dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_merge_bias_never_tf32():
    """With torch's float32 matmuls on TF32 W' changes (the MMA's operands are TF32), and b' =
    b - c1 W b_d does not: a matrix-vector product on the CUDA cores, within float32's
    tolerance, where TF32's 10-bit operands would miss it by ~1e-3 over K = 1536."""
    w, b, wd, bd = (t.detach() for t in _merge_inputs(768, 1536, torch.float32, True, True))
    ref_w, ref_b = oracle.merge(w.double(), b.double(), wd.double(), bd.double(), C1, C3)
    ieee = kernels("triton").merge_weights_fwd(w, b, wd, bd, C1, C3)
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        fast = kernels("triton").merge_weights_fwd(w, b, wd, bd, C1, C3)
    finally:
        matmul.fp32_precision = saved
    assert not torch.equal(ieee[0], fast[0]), "W': TF32 on, yet the float32 result"
    rtol, atol = TOLERANCES[torch.float16]  # TF32 keeps float16's 10 mantissa bits
    assert_close(fast[0], ref_w, rtol, atol * float(ref_w.abs().max()), "W' (TF32)")
    for name, got in (("b'", ieee[1]), ("b' (TF32 on)", fast[1])):
        _close(got, ref_b, torch.float32, name)


@pytest.mark.gpu
@pytest.mark.slow  # a cold Inductor compile: the GPU run's slow tier, after the sweep
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_compile_fullgraph(monkeypatch):
    _triton(monkeypatch)
    x, w, b, eps = _denoise_inputs(257, 129, torch.float32)
    w.requires_grad_(True)
    W = torch.randn(65, 129, device=DEVICE, requires_grad=True)

    def f(x, W, w, b, eps):
        mw, mb = drep_kernels.ops.merge_weights(W, None, w, b, C1, C3)
        return (x @ mw.T + mb).square().mean() + drep_kernels.ops.denoise_loss(x, w, b, A, S, noise=eps)

    eager = f(x, W, w, b, eps)
    compiled = torch.compile(f, fullgraph=True)(x, W, w, b, eps)
    assert_close(compiled, eager, 1e-5, 1e-6, "compiled vs eager")
    g_eager = torch.autograd.grad(eager, [W, w])
    g_comp = torch.autograd.grad(compiled, [W, w])
    for u, v in zip(g_comp, g_eager):
        assert_close(u, v, 1e-5, 1e-6 * float(v.abs().max()), "grad")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_timing_report(capsys):
    """Not a pass/fail speed bound (benchmarks/ does that): prints triton vs torch backend."""
    from triton.testing import do_bench

    M, K = 8192, 1024
    x, w, b, _ = _denoise_inputs(M, K, torch.bfloat16)
    seed = torch.tensor(1)
    rows = []
    for name in ("torch", "triton"):
        fn = lambda: kernels(name).denoise_loss_fwd(x, w, b, A, S, None, seed, True)  # noqa: E731
        rows.append((name, do_bench(fn, quantiles=[0.5, 0.2, 0.8])))
    with capsys.disabled():
        print(f"\ndenoise_loss_fwd M={M} K={K} bf16 grad on {torch.cuda.get_device_name()}: "
              + ", ".join(f"{n} {t[0]:.3f} ms (p20 {t[1]:.3f}, p80 {t[2]:.3f})" for n, t in rows))
    assert all(t[0] > 0 for _, t in rows)
