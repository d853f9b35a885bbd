"""Host overhead: a layer's training step (forward, task loss + 0.01 * denoise_loss, backward,
SGD) at a tiny shape (one image, K = out = 8), where the device does nothing worth timing and
the time is the host's: Python, dispatch, launches. DenoiseLinear beside the plain nn.Linear
step (the floor; ``x floor`` is the ratio) and the authors' layer. On a GPU, what a model with
many layers pays per step beyond its kernels; a CUDA-graph-captured step removes it."""
from . import runner

OP = "host_step"


def test_host_step(benchmark, spec, monkeypatch, paired):
    runner.run(benchmark, spec, monkeypatch, paired)
