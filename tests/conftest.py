"""Shared test helpers: per-dtype tolerances, a comparison that says where and by how much,
and the extension guard for CI."""
from __future__ import annotations

import os

import pytest
import torch

# Without CUDA the Triton kernels run on CPU tensors under Triton's interpreter, so plain
# `pytest` covers them too. It must be set before triton.jit decorates the kernels (when
# drep_kernels.triton is first imported), hence here, at import time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# (rtol, atol) for comparing a kernel in the given input dtype with the float64 oracle.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-6),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}


# N1 clamps the radius uniform at 1e-7. Under seed CLAMP_SEED these counters have such a
# radius word (w2 for the first, w0 for the second; found by a search over counters, checked by
# test_rng.py): with 4 columns, row = counter, so every backend's noise hook can be checked there.
CLAMP_SEED = 2024
CLAMPED_COUNTERS = (5926005, 11129137)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, name: str = "") -> None:
    """Like torch.testing.assert_close (NaN/Inf never pass), but reports the worst element."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values in the result"
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    if (err > bound).any():
        idx = int(torch.argmax(err - bound))
        flat_a, flat_e = a.reshape(-1), e.reshape(-1)
        raise AssertionError(
            f"{name}: {(err > bound).sum().item()} of {err.numel()} elements out of tolerance "
            f"(rtol={rtol}, atol={atol}); worst at flat index {idx}: {flat_a[idx].item()!r} vs "
            f"{flat_e[idx].item()!r}; max abs err {err.max().item():.3e}"
        )


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so a kernel that skips writing an element cannot pass."""
    return t.fill_(float("nan"))


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """Tests choose backends explicitly; an outer DREP_BACKEND must not leak into them."""
    monkeypatch.delenv("DREP_BACKEND", raising=False)


def pytest_sessionstart(session):
    # CI sets DREP_REQUIRE_EXTENSION=1: a build that silently lacks _C must fail, not skip.
    if os.environ.get("DREP_REQUIRE_EXTENSION") == "1":
        from drep_kernels.backends import extension_error

        err = extension_error()
        if err is not None:
            raise RuntimeError(f"DREP_REQUIRE_EXTENSION=1 but drep_kernels._C is not loaded: {err}")


def cpu_backends(op: str) -> list[str]:
    """Backends with a kernel for ``op`` on CPU tensors, excluding the Triton interpreter
    (too slow for these shapes; tests/test_triton_backend.py covers it)."""
    from drep_kernels.backends import NAMES, implements

    return [b for b in NAMES if b != "triton" and implements(b, op, "cpu")]
