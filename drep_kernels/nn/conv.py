"""``DenoiseConv2d``: an ``nn.Conv2d`` that owns a DenoiseRep denoiser on its output and folds it in."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .. import ops
from ..schedule import Schedule
from ._denoise import DenoiseLayerMixin


class DenoiseConv2d(DenoiseLayerMixin, nn.Conv2d):
    """A Conv2d layer read as reverse-diffusion step ``t``, denoising its *output* (docs/method.md,
    "Conv2d").

    y_t = conv(x, W) + b is read as the noisy state; one reverse step with the per-pixel denoiser
    (W_d: out x out, b_d: out) is folded into the filters (formulas C1, C2), so the layer computes
    y = conv(x, W', b') in train and eval, exactly, for any stride, padding, dilation and padding
    mode. In training mode, when a denoiser parameter requires grad, each forward also computes
    the denoising loss (L1) on y_t with K = out_channels per pixel; collect it with
    ``drep_kernels.denoise_loss(model)``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode,
            device, dtype: as for ``nn.Conv2d``; ``groups`` must be 1.
        t: the diffusion step, 1 <= t < schedule.T_max (stored as the buffer ``t``).
        schedule: the ``Schedule`` (default ``Schedule()``).
        init: ``"zeros"`` (default: W_d = 0, b_d = 0, so the layer computes c3 (conv(x, W) + b))
            or ``"linear"`` (nn.Linear's default init over out_channels).
        label_augmented: let the task gradient reach the denoiser through the merge.

    Parameters ``weight`` (out, in, kh, kw) and ``bias`` (out,) are the layer's own;
    ``denoise_weight`` (out, out) and ``denoise_bias`` (out,) the denoiser's (``denoise_bias`` is
    None when ``bias=False``: then b' = 0 and the fused conv has no bias either).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        t: int,
        schedule: Optional[Schedule] = None,
        init: str = "zeros",
        label_augmented: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        if groups != 1:
            # W_d mixes all output channels, so W' would mix filters of different groups:
            # the folded layer would not be a grouped conv any more.
            raise ValueError(f"DenoiseConv2d supports groups=1 only, got groups={groups}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )
        self._init_denoiser(
            out_channels, bias, t=t, schedule=schedule, init=init, label_augmented=label_augmented,
            device=device, dtype=dtype,
        )

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_conv2d(
        cls,
        conv: nn.Conv2d,
        t: int,
        schedule: Optional[Schedule] = None,
        *,
        init: str = "zeros",
        label_augmented: bool = False,
    ) -> "DenoiseConv2d":
        """Wrap an existing ``nn.Conv2d`` (groups = 1); its ``weight``/``bias`` Parameters are
        reused, not copied."""
        if isinstance(conv, DenoiseConv2d):
            raise TypeError("this layer is already a DenoiseConv2d; refusing to wrap it twice")
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        w = conv.weight
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            t=t,
            schedule=schedule,
            init=init,
            label_augmented=label_augmented,
            device=w.device,
            dtype=w.dtype,
        )
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer.train(conv.training)
        return layer

    # -- merge ----------------------------------------------------------------------------
    def _merge(self, denoise_weight: Tensor, denoise_bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """(W', b') by formulas C1, C2; W' has the weight's shape (out, in, kh, kw)."""
        co = self.coefficients
        return _merge_conv(self.weight, self.bias, denoise_weight, denoise_bias, co.c1, co.c3)

    def _plain_layer(self, bias: bool, device, dtype) -> nn.Conv2d:
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias,
            self.padding_mode,
            device=device,
            dtype=dtype,
        )

    def to_conv2d(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding (W', b'): the deployable layer, same architecture."""
        return self.to_plain()

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        merged_weight, merged_bias = self.merged_weight_and_bias()
        y = self._conv_forward(x, merged_weight, merged_bias)
        if not self._wants_loss():
            # Nothing could receive the denoising loss's gradient: do not compute it.
            return y
        # The loss needs y_t = conv(x, W) + b, the output *before* denoising, and conv(x, W', b')
        # does not give it back (that would need (c3 I - c1 W_d)^-1 per pixel). So a step that
        # trains the denoiser pays one extra conv(x, W), without grad. Producing y from y_t per
        # pixel instead (y = (c3 I - c1 W_d) y_t - c1 b_d, M out^2) would be cheaper when
        # in * kh * kw > out, but then training would run another computation than eval and the
        # deployed conv: here every mode runs conv(x, W', b').
        with torch.no_grad():
            y_t = self._conv_forward(x, self.weight, self.bias)
        # Per pixel, channels last: (N, C, H, W) -> (N H W, C), K = out_channels.
        self._stash_loss(*self._loss_terms(y_t.permute(0, 2, 3, 1).reshape(-1, self.out_channels)))
        return y


def _merge_conv(
    weight: Tensor,
    bias: Optional[Tensor],
    denoise_weight: Tensor,
    denoise_bias: Optional[Tensor],
    c1: float,
    c3: float,
) -> tuple[Tensor, Optional[Tensor]]:
    """(W', b') of a conv denoised on its output (C1, C2), through ``ops.merge_weights``.

    C1 is a left multiplication, W'_flat = (c3 I - c1 W_d) W_flat with W_flat = W as (out, P),
    P = in kh kw; merge_weights computes the right one, A (c3 I - c1 B) = c3 A - c1 A B (M1). By
    transposition W'_flat^T = c3 W_flat^T - c1 W_flat^T W_d^T: A = W_flat^T (P x out), B = W_d^T.
    C2 rides along as one more row of A: the row b^T gives c3 b^T - c1 b^T W_d^T = (c3 b - c1 W_d b)^T,
    and subtracting c1 b_d completes b' = c3 b - c1 (W_d b + b_d). Going through the op keeps the
    backend kernels (and M3..M5 as the backward) for the GEMM, and its float32 compute dtype.
    """
    out = weight.shape[0]
    rows = weight.reshape(out, -1).t()
    if bias is not None:
        rows = torch.cat((rows, bias.unsqueeze(0)), dim=0)
    merged_rows, _ = ops.merge_weights(rows.contiguous(), None, denoise_weight.t().contiguous(), None, c1, c3)
    if bias is None:
        # A bias-free conv has no b_d (docs/method.md): b' = c3 0 - c1 (W_d 0 + 0) = 0.
        return merged_rows.t().reshape(weight.shape).contiguous(), None
    # contiguous once here, not inside every conv call that reads the cached W'
    merged_weight = merged_rows[:-1].t().reshape(weight.shape).contiguous()
    merged_bias = merged_rows[-1]
    if denoise_bias is not None:
        cdt = torch.float64 if weight.dtype == torch.float64 else torch.float32
        merged_bias = (merged_bias.to(cdt) - c1 * denoise_bias.to(cdt)).to(weight.dtype)
    return merged_weight, merged_bias
