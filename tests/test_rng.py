"""The counter-based noise stream (docs/method.md N1), plain-torch transcription."""
import math

import pytest
import torch

from conftest import CLAMP_SEED, CLAMPED_COUNTERS
from drep_kernels import rng


def _philox_python(seed: int, index: int) -> tuple[int, int, int, int]:
    """Scalar Philox4x32-10 with Python ints: an independent check of the tensor version."""
    m = 0xFFFFFFFF
    k0, k1 = seed & m, (seed >> 32) & m
    c0, c1, c2, c3 = index & m, (index >> 32) & m, 0, 0
    for _ in range(10):
        pb, pa = 0xCD9E8D57 * c2, 0xD2511F53 * c0
        c0, c1, c2, c3 = (pb >> 32) ^ c1 ^ k0, pb & m, (pa >> 32) ^ c3 ^ k1, pa & m
        k0, k1 = (k0 + 0x9E3779B9) & m, (k1 + 0xBB67AE85) & m
    return c0, c1, c2, c3


@pytest.mark.parametrize("seed", [0, 1, 123456789012345, 2**62 + 7])
def test_philox_words_match_scalar_reference(seed):
    idx = torch.tensor([0, 1, 2, 1000, 2**31 - 1, 2**31, 2**32 + 5, 2**40 + 3], dtype=torch.int64)
    words = rng.philox_words(seed, idx)
    for i, got in enumerate(zip(*(w.tolist() for w in words))):
        assert got == _philox_python(seed, int(idx[i]))


def test_known_answer_philox4x32_10():
    # Random123's published known-answer test for philox4x32-10 with counter 0, key 0.
    want = (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert _philox_python(0, 0) == want
    assert tuple(int(w) for w in rng.philox_words(0, torch.zeros(1, dtype=torch.int64))) == want


def test_normal_statistics_and_independence():
    from scipy import stats

    eps = rng.normal(2024, 400, 500).reshape(-1).double()
    assert torch.isfinite(eps).all()
    assert abs(eps.mean().item()) < 0.01
    assert abs(eps.var().item() - 1) < 0.02
    assert stats.kstest(eps.numpy(), "norm").pvalue > 1e-3
    lag1 = torch.corrcoef(torch.stack([eps[:-1], eps[1:]]))[0, 1]
    assert abs(lag1.item()) < 0.01


@pytest.mark.parametrize("seed,counter", [(99, 2**33 + 17), (0, 0), (2**62 + 7, 12345), (5, 2**32 - 1)])
def test_box_muller_of_all_four_words(seed, counter):
    # N1 written out for one counter with Python floats: (r0 cos, r0 sin, r2 cos, r2 sin).
    w = _philox_python(seed, counter)

    def uniform(word):
        v = word - 2**32 if word >= 2**31 else word
        return float(torch.tensor(-v - 1 if v < 0 else v, dtype=torch.float32) * 4.6566127342e-10)

    want = []
    for wr, wa in ((w[0], w[1]), (w[2], w[3])):
        r = math.sqrt(-2 * math.log(max(uniform(wr), 1e-7)))
        theta = 2 * math.pi * uniform(wa)
        want += [r * math.cos(theta), r * math.sin(theta)]
    got = rng.normal4(seed, torch.tensor([counter]))[0]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_radius_clamp():
    # The radius uniform of these counters is below 1e-7: N1 clamps it, so the pair's normals
    # lie on the circle of radius sqrt(-2 ln 1e-7); the other pair is untouched.
    for counter, clamped_pair in zip(CLAMPED_COUNTERS, (1, 0)):
        words = _philox_python(CLAMP_SEED, counter)
        v = words[2 * clamped_pair]
        v = v - 2**32 if v >= 2**31 else v
        assert (-v - 1 if v < 0 else v) * 4.6566127342e-10 < 1e-7
        four = rng.normal4(CLAMP_SEED, torch.tensor([counter]))[0].double()
        r2 = four[2 * clamped_pair] ** 2 + four[2 * clamped_pair + 1] ** 2
        torch.testing.assert_close(r2, torch.tensor(-2 * math.log(1e-7), dtype=torch.float64), rtol=1e-5, atol=0)


def test_seed_and_position_determine_the_value():
    a = rng.normal(7, 30, 11)
    assert torch.equal(a, rng.normal(7, 30, 11))
    assert not torch.equal(a, rng.normal(8, 30, 11))
    # Rows of 11 use ceil(11 / 4) = 3 counters: row m starts at counter 3 m, and its
    # last counter gives three elements (the fourth is cut).
    four = rng.normal4(7, torch.arange(90)).reshape(30, 12)
    assert torch.equal(a, four[:, :11])
    # Sparse lookups agree with the whole matrix, at any index.
    m = torch.tensor([0, 29, 13, 5]).reshape(-1, 1)
    k = torch.tensor([0, 3, 4, 10])
    assert torch.equal(rng.normal_at(7, m, k, 11), a[m, k])
    assert torch.equal(rng.normal(7, 5, 11, row0=20), a[20:25])


def test_rows_of_a_multiple_of_four_are_the_flat_stream():
    # With 4 | K the counters of consecutive rows are consecutive: the matrix is the stream.
    assert torch.equal(rng.normal(3, 6, 8).reshape(-1), rng.normal(3, 1, 48).reshape(-1))
