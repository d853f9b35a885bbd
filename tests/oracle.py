"""Float64 oracle for the tests: docs/method.md transcribed with plain autograd.

Written independently of drep_kernels.backends.reference: gradients come from autograd of the
formulas, not from the hand-written L2 / M3..M5, so the two check each other.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _round(t: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    """t rounded once to dtype (a GEMM operand under the tensor-core precision policy), as float64."""
    return t if dtype is None else t.to(dtype).double()


def gemm_eps(eps: Tensor, gemm_dtype=None) -> Tensor:
    """eps as the tensor-core policy uses it, float64: rounded once to ``gemm_dtype`` from its
    float32 value (docs/method.md, "Precision"); as given without one."""
    return _round(eps.float(), gemm_dtype) if gemm_dtype is not None else eps.double()


def denoise_loss(
    x: Tensor, w_d: Tensor, b_d: Optional[Tensor], a: float, s: float, eps: Tensor, gemm_dtype=None
) -> Tensor:
    """L1 in float64; differentiable in w_d, b_d (x is detached). With ``gemm_dtype`` (bf16 /
    fp16 on tensor cores: docs/method.md, "Precision"), eps is rounded once to it (``gemm_eps``)
    and x_noisy, formed from that eps, is rounded once to it from its float32 value, as the
    kernels form them."""
    k = x.shape[-1]
    eps = gemm_eps(eps, gemm_dtype).reshape(-1, k)
    xn = a * x.detach().double().reshape(-1, k) + s * eps
    if gemm_dtype is not None:
        xn = _round(xn.float(), gemm_dtype)
    p = xn @ w_d.double().T
    if b_d is not None:
        p = p + b_d.double()
    d = p - eps
    if d.numel() == 0:
        return (w_d.double().sum() + (b_d.double().sum() if b_d is not None else 0)) * 0.0
    return d.abs().mean() + d.square().mean()


def denoise_loss_grads(x, w_d, b_d, a, s, eps, gemm_dtype=None):
    """(loss, dL/dW_d, dL/db_d or None) by autograd of L1, all float64.

    With ``gemm_dtype``, the tensor-core policy's roundings: eps and x_noisy as in
    ``denoise_loss``, and dL/dW_d = G'^T x_noisy / n with G' = sign D + 2 D rounded once to
    gemm_dtype (float16 holds G' 2^-14: exact, the same rounding as G' itself away from
    overflow). The rounding has no derivative, so that product is written out here, from
    autograd's D."""
    w = w_d.detach().double().requires_grad_(True)
    b = b_d.detach().double().requires_grad_(True) if b_d is not None else None
    loss = denoise_loss(x, w, b, a, s, eps, gemm_dtype)
    grads = torch.autograd.grad(loss, [w] + ([b] if b is not None else []))
    grad_w = grads[0]
    if gemm_dtype is not None:
        k = x.shape[-1]
        e = gemm_eps(eps, gemm_dtype).reshape(-1, k)
        xn = _round((a * x.detach().double().reshape(-1, k) + s * e).float(), gemm_dtype)
        p = xn @ w_d.detach().double().T + (b_d.detach().double() if b_d is not None else 0)
        d = p - e
        g1 = torch.sign(d) + 2 * d
        grad_w = _round(g1.float(), gemm_dtype).T @ xn / max(d.numel(), 1)
    return loss.detach(), grad_w, (grads[1] if b is not None else None)


# Unit roundoff of each input dtype (x_noisy is rounded to it) and of its compute dtype.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def sign_flip_slack(x, w_d, b_d, eps, dtype, a, s):
    """The most that sign(D) flipping where D is within rounding of 0 can move (dL/dW_d, dL/db_d).

    sign is discontinuous at 0 (L2): where a kernel's D (eps and x_noisy rounded to the input
    dtype, float32 GEMM) and the oracle's may differ in sign, either sign is right. tau bounds
    that difference per element: the per-term roundings of x_noisy and of the GEMM, taken as
    independent, at 8 times their scale (over 13 standard deviations), plus the roundings of
    eps and of p + b_d - eps. Each element (m, i) with |D| < tau can move dL/dW_d[i, :] by
    2 |x_noisy[m, :]| / n and dL/db_d[i] by 2 / n. ``dtype``: what eps and x_noisy are rounded
    to in the kernel and not in the oracle (the input dtype); float32 where the oracle rounds
    them too (then ``eps`` is the rounded eps, ``gemm_eps``).
    """
    k = x.shape[-1]
    xn = a * x.double().reshape(-1, k) + s * eps.double().reshape(-1, k)
    w = w_d.double()
    b = b_d.double() if b_d is not None else torch.zeros(k, dtype=torch.float64, device=xn.device)
    e = eps.double().reshape(-1, k)
    p = xn @ w.T
    d = p + b - e
    u, u_acc = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
    tau = 8 * (u + u_acc * k**0.5) * ((xn * xn) @ (w * w).T).sqrt() + (u + 4 * u_acc) * e.abs() + 4 * u_acc * (
        p.abs() + b.abs())
    near = (d.abs() < tau).double()
    n = max(d.numel(), 1)
    return 2 * near.T @ xn.abs() / n, 2 * near.sum(0) / n


def two_step(x: Tensor, w: Tensor, b: Optional[Tensor], w_d: Tensor, b_d: Optional[Tensor], c1: float, c3: float) -> Tensor:
    """Denoise (one deterministic reverse step), then the layer: the function M1/M2 must equal."""
    eps_hat = x @ w_d.T + (b_d if b_d is not None else 0)
    x_prev = c3 * x - c1 * eps_hat
    y = x_prev @ w.T
    return y + b if b is not None else y


def merge(w, b, w_d, b_d, c1, c3):
    """(W', b') straight from M1/M2 (differentiable by autograd)."""
    merged_w = c3 * w - c1 * (w @ w_d)
    if b is None and b_d is None:
        return merged_w, None
    merged_b = (b if b is not None else torch.zeros_like(w[:, 0])) - c1 * (w @ b_d if b_d is not None else 0)
    return merged_w, merged_b


def merge_grads(w, b, w_d, b_d, c1, c3, grad_w, grad_b):
    """(dW, db, dW_d, db_d) by autograd of M1/M2 in float64, None where the parameter is None;
    grad_w: upstream gradient of W', grad_b: of b' (None when there is no b')."""
    params = [t.detach().double().requires_grad_(True) if t is not None else None for t in (w, b, w_d, b_d)]
    merged_w, merged_b = merge(*params, c1, c3)
    outputs = [merged_w] + ([merged_b] if merged_b is not None else [])
    upstream = [grad_w.double()] + ([grad_b.double()] if merged_b is not None else [])
    present = [p for p in params if p is not None]
    grads = iter(torch.autograd.grad(outputs, present, upstream))
    return tuple(next(grads) if p is not None else None for p in params)
