"""DenoiseLinear: drop-in surface, exact function, caching, losses, gradients vs the formulas."""
import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import oracle
from conftest import assert_close
from drep_kernels import DenoiseLinear, Schedule, rng
from drep_kernels.backends import NAMES, implements

# Every backend whose merge runs on CPU tensors here: torch, the C++ kernels, and Triton under
# its interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU).
MERGE_BACKENDS = [b for b in NAMES if implements(b, "merge_weights", "cpu")]


def _layer(k=6, out=4, bias=True, t=3, init="linear", dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return DenoiseLinear(k, out, bias, t=t, init=init, dtype=dtype, **kw)


def test_is_a_linear_with_the_documented_state():
    layer = _layer()
    assert isinstance(layer, nn.Linear)
    assert set(layer.state_dict()) == {"weight", "bias", "t", "denoise_weight", "denoise_bias"}
    assert layer.denoise_weight.shape == (6, 6) and layer.denoise_bias.shape == (6,)
    assert int(layer.t) == 3 and "t=3" in repr(layer)
    no_bias = _layer(bias=False)
    assert no_bias.denoise_bias is None and "denoise_bias" not in no_bias.state_dict()


def test_zero_init_is_the_pretrained_function_up_to_c3():
    torch.manual_seed(1)
    linear = nn.Linear(8, 5, dtype=torch.float64)
    layer = DenoiseLinear.from_linear(copy.deepcopy(linear), t=10).eval()
    x = torch.randn(3, 8, dtype=torch.float64)
    c3 = Schedule().coefficients(10).c3
    assert abs(c3 - 1) < 1e-3
    with torch.no_grad():
        assert_close(layer(x), c3 * (x @ linear.weight.T) + linear.bias, 1e-13, 1e-13, "zero-init output")


def test_from_linear_reuses_parameters_and_refuses_twice():
    linear = nn.Linear(4, 3)
    layer = DenoiseLinear.from_linear(linear, t=2)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    with pytest.raises(TypeError, match="already a DenoiseLinear"):
        DenoiseLinear.from_linear(layer, t=2)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_denoise_then_layer_in_train_and_eval(bias):
    layer = _layer(bias=bias)
    co = layer.coefficients
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    want = oracle.two_step(x, layer.weight, layer.bias, layer.denoise_weight, layer.denoise_bias, co.c1, co.c3)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    assert_close(y_train, want, 1e-12, 1e-12, "train output")
    assert_close(y_eval, want, 1e-12, 1e-12, "eval output")
    linear = layer.to_linear()
    assert type(linear) is nn.Linear and (linear.bias is None) == (not bias)
    assert_close(linear(x), want, 1e-12, 1e-12, "to_linear output")


def _oracle_merge(layer):
    co = layer.coefficients
    return oracle.merge(layer.weight, layer.bias, layer.denoise_weight, layer.denoise_bias, co.c1, co.c3)


def test_merge_is_cached_until_a_parameter_changes():
    layer = _layer().eval()
    with torch.no_grad():
        w1, _ = layer.merged_weight_and_bias()
        w2, _ = layer.merged_weight_and_bias()
        assert w1 is w2
        layer.denoise_weight.add_(0.1)
        w3, b3 = layer.merged_weight_and_bias()
        want_w, want_b = _oracle_merge(layer)
    assert_close(w3, want_w, 1e-12, 1e-14, "W' after the change")
    assert_close(b3, want_b, 1e-12, 1e-14, "b' after the change")


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_merge_cache_follows_grad_mode(no_grad):
    # A merge made without autograd must not be reused by the next training forward: W would
    # then get no gradient at all.
    layer = _layer().train()
    for p in layer.denoiser_parameters():
        p.requires_grad_(False)  # backbone phase: the task gradient only, through M1/M2
    x = torch.randn(3, 6, dtype=torch.float64)
    with no_grad():
        layer(x)
    layer(x).sum().backward()
    assert layer.weight.grad is not None, "the training forward reused a merge made without autograd"
    w, b = (p.detach().clone().requires_grad_(True) for p in (layer.weight, layer.bias))
    co = layer.coefficients
    want = torch.autograd.grad(
        oracle.two_step(x, w, b, layer.denoise_weight, layer.denoise_bias, co.c1, co.c3).sum(), [w, b]
    )
    assert_close(layer.weight.grad, want[0], 1e-12, 1e-13, "dW")
    assert_close(layer.bias.grad, want[1], 1e-12, 1e-13, "db")


@pytest.mark.parametrize("backend", MERGE_BACKENDS)
def test_label_augmented_denoise_bias_alone_gets_its_merge_gradient(backend, monkeypatch):
    # W_d frozen, b_d trainable: the merge's backward must still compute db_d (M5), not only
    # when dW_d is asked for too.
    monkeypatch.setenv("DREP_BACKEND", backend)
    layer = _layer(k=5, out=7, label_augmented=True).eval()  # eval: the task gradient alone
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    layer.denoise_weight.requires_grad_(False)
    x = torch.randn(4, 5, dtype=torch.float64)
    g = torch.randn(4, 7, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    b_d = layer.denoise_bias.detach().clone().requires_grad_(True)
    co = layer.coefficients
    mw, mb = oracle.merge(layer.weight, layer.bias, layer.denoise_weight, b_d, co.c1, co.c3)
    want = torch.autograd.grad((F.linear(x, mw, mb) * g).sum(), b_d)[0]
    assert layer.denoise_weight.grad is None
    assert_close(layer.denoise_bias.grad, want, 1e-12, 1e-13, f"db_d ({backend})")


def _joint_step_grads(layer, x, lam):
    """Gradients of sum(y) + lam * loss from the module."""
    import drep_kernels

    y = layer(x)
    loss = drep_kernels.denoise_loss(layer)
    return torch.autograd.grad(y.sum() + lam * loss, [layer.weight, layer.bias, layer.denoise_weight, layer.denoise_bias])


@pytest.mark.parametrize("label_augmented", [False, True])
def test_module_gradients_match_a_plain_transcription(label_augmented):
    layer = _layer(label_augmented=label_augmented).train()
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    torch.manual_seed(42)
    got = _joint_step_grads(layer, x, 0.01)
    torch.manual_seed(42)  # the module draws its noise seed from the default generator
    eps = rng.normal(int(rng.draw_seed()), 12, 6).double().reshape(3, 4, 6)
    w, b, wd, bd = (p.detach().clone().requires_grad_(True) for p in (layer.weight, layer.bias, layer.denoise_weight, layer.denoise_bias))
    co = layer.coefficients
    route_wd, route_bd = (wd, bd) if label_augmented else (wd.detach(), bd.detach())
    y = oracle.two_step(x, w, b, route_wd, route_bd, co.c1, co.c3)
    obj = y.sum() + 0.01 * oracle.denoise_loss(x, wd, bd, co.a, co.s, eps)
    want = torch.autograd.grad(obj, [w, b, wd, bd])
    for name, g, e in zip(("dW", "db", "dW_d", "db_d"), got, want):
        assert_close(g, e, 1e-6, 1e-9, name)  # eps is float32 noise: compare at float32 level


def test_backbone_phase_computes_no_loss():
    import drep_kernels

    layer = _layer().train()
    for p in layer.denoiser_parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 6, dtype=torch.float64)
    y = layer(x)
    assert layer._stash is None
    assert drep_kernels.denoise_loss(layer).item() == 0.0
    y.sum().backward()
    w = layer.weight.detach().clone().requires_grad_(True)
    co = layer.coefficients
    want = torch.autograd.grad(
        oracle.two_step(x, w, layer.bias.detach(), layer.denoise_weight, layer.denoise_bias, co.c1, co.c3).sum(), w
    )[0]
    assert_close(layer.weight.grad, want, 1e-12, 1e-13, "dW")


def test_gradient_accumulation_reuses_the_cached_merge():
    layer = _layer().train()
    for p in layer.denoiser_parameters():
        p.requires_grad_(False)
    x1, x2 = torch.randn(2, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    layer(x1).sum().backward()
    w_cached = layer._merge_cache[1]
    layer(x2).sum().backward()  # second backward through the same cached merge
    assert layer._merge_cache[1] is w_cached
    acc = layer.weight.grad.clone()
    layer.weight.grad = None
    fresh = _layer().train()
    for p in fresh.denoiser_parameters():
        p.requires_grad_(False)
    (fresh(x1).sum() + fresh(x2).sum()).backward()
    assert_close(acc, fresh.weight.grad, 1e-12, 1e-12, "accumulated dW")


def test_an_unread_loss_keeps_no_graph_alive(monkeypatch):
    seen = []
    layer = _layer(dtype=torch.float32).train()
    real = layer._loss_terms

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(weakref.ref(out[0]))  # the loss the op returned
        return out

    monkeypatch.setattr(layer, "_loss_terms", spy)
    x = torch.randn(4, 6, requires_grad=True)
    for _ in range(3):
        layer(x).sum().backward()  # the task loss only: the denoising loss is never read
    gc.collect()
    assert len(seen) == 3 and all(ref() is None for ref in seen), "an unread loss is still alive"
    value, grad_dw, grad_db = layer._stash
    assert all(t.grad_fn is None and not t.requires_grad for t in (value, grad_dw, grad_db))
    assert grad_dw.shape == (6, 6)  # bounded: one accumulator, however many forwards


def test_stale_losses_are_dropped_with_a_warning():
    layer = _layer(dtype=torch.float32).train()
    x = torch.randn(4, 6)
    layer(x)
    with torch.no_grad():
        layer.denoise_weight.add_(1.0)  # e.g. an optimizer step before the loss was read
    torch.manual_seed(5)  # same noise for the two forwards below
    with pytest.warns(UserWarning, match="never collected"):
        layer(x)
    import drep_kernels

    only_new = drep_kernels.denoise_loss(layer)
    torch.manual_seed(5)
    layer(x)
    assert torch.equal(only_new, drep_kernels.denoise_loss(layer))  # one loss, not two


def test_unread_losses_are_summed_and_handed_over_once():
    import drep_kernels

    layer = _layer().train()
    x1, x2 = torch.randn(4, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)

    def loss_of(*forwards):
        # One explicit seed per forward: the layer draws its noise seed from torch's generator.
        for seed, x in forwards:
            torch.manual_seed(seed)
            layer(x)
        loss = drep_kernels.denoise_loss(layer)
        grads = torch.autograd.grad(loss, layer.denoiser_parameters())
        return loss, grads

    total, total_grads = loss_of((1, x1), (2, x2))
    assert drep_kernels.denoise_loss(layer).item() == 0.0  # handed over once, then cleared
    first, first_grads = loss_of((1, x1))
    second, second_grads = loss_of((2, x2))
    assert_close(total, first + second, 1e-14, 0.0, "summed loss")
    for name, got, a, b in zip(("dW_d", "db_d"), total_grads, first_grads, second_grads):
        assert_close(got, a + b, 1e-13, 1e-15, f"summed {name}")


def test_state_dict_round_trip_and_t_reload():
    layer = _layer(t=3)
    other = DenoiseLinear(6, 4, t=9, dtype=torch.float64)
    other.load_state_dict(layer.state_dict())
    assert other._t == 3 and other.coefficients == layer.coefficients
    x = torch.randn(2, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(other.eval()(x), layer.eval()(x))


def test_deepcopy_of_a_training_layer():
    layer = _layer(dtype=torch.float32).train()
    layer(torch.randn(2, 6))  # leaves a differentiable cache and a pending loss
    clone = copy.deepcopy(layer)
    assert clone._stash is None and clone._merge_cache is None


@pytest.mark.parametrize("t", [0, 1000])
def test_bad_t(t):
    with pytest.raises(ValueError, match="t must satisfy"):
        DenoiseLinear(3, 3, t=t)


def test_bad_init():
    with pytest.raises(ValueError, match="init must be one of"):
        DenoiseLinear(3, 3, t=1, init="randn")


def test_float32_layer_against_float64():
    layer = _layer(k=127, out=33, dtype=torch.float32).eval()
    x = torch.randn(5, 127)
    co = layer.coefficients
    p64 = [p.double() if p is not None else None for p in (layer.weight, layer.bias, layer.denoise_weight, layer.denoise_bias)]
    want = oracle.two_step(x.double(), *p64, co.c1, co.c3)
    with torch.no_grad():
        assert_close(layer(x), want, 1e-4, 1e-5, "float32 layer")
