"""Randomized differential tests: every backend usable here against the float64 oracle.

Hypothesis draws the cases: empty batches, odd K and K multiples of the Triton kernels' blocks,
2-D and 3-D inputs, storage layouts (column-major, sliced columns, stepped rows, expanded rows),
all four dtypes, and which biases exist. Each property runs through the public ops and their
autograd with the backend forced by DREP_BACKEND, on every device type present (CPU tensors run
Triton in its interpreter, which conftest.py enables without CUDA). The examples are
derandomized and the database is off, so every run tests the same cases.

Tolerances are conftest.py's TOLERANCES, chosen by where the result is rounded: values the
kernels return in their compute dtype (the loss: float32, or float64 for float64 inputs) are
held to that dtype's, values stored in the parameter's dtype (the gradients, the merged weights)
to that dtype's. The absolute part is scaled by the reference's largest element: a float32 dot
product's error is relative to the size of its terms, so an element that cancels to ~0 is off by
the tensor's scale, not its own; gradients are O(1 / (M K)), far below any fixed atol. Near 0
a stored value's rounding is absolute (subnormals): half the dtype's subnormal spacing is added.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import oracle
from conftest import TOLERANCES, assert_close
from drep_kernels import Schedule, ops, precision, rng
from drep_kernels.backends import NAMES, implements, select

DEVICE_TYPES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "column_major", "sliced_columns", "stepped_rows", "expanded_rows")
# Odd widths, 4 (one whole Philox group, N1), and the Triton interpreter's block width 32 (every
# BLOCK_N / BLOCK_K / BLOCK_R of both kernels under TRITON_INTERPRET), its multiple and one past it.
K_VALUES = (1, 3, 4, 7, 32, 33, 64)
# Diffusion steps with (a, s) = (1.00, 0.014), (0.99, 0.14), (0.59, 0.81): little noise to much.
STEPS = (1, 100, 999)
# (c1, c3) of real steps, tiny c1, and O(1) pairs in which the W W_d term weighs as much as c3 W
# (so a dropped or mis-signed term fails in every dtype).
MERGE_COEFFICIENTS = tuple((c.c1, c.c3) for c in map(Schedule().coefficients, (1, 500))) + ((0.75, 1.25), (-1.5, 0.5))
# Upstream gradient of the loss: 1, the authors' lambda, and a negative one (backward must scale).
LOSS_UPSTREAM = (1.0, 0.01, -2.5)
# The interpreter is slow (about 0.5 s per loss at M = 100, K = 64): fewer cases there.
MAX_EXAMPLES = {"torch": 40, "cpu": 40, "cuda": 40, "triton": 10}
# Rows of x: past 96, so the interpreter's Triton loss has row-block groups of several blocks.
MAX_ROWS = 130
# Rows of the merged weight: three of the interpreter's 32-row blocks, the last one partial.
MAX_OUT = 70


def _targets(*op_names: str, slow_interpreter: bool = False) -> list:
    """(backend, device type) pairs that implement every op in ``op_names``; with
    ``slow_interpreter``, Triton on CPU tensors (its interpreter) is marked slow."""
    slow = slow_interpreter and [pytest.mark.slow]
    return [
        pytest.param(b, d, id=f"{b}-{d}", marks=slow if (b, d) == ("triton", "cpu") and slow else [])
        for d in DEVICE_TYPES
        for b in NAMES
        if all(implements(b, op, d) for op in op_names)
    ]


@contextlib.contextmanager
def _forced(backend: str, device: str, *op_names: str):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DREP_BACKEND", backend)
        for op in op_names:  # the forced backend is the one that runs (no silent fallback)
            assert select(op, torch.device(device)) == backend
        yield


def _run(backend: str, strategy, check, explicit: list) -> None:
    """Run ``check(case)`` on the ``explicit`` cases, then on the backend's number of examples
    of ``strategy``. The explicit ones make sure every dtype meets every backend on a rich case
    (3-D, strided, biased, several blocks): a dozen drawn examples need not."""

    @settings(derandomize=True, database=None, max_examples=MAX_EXAMPLES[backend], deadline=None)
    @given(case=strategy)
    def prop(case):
        check(case)

    for case in explicit:
        prop = example(case=case)(prop)
    prop()


def _subnormal_rounding(dtype: torch.dtype) -> float:
    """Largest rounding error of storing a value in ``dtype`` near 0, where the relative bound
    stops: half the subnormal spacing (float16 gradients of small tensors reach it)."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps / 2


