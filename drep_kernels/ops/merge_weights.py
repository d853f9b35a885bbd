"""``drep::merge_weights``: one reverse step folded into a Linear layer's weights.

Math: docs/method.md, formulas M1, M2 (forward) and M3..M5 (backward). Computed in float32
(float64 for float64 weights) whatever the parameter dtype, then cast.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import kernels, select
from . import _checks


@torch.library.custom_op("drep::merge_weights", mutates_args=())
def merge_weights_op(
    weight: Tensor,
    bias: Optional[Tensor],
    denoise_weight: Tensor,
    denoise_bias: Optional[Tensor],
    c1: float,
    c3: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(W', b'); b' is a 0-element tensor when neither b nor b_d exists."""
    return kernels(backend).merge_weights_fwd(weight, bias, denoise_weight, denoise_bias, c1, c3)


@merge_weights_op.register_fake
def _(weight, bias, denoise_weight, denoise_bias, c1, c3, backend):
    has_bias = bias is not None or denoise_bias is not None
    return weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],) if has_bias else (0,))


def _setup_context(ctx, inputs, output):
    weight, bias, denoise_weight, denoise_bias, c1, c3, backend = inputs
    # Held as attributes, not save_for_backward: a merged weight cached across gradient-
    # accumulation micro-batches is backpropagated more than once, and saved tensors would be
    # freed after the first backward. All four are parameters (leaves), so nothing of the
    # graph is kept alive by this.
    ctx.weight, ctx.denoise_weight, ctx.denoise_bias = weight, denoise_weight, denoise_bias
    ctx.c1, ctx.c3, ctx.backend = c1, c3, backend
    ctx.has_bias = bias is not None


def _backward(ctx, grad_merged_weight, grad_merged_bias):
    need_w, need_b, need_dw, need_db = ctx.needs_input_grad[:4]
    g_b = grad_merged_bias if grad_merged_bias is not None and grad_merged_bias.numel() else None
    grad_w, grad_dw, grad_db = kernels(ctx.backend).merge_weights_bwd(
        grad_merged_weight,
        g_b,
        ctx.weight,
        ctx.denoise_weight,
        ctx.denoise_bias,
        ctx.c1,
        ctx.c3,
        need_w,
        need_dw or need_db,
    )
    dtype = ctx.weight.dtype
    dw = grad_w.to(dtype) if need_w else None
    db = None
    if need_b:
        db = g_b if g_b is not None else torch.zeros_like(ctx.weight[:, 0])
    ddw = grad_dw.to(dtype) if need_dw else None
    ddb = None
    if need_db:
        ddb = grad_db.to(dtype) if grad_db.numel() else torch.zeros_like(ctx.denoise_bias)
    return dw, db, ddw, ddb, None, None, None


merge_weights_op.register_autograd(_backward, setup_context=_setup_context)


def merge_weights(
    weight: Tensor,
    bias: Optional[Tensor],
    denoise_weight: Tensor,
    denoise_bias: Optional[Tensor],
    c1: float,
    c3: float,
) -> tuple[Tensor, Optional[Tensor]]:
    """Fold the reverse step into the layer: W' = c3 W - c1 W W_d, b' = b - c1 W b_d.

    Args:
        weight: (out, K) W; bias: (out,) b or None.
        denoise_weight: (K, K) W_d; denoise_bias: (K,) b_d or None. All one dtype and device.
        c1, c3: reverse-step scales (finite floats).
    Returns:
        (W', b') in the weight's dtype, W' contiguous (row-major) whatever W's layout, on
        every backend; b' is None when neither b nor b_d exists.
        Differentiable in all four tensors (docs/method.md, M3..M5).
    """
    _checks.tensor("weight", weight)
    _checks.tensor("bias", bias, optional=True)
    _checks.tensor("denoise_weight", denoise_weight)
    _checks.tensor("denoise_bias", denoise_bias, optional=True)
    _checks.same_dtype_and_device(
        {"weight": weight, "bias": bias, "denoise_weight": denoise_weight, "denoise_bias": denoise_bias}
    )
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, K), got shape {tuple(weight.shape)}")
    out, K = weight.shape
    _checks.shape("bias", bias, (out,))
    _checks.shape("denoise_weight", denoise_weight, (K, K))
    _checks.shape("denoise_bias", denoise_bias, (K,))
    c1, c3 = _checks.finite("c1", c1), _checks.finite("c3", c3)
    backend = select("merge_weights", weight.device)
    merged_weight, merged_bias = merge_weights_op(weight, bias, denoise_weight, denoise_bias, c1, c3, backend)
    return merged_weight, (merged_bias if bias is not None or denoise_bias is not None else None)
