"""The ``torch`` backend: docs/method.md transcribed into plain PyTorch.

It is the oracle every other backend is tested against, and the fallback that works for any
device and dtype. Each function here is a *kernel*: it receives validated 2-D inputs from
``drep_kernels.ops`` and returns plain tensors; autograd lives in ``drep_kernels.ops``.
The loss follows the precision policy (``drep_kernels.precision``) with its roundings: on CUDA
tensors, half-precision inputs have eps, x_noisy and G' rounded to the input dtype (the
tensor-core policy of the cuda and triton backends), on CPU tensors they are
computed in float32 (the cpu backend's); float64 is float64 throughout. The merge is computed in
float32 (float64) from the weights as given.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import precision, rng
from ..precision import accumulate_dtype as compute_dtype


def noise_for(x: Tensor, noise: Optional[Tensor], seed: Tensor) -> Tensor:
    """eps for the M x K input x: the given tensor, or the seed's counter-based stream."""
    if noise is not None:
        return noise.to(compute_dtype(x.dtype))
    eps = rng.normal(rng.seed_from_tensor(seed), x.shape[0], x.shape[1], device=x.device)
    return eps.to(compute_dtype(x.dtype))


def denoise_loss_fwd(
    x: Tensor,
    denoise_weight: Tensor,
    denoise_bias: Optional[Tensor],
    a: float,
    s: float,
    noise: Optional[Tensor],
    seed: Tensor,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss (formula L1) and, if asked, its gradients dL/dW_d, dL/db_d (formula L2).

    x: (M, K); denoise_weight: (K, K); denoise_bias: (K,) or None; noise: (M, K) or None.
    Returns loss (0-d), grad_weight (K, K), grad_bias (K,), all in the compute dtype; the
    gradients are empty when ``compute_grad`` is False or there is no bias.
    """
    cdt = compute_dtype(x.dtype)
    M, K = x.shape
    gemm = precision.gemm_dtype(x.dtype, precision.on_tensor_cores("torch", x.device))
    # The policy's roundings: eps, then GEMM 1's operand x_noisy formed from that eps (W_d is in
    # the input dtype already).
    eps = precision.round_to_gemm(noise_for(x, noise, seed), gemm)
    x_noisy = precision.round_to_gemm(a * x.to(cdt) + s * eps, gemm)
    p = x_noisy @ denoise_weight.to(cdt).T
    if denoise_bias is not None:
        p = p + denoise_bias.to(cdt)
    D = p - eps
    n = max(M * K, 1)  # an empty batch has loss 0, not 0/0
    loss = (D.abs().sum() + D.square().sum()) / n
    if not compute_grad:
        return loss, x.new_empty(0, dtype=cdt), x.new_empty(0, dtype=cdt)
    G1 = torch.sign(D) + 2.0 * D  # L2's G without its 1 / n
    # GEMM 2 takes G' as stored in the GEMM dtype (float16 scaled: precision.grad_to_gemm).
    G1_gemm = precision.grad_to_gemm(G1, gemm).to(cdt)
    grad_weight = (G1_gemm.T @ x_noisy) / (n * precision.grad_scale(gemm))
    grad_bias = G1.sum(0) / n if denoise_bias is not None else x.new_empty(0, dtype=cdt)
    return loss, grad_weight, grad_bias


def merge_weights_fwd(
    weight: Tensor,
    bias: Optional[Tensor],
    denoise_weight: Tensor,
    denoise_bias: Optional[Tensor],
    c1: float,
    c3: float,
) -> tuple[Tensor, Tensor]:
    """W' = c3 W - c1 W W_d and b' = b - c1 W b_d (formulas M1, M2), in float32 or float64,
    returned in the weight's dtype. b' is empty when neither b nor b_d exists."""
    cdt = compute_dtype(weight.dtype)
    W = weight.to(cdt)
    merged_weight = torch.addmm(W, W, denoise_weight.to(cdt), beta=c3, alpha=-c1)
    if bias is None and denoise_bias is None:
        merged_bias = weight.new_empty(0)
    else:
        merged_bias = bias.to(cdt, copy=True) if bias is not None else W.new_zeros(W.shape[0])
        if denoise_bias is not None:
            merged_bias = torch.addmv(merged_bias, W, denoise_bias.to(cdt), alpha=-c1)
        merged_bias = merged_bias.to(weight.dtype)
    return merged_weight.to(weight.dtype), merged_bias


def merge_weights_bwd(
    grad_merged_weight: Tensor,
    grad_merged_bias: Optional[Tensor],
    weight: Tensor,
    denoise_weight: Tensor,
    denoise_bias: Optional[Tensor],
    c1: float,
    c3: float,
    need_weight: bool,
    need_denoise: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients through the merge (formulas M3..M5), in the compute dtype.

    Returns (dW, dW_d, db_d); each is empty unless asked for (db_d also when b_d or g_b is absent).
    dW = c3 G_W - c1 G_W W_d^T - c1 g_b b_d^T;  dW_d = -c1 W^T G_W;  db_d = -c1 W^T g_b.
    """
    cdt = compute_dtype(weight.dtype)
    G_W = grad_merged_weight.to(cdt)
    g_b = grad_merged_bias.to(cdt) if grad_merged_bias is not None else None
    # Distinct empty tensors: outputs of a registered op must not alias each other.
    grad_weight, grad_dw, grad_db = (weight.new_empty(0, dtype=cdt) for _ in range(3))
    if need_weight:
        grad_weight = torch.addmm(G_W, G_W, denoise_weight.to(cdt).T, beta=c3, alpha=-c1)
        if g_b is not None and denoise_bias is not None:
            grad_weight = grad_weight.addr_(g_b, denoise_bias.to(cdt), alpha=-c1)
    if need_denoise:
        W = weight.to(cdt)
        grad_dw = (-c1) * (W.T @ G_W)
        if g_b is not None and denoise_bias is not None:
            grad_db = (-c1) * (W.T @ g_b)
    return grad_weight, grad_dw, grad_db
