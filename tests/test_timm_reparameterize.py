"""timm's deployment call, ``timm.utils.reparameterize_model``, fuses the denoising layers too:
it replaces every child that has a ``fuse()`` method by what that returns."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm", reason="timm is an optional dependency; CI's 'newest' environment has none")

import drep_kernels as dk  # noqa: E402
from conftest import TOLERANCES, assert_close  # noqa: E402


def test_reparameterize_model_replaces_every_denoising_layer_by_its_plain_fused_layer():
    torch.manual_seed(0)
    original = timm.create_model("test_vit", num_classes=10, img_size=32)
    model = timm.create_model("test_vit", num_classes=10, img_size=32)
    model.load_state_dict(original.state_dict())
    x = torch.randn(2, 3, 32, 32)
    # Linears and the Conv2d patch embedding; random denoisers, so the fused weights differ from W.
    dk.convert(model, include=(nn.Linear, nn.Conv2d), init="linear", example_inputs=(x,))
    with torch.no_grad():
        expected = model.eval()(x)
        deployed = timm.utils.reparameterize_model(model)  # a fused copy; the model stays as it is
        got = deployed(x)
    assert [type(m) for m in deployed.modules()] == [type(m) for m in original.modules()]
    assert len(dk.timesteps(model)) == 26
    assert_close(got, expected, *TOLERANCES[torch.float32], "reparameterized vs converted")
    assert not torch.equal(deployed.blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc1.weight)  # W', not W
    assert_close(deployed.blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc1.merged_weight_and_bias()[0],
                 0, 0, "fc1 holds W'")
