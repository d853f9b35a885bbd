"""Model-level recipe: convert/numbering, phases, fuse, state dicts, the authors' checkpoints."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import drep_kernels as dk
import oracle
from conftest import assert_close


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, d=8, n_blocks=3, classes=5):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_blocks))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _net(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return Net(**kw).to(dtype)


def test_global_numbering_over_sibling_blocks():
    model = dk.convert(_net(), init="linear")
    ts = dk.timesteps(model)
    names = ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "blocks.2.fc1", "blocks.2.fc2", "head"]
    assert list(ts) == names
    assert [ts[n] for n in names] == [7, 6, 5, 4, 3, 2, 1]


def test_forward_order_from_example_inputs():
    class Reordered(nn.Module):  # registration order differs from call order
        def __init__(self):
            super().__init__()
            self.late, self.early = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.late(self.early(x))

    by_registration = dk.timesteps(dk.convert(Reordered()))
    assert by_registration == {"late": 2, "early": 1}
    by_forward = dk.timesteps(dk.convert(Reordered(), example_inputs=(torch.randn(1, 4),)))
    assert by_forward == {"early": 2, "late": 1}


def test_include_exclude():
    ts = dk.timesteps(dk.convert(_net(), exclude=["head"]))
    assert "head" not in ts and len(ts) == 6 and max(ts.values()) == 6
    ts = dk.timesteps(dk.convert(_net(), exclude=lambda name, m: name.endswith("fc1")))
    assert sorted(ts) == ["blocks.0.fc2", "blocks.1.fc2", "blocks.2.fc2", "head"]
    with pytest.raises(TypeError, match="only nn.Linear"):
        dk.convert(_net(), include=(nn.GELU,))


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _Attention(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.scaled = _ScaledLinear(d, d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return self.fc(self.scaled(self.attn(x, x, x, need_weights=False)[0]))


def test_leaves_layers_it_cannot_denoise(caplog):
    # MultiheadAttention reads out_proj.weight itself (a converted out_proj would never make a
    # loss, and fuse would change the model); a subclass's own forward would be lost.
    import logging

    torch.manual_seed(3)
    model = _Attention()
    x = torch.randn(2, 5, 8)
    with caplog.at_level(logging.INFO, logger="drep_kernels"):
        dk.convert(model, init="linear")
    assert dk.timesteps(model) == {"fc": 1}
    assert not isinstance(model.attn.out_proj, dk.DenoiseLinear) and type(model.scaled) is _ScaledLinear
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "attn.out_proj" in messages and "MultiheadAttention" in messages
    assert "scaled" in messages and "_ScaledLinear overrides Linear's forward" in messages
    # Trained or not, the fused model computes what the converted one does.
    dk.set_phase(model, "denoiser")
    model.train()
    model(x)
    dk.denoise_loss(model).backward()
    model.eval()
    with torch.no_grad():
        before = model(x)
        assert_close(dk.fuse(model)(x), before, 1e-6, 1e-6, "fused vs converted")


def test_denoise_loss_keeps_float64():
    model = dk.convert(Net().double(), init="linear")
    model(torch.randn(4, 8, dtype=torch.float64))
    loss = dk.denoise_loss(model)
    assert loss.dtype == torch.float64 and loss.item() > 0


def test_refuses_double_conversion_and_too_many_layers():
    model = dk.convert(_net())
    with pytest.raises(ValueError, match="already converted"):
        dk.convert(model)
    with pytest.raises(ValueError, match="need N < T_max"):
        dk.convert(_net(), schedule=dk.Schedule(T_max=7))  # 7 layers
    untouched = _net()
    with pytest.raises(ValueError):
        dk.convert(untouched, schedule=dk.Schedule(T_max=7))
    assert not dk.timesteps(untouched), "a refused conversion must leave the model unchanged"
    assert len(dk.timesteps(dk.convert(_net(), schedule=dk.Schedule(T_max=8)))) == 7


def test_shared_module_is_converted_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    dk.convert(model)
    assert model[0] is model[2] and isinstance(model[0], dk.DenoiseLinear)
    assert dk.timesteps(model) == {"0": 1}


def test_set_phase_by_module_type():
    model = dk.convert(_net())
    dk.set_phase(model, "denoiser")
    for m in model.modules():
        if isinstance(m, dk.DenoiseLinear):
            assert m.denoise_weight.requires_grad and m.denoise_bias.requires_grad
            assert not m.weight.requires_grad and not m.bias.requires_grad
    dk.set_phase(model, "backbone")
    assert all(p.requires_grad != any(p is q for m in model.modules() if isinstance(m, dk.DenoiseLinear) for q in m.denoiser_parameters()) for p in model.parameters())
    dk.set_phase(model, "joint")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="phase must be one of"):
        dk.set_phase(model, "task")
    with pytest.raises(ValueError, match="no denoising layers"):
        dk.set_phase(_net(), "denoiser")


def test_phases_route_the_losses():
    model = dk.convert(_net(dtype=torch.float32), init="linear").train()
    x = torch.randn(4, 8)
    dk.set_phase(model, "denoiser")
    task = model(x).square().mean()
    loss = dk.denoise_loss(model)
    assert loss.item() > 0
    (task + 0.01 * loss).backward()
    layer = model.blocks[0].fc1
    assert layer.denoise_weight.grad is not None and layer.weight.grad is None
    model.zero_grad()
    dk.set_phase(model, "backbone")
    model(x).square().mean().backward()
    assert dk.denoise_loss(model).item() == 0.0  # not computed in the backbone phase
    assert layer.weight.grad is not None and layer.denoise_weight.grad is None


def test_fuse_equals_unfused_and_restores_the_architecture():
    original = _net()
    n_params = sum(p.numel() for p in original.parameters())
    model = dk.convert(copy.deepcopy(original), init="linear").eval()
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
        fused = dk.fuse(model)
        assert_close(fused(x), y, 1e-12, 1e-12, "fused vs unfused")
    assert not any(isinstance(m, dk.DenoiseLinear) for m in fused.modules())
    assert [type(m) for m in fused.modules()] == [type(m) for m in original.modules()]
    assert sum(p.numel() for p in fused.parameters()) == n_params
    again = dk.fuse(fused)
    with torch.no_grad():
        assert torch.equal(again(x), fused(x))  # idempotent
    fresh = _net()
    fresh.load_state_dict(fused.state_dict())  # loads into the original architecture, strictly
    with torch.no_grad():
        assert torch.equal(fresh(x), fused(x))


def test_fused_layer_is_the_two_step_function():
    model = dk.convert(_net(), init="linear").eval()
    layer = model.head
    co = layer.coefficients
    h = torch.randn(5, 8, dtype=torch.float64)
    want = oracle.two_step(h, layer.weight, layer.bias, layer.denoise_weight, layer.denoise_bias, co.c1, co.c3)
    dk.fuse(model)
    with torch.no_grad():
        assert_close(model.head(h), want, 1e-12, 1e-12, "fused head")


def test_converted_state_dict_round_trip():
    model = dk.convert(_net(), init="linear")
    other = dk.convert(_net())
    other.load_state_dict(model.state_dict())
    x = torch.randn(2, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), other.eval()(x))


# --- the authors' checkpoint layout -------------------------------------------------------

def _reference_layer_checkpoint(k, t, seed):
    """A state dict in the authors' layout, with their time MLP built here from its documented
    structure: Sequential(sinusoid(2048), Linear(2048, K), GELU, Linear(K, K))."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    betas = torch.linspace(1e-4, 2e-3, 1000)
    alphas = 1 - betas
    sd = {
        "weight": r(3, k), "bias": r(3), "dm.weight": r(k, k), "dm.bias": r(k),
        "time_mlp.1.weight": r(k, 2048), "time_mlp.1.bias": r(k),
        "time_mlp.3.weight": r(k, k), "time_mlp.3.bias": r(k),
        "betas": betas, "sqrt_betas": betas.sqrt(), "alphas": alphas, "sqrt_alphas": alphas.sqrt(),
        "alphas_cumprod": torch.cumprod(alphas, 0),
    }
    return sd


