"""The counter-based noise stream (docs/method.md N1), plain-torch transcription."""
import pytest
import torch

from drep_kernels import rng


def _philox_python(seed: int, index: int) -> tuple[int, int]:
    """Scalar Philox4x32-10 with Python ints: an independent check of the tensor version."""
    m = 0xFFFFFFFF
    k0, k1 = seed & m, (seed >> 32) & m
    c0, c1, c2, c3 = index & m, (index >> 32) & m, 0, 0
    for _ in range(10):
        pb, pa = 0xCD9E8D57 * c2, 0xD2511F53 * c0
        c0, c1, c2, c3 = (pb >> 32) ^ c1 ^ k0, pb & m, (pa >> 32) ^ c3 ^ k1, pa & m
        k0, k1 = (k0 + 0x9E3779B9) & m, (k1 + 0xBB67AE85) & m
    return c0, c1


@pytest.mark.parametrize("seed", [0, 1, 123456789012345, 2**62 + 7])
def test_philox_words_match_scalar_reference(seed):
    idx = torch.tensor([0, 1, 2, 1000, 2**31 - 1, 2**31, 2**32 + 5, 2**40 + 3], dtype=torch.int64)
    w0, w1 = rng.philox_words(seed, idx)
    for i, (a, b) in enumerate(zip(w0.tolist(), w1.tolist())):
        assert (a, b) == _philox_python(seed, int(idx[i]))


def test_known_answer_philox4x32_10():
    # Random123's published known-answer test for philox4x32-10 with counter 0, key 0.
    c0, c1 = _philox_python(0, 0)
    w0, w1 = rng.philox_words(0, torch.zeros(1, dtype=torch.int64))
    assert (c0, c1) == (0x6627E8D5, 0xE169C58D)
    assert (int(w0), int(w1)) == (c0, c1)


def test_normal_statistics_and_independence():
    from scipy import stats

    eps = rng.normal(2024, 400, 500).reshape(-1).double()
    assert torch.isfinite(eps).all()
    assert abs(eps.mean().item()) < 0.01
    assert abs(eps.var().item() - 1) < 0.02
    assert stats.kstest(eps.numpy(), "norm").pvalue > 1e-3
    lag1 = torch.corrcoef(torch.stack([eps[:-1], eps[1:]]))[0, 1]
    assert abs(lag1.item()) < 0.01


def test_seed_and_index_determine_the_value():
    a = rng.normal(7, 30, 11)
    assert torch.equal(a, rng.normal(7, 30, 11))
    assert not torch.equal(a, rng.normal(8, 30, 11))
    # The value of element (m, k) depends on its flat index only, not on the matrix shape.
    b = rng.normal(7, 1, 330).reshape(30, 11)
    assert torch.equal(a, b)
