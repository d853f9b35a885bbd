"""DenoiseConv2d: exactness of the folded reverse step (C1, C2), gradients, loss, convert / fuse."""
from __future__ import annotations

import copy
import io
import logging
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import drep_kernels as dk
from drep_kernels import rng
from drep_kernels.backends import implements

import oracle
from conftest import assert_close

GEOMETRIES = [
    dict(stride=1, padding=0, dilation=1),
    dict(stride=2, padding=1, dilation=1),
    dict(stride=(1, 2), padding=(2, 0), dilation=(2, 1)),
    dict(stride=1, padding="same", dilation=2),
    dict(stride=2, padding=1, dilation=1, padding_mode="reflect"),
]
MERGE_BACKENDS = [b for b in ("torch", "cpu") if implements(b, "merge_weights", "cpu")]


def _layer(bias: bool, geometry: dict, *, dtype=torch.float64, t: int = 7, label_augmented=False, k=3):
    conv = nn.Conv2d(3, 5, k, bias=bias, **geometry).to(dtype)
    layer = dk.DenoiseConv2d.from_conv2d(conv, t=t, init="linear", label_augmented=label_augmented)
    return conv, layer


def _two_step(layer: dk.DenoiseConv2d, x: torch.Tensor) -> torch.Tensor:
    """conv, then one reverse step with the per-pixel denoiser: what C1/C2 must equal (float64)."""
    co = layer.coefficients
    y_t = layer._conv_forward(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    eps_hat = torch.einsum("oj,njhw->nohw", layer.denoise_weight.double(), y_t)
    if layer.denoise_bias is not None:
        eps_hat = eps_hat + layer.denoise_bias.double().view(1, -1, 1, 1)
    return co.c3 * y_t - co.c1 * eps_hat


def _merge_oracle(w, b, w_d, b_d, c1, c3):
    """C1 / C2 transcribed directly (differentiable by autograd)."""
    merged_w = c3 * w - c1 * torch.einsum("oj,jikl->oikl", w_d, w)
    if b is None:
        return merged_w, None
    return merged_w, c3 * b - c1 * (w_d @ b + (b_d if b_d is not None else 0))


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()))
def test_folded_conv_equals_denoise_after_conv_float64(geometry, bias, backend, monkeypatch):
    monkeypatch.setenv("DREP_BACKEND", backend)
    torch.manual_seed(0)
    _, layer = _layer(bias, geometry)
    x = torch.randn(2, 3, 11, 9, dtype=torch.float64)
    w, b = layer.merged_weight_and_bias()
    assert w.shape == layer.weight.shape and w.is_contiguous()
    assert (b is None) == (not bias)
    y = layer._conv_forward(x, w, b)
    expected = _two_step(layer, x)
    rel = ((y - expected).abs().max() / expected.abs().max()).item()
    assert rel < 1e-12, rel
    exp_w, exp_b = _merge_oracle(
        layer.weight, layer.bias, layer.denoise_weight, layer.denoise_bias, layer.coefficients.c1, layer.coefficients.c3
    )
    assert_close(w, exp_w, 1e-12, 1e-14, "W'")
    if bias:
        assert_close(b, exp_b, 1e-12, 1e-14, "b'")


