"""The DDPM schedule and the per-layer scalars (docs/method.md, "Schedule")."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Coefficients(NamedTuple):
    """The five per-layer scalars of diffusion step t, as Python floats (float64)."""

    a: float  # sqrt(abar_t): noising, signal scale
    s: float  # sqrt(1 - abar_t): noising, noise scale
    c1: float  # beta_t / (sqrt(1 - abar_t) sqrt(alpha_t)): reverse step, predicted-noise scale
    c2: float  # sqrt(beta_t): reverse step, sampling-noise scale
    c3: float  # 1 / sqrt(alpha_t): reverse step, input scale


class Schedule:
    """Linear beta schedule: beta = linspace(beta_start, beta_end, T_max), indexed by t directly.

    Step t = 0 is not a diffusion step; valid steps are 1 <= t < T_max, so at most
    T_max - 1 layers can be converted.
    """

    def __init__(self, T_max: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-3):
        if not isinstance(T_max, int) or isinstance(T_max, bool) or T_max < 2:
            raise ValueError(f"T_max must be an int >= 2, got {T_max!r}")
        for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 < v < 1.0):
                raise ValueError(f"{name} must be a finite float in (0, 1), got {v!r}")
        self.T_max = T_max
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.betas = torch.linspace(self.beta_start, self.beta_end, T_max, dtype=torch.float64)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def coefficients(self, t: int) -> Coefficients:
        """Return (a, s, c1, c2, c3) for step t, computed in float64."""
        if isinstance(t, torch.Tensor):
            t = int(t.item())
        if not isinstance(t, int) or isinstance(t, bool):
            raise TypeError(f"t must be an int, got {type(t).__name__}")
        if not 1 <= t < self.T_max:
            raise ValueError(f"t must satisfy 1 <= t < T_max={self.T_max}, got t={t}")
        beta = self.betas[t].item()
        alpha = self.alphas[t].item()
        abar = self.alphas_cumprod[t].item()
        return Coefficients(
            a=math.sqrt(abar),
            s=math.sqrt(1.0 - abar),
            c1=beta / (math.sqrt(1.0 - abar) * math.sqrt(alpha)),
            c2=math.sqrt(beta),
            c3=1.0 / math.sqrt(alpha),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and (self.T_max, self.beta_start, self.beta_end) == (
            other.T_max,
            other.beta_start,
            other.beta_end,
        )

    def __hash__(self) -> int:
        return hash((self.T_max, self.beta_start, self.beta_end))

    def __repr__(self) -> str:
        return f"Schedule(T_max={self.T_max}, beta_start={self.beta_start}, beta_end={self.beta_end})"