def _close(actual, expected, dtype, name) -> None:
    """``dtype``'s tolerance, its atol scaled by the reference's largest element."""
    rtol, atol = TOLERANCES[dtype]
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    assert_close(actual, expected, rtol, atol * scale + _subnormal_rounding(dtype), name)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rounded_gemm(backend: str, device: str, dtype: torch.dtype):
    """The GEMM dtype whose roundings the oracle must apply for ``backend`` (docs/method.md
    section 10): bf16 / fp16 where the GEMMs run on tensor cores, else None (no rounding)."""
    gemm = precision.gemm_dtype(dtype, precision.on_tensor_cores(backend, torch.device(device)))
    return gemm if gemm in precision.HALF_DTYPES else None


# The loss's tolerance where x_noisy is rounded to bf16 / fp16: the kernel forms a x + s eps in
# float32, the oracle in float64, and where the float32 value is a tie of the GEMM dtype the two
# round one ulp apart (a row's p moves by that ulp times W_d): far under 1e-4 of the loss.
ROUNDED_LOSS_RTOL = 1e-4


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Batch:
    """A layer input: leading shape, width K, dtype, and the storage layouts of x and of eps."""

    lead: tuple[int, ...]
    K: int
    dtype: torch.dtype
    x_layout: str
    noise_layout: str


