"""drep::merge_weights, forward and forward + backward (backbone phase), per built backend,
against the authors' matmul-plus-elementwise merge (eager and torch.compile) and the floor of
one (two with backward) out x K x K addmm."""
from . import runner

OP = "merge_weights"


def test_merge_weights(benchmark, spec, monkeypatch, paired):
    runner.run(benchmark, spec, monkeypatch, paired)
