"""CUDA graphs: a captured denoising loss draws new noise on every replay on both GPU backends
(the seed is drawn on the device and read by the kernel), while an explicit seed keeps its
meaning (the same noise every time, captured or not). GPU only."""
from __future__ import annotations

import pytest
import torch

from drep_kernels import ops, rng
from drep_kernels.backends import implements

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

A, S = 0.8, 0.6
BACKENDS = ["cuda", "triton"]


def _inputs(M=300, K=96):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).cuda()
    w = (torch.randn(K, K, generator=g) / K**0.5).cuda().requires_grad_(True)
    b = torch.randn(K, generator=g).cuda().requires_grad_(True)
    return x, w, b


def _use(backend, monkeypatch):
    assert implements(backend, "denoise_loss", "cuda"), f"the {backend} backend is not usable on this GPU machine"
    monkeypatch.setenv("DREP_BACKEND", backend)


def _capture(fn):
    """Warm up on a side stream (autotuning, compiles), then capture one call of ``fn``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("backend", BACKENDS)
def test_replays_of_a_captured_loss_draw_new_noise(backend, monkeypatch):
    _use(backend, monkeypatch)
    x, w, b = _inputs()
    graph, loss = _capture(lambda: ops.denoise_loss(x, w.detach(), b.detach(), A, S))
    values = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        values.append(loss.clone())
    assert len({float(v) for v in values}) == 3, values  # three replays, three draws
    # Each replay is a proper draw: the same distribution, so losses of one size.
    assert all(torch.isfinite(v) and abs(float(v) / float(values[0]) - 1) < 0.2 for v in values), values


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_explicit_seed_gives_the_same_noise_captured_or_not(backend, monkeypatch):
    _use(backend, monkeypatch)
    x, w, b = _inputs()
    eager = [ops.denoise_loss(x, w.detach(), b.detach(), A, S, seed=7) for _ in range(2)]
    assert torch.equal(eager[0], eager[1])
    graph, loss = _capture(lambda: ops.denoise_loss(x, w.detach(), b.detach(), A, S, seed=7))
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(loss, eager[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_device_seed_matches_the_same_seed_given_explicitly(backend, monkeypatch):
    # The device-drawn seed is an ordinary seed: the kernel reading it must draw the noise that
    # the same value given on the host draws.
    _use(backend, monkeypatch)
    x, w, b = _inputs()
    torch.manual_seed(11)
    drawn = ops.denoise_loss(x, w.detach(), b.detach(), A, S)
    torch.manual_seed(11)
    seed = int(rng.draw_seed(device="cuda"))
    assert torch.equal(drawn, ops.denoise_loss(x, w.detach(), b.detach(), A, S, seed=seed))
