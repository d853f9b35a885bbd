"""Model-level recipe: convert/numbering, phases, fuse, state dicts, the authors' checkpoints."""
import contextlib
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import drep_kernels as dk
import oracle
from conftest import assert_close
from drep_kernels import rng


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


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, dk.model.DENOISE_TYPES)]


@contextlib.contextmanager
def _recording(model):
    """Collects (layer, its input) of the denoising layers, in the order the forwards call them."""
    calls = []
    record = lambda m, inp: calls.append((m, inp[0].detach()))  # noqa: E731
    hooks = [m.register_forward_pre_hook(record) for _, m in _layers(model)]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def _oracle_losses(calls, seed):
    """The summed L1 loss of the recorded calls in float64 and each layer's (dL/dW_d, dL/db_d)
    (L2, by autograd), with the noise the layers drew after torch.manual_seed(seed): one seed
    per call, in call order."""
    torch.manual_seed(seed)
    total, grads = 0.0, {}
    for layer, x in calls:
        rows = x.reshape(-1, x.shape[-1])
        eps = rng.normal(int(rng.draw_seed()), rows.shape[0], rows.shape[1]).double()
        co = layer.coefficients
        loss, g_w, g_b = oracle.denoise_loss_grads(rows, layer.denoise_weight, layer.denoise_bias, co.a, co.s, eps)
        total = total + loss
        grads[layer] = (g_w, g_b)  # each layer is called once in these tests
    return total, grads


def _backbone_grads_through_the_merge(model, x, objective):
    """d objective(model(x)) / d(W, b) of every layer by autograd of M1/M2 (oracle.merge), in a
    plain Net whose every Linear holds its merged weights (the denoisers frozen)."""
    leaves, merged = {}, {}
    for name, m in _layers(model):
        w, b = (p.detach().clone().requires_grad_(True) for p in (m.weight, m.bias))
        co = m.coefficients
        mw, mb = oracle.merge(w, b, m.denoise_weight.detach(), m.denoise_bias.detach(), co.c1, co.c3)
        leaves |= {f"{name}.weight": w, f"{name}.bias": b}
        merged |= {f"{name}.weight": mw, f"{name}.bias": mb}
    out = torch.func.functional_call(_net(), merged, (x,))
    return dict(zip(leaves, torch.autograd.grad(objective(out), list(leaves.values()))))


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


def test_denoise_loss_is_the_float64_sum_of_the_layers_losses():
    model = dk.convert(_net(), init="linear").train()
    x = torch.randn(4, 8, dtype=torch.float64)
    with _recording(model) as calls:
        torch.manual_seed(7)
        model(x)
    loss = dk.denoise_loss(model)
    want, _ = _oracle_losses(calls, 7)
    assert loss.dtype == torch.float64 and len(calls) == 7
    # The backends regenerate eps in float32 (their log / cos may round unlike torch's):
    # compare at the float32 level of the noise.
    assert_close(loss, want, 1e-6, 1e-9, "model loss")


def test_denoise_loss_refuses_a_model_without_denoising_layers():
    # A forgotten convert must not train silently without denoising.
    with pytest.raises(ValueError, match=r"denoise_loss: model has no denoising layers; call drep_kernels\.convert"):
        dk.denoise_loss(_net())
    model = dk.convert(_net()).eval()
    model(torch.randn(2, 8, dtype=torch.float64))
    zero = dk.denoise_loss(model)  # converted, but eval made no loss: a zero, legitimately
    assert zero.shape == () and zero.item() == 0.0 and not zero.requires_grad
    dk.fuse(model)
    for fn in (dk.denoise_loss, lambda m: dk.set_phase(m, "joint")):
        with pytest.raises(ValueError, match="has been fused"):
            fn(model)
    with pytest.raises(ValueError, match="has been fused"):
        dk.denoise_loss(dk.fuse(dk.DenoiseLinear(3, 2, t=1)))  # a bare layer, fused


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


def test_phase_plan_alternates_from_the_denoiser_phase():
    d, b = "denoiser", "backbone"
    assert dk.phase_plan(7, 2) == [d, d, b, b, d, d, b]
    assert dk.phase_plan(3, 10) == [d, d, d] and dk.phase_plan(0, 1) == []
    with pytest.raises(ValueError, match="phase_len >= 1"):
        dk.phase_plan(4, 0)