def _batches(dtypes=DTYPES):
    lead = st.one_of(
        st.tuples(st.integers(0, MAX_ROWS)),
        st.tuples(st.integers(0, 3), st.integers(0, MAX_ROWS // 3)),
    )
    return st.builds(
        Batch, lead, st.sampled_from(K_VALUES), st.sampled_from(dtypes), st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS)
    )


def _tensor(gen: torch.Generator, lead: tuple[int, ...], K: int, layout: str, dtype, device, scale=1.0):
    """A (*lead, K) tensor of N(0, scale^2) values in ``dtype``, stored as ``layout`` says.
    Storage around a view is NaN, so a kernel that reads outside its elements cannot pass."""
    if layout == "expanded_rows":  # one row, every leading stride 0
        return (torch.randn(K, generator=gen, dtype=torch.float64) * scale).to(device, dtype).expand(*lead, K)
    v = (torch.randn(*lead, K, generator=gen, dtype=torch.float64) * scale).to(device, dtype)
    if layout == "contiguous":
        return v
    if layout == "column_major":  # every stride reversed: the last dim's is the largest
        dims = tuple(reversed(range(v.dim())))
        return v.permute(dims).contiguous().permute(dims)
    if layout == "sliced_columns":  # columns 1, 3, 5, ... of a wider buffer: stride 2, offset 1
        buf = v.new_full((*lead, 2 * K + 1), math.nan)
        buf[..., 1::2] = v
        return buf[..., 1::2]
    if layout == "stepped_rows":  # x[::2] of a buffer with twice the rows
        buf = v.new_full((*lead[:-1], 2 * lead[-1], K), math.nan)
        buf[..., ::2, :] = v
        return buf[..., ::2, :]
    raise AssertionError(layout)


def _denoiser(gen, K, dtype, device, bias: bool, column_major: bool):
    """(W_d, b_d) leaves requiring grad; W_d ~ N(0, 1 / K) keeps p of the size of eps."""
    wd = (torch.randn(K, K, generator=gen, dtype=torch.float64) / math.sqrt(K)).to(device, dtype)
    if column_major:
        wd = wd.t().contiguous().t()
    bd = (torch.randn(K, generator=gen, dtype=torch.float64) * 0.5).to(device, dtype) if bias else None
    return wd.requires_grad_(True), (bd.requires_grad_(True) if bias else None)


# ---------------------------------------------------------------- denoising loss (L1, L2)


@dataclass(frozen=True)
class LossCase:
    batch: Batch
    bias: bool
    wd_column_major: bool
    t: int
    upstream: float
    seed: int  # of the generator of the tensors' values


def _loss_cases():
    return st.builds(
        LossCase,
        _batches(),
        st.booleans(),
        st.booleans(),
        st.sampled_from(STEPS),
        st.sampled_from(LOSS_UPSTREAM),
        st.integers(0, 2**31 - 1),
    )


# 3-D, x with column stride 2, column-major eps and W_d, b_d, a negative upstream gradient; 100
# rows: four of the interpreter's 32-row blocks in three row-block groups, one of two blocks; K = 33:
# two column blocks, the second of one column, and a Philox group cut at one element.
RICH_LOSS = [
    LossCase(Batch((2, 50), 33, dtype, "sliced_columns", "column_major"), True, True, 100, -2.5, 1) for dtype in DTYPES
]


def _loss_inputs(case: LossCase, device: str):
    b = case.batch
    gen = torch.Generator().manual_seed(case.seed)
    x = _tensor(gen, b.lead, b.K, b.x_layout, b.dtype, device)
    eps = _tensor(gen, b.lead, b.K, b.noise_layout, b.dtype, device)
    wd, bd = _denoiser(gen, b.K, b.dtype, device, case.bias, case.wd_column_major)
    return x, eps, wd, bd, Schedule().coefficients(case.t)


@pytest.mark.parametrize("backend,device", _targets("denoise_loss"))
def test_denoise_loss_matches_oracle(backend, device):
    """L1 and its autograd (L2) through ops.denoise_loss, with explicit noise."""

    def check(case: LossCase):
        x, eps, wd, bd, co = _loss_inputs(case, device)
        with _forced(backend, device, "denoise_loss"):
            loss = ops.denoise_loss(x, wd, bd, co.a, co.s, noise=eps)
        dtype = case.batch.dtype
        gemm = _rounded_gemm(backend, device, dtype)
        ref_loss, ref_gw, ref_gb = oracle.denoise_loss_grads(x, wd, bd, co.a, co.s, eps, gemm)
        # The loss comes in its compute dtype; g dL/dW_d and g dL/db_d in the parameters'.
        assert loss.dtype == _compute_dtype(dtype) and loss.shape == ()
        if gemm is None:
            _close(loss, ref_loss, _compute_dtype(dtype), "loss")
        else:
            assert_close(loss, ref_loss, ROUNDED_LOSS_RTOL, 1e-6, "loss")
        grads = torch.autograd.grad(loss * case.upstream, [wd] + ([bd] if bd is not None else []))
        assert all(g.dtype == dtype for g in grads)
        _close(grads[0], case.upstream * ref_gw, dtype, "dW_d")
        if bd is not None:
            _close(grads[1], case.upstream * ref_gb, dtype, "db_d")

    _run(backend, _loss_cases(), check, RICH_LOSS)


# Largest |difference| between two backends' N1 noise elements: the rounding of log, sin and cos
# in float32 (tests/test_rng.py, test_triton_backend.py bound it by 2e-6).
NOISE_ROUNDING = 2e-6


# Under the interpreter: 6 to 9 s on 2 shared cores (in-kernel Philox is slow there).
@pytest.mark.parametrize("backend,device", _targets("denoise_loss", slow_interpreter=True))
def test_seeded_denoise_loss_agrees_across_backends(backend, device):
    """With a seed each backend draws eps in-kernel (N1). Every backend is compared with the
    oracle fed drep_kernels.rng's stream (the torch backend's eps), so all agree with each other
    to the noise's rounding. The loss is smooth in eps: 1e-5 relative covers it. A gradient term
    sign(D) flips where |D| is within the noise's rounding of 0; each such element may move its
    column's gradient by 2 |g| max|x_noisy| / (M K) (dW_d) or 2 |g| / (M K) (db_d), allowed on
    top of 1e-5 of the gradient's scale."""

    def check(drawn: tuple[LossCase, int]):
        case, seed = drawn
        x, _, wd, bd, co = _loss_inputs(case, device)
        with _forced(backend, device, "denoise_loss"):
            loss = ops.denoise_loss(x, wd, bd, co.a, co.s, seed=seed)
        x2d = x.reshape(-1, x.shape[-1])
        M, K = x2d.shape
        eps = rng.normal(seed, M, K, device=x.device).reshape(x.shape)
        gemm = _rounded_gemm(backend, device, case.batch.dtype)
        ref_loss, ref_gw, ref_gb = oracle.denoise_loss_grads(x, wd, bd, co.a, co.s, eps, gemm)
        # D of the reference (its eps rounded as the policy says), to count the elements whose
        # sign the noise's rounding may flip.
        e = oracle.gemm_eps(eps, gemm).reshape(M, K)
        x_noisy = co.a * x2d.double() + co.s * e
        d = x_noisy @ wd.detach().double().T + (bd.detach().double() if bd is not None else 0) - e
        # |dD| <= |d eps| (1 + s max row sum |W_d|) bounds how far the noise's rounding moves D.
        # With a GEMM dtype the kernel's eps and rng's, a few float32 ulps apart, may round to
        # neighbouring values of it (one ulp of the largest |eps| at most), and x_noisy's rounding
        # may put an element of x_noisy one ulp over (at most the ulp of its largest element).
        row_sum = float(wd.detach().double().abs().sum(1).max()) if wd.numel() else 0.0
        eps_moved = NOISE_ROUNDING
        if gemm is not None and e.numel():
            eps_moved += torch.finfo(gemm).eps * float(e.abs().max())
        moved = co.s * eps_moved
        if gemm is not None and x_noisy.numel():
            moved += torch.finfo(gemm).eps * float(x_noisy.abs().max())
        reach = eps_moved + moved * row_sum
        flips = int((d.abs() <= 2 * reach).sum(0).max()) if d.numel() else 0
        unit = 2 * abs(case.upstream) * flips / max(M * K, 1)
        extra_w = unit * (float(x_noisy.abs().max()) if x_noisy.numel() else 0.0)
        dtype = case.batch.dtype
        params = [wd] + ([bd] if bd is not None else [])
        grads = torch.autograd.grad(loss * case.upstream, params)
        assert_close(loss, ref_loss, 1e-5 if gemm is None else ROUNDED_LOSS_RTOL, 1e-5, "loss")
        ref_gw = case.upstream * ref_gw
        # Half-precision gradients are also rounded to their dtype.
        rtol = 1e-5 + (TOLERANCES[dtype][0] if dtype in (torch.bfloat16, torch.float16) else 0.0)
        floor = _subnormal_rounding(dtype)
        assert_close(grads[0], ref_gw, rtol, 1e-5 * float(ref_gw.abs().max()) + extra_w + floor, "dW_d")
        if bd is not None:
            ref_gb = case.upstream * ref_gb
            assert_close(grads[1], ref_gb, rtol, 1e-5 * float(ref_gb.abs().max()) + unit + floor, "db_d")

    # Seeds of both Philox key words (N1: key = (seed mod 2^32, seed div 2^32)), half each.
    seeds = st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32, 2**63 - 1))
    # The in-kernel noise path depends on the compute dtype (half precisions run float32's).
    rich = [(case, 2**40 + 12345) for case in RICH_LOSS if case.batch.dtype in (torch.float32, torch.float64)]
    _run(backend, st.tuples(_loss_cases(), seeds), check, rich)


