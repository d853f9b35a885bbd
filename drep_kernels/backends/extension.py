"""The ``cpu`` and ``cuda`` backends: the kernels compiled into ``drep_kernels._C``.

Both are the same ``torch.ops.drep.*_fwd/_bwd`` ops (schemas in ``csrc/ops.cpp``); the
dispatcher picks the CPU or CUDA kernel from the tensors' device.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import drep_kernels._C  # noqa: F401  (loads the library: registers the kernels)


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
    return torch.ops.drep.denoise_loss_fwd(x, denoise_weight, denoise_bias, a, s, noise, seed, compute_grad)


def merge_weights_fwd(
    weight: Tensor,
    bias: Optional[Tensor],
    denoise_weight: Tensor,
    denoise_bias: Optional[Tensor],
    c1: float,
    c3: float,
) -> tuple[Tensor, Tensor]:
    return torch.ops.drep.merge_weights_fwd(weight, bias, denoise_weight, denoise_bias, c1, c3)


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
    return torch.ops.drep.merge_weights_bwd(
        grad_merged_weight, grad_merged_bias, weight, denoise_weight, denoise_bias, c1, c3, need_weight, need_denoise
    )


# Fake kernels of the C++ ops, so they can be opchecked and traced on their own.
@torch.library.register_fake("drep::merge_weights_fwd")
def _(weight, bias, denoise_weight, denoise_bias, c1, c3):
    has_bias = bias is not None or denoise_bias is not None
    return weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],) if has_bias else (0,))


def _cdt(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.register_fake("drep::merge_weights_bwd")
def _(grad_merged_weight, grad_merged_bias, weight, denoise_weight, denoise_bias, c1, c3, need_weight, need_denoise):
    cdt = _cdt(weight)
    rank_one = grad_merged_bias is not None and denoise_bias is not None
    return (
        weight.new_empty(weight.shape if need_weight else (0,), dtype=cdt),
        weight.new_empty(denoise_weight.shape if need_denoise else (0,), dtype=cdt),
        weight.new_empty((weight.shape[1],) if need_denoise and rank_one else (0,), dtype=cdt),
    )


@torch.library.register_fake("drep::denoise_loss_fwd")
def _(x, denoise_weight, denoise_bias, a, s, noise, seed, compute_grad):
    cdt = _cdt(x)
    K = denoise_weight.shape[0]
    return (
        x.new_empty((), dtype=cdt),
        x.new_empty((K, K) if compute_grad else (0,), dtype=cdt),
        x.new_empty((K,) if compute_grad and denoise_bias is not None else (0,), dtype=cdt),
    )