def _authors_reverse_step_then_layer(sd, x, t):
    """Their denoiser with the time embedding, one deterministic reverse step, then the layer."""
    half = 1024
    freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000) / (half - 1)))
    ang = torch.tensor([float(t)], dtype=torch.float64)[:, None] * freqs[None]
    sinus = torch.cat((ang.sin(), ang.cos()), dim=-1)
    d = {k: v.double() for k, v in sd.items()}
    e_t = F.linear(F.gelu(F.linear(sinus, d["time_mlp.1.weight"], d["time_mlp.1.bias"])), d["time_mlp.3.weight"], d["time_mlp.3.bias"])
    eps_hat = F.linear(x + e_t, d["dm.weight"], d["dm.bias"])
    beta = d["betas"][t]
    abar = d["alphas_cumprod"][t]
    c1 = beta / ((1 - abar).sqrt() * (1 - beta).sqrt())
    c3 = 1 / (1 - beta).sqrt()
    return F.linear(c3 * x - c1 * eps_hat, d["weight"], d["bias"])


def test_load_reference_checkpoint_folds_the_time_embedding():
    sd = _reference_layer_checkpoint(k=6, t=4, seed=1)
    layer = dk.DenoiseLinear(6, 3, t=4, dtype=torch.float64)
    dk.load_reference_state_dict(layer, sd)
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        got = layer.eval()(x)
    assert_close(got, _authors_reverse_step_then_layer(sd, x, 4), 1e-6, 1e-7, "loaded layer")


def test_load_reference_checkpoint_into_a_model():
    model = dk.convert(nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 6)))
    sd0, sd2 = _reference_layer_checkpoint(6, 2, 2), _reference_layer_checkpoint(3, 1, 3)
    sd2["weight"], sd2["bias"] = torch.randn(6, 3) * 0.1, torch.randn(6) * 0.1
    full = {f"0.{k}": v for k, v in sd0.items()} | {f"2.{k}": v for k, v in sd2.items()}
    dk.load_reference_state_dict(model, full)
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        h = F.relu(_authors_reverse_step_then_layer(sd0, x, 2))
        want = _authors_reverse_step_then_layer(sd2, h, 1)
        got = model.double().eval()(x)
    assert_close(got, want, 1e-5, 1e-6, "loaded model")


def test_load_reference_checkpoint_errors():
    layer = dk.DenoiseLinear(6, 3, t=4)
    sd = _reference_layer_checkpoint(6, 4, 0)
    sd["betas"] = torch.linspace(1e-4, 2e-2, 1000)
    with pytest.raises(ValueError, match="schedule differs"):
        dk.load_reference_state_dict(layer, sd)
    with pytest.raises(KeyError, match="dm.weight"):
        dk.load_reference_state_dict(layer, {"weight": torch.zeros(3, 6)})
    no_bias = dk.DenoiseLinear(6, 3, bias=False, t=4)
    with pytest.raises(ValueError, match="has no bias"):
        dk.load_reference_state_dict(no_bias, _reference_layer_checkpoint(6, 4, 0))
