"""Counter-based Gaussian noise shared by every backend (docs/method.md, "Noise").

eps[i] for flat element index i (row-major over the M x K input) is a pure function of
(seed, i): Philox4x32-10 with key = (seed_lo, seed_hi) and counter = (i_lo, i_hi, 0, 0),
the first two words turned into uniforms and then into one normal by Box-Muller. This is
the same stream as Triton's ``tl.randn(seed, i)`` and as ``csrc/philox.h``, so a seed gives
the same noise (up to the rounding of log/cos) on every backend, for any tiling or thread
count. This module is the plain-torch transcription (int64 arithmetic, masks for uint32).
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
# Largest float32 scale with (2^31 - 1) * scale < 1 (Triton's uint_to_uniform_float).
_U32_TO_UNIFORM = 4.6566127342e-10
_TWO_PI = 6.283185307179586


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * b for a constant a and uint32 values b held in int64.

    The 64-bit product would overflow int64, so it is assembled from 16-bit halves.
    """
    ah, al = a >> 16, a & 0xFFFF
    bh, bl = b >> 16, b & 0xFFFF
    mid = ah * bl + al * bh
    low = al * bl + ((mid & 0xFFFF) << 16)
    lo = low & _M32
    hi = ah * bh + (mid >> 16) + (low >> 32)
    return hi & _M32, lo


def philox_words(seed: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First two uint32 outputs (in int64) of Philox4x32-10 at counter ``index`` (int64)."""
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c0 = index & _M32
    c1 = (index >> 32) & _M32
    c2 = torch.zeros_like(index)
    c3 = torch.zeros_like(index)
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1


def _uniform(word: torch.Tensor) -> torch.Tensor:
    # Reinterpret as int32, fold negatives onto [0, 2^31), scale into [0, 1).
    signed = torch.where(word >= 2**31, word - 2**32, word)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * _U32_TO_UNIFORM


def normal_from_index(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 noise for each int64 flat index in ``index``."""
    w0, w1 = philox_words(int(seed), index.to(torch.int64))
    u1 = torch.clamp(_uniform(w0), min=1.0e-7)
    u2 = _uniform(w1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(_TWO_PI * u2)


def normal(seed: int, rows: int, cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The rows x cols float32 noise matrix of ``seed``: element (m, k) has index m * cols + k."""
    index = torch.arange(rows * cols, dtype=torch.int64, device=device)
    return normal_from_index(seed, index).reshape(rows, cols)


def seed_from_tensor(seed: torch.Tensor) -> int:
    """The Python int held by a 0-d int64 seed tensor (seeds travel as tensors so that
    torch.compile can trace drawing them)."""
    return int(seed.item())


def draw_seed(generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh 0-d int64 CPU seed tensor from torch's default (or the given) CPU generator,
    so ``torch.manual_seed`` makes runs repeatable."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu", generator=generator)
