"""torch.compile(fullgraph=True) traces a converted model: training (with losses) and eval."""
import pytest
import torch
import torch.nn as nn

import drep_kernels as dk
from conftest import assert_close


def _model():
    torch.manual_seed(0)
    return dk.convert(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)), init="linear")


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    eager, compiled_model = _model(), _model()
    dk.set_phase(eager, "joint")
    dk.set_phase(compiled_model, "joint")
    x = torch.randn(5, 8)

    def step(model):
        def fn(x):
            return model(x).square().mean() + 0.01 * dk.denoise_loss(model)

        return fn

    compiled = torch.compile(step(compiled_model), fullgraph=True)
    for _ in range(2):  # the second call reuses the compiled graph with a fresh noise seed
        torch.manual_seed(1)
        want = step(eager)(x)
        torch.manual_seed(1)
        got = compiled(x)
        assert_close(got, want, 1e-5, 1e-6, "compiled loss")
        want.backward()
        got.backward()
        for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
            assert_close(q.grad, p.grad, 1e-4, 1e-6, f"grad of {name}")
            p.grad = q.grad = None


@pytest.mark.slow
def test_compiled_eval_matches_eager():
    model = _model().eval()
    x = torch.randn(3, 8)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), model(x), 1e-5, 1e-6, "compiled eval")
