"""``drep::linear_denoise``: a DenoiseLinear layer's training forward, y and its loss at once.

y = x W'^T + b' with (W', b') the merged weights (docs/method.md, M1/M2), and the layer's
denoising loss on x (L1). Registered as a CompositeImplicitAutograd op: it is the composition
of ``drep::merge_weights``, ``F.linear`` and ``drep::denoise_loss``, and autograd flows
through those ops' own formulas. A kernel backend that fuses the two passes over x would
register a kernel of its own here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import select
from ..schedule import Coefficients
from . import _checks
from .denoise_loss import denoise_loss_op, flat_noise_and_seed
from .merge_weights import merge_weights_op

torch.library.define(
    "drep::linear_denoise",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor denoise_weight, Tensor? denoise_bias, "
    "float a, float s, float c1, float c3, Tensor? noise, Tensor seed, bool label_augmented, "
    "Tensor? merged_weight, Tensor? merged_bias) -> (Tensor, Tensor, Tensor, Tensor)",
)


@torch.library.impl("drep::linear_denoise", "CompositeImplicitAutograd")
def _linear_denoise(
    x, weight, bias, denoise_weight, denoise_bias, a, s, c1, c3, noise, seed, label_augmented, merged_weight, merged_bias
):
    K = x.shape[-1]
    if merged_weight is None:
        # Label-free: the merge sees a detached denoiser, so the task gradient cannot reach it.
        dw = denoise_weight if label_augmented else denoise_weight.detach()
        db = denoise_bias if label_augmented or denoise_bias is None else denoise_bias.detach()
        merged_weight, mb = merge_weights_op(weight, bias, dw, db, c1, c3, select("merge_weights", weight.device))
        merged_bias = mb if bias is not None or denoise_bias is not None else None
    y = F.linear(x, merged_weight, merged_bias)
    compute_grad = torch.is_grad_enabled() and (
        denoise_weight.requires_grad or (denoise_bias is not None and denoise_bias.requires_grad)
    )
    loss, grad_dw, grad_db = denoise_loss_op(
        x.detach().reshape(-1, K),
        denoise_weight,
        denoise_bias,
        a,
        s,
        noise,
        seed,
        select("denoise_loss", x.device),
        compute_grad,
    )
    return y, loss, grad_dw, grad_db


def linear_denoise(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    denoise_weight: Tensor,
    denoise_bias: Optional[Tensor],
    coefficients: Coefficients,
    *,
    noise: Optional[Tensor] = None,
    seed: Optional[int | Tensor] = None,
    label_augmented: bool = False,
    merged: Optional[tuple[Tensor, Optional[Tensor]]] = None,
    with_loss_grads: bool = False,
) -> tuple[Tensor, ...]:
    """The layer output and its denoising loss.

    Args:
        x: (..., K); weight: (out, K); bias: (out,) or None; denoise_weight: (K, K);
            denoise_bias: (K,) or None; all one floating dtype and device.
        coefficients: the layer's ``Schedule.coefficients(t)`` (a, s, c1, c3 are used; the
            merge is the deterministic posterior mean, c2 z with z = 0).
        noise / seed: as for ``denoise_loss``.
        label_augmented: let the task gradient reach the denoiser through the merge.
        merged: precomputed (W', b') to reuse (a layer's merge cache); they must be the
            merge of these parameters with the same label_augmented routing.
        with_loss_grads: also return dL/dW_d and dL/db_d, which the op computes in its forward
            pass anyway (L2); a caller can keep these instead of the loss's graph.
    Returns:
        y of shape (..., out) in x's dtype, and the 0-d float32 (float64) loss; with
        ``with_loss_grads``, also dL/dW_d (K, K) and dL/db_d (K,) (non-differentiable; empty
        when no denoiser parameter requires grad or there is no b_d).
    """
    _checks.tensor("x", x)
    _checks.tensor("weight", weight)
    _checks.tensor("bias", bias, optional=True)
    _checks.tensor("denoise_weight", denoise_weight)
    _checks.tensor("denoise_bias", denoise_bias, optional=True)
    _checks.same_dtype_and_device(
        {"x": x, "weight": weight, "bias": bias, "denoise_weight": denoise_weight, "denoise_bias": denoise_bias}
    )
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, K), got shape {tuple(weight.shape)}")
    out, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have shape (..., {K}), got {tuple(x.shape)}")
    _checks.shape("bias", bias, (out,))
    _checks.shape("denoise_weight", denoise_weight, (K, K))
    _checks.shape("denoise_bias", denoise_bias, (K,))
    a, s, c1, c3 = (_checks.finite(n, getattr(coefficients, n)) for n in ("a", "s", "c1", "c3"))
    noise2d, seed_t = flat_noise_and_seed(x, noise, seed)
    merged_weight, merged_bias = merged if merged is not None else (None, None)
    outputs = torch.ops.drep.linear_denoise(
        x,
        weight,
        bias,
        denoise_weight,
        denoise_bias,
        a,
        s,
        c1,
        c3,
        noise2d,
        seed_t,
        label_augmented,
        merged_weight,
        merged_bias,
    )
    return outputs if with_loss_grads else outputs[:2]