def test_phases_route_the_losses():
    model = dk.convert(_net(), init="linear").train()
    x = torch.randn(4, 8, dtype=torch.float64)
    dk.set_phase(model, "denoiser")
    with _recording(model) as calls:
        torch.manual_seed(3)
        task = model(x).square().mean()
    loss = dk.denoise_loss(model)
    want_loss, want_grads = _oracle_losses(calls, 3)
    assert_close(loss, want_loss, 1e-6, 1e-9, "denoising loss")
    (task + 0.01 * loss).backward()
    for name, layer in _layers(model):
        # Label-free: the loss alone reaches the denoiser, and nothing reaches the frozen backbone.
        # eps at float32 level: its rounding reaches a gradient element through terms of the
        # tensor's scale, which may cancel, hence an atol relative to that scale.
        got = (layer.denoise_weight.grad, layer.denoise_bias.grad)
        for what, grad, g in zip(("dW_d", "db_d"), got, want_grads[layer]):
            assert_close(grad, 0.01 * g, 1e-6, 1e-6 * 0.01 * float(g.abs().max()), f"{name} {what}")
        assert layer.weight.grad is None and layer.bias.grad is None
    model.zero_grad(set_to_none=True)
    dk.set_phase(model, "backbone")
    objective = lambda out: out.square().mean()  # noqa: E731
    objective(model(x)).backward()
    assert dk.denoise_loss(model).item() == 0.0  # not computed in the backbone phase
    want = _backbone_grads_through_the_merge(model, x, objective)
    for name, layer in _layers(model):
        assert_close(layer.weight.grad, want[f"{name}.weight"], 1e-10, 1e-13, f"{name} dW")
        assert_close(layer.bias.grad, want[f"{name}.bias"], 1e-10, 1e-13, f"{name} db")
        assert layer.denoise_weight.grad is None and layer.denoise_bias.grad is None


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


# --- plain checkpoints: the pretrained model's state dict, loaded after converting ----------

def _mlp():
    return nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 4)).double()


def _conv_net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, bias=False), nn.Flatten(),
        nn.Linear(5 * 4 * 4, 3),
    ).double()


PLAIN_MODELS = [
    pytest.param(_mlp, (nn.Linear,), (3, 6), id="mlp"),
    pytest.param(_conv_net, (nn.Linear, nn.Conv2d), (2, 3, 6, 6), id="convnet"),
]


def _zero_denoiser_merge(layer):
    """(W', b') of a layer whose denoiser is zero: M1/M2 give (c3 W, b) for a Linear, C1/C2
    give (c3 W, c3 b) for a Conv2d (it denoises its output, bias included)."""
    c3 = layer.coefficients.c3
    b = layer.bias
    if b is not None and isinstance(layer, dk.DenoiseConv2d):
        b = c3 * b
    return c3 * layer.weight, b


@pytest.mark.parametrize("make,include,x_shape", PLAIN_MODELS)
def test_plain_checkpoint_loads_into_a_converted_model(make, include, x_shape):
    torch.manual_seed(0)
    pretrained = make()
    torch.manual_seed(1)  # other weights: the load must replace them
    model = dk.convert(make(), include=include)
    steps = dk.timesteps(model)
    result = model.load_state_dict(pretrained.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert dk.timesteps(model) == steps
    for name, layer in _layers(model):
        assert int(layer.t) == steps[name] and layer.coefficients == layer.schedule.coefficients(steps[name])
        assert not layer.denoise_weight.any() and (layer.denoise_bias is None or not layer.denoise_bias.any())
    x = torch.randn(*x_shape, dtype=torch.float64)
    with torch.no_grad():
        got, want = model.eval()(x), pretrained(x)
        # A zero denoiser scales W by c3 (within 0.1% of 1 for these t): the pretrained function.
        assert_close(got, want, 3e-3, 1e-6, "converted vs pretrained")
        plain_merged = {}
        for name, layer in _layers(model):
            w, b = _zero_denoiser_merge(layer)
            plain_merged[f"{name}.weight"] = w
            if b is not None:
                plain_merged[f"{name}.bias"] = b
        exact = torch.func.functional_call(pretrained, plain_merged, (x,))
    assert_close(got, exact, 1e-12, 1e-13, "converted vs the analytic merge")


def test_plain_checkpoint_keeps_the_denoiser():
    torch.manual_seed(0)
    pretrained = _mlp()
    model = dk.convert(_mlp(), init="linear")
    denoiser_keys = {"denoise_weight", "denoise_bias", "t"}
    before = {k: v.clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[1] in denoiser_keys}
    assert len(before) == 6
    model.load_state_dict(pretrained.state_dict(), strict=True)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(torch.equal(after[k], v) for k, v in pretrained.state_dict().items())


@pytest.mark.parametrize("drop", ["0.t", "2.denoise_weight", "2.denoise_bias"])
def test_partial_denoiser_state_is_an_error_that_says_what_to_do(drop):
    converted = dk.convert(_mlp(), init="linear")
    sd = converted.state_dict()
    del sd[drop]
    layer = drop.split(".")[0]
    target = dk.convert(_mlp())
    before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith(layer + ".")}
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=rf"but not {drop}\. Give all of the denoiser's keys .* or none of them"):
            target.load_state_dict(sd, strict=strict)
    # Nothing of that layer was loaded: no denoiser paired with another step's t.
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())
