"""Inference of the deployed layer: the fused model must cost what the original costs."""
from . import runner

OP = "inference"


def test_inference(benchmark, spec, monkeypatch, paired):
    runner.run(benchmark, spec, monkeypatch, paired)