# ---------------------------------------------------------------- merge (M1, M2; M3..M5)


@dataclass(frozen=True)
class MergeCase:
    out: int
    K: int
    dtype: torch.dtype
    w_layout: str
    wd_column_major: bool
    bias: bool
    denoise_bias: bool
    coefficients: tuple[float, float]
    seed: int


def _merge_cases():
    return st.builds(
        MergeCase,
        st.integers(0, MAX_OUT),
        st.sampled_from(K_VALUES),
        st.sampled_from(DTYPES),
        st.sampled_from(LAYOUTS),
        st.booleans(),
        st.booleans(),
        st.booleans(),
        st.sampled_from(MERGE_COEFFICIENTS),
        st.integers(0, 2**31 - 1),
    )


# W with column stride 2, column-major W_d, both biases, O(1) coefficients; out = 45: two of the
# interpreter's 32-row blocks, the second partial; K = 33: a reduction and column block of one.
RICH_MERGE = [MergeCase(45, 33, dtype, "sliced_columns", True, True, True, (0.75, 1.25), 1) for dtype in DTYPES]


@pytest.mark.parametrize("backend,device", _targets("merge_weights"))
def test_merge_weights_and_backward_match_oracle(backend, device):
    """M1, M2 through ops.merge_weights, and its backward (M3..M5) by torch.autograd with random
    upstream gradients, every parameter requiring grad."""

    def check(case: MergeCase):
        gen = torch.Generator().manual_seed(case.seed)
        c1, c3 = case.coefficients
        w = _tensor(gen, (case.out,), case.K, case.w_layout, case.dtype, device, scale=case.K**-0.5)
        b = _tensor(gen, (), case.out, "contiguous", case.dtype, device) if case.bias else None
        wd, bd = _denoiser(gen, case.K, case.dtype, device, case.denoise_bias, case.wd_column_major)
        w.requires_grad_(True)
        if b is not None:
            b.requires_grad_(True)
        with _forced(backend, device, "merge_weights"):
            mw, mb = ops.merge_weights(w, b, wd, bd, c1, c3)
        ref_w, ref_b = oracle.merge(*(t.detach().double() if t is not None else None for t in (w, b, wd, bd)), c1, c3)
        assert (mb is None) == (ref_b is None)
        assert mw.dtype == case.dtype and mw.shape == (case.out, case.K)
        _close(mw, ref_w, case.dtype, "W'")
        if mb is not None:
            assert mb.dtype == case.dtype
            _close(mb, ref_b, case.dtype, "b'")
        # The backward runs the backend the forward chose (saved in the op's context).
        g_w = _tensor(gen, (case.out,), case.K, "contiguous", case.dtype, device)
        g_b = _tensor(gen, (), case.out, "contiguous", case.dtype, device) if mb is not None else None
        params = [t for t in (w, b, wd, bd) if t is not None]
        outputs = [mw] + ([mb] if mb is not None else [])
        grads = iter(torch.autograd.grad(outputs, params, [g_w] + ([g_b] if g_b is not None else [])))
        want = oracle.merge_grads(w, b, wd, bd, c1, c3, g_w, g_b)
        for name, p, ref in zip(("dW", "db", "dW_d", "db_d"), (w, b, wd, bd), want):
            if p is not None:
                got = next(grads)
                assert got.dtype == case.dtype, name
                _close(got, ref, case.dtype, name)

    _run(backend, _merge_cases(), check, RICH_MERGE)


