"""``drep::denoise_loss``: the label-free DDPM noise-prediction loss of one layer.

Math: docs/method.md, formulas L1 (loss) and L2 (gradients). The op returns the loss and,
when a denoiser parameter needs it, the finished gradients dL/dW_d and dL/db_d computed in the
same pass (as a fused linear cross-entropy does): backward only scales them by the upstream
gradient, so nothing of size M x K is saved. Recomputing instead would cost a third M x K x K
GEMM (p again, then dW_d); computing in forward is exactly the two-GEMM floor.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import precision, rng
from ..backends import kernels, select
from . import _checks


@torch.library.custom_op("drep::denoise_loss", mutates_args=())
def denoise_loss_op(
    x: Tensor,
    denoise_weight: Tensor,
    denoise_bias: Optional[Tensor],
    a: float,
    s: float,
    noise: Optional[Tensor],
    seed: Tensor,
    backend: str,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dL/dW_d, dL/db_d) for a 2-D x; see ``denoise_loss`` for the public form."""
    return kernels(backend).denoise_loss_fwd(x, denoise_weight, denoise_bias, a, s, noise, seed, compute_grad)


@denoise_loss_op.register_fake
def _(x, denoise_weight, denoise_bias, a, s, noise, seed, backend, compute_grad):
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    K = denoise_weight.shape[0]
    loss = x.new_empty((), dtype=cdt)
    grad_weight = x.new_empty((K, K) if compute_grad else (0,), dtype=cdt)
    grad_bias = x.new_empty((K,) if compute_grad and denoise_bias is not None else (0,), dtype=cdt)
    return loss, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    _, denoise_weight, denoise_bias, *_ = inputs
    _, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(grad_weight, grad_bias)
    # The gradient outputs get no gradient: no K x K zeros filled for them before backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_weight, grad_bias)
    ctx.weight_dtype = denoise_weight.dtype


def _backward(ctx, grad_loss, _grad_gw, _grad_gb):
    if grad_loss is None:  # (without materialized grads) nothing flowed into the loss
        return (None,) * 9
    grad_weight, grad_bias = ctx.saved_tensors
    need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if (need_w and grad_weight.numel() == 0) or (need_b and grad_bias.numel() == 0):
        raise RuntimeError("drep::denoise_loss was called with compute_grad=False; no gradient was computed")
    dw = precision.scaled_grad(grad_loss, grad_weight, ctx.weight_dtype) if need_w else None
    db = precision.scaled_grad(grad_loss, grad_bias, ctx.weight_dtype) if need_b else None
    # x gets no gradient: the denoising objective never pulls the backbone.
    return None, dw, db, None, None, None, None, None, None


denoise_loss_op.register_autograd(_backward, setup_context=_setup_context)


def flat_noise_and_seed(
    x: Tensor, noise: Optional[Tensor], seed: Optional[int | Tensor]
) -> tuple[Optional[Tensor], Tensor]:
    """Check ``noise`` / ``seed`` for the (..., K) input x and return (noise as (M, K), seed
    tensor).

    Without either, a seed is drawn from torch's default generator of x's device: for CUDA x
    on the device (``torch.randint``, capture-safe), never read on the host, so that the CUDA
    and Triton kernels load it themselves and a captured CUDA graph draws new noise on every
    replay. An explicit seed is a CPU value, read on the host (a graph replays it unchanged)."""
    if noise is not None:
        if seed is not None:
            raise ValueError("give noise or seed, not both")
        _checks.tensor("noise", noise)
        if noise.shape != x.shape:
            raise ValueError(f"noise must have the shape of x, {tuple(x.shape)}, got {tuple(noise.shape)}")
        if noise.device != x.device:
            raise ValueError(f"noise is on {noise.device} but x is on {x.device}")
        return noise.reshape(math.prod(x.shape[:-1]), x.shape[-1]), torch.zeros((), dtype=torch.int64)
    if seed is None:
        return None, rng.draw_seed(device=x.device)
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.dim() != 0 or seed.device.type != "cpu":
            raise ValueError("a seed tensor must be a 0-d int64 CPU tensor")
        return None, seed
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return None, torch.tensor(seed, dtype=torch.int64)


def denoise_loss(
    x: Tensor,
    denoise_weight: Tensor,
    denoise_bias: Optional[Tensor],
    a: float,
    s: float,
    *,
    noise: Optional[Tensor] = None,
    seed: Optional[int | Tensor] = None,
) -> Tensor:
    """Denoising loss mean(|D|) + mean(D^2), D = (a x + s eps) W_d^T + b_d - eps.

    Args:
        x: (..., K) layer input, float16/bfloat16/float32/float64; it gets no gradient.
        denoise_weight: (K, K) W_d, same dtype and device as x.
        denoise_bias: (K,) b_d or None.
        a, s: noising scales sqrt(abar_t), sqrt(1 - abar_t) (finite floats).
        noise: optional eps with x's shape; every backend uses it as given.
        seed: optional int (or 0-d int64 CPU tensor) keying the counter-based noise stream;
            without noise or seed one is drawn from torch's default generator.
    Returns:
        0-d loss, float32 (float64 for float64 inputs). Gradients reach W_d and b_d only.
    """
    _checks.tensor("x", x)
    _checks.tensor("denoise_weight", denoise_weight)
    _checks.tensor("denoise_bias", denoise_bias, optional=True)
    _checks.same_dtype_and_device({"x": x, "denoise_weight": denoise_weight, "denoise_bias": denoise_bias})
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., K)")
    K = x.shape[-1]
    _checks.shape("denoise_weight", denoise_weight, (K, K))
    _checks.shape("denoise_bias", denoise_bias, (K,))
    a, s = _checks.finite("a", a), _checks.finite("s", s)
    x2d = x.reshape(-1, K)
    noise2d, seed_t = flat_noise_and_seed(x, noise, seed)
    compute_grad = torch.is_grad_enabled() and (
        denoise_weight.requires_grad or (denoise_bias is not None and denoise_bias.requires_grad)
    )
    backend = select("denoise_loss", x.device)
    loss, _, _ = denoise_loss_op(
        x2d.detach(), denoise_weight, denoise_bias, a, s, noise2d, seed_t, backend, compute_grad
    )
    return loss
