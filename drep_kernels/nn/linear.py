"""``DenoiseLinear``: an ``nn.Linear`` that owns a DenoiseRep denoiser and folds it in."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..schedule import Schedule
from ._denoise import DenoiseLayerMixin


class DenoiseLinear(DenoiseLayerMixin, nn.Linear):
    """A Linear layer read as reverse-diffusion step ``t`` (docs/method.md).

    Computes y = x W'^T + b' in train and eval, with (W', b') the reverse step folded into
    (W, b) (formulas M1, M2). In training mode, when a denoiser parameter requires grad, each
    forward also computes the denoising loss (L1) on its input; collect it with
    ``drep_kernels.denoise_loss(model)``.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        t: the diffusion step, 1 <= t < schedule.T_max (stored as the buffer ``t``).
        schedule: the ``Schedule`` (default ``Schedule()``).
        init: ``"zeros"`` (default: W_d = 0, b_d = 0, so the layer computes c3 x W^T + b) or
            ``"linear"`` (nn.Linear's default init, as the authors' code does).
        label_augmented: let the task gradient reach the denoiser through the merge.

    Parameters ``weight`` (out, K) and ``bias`` (out,) are the layer's own; ``denoise_weight``
    (K, K) and ``denoise_bias`` (K,) the denoiser's (``denoise_bias`` is None when
    ``bias=False``, so the fused layer keeps the original architecture).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        t: int,
        schedule: Optional[Schedule] = None,
        init: str = "zeros",
        label_augmented: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_denoiser(
            in_features, bias, t=t, schedule=schedule, init=init, label_augmented=label_augmented,
            device=device, dtype=dtype,
        )

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        t: int,
        schedule: Optional[Schedule] = None,
        *,
        init: str = "zeros",
        label_augmented: bool = False,
    ) -> "DenoiseLinear":
        """Wrap an existing ``nn.Linear``; its ``weight``/``bias`` Parameters are reused, not copied."""
        if isinstance(linear, DenoiseLinear):
            raise TypeError("this layer is already a DenoiseLinear; refusing to wrap it twice")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            t=t,
            schedule=schedule,
            init=init,
            label_augmented=label_augmented,
            device=w.device,
            dtype=w.dtype,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    # -- merge ----------------------------------------------------------------------------
    def _merge(self, denoise_weight: Tensor, denoise_bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """(W', b') by formulas M1, M2."""
        co = self.coefficients
        return ops.merge_weights(self.weight, self.bias, denoise_weight, denoise_bias, co.c1, co.c3)

    def _plain_layer(self, bias: bool, device, dtype) -> nn.Linear:
        return nn.Linear(self.in_features, self.out_features, bias, device=device, dtype=dtype)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding (W', b'): the deployable layer, same architecture."""
        return self.to_plain()

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        merged = self.merged_weight_and_bias()
        if self._wants_loss():
            # The loss's rows are the layer's own input, as its matmul sees it (under autocast:
            # cast once to the autocast dtype, for both). The loss op returns its gradients with
            # the loss (L2), so nothing of it joins the autograd graph: the step costs one op
            # call more than a plain Linear's, not an autograd node per layer.
            x = self.autocast_rows(x)
            self._stash_loss(*self._loss_terms(x.reshape(-1, self.in_features)))
        return F.linear(x, *merged)
