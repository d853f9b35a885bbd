import math

import pytest
import torch

from drep_kernels import Schedule


def test_coefficients_match_definitions():
    sch = Schedule()
    betas = torch.linspace(1e-4, 2e-3, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    for t in (1, 2, 17, 500, 999):
        c = sch.coefficients(t)
        beta, alpha = betas[t].item(), 1 - betas[t].item()
        assert c.a == pytest.approx(math.sqrt(abar[t].item()), rel=1e-14)
        assert c.s == pytest.approx(math.sqrt(1 - abar[t].item()), rel=1e-14)
        assert c.c3 == pytest.approx(1 / math.sqrt(alpha), rel=1e-14)
        assert c.c2 == pytest.approx(math.sqrt(beta), rel=1e-14)
        assert c.c1 == pytest.approx(beta / (math.sqrt(1 - abar[t].item()) * math.sqrt(alpha)), rel=1e-14)


def test_custom_schedule_and_noise_grows_with_t():
    sch = Schedule(T_max=50, beta_start=1e-3, beta_end=2e-2)
    s_values = [sch.coefficients(t).s for t in range(1, 50)]
    assert all(b > a for a, b in zip(s_values, s_values[1:]))


@pytest.mark.parametrize("t", [0, -1, 1000, 5000])
def test_t_out_of_range(t):
    with pytest.raises(ValueError, match="t must satisfy"):
        Schedule().coefficients(t)


def test_t_type():
    with pytest.raises(TypeError, match="t must be an int"):
        Schedule().coefficients(1.5)


@pytest.mark.parametrize("kwargs", [dict(T_max=1), dict(beta_start=0.0), dict(beta_end=float("nan")), dict(beta_end=1.5)])
def test_bad_schedule(kwargs):
    with pytest.raises(ValueError):
        Schedule(**kwargs)
