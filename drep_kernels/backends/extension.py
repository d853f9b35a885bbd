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
