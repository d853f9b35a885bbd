"""The unfused baseline: DenoiseRep computed the way the authors' public code computes it.

Written from the description of the public code (GitHub RG12138/DenoiseRep, ``denoiserep_op``)
in plain PyTorch, so our ops are compared with what a user of that code pays per call:

- the denoising loss draws eps with ``randn_like``, noises ``a x + s eps`` with a and s
  gathered per batch row from schedule buffers, evaluates the time embedding
  e_t = Linear(K, K)(GELU(Linear(2048, K)(sinusoid(t)))) at every call, adds it, applies the
  denoiser ``nn.Linear(K, K)`` to the detached sum and takes ``F.l1_loss + F.mse_loss``;
  autograd does the backward;
- the merge is their matmul-plus-elementwise expression (transposes included), with the
  sampling noise left out (z = 0), as docs/method.md prescribes: that noise is one
  out x K matrix-vector product, small next to the out x K x K product;
- the training step of a converted layer computes the loss in every phase and merges at
  every call in the backbone phase, as theirs does.

Two deliberate departures, both needed to run the baseline in bf16/fp16: the schedule buffers
follow the module's dtype, and the sinusoid is cast to the time MLP's dtype (the public code
would need autocast there). ``floor_*`` are the GEMMs no implementation can avoid.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

TIME_EMBED_DIM = 2048  # width of the public code's sinusoidal time embedding


class Sinusoid(nn.Module):
    """sinusoid(t): [sin(t f_j), cos(t f_j)], f_j = 10000^(-j / (half - 1)); (B,) -> (B, dim)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000.0) / (half - 1)))
        angles = t[:, None].float() * freqs[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


def schedule_tables(T_max: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-3, device=None,
                    dtype=None) -> dict[str, Tensor]:
    """Their schedule buffers, built in float32 and indexed by t (then cast to ``dtype``)."""
    betas = torch.linspace(beta_start, beta_end, T_max, device=device)
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, dim=0)
    tables = {
        "sqrt_alphas_cumprod": abar.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
        "c1": betas / ((1.0 - abar).sqrt() * alphas.sqrt()),
        "c3": 1.0 / alphas.sqrt(),
    }
    return {k: v.to(dtype) if dtype is not None else v for k, v in tables.items()}


class ReferenceDenoiser(nn.Module):
    """The public code's per-layer denoiser of width K, unfused: time MLP + ``dm`` + schedule."""

    def __init__(self, K: int, t: int, *, T_max: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-3,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.t = t
        self.dm = nn.Linear(K, K, **factory)
        self.time_mlp = nn.Sequential(
            Sinusoid(TIME_EMBED_DIM),
            nn.Linear(TIME_EMBED_DIM, K, **factory),
            nn.GELU(),
            nn.Linear(K, K, **factory),
        )
        for name, value in schedule_tables(T_max, beta_start, beta_end, device, dtype).items():
            self.register_buffer(name, value)

    def _per_row(self, table: Tensor, t: Tensor, ndim: int) -> Tensor:
        # Their _extract: gather the scalar for each batch row, shaped to broadcast.
        return table.gather(0, t).reshape(t.shape[0], *([1] * (ndim - 1)))

    def loss(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """mean|D| + mean D^2 with D = dm(a x + s eps + e_t) - eps; x: (B, ..., K)."""
        t = torch.full((x.shape[0],), self.t, device=x.device, dtype=torch.long)
        eps = torch.randn_like(x) if noise is None else noise
        x_noisy = self._per_row(self.sqrt_alphas_cumprod, t, x.dim()) * x + self._per_row(
            self.sqrt_one_minus_alphas_cumprod, t, x.dim()
        ) * eps
        e_t = self.time_mlp[1:](self.time_mlp[0](t).to(self.dm.weight.dtype))  # (B, K)
        e_t = e_t.reshape(e_t.shape[0], *([1] * (x.dim() - 2)), e_t.shape[-1])
        pred = self.dm((x_noisy + e_t).detach())
        return F.l1_loss(eps, pred) + F.mse_loss(eps, pred)

    def time_embedding(self) -> Tensor:
        """e_t of this layer's step, (K,) (what docs/method.md T1 folds into b_d)."""
        t = torch.full((1,), self.t, device=self.dm.weight.device, dtype=torch.long)
        return self.time_mlp[1:](self.time_mlp[0](t).to(self.dm.weight.dtype))[0]


def reference_merge_tensors(weight: Tensor, bias: Tensor | None, w_d: Tensor, b_d: Tensor, c1: Tensor,
                            c3: Tensor) -> tuple[Tensor, Tensor]:
    """Their fuse_weight / fuse_bias (z = 0): W' = (W^T c3 - c1 W_d^T W^T)^T, b' = b - c1 b_d W^T.

    c1, c3 are 0-d tensors, as the public code reads them from its schedule buffers."""
    w_t = weight.transpose(0, 1)
    merged_weight = (w_t * c3 - c1 * w_d.transpose(0, 1) @ w_t).transpose(0, 1)
    merged_bias = -c1 * b_d @ w_t
    if bias is not None:
        merged_bias = merged_bias + bias
    return merged_weight, merged_bias


def reference_merge(weight: Tensor, bias: Tensor | None, den: ReferenceDenoiser) -> tuple[Tensor, Tensor]:
    """The merge of a layer's (W, b) with its denoiser ``den`` at the denoiser's step."""
    return reference_merge_tensors(weight, bias, den.dm.weight, den.dm.bias, den.c1[den.t], den.c3[den.t])


class ReferenceDenoiseLinear(nn.Module):
    """Their converted Linear: in training it computes the loss at every call (kept on the
    module until read) and, when the denoiser is frozen (backbone phase), merges at every call;
    otherwise it runs the un-merged weights."""

    def __init__(self, linear: nn.Linear, t: int) -> None:
        super().__init__()
        w = linear.weight
        self.weight = linear.weight
        self.bias = linear.bias
        self.denoiser = ReferenceDenoiser(linear.in_features, t, device=w.device, dtype=w.dtype)
        self.losses: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        if self.training:
            self.losses.append(self.denoiser.loss(x))
            if not self.denoiser.dm.weight.requires_grad:
                weight, bias = reference_merge(weight, bias, self.denoiser)
        return F.linear(x, weight, bias)

    def take_loss(self) -> Tensor:
        losses, self.losses = self.losses, []
        return sum(losses)

    def set_phase(self, phase: str) -> None:
        """"denoiser": dm and time MLP train; "backbone": the layer's own weights train."""
        for p in self.denoiser.parameters():
            p.requires_grad_(phase == "denoiser")
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(phase == "backbone")


# --- the floor: the GEMMs the op cannot avoid, in the inputs' dtype ----------------------

def floor_loss(x2d: Tensor, w_d: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """The loss's two M x K x K GEMMs: p = x W_d^T (forward) and G^T x (dL/dW_d)."""
    return x2d @ w_d.T, g.T @ x2d


def floor_merge(weight: Tensor, w_d: Tensor, c1: float, c3: float) -> Tensor:
    """The merge's one out x K x K GEMM (M1) as a single addmm."""
    return torch.addmm(weight, weight, w_d, beta=c3, alpha=-c1)


def floor_merge_backward(weight: Tensor, w_d: Tensor, g_w: Tensor, c1: float, c3: float) -> tuple[Tensor, Tensor]:
    """Forward (M1) plus the backbone gradient (M3): two out x K x K addmm."""
    return floor_merge(weight, w_d, c1, c3), torch.addmm(g_w, g_w, w_d.T, beta=c3, alpha=-c1)