@pytest.mark.parametrize("label_augmented", [False, True], ids=["label_free", "label_augmented"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradients_through_the_merge_match_autograd_of_the_formulas(bias, label_augmented):
    torch.manual_seed(1)
    geometry = dict(stride=2, padding=1, dilation=1)
    _, layer = _layer(bias, geometry, label_augmented=label_augmented)
    layer.eval()  # no denoising loss: the task gradient alone, through C1/C2
    x = torch.randn(2, 3, 8, 7, dtype=torch.float64)
    g = torch.randn_like(layer(x))
    (layer(x) * g).sum().backward()

    params = [layer.weight, layer.bias, layer.denoise_weight, layer.denoise_bias]
    leaves = [p.detach().clone().requires_grad_(True) if p is not None else None for p in params]
    w, b, w_d, b_d = leaves
    co = layer.coefficients
    mw, mb = _merge_oracle(w, b, w_d, b_d, co.c1, co.c3)
    (layer._conv_forward(x, mw, mb) * g).sum().backward()
    assert_close(layer.weight.grad, w.grad, 1e-12, 1e-13, "dW")
    if bias:
        assert_close(layer.bias.grad, b.grad, 1e-12, 1e-13, "db")
    if label_augmented:
        assert_close(layer.denoise_weight.grad, w_d.grad, 1e-12, 1e-13, "dW_d")
        if bias:
            assert_close(layer.denoise_bias.grad, b_d.grad, 1e-12, 1e-13, "db_d")
    else:
        assert layer.denoise_weight.grad is None  # label-free: the task never reaches the denoiser


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_training_loss_is_l1_on_the_conv_output_per_pixel(bias):
    torch.manual_seed(2)
    _, layer = _layer(bias, dict(stride=1, padding=1, dilation=1))
    layer.train()
    dk.set_phase(layer, "denoiser")
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    torch.manual_seed(123)
    seed = rng.draw_seed()
    torch.manual_seed(123)  # the layer draws the same seed
    y = layer(x)
    loss = layer.take_loss()
    assert layer.take_loss() is None
    y_t = layer._conv_forward(x, layer.weight, layer.bias).permute(0, 2, 3, 1).reshape(-1, 5)
    eps = rng.normal(rng.seed_from_tensor(seed), y_t.shape[0], y_t.shape[1]).double()
    co = layer.coefficients
    exp_loss, exp_dw, exp_db = oracle.denoise_loss_grads(y_t, layer.denoise_weight, layer.denoise_bias, co.a, co.s, eps)
    # The layer's backend regenerates eps in float32 (its log/cos may round differently from
    # torch's): compare at the float32 level of the noise.
    assert_close(loss, exp_loss, 1e-6, 1e-9, "loss")
    loss.backward()
    assert_close(layer.denoise_weight.grad, exp_dw, 1e-6, 1e-9, "dW_d")
    if bias:
        assert_close(layer.denoise_bias.grad, exp_db, 1e-6, 1e-9, "db_d")
    assert layer.weight.grad is None  # the loss never pulls the backbone
    assert_close(y, _two_step(layer, x), 1e-12, 1e-13, "y")


def test_no_loss_when_nothing_could_use_it():
    _, layer = _layer(True, GEOMETRIES[0])
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    layer.eval()
    layer(x)
    with torch.no_grad():
        layer.train()
        layer(x)
    dk.set_phase(layer, "backbone")
    layer(x)
    assert layer.take_loss() is None


def test_merge_cache_and_gradient_accumulation():
    torch.manual_seed(3)
    _, layer = _layer(True, GEOMETRIES[1])
    dk.set_phase(layer, "joint")
    w1, _ = layer.merged_weight_and_bias()
    assert layer.merged_weight_and_bias()[0] is w1  # cached until a parameter changes
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    for _ in range(2):  # two micro-batches backpropagate through one cached merge
        (layer(x).square().mean() + dk.denoise_loss(layer)).backward()
    grad_twice = layer.weight.grad.clone()
    layer.zero_grad()
    (layer(x).square().mean() + dk.denoise_loss(layer)).backward()
    assert_close(grad_twice, 2 * layer.weight.grad, 1e-12, 1e-13, "accumulated dW")
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    w2, b2 = layer.merged_weight_and_bias()
    co = layer.coefficients
    want_w, want_b = _merge_oracle(layer.weight, layer.bias, layer.denoise_weight, layer.denoise_bias, co.c1, co.c3)
    assert_close(w2, want_w, 1e-12, 1e-14, "W' after the step")
    assert_close(b2, want_b, 1e-12, 1e-14, "b' after the step")


def test_bfloat16_parameters_merge_in_float32():
    torch.manual_seed(4)
    _, layer32 = _layer(True, GEOMETRIES[1], dtype=torch.float32)
    with torch.no_grad():
        # A denoiser scaled by 0.5 / c1: its terms are then about half of W' and b', far above
        # the tolerance below, so a merge that drops or mangles the denoiser fails.
        for p in layer32.denoiser_parameters():
            p.mul_(0.5 / layer32.coefficients.c1)
    layer16 = copy.deepcopy(layer32).to(torch.bfloat16)
    w16, b16 = layer16.merged_weight_and_bias()
    assert w16.dtype == torch.bfloat16
    with torch.no_grad():
        exp_w, exp_b = _merge_oracle(
            *(p.double() for p in (layer16.weight, layer16.bias, layer16.denoise_weight, layer16.denoise_bias)),
            layer16.coefficients.c1,
            layer16.coefficients.c3,
        )
        dropped = (exp_w - layer16.coefficients.c3 * layer16.weight.double()).abs().max() / exp_w.abs().max()
        first = float((exp_b + layer16.coefficients.c1 * layer16.denoise_bias.double()).abs().max())
    assert dropped > 0.1, "the denoiser must be a large part of W' for this test to see it"
    eps = torch.finfo(torch.bfloat16).eps  # 2^-7: twice the largest relative rounding error
    # W': float32 from exact inputs, rounded once to bfloat16 (rtol), plus float32 accumulation
    # over 5 channels (atol, of the tensor's scale).
    assert_close(w16, exp_w, eps, 1e-5 * float(exp_w.abs().max()), "W' bf16")
    # b' = c3 b - c1 W_d b (``first``), rounded to bfloat16, minus c1 b_d, rounded again (rtol):
    # the first rounding's error is relative to that term, which c1 b_d may nearly cancel (atol).
    assert_close(b16, exp_b, eps, eps * first, "b' bf16")


def test_errors():
    with pytest.raises(ValueError, match="groups=1"):
        dk.DenoiseConv2d(4, 4, 3, groups=2, t=1)
    _, layer = _layer(True, GEOMETRIES[0])
    with pytest.raises(TypeError, match="already"):
        dk.DenoiseConv2d.from_conv2d(layer, t=1)
    with pytest.raises(TypeError, match="nn.Conv2d"):
        dk.DenoiseConv2d.from_conv2d(nn.Linear(2, 2), t=1)
    with pytest.raises(ValueError, match="init"):
        layer.reset_denoiser("orthogonal")


class _Net(nn.Module):
    """Convs (one grouped, one bias-free) and Linears, registered out of forward order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 4)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.depthwise(x)
        x = F.relu(self.bn(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def test_convert_numbers_convs_and_linears_in_forward_order_and_skips_grouped(caplog):
    torch.manual_seed(5)
    model = _Net()
    x = torch.randn(2, 3, 8, 8)
    with caplog.at_level(logging.INFO, logger="drep_kernels"):
        dk.convert(model, include=(nn.Linear, nn.Conv2d), example_inputs=(x,), init="linear")
    assert dk.timesteps(model) == {"conv1": 3, "conv2": 2, "head": 1}
    assert type(model.depthwise) is nn.Conv2d
    assert any("depthwise" in r.getMessage() and "groups=8" in r.getMessage() for r in caplog.records)
    assert isinstance(model.conv1, dk.DenoiseConv2d) and model.conv2.denoise_bias is None
    # Linear-only conversion (the default) leaves the convs alone.
    assert dk.timesteps(dk.convert(_Net())) == {"head": 1}


def test_phases_losses_fuse_and_state_dict_round_trip():
    torch.manual_seed(6)
    original = _Net()
    n_params = sum(p.numel() for p in original.parameters())
    model = dk.convert(copy.deepcopy(original), include=(nn.Linear, nn.Conv2d), init="linear")
    x = torch.randn(4, 3, 8, 8)
    dk.set_phase(model, "denoiser")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        out = model(x)
        loss = out.square().mean() + 0.01 * dk.denoise_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dk.set_phase(model, "backbone")
    model(x).square().mean().backward()
    assert dk.denoise_loss(model).item() == 0.0

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    clone = dk.convert(copy.deepcopy(original), include=(nn.Linear, nn.Conv2d))
    clone.load_state_dict(torch.load(buf))
    model.eval()
    clone.eval()
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(clone(x), expected)
        assert torch.equal(pickle.loads(pickle.dumps(model))(x), expected)
        fused = dk.fuse(model)
        assert not any(isinstance(m, dk.model.DENOISE_TYPES) for m in fused.modules())
        assert [type(m) for m in fused.modules()] == [type(m) for m in original.modules()]
        assert sum(p.numel() for p in fused.parameters()) == n_params
        assert fused.conv2.bias is None
        assert_close(fused(x), expected, 1e-5, 1e-6, "fused vs unfused")
    assert type(dk.fuse(dk.DenoiseConv2d(2, 3, 1, t=1))) is nn.Conv2d
