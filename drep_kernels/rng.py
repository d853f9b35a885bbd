"""Counter-based Gaussian noise shared by every backend (docs/method.md, "Noise", N1).

Element (m, k) of a rows x cols noise matrix is a pure function of (seed, m, k): output
k mod 4 of the counter c = m ceil(cols / 4) + k // 4, whose four normals are Box-Muller of
the four words of Philox4x32-10 with key = (seed_lo, seed_hi) and counter = (c_lo, c_hi, 0, 0).
This is the same stream as Triton's ``tl.randn4x(seed, c)`` and as ``csrc/philox.h``, so a
seed gives the same noise (up to the rounding of log/sin/cos) on every backend, for any tiling
or thread count. This module is the plain-torch transcription (int64 arithmetic, masks for
uint32).
"""
from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
# Largest float32 scale with (2^31 - 1) * scale < 1 (Triton's uint_to_uniform_float).
_U32_TO_UNIFORM = 4.6566127342e-10
_TWO_PI = 6.283185307179586


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
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


def philox_words(seed: int, counter: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four uint32 outputs (in int64) of Philox4x32-10 at each int64 ``counter``."""
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c0 = counter & _M32
    c1 = (counter >> 32) & _M32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def _uniform(word: Tensor) -> Tensor:
    # Reinterpret as int32, fold negatives onto [0, 2^31), scale into [0, 1).
    signed = torch.where(word >= 2**31, word - 2**32, word)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * _U32_TO_UNIFORM


def _box_muller(w_radius: Tensor, w_angle: Tensor) -> tuple[Tensor, Tensor]:
    radius = torch.sqrt(-2.0 * torch.log(torch.clamp(_uniform(w_radius), min=1.0e-7)))
    theta = _TWO_PI * _uniform(w_angle)
    return radius * torch.cos(theta), radius * torch.sin(theta)


def normal4(seed: int, counter: Tensor) -> Tensor:
    """The four float32 normals of each int64 counter: shape ``counter.shape + (4,)``."""
    w0, w1, w2, w3 = philox_words(int(seed), counter.to(torch.int64))
    return torch.stack((*_box_muller(w0, w1), *_box_muller(w2, w3)), dim=-1)


def normal_at(seed: int, m: Tensor, k: Tensor, cols: int) -> Tensor:
    """eps[m, k] of a noise matrix with ``cols`` columns, for int64 index tensors m, k
    (broadcast together): one Philox call per element, for sparse checks at large indices."""
    m, k = torch.broadcast_tensors(m.to(torch.int64), k.to(torch.int64))
    four = normal4(seed, m * ((cols + 3) // 4) + k // 4)
    return four.gather(-1, (k % 4).unsqueeze(-1)).squeeze(-1)


def normal(seed: int, rows: int, cols: int, device: torch.device | str = "cpu", row0: int = 0) -> Tensor:
    """Rows row0 .. row0 + rows - 1 of the float32 noise matrix of ``seed`` with ``cols``
    columns (N1)."""
    groups = (cols + 3) // 4
    counter = torch.arange(row0 * groups, (row0 + rows) * groups, dtype=torch.int64, device=device)
    return normal4(seed, counter).reshape(rows, 4 * groups)[:, :cols]


def seed_from_tensor(seed: torch.Tensor) -> int:
    """The Python int held by a 0-d int64 seed tensor (seeds travel as tensors so that
    torch.compile can trace drawing them)."""
    return int(seed.item())


def draw_seed(generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh 0-d int64 seed tensor on ``device`` from torch's default generator of that device
    (or the given one), so ``torch.manual_seed`` makes runs repeatable. On CUDA the draw is a
    device op that a CUDA graph replays (a new seed each replay); nothing is read on the host."""
    device = torch.device(device)
    if device.type != "cuda":
        device = torch.device("cpu")
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device, generator=generator)