# ---------------------------------------------------------------- the layer's training forward


@dataclass(frozen=True)
class LinearCase:
    batch: Batch
    out: int
    bias: bool
    denoise_bias: bool
    label_augmented: bool
    t: int
    seed: int


# Under the interpreter: 5 to 8 s on 2 shared cores (a merge and a loss per example).
@pytest.mark.parametrize("backend,device", _targets("denoise_loss", "merge_weights", slow_interpreter=True))
def test_linear_denoise_matches_oracle(backend, device):
    """ops.linear_denoise on 2-D / 3-D, non-contiguous x: y = x W'^T + b' and the loss, and the
    gradients of a task term plus 0.01 loss reaching x, W, b (task), W_d, b_d (loss; also the task
    when label-augmented), against the oracle's composition. float32 / float64: the half
    precisions' rounding of the merge and the loss is covered above, and y's GEMM is torch's."""

    def check(case: LinearCase):
        bt = case.batch
        gen = torch.Generator().manual_seed(case.seed)
        x = _tensor(gen, bt.lead, bt.K, bt.x_layout, bt.dtype, device).requires_grad_(True)
        eps = _tensor(gen, bt.lead, bt.K, bt.noise_layout, bt.dtype, device)
        w = _tensor(gen, (case.out,), bt.K, "contiguous", bt.dtype, device, scale=bt.K**-0.5).requires_grad_(True)
        b = _tensor(gen, (), case.out, "contiguous", bt.dtype, device).requires_grad_(True) if case.bias else None
        wd, bd = _denoiser(gen, bt.K, bt.dtype, device, case.denoise_bias, column_major=False)
        co = Schedule().coefficients(case.t)
        with _forced(backend, device, "denoise_loss", "merge_weights"):
            y, loss = ops.linear_denoise(x, w, b, wd, bd, co, noise=eps, label_augmented=case.label_augmented)
        g_y = _tensor(gen, bt.lead, case.out, "contiguous", bt.dtype, device)
        params = [t for t in (x, w, b, wd, bd) if t is not None]
        grads = iter(torch.autograd.grad([y, loss], params, [g_y, torch.tensor(0.01, dtype=loss.dtype, device=device)]))

        p64 = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, b, wd, bd)]
        x64, w64, b64, wd64, bd64 = p64
        routed = (wd64, bd64) if case.label_augmented else (wd64.detach(), bd64.detach() if bd64 is not None else None)
        mw, mb = oracle.merge(w64, b64, *routed, co.c1, co.c3)
        ref_y = F.linear(x64, mw, mb)
        ref_loss = oracle.denoise_loss(x64, wd64, bd64, co.a, co.s, eps)
        present = [t for t in p64 if t is not None]
        want = iter(torch.autograd.grad((ref_y * g_y.double()).sum() + 0.01 * ref_loss, present))
        assert y.dtype == bt.dtype and y.shape == (*bt.lead, case.out)
        _close(y, ref_y, bt.dtype, "y")
        _close(loss, ref_loss, _compute_dtype(bt.dtype), "loss")
        for name, p in zip(("dx", "dW", "db", "dW_d", "db_d"), (x, w, b, wd, bd)):
            if p is not None:
                _close(next(grads), next(want), bt.dtype, name)

    cases = st.builds(
        LinearCase,
        _batches(dtypes=(torch.float32, torch.float64)),
        st.integers(0, MAX_OUT),
        st.booleans(),
        st.booleans(),
        st.booleans(),
        st.sampled_from(STEPS),
        st.integers(0, 2**31 - 1),
    )
    rich = [
        LinearCase(Batch((2, 50), 33, dtype, "stepped_rows", "sliced_columns"), 45, True, True, label_augmented, 100, 1)
        for dtype, label_augmented in ((torch.float32, False), (torch.float64, True))
    ]
    _run(backend, cases, check, rich)
