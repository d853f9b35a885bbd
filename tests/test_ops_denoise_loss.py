"""drep::denoise_loss on every CPU backend: L1 / L2 against the float64 oracle, noise, errors."""
import os

import pytest
import torch
from torch.library import opcheck

import oracle
from conftest import TOLERANCES, assert_close, cpu_backends
from drep_kernels import Schedule, ops, precision, rng

BACKENDS = cpu_backends("denoise_loss")
CO = Schedule().coefficients(5)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("DREP_BACKEND", request.param)
    return request.param


def ops_backend() -> str:
    return os.environ["DREP_BACKEND"]  # set by the backend fixture


def _inputs(shape, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    wd = (torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5).to(dtype).requires_grad_(True)
    bd = (torch.randn(k, generator=g, dtype=torch.float64) * 0.1).to(dtype).requires_grad_(True) if bias else None
    eps = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    return x, wd, bd, eps


def _oracle_gemm_dtype(backend: str, x: torch.Tensor):
    """The GEMM dtype whose roundings the oracle applies for ``backend`` (precision policy):
    bf16 / fp16 on tensor cores, None (no rounding) where the GEMMs are float32 or float64."""
    gemm = precision.gemm_dtype(x.dtype, precision.on_tensor_cores(backend, x.device))
    return gemm if gemm in precision.HALF_DTYPES else None


def _check_against_oracle(x, wd, bd, eps, dtype, a=CO.a, s=CO.s):
    backend = ops_backend()
    loss = ops.denoise_loss(x, wd, bd, a, s, noise=eps)
    params = [wd] + ([bd] if bd is not None else [])
    grads = torch.autograd.grad(loss, params)
    gemm = _oracle_gemm_dtype(backend, x)
    e_loss, e_gw, e_gb = oracle.denoise_loss_grads(x, wd, bd, a, s, eps, gemm)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == compute
    # Half inputs are exact in float32, where the op computes: the loss keeps float32's
    # tolerance. With x_noisy rounded to bf16 / fp16 (tensor cores), the kernel's float32
    # a x + s eps and the oracle's may round to neighbouring values where they lie within
    # float32's rounding of a tie (about 2^-16 of the elements): 1e-4 covers those.
    rtol, atol = TOLERANCES[compute] if gemm is None else (1e-4, 1e-6)
    assert_close(loss, e_loss, rtol, atol, "loss")
    for name, got, want in (("dW_d", grads[0], e_gw), ("db_d", grads[1] if bd is not None else None, e_gb)):
        if want is None:
            continue
        assert got.dtype == dtype
        if dtype in (torch.float32, torch.float64):
            rtol, atol = TOLERANCES[dtype]
        else:
            # Computed in float32, then rounded once to dtype: half an ulp, |g| finfo(dtype).eps / 2
            # (rtol with a factor 2 to spare), plus float32's accumulation error over the rows, of
            # the tensor's scale (atol). Zeroing or halving a gradient fails by far.
            rtol, atol = torch.finfo(dtype).eps, 1e-5 * float(want.abs().max())
        assert_close(got, want, rtol, atol, name)


@pytest.mark.parametrize("shape", [(1, 1), (7, 7), (130, 33), (2, 9, 127), (5, 768)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_oracle(backend, shape, dtype):
    _check_against_oracle(*_inputs(shape, dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_oracle(backend, dtype):
    _check_against_oracle(*_inputs((3, 11, 33), dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_operands_rounded_as_the_precision_policy_says(backend, dtype):
    """x = 0, a = 0, s = 0.625, W_d = 1.6 I (in the dtype: s W_d is 1 within 2^-10), float32
    noise given: D = W_d (s eps) - eps is small, and on tensor cores mostly the rounding of eps
    and of x_noisy = 0.625 eps to the GEMM dtype, which the CPU policy (float32 operands) does
    not apply. The two policies' losses differ by far more than the tolerance, and the backend
    matches its own. dL/dW_d sees G' as rounded for GEMM 2: sign D + 2 D, whose 2 D part bf16
    rounds away next to 1."""
    M, K, s = 96, 40, 0.625
    x = torch.zeros(M, K, dtype=dtype)
    wd = (1.6 * torch.eye(K)).to(dtype).requires_grad_(True)
    eps = rng.normal(7, M, K)
    loss = ops.denoise_loss(x, wd, None, 0.0, s, noise=eps)
    (gw,) = torch.autograd.grad(loss, [wd])
    gemm = _oracle_gemm_dtype(backend, x)
    e_loss, e_gw, _ = oracle.denoise_loss_grads(x, wd, None, 0.0, s, eps, gemm)
    other = oracle.denoise_loss(x, wd.detach(), None, 0.0, s, eps, dtype if gemm is None else None)
    assert abs(float(other - e_loss)) > 1e-2 * float(e_loss) > 0  # the test tells the policies apart
    assert_close(loss, e_loss, 1e-4, 1e-9, "loss")
    assert_close(gw, e_gw, torch.finfo(dtype).eps, 1e-5 * float(e_gw.abs().max()) + 1e-12, "dW_d")


def _op_grads(backend, x, wd, bd, eps):
    """The float32 dL/dW_d, dL/db_d the op computes in forward (before backward scales them)."""
    seed = torch.zeros((), dtype=torch.int64)
    _, gw, gb = torch.ops.drep.denoise_loss(x, wd.detach(), bd.detach(), CO.a, CO.s, eps, seed, backend, True)
    return gw, gb


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_parameter_gradients_are_the_scaled_float32_ones_rounded_once(backend, dtype):
    # Backward scales the op's float32 gradients by the upstream gradient (0.37 here) and
    # rounds the product once to the parameters' dtype: bitwise (0.37 * dL/dW_d).to(dtype),
    # not 0.37 times dL/dW_d already rounded (two roundings, which the last line tells apart).
    x, wd, bd, eps = _inputs((9, 33), dtype)
    loss = ops.denoise_loss(x, wd, bd, CO.a, CO.s, noise=eps)
    gw, gb = torch.autograd.grad(loss * 0.37, [wd, bd])
    want_gw, want_gb = _op_grads(backend, x, wd, bd, eps)
    scale = torch.tensor(0.37, dtype=torch.float32)
    assert want_gw.dtype == torch.float32 and gw.dtype == dtype
    assert torch.equal(gw, (scale * want_gw).to(dtype)) and torch.equal(gb, (scale * want_gb).to(dtype))
    assert not torch.equal(gw, scale.to(dtype) * want_gw.to(dtype)), "the test cannot see a second rounding"


def test_half_parameter_gradients_under_create_graph_and_batched_backward(backend):
    # A differentiable backward (create_graph, a learned loss weight) and a batched one (vmap)
    # take the product-then-cast route: the same values, and the graph / the batch work.
    x, wd, bd, eps = _inputs((9, 33), torch.bfloat16)
    want_gw, _ = _op_grads(backend, x, wd, bd, eps)
    lam = torch.tensor(0.37, requires_grad=True)
    loss = ops.denoise_loss(x, wd, bd, CO.a, CO.s, noise=eps)
    (gw,) = torch.autograd.grad(lam * loss, [wd], create_graph=True)
    assert gw.requires_grad and torch.equal(gw, (lam.detach() * want_gw).bfloat16())
    (dlam,) = torch.autograd.grad((gw.float() * want_gw).sum(), [lam])
    assert_close(dlam, (want_gw.bfloat16().float() * want_gw).sum(), 1e-2, 0.0, "d/dlam")
    loss = ops.denoise_loss(x, wd, bd, CO.a, CO.s, noise=eps)
    scales = torch.tensor([1.0, 0.5, -2.0])
    (batched,) = torch.autograd.grad(loss, [wd], grad_outputs=scales, is_grads_batched=True)
    for scale, got in zip(scales, batched):
        assert torch.equal(got, (scale * want_gw).bfloat16())


def test_without_bias(backend):
    _check_against_oracle(*_inputs((13, 17), torch.float64, bias=False), torch.float64)


def test_non_contiguous_input(backend):
    x, wd, bd, eps = _inputs((33, 40), torch.float64)
    x_view = x.T.contiguous().T[:, ::2]  # column-major and strided
    eps_view = eps[:, ::2]
    wd2 = (torch.randn(20, 20, dtype=torch.float64) / 5).requires_grad_(True)
    bd2 = torch.randn(20, dtype=torch.float64).requires_grad_(True)
    _check_against_oracle(x_view, wd2, bd2, eps_view, torch.float64)


def test_empty_batch_gives_zero_loss_and_zero_grads(backend):
    x, wd, bd, eps = _inputs((0, 9), torch.float32)
    loss = ops.denoise_loss(x, wd, bd, CO.a, CO.s, noise=eps)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(wd.grad, torch.zeros_like(wd)) and torch.equal(bd.grad, torch.zeros_like(bd))
    loss = ops.denoise_loss(torch.zeros(2, 0, 9), wd, bd, CO.a, CO.s, seed=3)
    assert loss.item() == 0.0


def test_x_gets_no_gradient(backend):
    x, wd, bd, eps = _inputs((4, 6), torch.float64)
    x.requires_grad_(True)
    loss = ops.denoise_loss(x, wd, bd, CO.a, CO.s, noise=eps)
    assert torch.autograd.grad(loss, x, allow_unused=True)[0] is None


def test_gradcheck(backend):
    # L1 is |D|: gradcheck's finite differences are valid where no D crosses 0. With eps = 0
    # and a large b_d, D = a x W_d^T + b_d stays far from 0 for these small perturbations.
    x, wd, _, _ = _inputs((5, 4), torch.float64)
    bd = torch.full((4,), 3.0, dtype=torch.float64, requires_grad=True)
    eps = torch.zeros(5, 4, dtype=torch.float64)
    fn = lambda w, b: ops.denoise_loss(x, w, b, CO.a, CO.s, noise=eps)
    assert torch.autograd.gradcheck(fn, (wd, bd))


def test_seeded_noise_is_the_counter_stream(backend):
    x, wd, bd, _ = _inputs((6, 10), torch.float64)
    seeded = ops.denoise_loss(x, wd, bd, CO.a, CO.s, seed=1234)
    eps = rng.normal(1234, 6, 10).double()
    explicit = ops.denoise_loss(x, wd, bd, CO.a, CO.s, noise=eps)
    assert_close(seeded, explicit, 1e-6, 1e-7, "seeded vs explicit noise")


def test_seeds_reproduce_and_differ(backend):
    x, wd, bd, _ = _inputs((8, 12), torch.float32)
    explicit = lambda seed: ops.denoise_loss(x, wd, bd, CO.a, CO.s, noise=rng.normal(seed, 8, 12))  # noqa: E731
    a = ops.denoise_loss(x, wd, bd, CO.a, CO.s, seed=5)
    b = ops.denoise_loss(x, wd, bd, CO.a, CO.s, seed=5)
    c = ops.denoise_loss(x, wd, bd, CO.a, CO.s, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert_close(c, explicit(6), 1e-6, 1e-7, "seed 6")  # its own stream, not seed 5's
    # Without a seed, one is drawn from torch's default generator.
    torch.manual_seed(0)
    d = ops.denoise_loss(x, wd, bd, CO.a, CO.s)
    torch.manual_seed(0)
    e = ops.denoise_loss(x, wd, bd, CO.a, CO.s)
    assert torch.equal(d, e)
    torch.manual_seed(0)
    assert_close(d, explicit(int(rng.draw_seed())), 1e-6, 1e-7, "drawn seed")


def test_opcheck(backend):
    x, wd, bd, eps = _inputs((7, 5), torch.float32)
    seed = torch.tensor(11)
    opcheck(torch.ops.drep.denoise_loss.default, (x, wd, bd, CO.a, CO.s, eps, seed, backend, True))
    opcheck(torch.ops.drep.denoise_loss.default, (x, wd, None, CO.a, CO.s, None, seed, backend, True))
    opcheck(torch.ops.drep.denoise_loss.default, (x, wd.detach(), bd.detach(), CO.a, CO.s, None, seed, backend, False))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(x=torch.randn(3, 4)), ValueError, "denoise_weight must have shape"),
        (dict(denoise_bias=torch.randn(4)), ValueError, "denoise_bias must have shape"),
        (dict(denoise_weight=torch.randn(5, 5, dtype=torch.float64)), TypeError, "denoise_weight has dtype"),
        (dict(x=torch.randn(3, 5, device="meta")), ValueError, "is on"),
        (dict(x=torch.ones(3, 5, dtype=torch.int64)), TypeError, "x must be float16"),
        (dict(a=float("nan")), ValueError, "a must be finite"),
        (dict(s=float("inf")), ValueError, "s must be finite"),
        (dict(noise=torch.randn(3, 4)), ValueError, "noise must have the shape"),
        # Same element count and K, another layout: refused, not silently reshaped.
        (dict(x=torch.randn(2, 3, 5), noise=torch.randn(3, 2, 5)), ValueError, "noise must have the shape"),
        (dict(noise=torch.randn(3, 5), seed=1), ValueError, "noise or seed"),
        (dict(seed=-1), ValueError, "seed must be"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(x=torch.randn(3, 5), denoise_weight=torch.randn(5, 5), denoise_bias=torch.randn(5), a=0.9, s=0.1)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.denoise_loss(
            args.pop("x"), args.pop("denoise_weight"), args.pop("denoise_bias"), args.pop("a"), args.pop("s"), **args
        )


def test_forced_backend_unavailable_is_an_error(monkeypatch):
    monkeypatch.setenv("DREP_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="DREP_BACKEND='cuda' cannot run"):
        ops.denoise_loss(torch.randn(2, 3), torch.zeros(3, 3), None, 0.9, 0.1, seed=1)
    monkeypatch.setenv("DREP_BACKEND", "fastest")
    with pytest.raises(ValueError, match="is not one of"):
        ops.denoise_loss(torch.randn(2, 3), torch.zeros(3, 3), None, 0.9, 0.1, seed=1)
