"""drep::denoise_loss, forward + backward, per built backend, against the authors' unfused
loss (eager and torch.compile) and the floor of two M x K x K GEMMs."""
from . import runner

OP = "denoise_loss"


def test_denoise_loss(benchmark, spec, monkeypatch, paired):
    runner.run(benchmark, spec, monkeypatch, paired)
