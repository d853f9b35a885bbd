"""Real model zoos (random init, no download): convert, train a couple of steps, fuse.

timm's vit_tiny_patch16_224 (Linears and its Conv2d patch embedding) and torchvision's
resnet18 (bias-free convs followed by batch norm, and the fc): the fused model must be the
original architecture and compute what the converted model computes in eval.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import drep_kernels as dk
from conftest import assert_close


@pytest.fixture
def one_thread():
    # Batches of one or two images: intra-op threads buy nothing, and on a shared CPU they cost.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train_fuse_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, expected_layers: int) -> dict[str, int]:
    original = copy.deepcopy(model)
    dk.convert(model, include=(nn.Linear, nn.Conv2d), example_inputs=(x,), init="linear")
    steps = dk.timesteps(model)
    assert len(steps) == expected_layers and sorted(steps.values()) == list(range(1, expected_layers + 1))
    opt = torch.optim.SGD([p for p in model.parameters()], lr=1e-3)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    for phase in ("denoiser", "backbone"):
        dk.set_phase(model, phase)
        model.train()
        loss = F.cross_entropy(model(x), y)
        dl = dk.denoise_loss(model)
        assert (dl.item() > 0) == (phase == "denoiser")
        (loss + 0.01 * dl).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, snapshot[n])}
    assert any(n.endswith("denoise_weight") for n in changed)
    assert any(n.endswith(".weight") and "denoise" not in n for n in changed)

    model.eval()
    with torch.no_grad():
        expected = model(x)
        fused = dk.fuse(model)
        actual = fused(x)
    assert [type(m) for m in fused.modules()] == [type(m) for m in original.modules()]
    assert [(n, p.shape) for n, p in fused.named_parameters()] == [(n, p.shape) for n, p in original.named_parameters()]
    assert_close(actual, expected, 1e-5, 1e-6, "fused vs unfused logits")
    return steps


def test_timm_vit_tiny_patch16_224(one_thread):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    x, y = torch.randn(1, 3, 224, 224), torch.tensor([3])
    # patch_embed.proj (Conv2d) + 12 blocks x (qkv, proj, fc1, fc2) + head
    steps = _train_fuse_check(model, x, y, expected_layers=1 + 12 * 4 + 1)
    assert steps["patch_embed.proj"] == 50 and steps["blocks.0.attn.qkv"] == 49 and steps["head"] == 1


def test_torchvision_resnet18(one_thread):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([3, 7])
    # 17 3x3 / 7x7 convs + 3 downsample 1x1 convs + fc
    steps = _train_fuse_check(model, x, y, expected_layers=20 + 1)
    assert steps["conv1"] == 21 and steps["fc"] == 1
