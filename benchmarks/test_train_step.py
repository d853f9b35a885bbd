"""A DenoiseLinear training step (forward, task loss + 0.01 * denoise_loss, backward, SGD) in
the denoiser and the backbone phase, against the authors' converted layer and a plain
nn.Linear step."""
from . import runner

OP = "train_step"


def test_train_step(benchmark, spec, monkeypatch, paired):
    runner.run(benchmark, spec, monkeypatch, paired)
