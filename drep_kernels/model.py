"""Model-level recipe: convert, number, collect losses, set phases, fuse, load checkpoints."""
from __future__ import annotations

import fnmatch
import functools
import logging
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .nn import DenoiseConv2d, DenoiseLinear
from .nn._denoise import FUSED
from .schedule import Schedule

DENOISE_TYPES: tuple[type, ...] = (DenoiseLinear, DenoiseConv2d)
_CONVERTIBLE: tuple[type, ...] = (nn.Linear, nn.Conv2d)
_log = logging.getLogger("drep_kernels")
_PHASES = ("denoiser", "backbone", "joint")


def _denoise_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DENOISE_TYPES)]


def _required_denoise_layers(model: nn.Module, caller: str) -> list[tuple[str, nn.Module]]:
    """The model's denoising layers; raises when there are none, since every caller would
    otherwise do nothing in silence (a forgotten convert trains without any denoising)."""
    layers = _denoise_layers(model)
    if layers:
        return layers
    if any(getattr(m, FUSED, False) for m in model.modules()):
        raise ValueError(
            f"{caller}: the model has been fused (drep_kernels.fuse) and has no denoising layers left; "
            f"call {caller} before fusing, or drep_kernels.convert(model) to denoise it again"
        )
    raise ValueError(f"{caller}: model has no denoising layers; call drep_kernels.convert(model) first")


def _excluded(name: str, module: nn.Module, exclude) -> bool:
    if exclude is None:
        return False
    if callable(exclude) and not isinstance(exclude, type):
        return bool(exclude(name, module))
    for item in exclude:
        if isinstance(item, type) and isinstance(module, item):
            return True
        if isinstance(item, str) and fnmatch.fnmatchcase(name, item):
            return True
    return False


def _forward_order(model: nn.Module, candidates: dict[int, str], example_inputs: Sequence[Any]) -> list[str]:
    """Names of the candidate modules in the order a forward pass first calls them."""
    order: list[str] = []
    seen: set[int] = set()

    def hook(module, _inputs):
        if id(module) not in seen:
            seen.add(id(module))
            order.append(candidates[id(module)])

    by_id = {id(m): m for m in model.modules()}
    handles = [by_id[i].register_forward_pre_hook(hook) for i in candidates]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    # Layers the example forward did not reach keep their registration order, after the rest.
    return order + [n for n in candidates.values() if n not in order]


def _weights_read_directly(model: nn.Module) -> dict[int, str]:
    """Layers whose owner reads their weight itself and never calls their forward, by id: a
    denoising layer there would make no loss and its merge would never be used in training,
    while fuse would put the merged weight there."""
    return {
        id(m.out_proj): "nn.MultiheadAttention reads out_proj.weight directly (its forward is never called)"
        for m in model.modules()
        if isinstance(m, nn.MultiheadAttention)
    }


def _cannot_convert(module: nn.Module, read_directly: Mapping[int, str]) -> Optional[str]:
    """Why this candidate layer is left as it is, or None if it can be converted."""
    if id(module) in read_directly:
        return read_directly[id(module)]
    if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward:
        return f"{type(module).__name__} overrides Linear's forward"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped conv (groups={module.groups}): W_d would mix the groups' filters"
        if type(module).forward is not nn.Conv2d.forward or type(module)._conv_forward is not nn.Conv2d._conv_forward:
            # e.g. a conv with dynamic "same" padding: DenoiseConv2d would drop that behaviour.
            return f"{type(module).__name__} overrides Conv2d's forward"
    return None


def _denoise_layer(module: nn.Module, **kwargs) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        return DenoiseConv2d.from_conv2d(module, **kwargs)
    return DenoiseLinear.from_linear(module, **kwargs)


def convert(
    model: nn.Module,
    *,
    schedule: Optional[Schedule] = None,
    include: Iterable[type] = (nn.Linear,),
    exclude: Union[None, Iterable[Union[str, type]], Callable[[str, nn.Module], bool]] = None,
    example_inputs: Optional[Sequence[Any]] = None,
    init: str = "zeros",
    label_augmented: bool = False,
) -> nn.Module:
    """Replace the model's layers by denoising layers, in place, and return the model.

    Converted layers are numbered globally: the i-th of N in forward order gets t = N - i
    (the layer nearest the input is the noisiest step). Forward order is the modules'
    registration order, or the order of a real forward pass when ``example_inputs`` is given.

    Args:
        include: layer types to convert: ``nn.Linear`` (default) and/or ``nn.Conv2d`` (and their
            subclasses). Left as they are, with the reason logged (logger ``"drep_kernels"``,
            level INFO): grouped convs; layers whose class overrides the forward (the denoising
            layer would drop that behaviour); layers whose owner reads their weight without
            calling them (``nn.MultiheadAttention.out_proj``).
        exclude: qualified-name glob patterns and/or types to skip, or a predicate(name, module).
        init, label_augmented: passed to each ``DenoiseLinear`` / ``DenoiseConv2d``.
    Raises:
        ValueError: the model is already converted, or N >= schedule.T_max.
    """
    schedule = schedule if schedule is not None else Schedule()
    include = tuple(include)
    unsupported = [t for t in include if not (isinstance(t, type) and issubclass(t, _CONVERTIBLE))]
    if unsupported:
        raise TypeError(f"include: only nn.Linear and nn.Conv2d can be converted, got {unsupported}")
    if _denoise_layers(model):
        raise ValueError("model is already converted (it holds denoising layers); convert it once")
    candidates: dict[int, str] = {}
    read_directly = _weights_read_directly(model)
    for name, module in model.named_modules():
        if isinstance(module, include) and not _excluded(name, module, exclude) and id(module) not in candidates:
            why_not = _cannot_convert(module, read_directly)
            if why_not is not None:
                _log.info("convert: leaving %s unconverted: %s", name or type(module).__name__, why_not)
                continue
            candidates[id(module)] = name
    names = (
        _forward_order(model, candidates, example_inputs)
        if example_inputs is not None
        else list(candidates.values())
    )
    n = len(names)
    if n >= schedule.T_max:
        raise ValueError(f"cannot convert {n} layers with T_max={schedule.T_max}: need N < T_max")
    converted: dict[int, nn.Module] = {}
    for i, name in enumerate(names):
        old = model.get_submodule(name)
        converted[id(old)] = _denoise_layer(
            old, t=n - i, schedule=schedule, init=init, label_augmented=label_augmented
        )
    _replace(model, converted)
    return model


def _replace(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    # Every parent slot that holds a replaced module is rewritten (shared modules included).
    for parent in model.modules():
        # parent._modules, not named_children(): the latter skips a module's second slot.
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])


def timesteps(model: nn.Module) -> dict[str, int]:
    """{qualified name: t} of every denoising layer."""
    return {name: m._t for name, m in _denoise_layers(model)}


def denoise_loss(model: nn.Module) -> Tensor:
    """Sum of the denoising losses the model's layers produced since the last call; clears them.

    Add ``lambda * denoise_loss(model)`` (the authors use lambda = 0.01) to the task loss.
    The sum is 0-d, in the layers' loss dtype (float32; float64 for float64 layers). Returns a
    0-d float32 zero when the layers produced no loss (eval, no_grad, backbone phase).

    Raises:
        ValueError: the model has no denoising layers: it was never converted
            (``drep_kernels.convert``) or it has been fused.
    """
    losses = []
    for _, layer in _required_denoise_layers(model, "denoise_loss"):
        loss = layer.take_loss()
        if loss is not None:
            losses.append(loss)
    if not losses:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else "cpu")
    dtype = functools.reduce(torch.promote_types, (loss.dtype for loss in losses))
    return torch.stack([loss.to(dtype) for loss in losses]).sum()


def set_phase(model: nn.Module, phase: str) -> nn.Module:
    """Set requires_grad for a training phase, by module type (never by parameter name).

    - ``"denoiser"``: only the denoisers train (label-free: the loss alone reaches them).
    - ``"backbone"``: denoisers frozen; everything else trains through (W', b').
    - ``"joint"``: both.

    Raises:
        ValueError: an unknown phase, or a model without denoising layers (never converted,
            or fused).
    """
    if phase not in _PHASES:
        raise ValueError(f"phase must be one of {_PHASES}, got {phase!r}")
    layers = _required_denoise_layers(model, "set_phase")
    denoiser_ids = {id(p) for _, m in layers for p in m.denoiser_parameters()}
    for p in model.parameters():
        is_denoiser = id(p) in denoiser_ids
        p.requires_grad_(phase == "joint" or (phase == "denoiser") == is_denoiser)
    for _, layer in layers:
        layer._phase = phase
    return model


def phase_plan(epochs: int, phase_len: int) -> list[str]:
    """The phase of each epoch in the authors' recipe: ``phase_len`` epochs of ``"denoiser"``,
    then as many of ``"backbone"``, alternating (they use 10)."""
    if epochs < 0 or phase_len < 1:
        raise ValueError(f"need epochs >= 0 and phase_len >= 1, got {epochs} and {phase_len}")
    return [("denoiser", "backbone")[(e // phase_len) % 2] for e in range(epochs)]


def fuse(model: nn.Module) -> nn.Module:
    """Replace every denoising layer by its plain deployable layer holding (W', b'), in place.

    Idempotent; the fused model has the original architecture, parameter count and FLOPs.
    A bare denoising layer (no parent) is returned fused.
    """
    if isinstance(model, DENOISE_TYPES):
        return model.to_plain()
    _replace(model, {id(m): m.to_plain() for _, m in _denoise_layers(model)})
    return model


# --- checkpoints of the authors' public code ----------------------------------------------

def _sinusoid(t: int, dim: int, dtype=torch.float64) -> Tensor:
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -(math.log(10000.0) / (half - 1)))
    angles = t * freqs
    return torch.cat((angles.sin(), angles.cos()))


def _time_embedding(sd: Mapping[str, Tensor], prefix: str, t: int) -> Tensor:
    """e_t = Linear2(GELU(Linear1(sinusoid(t)))), the public code's time MLP, in float64."""
    w1, b1 = sd[prefix + "time_mlp.1.weight"].double(), sd[prefix + "time_mlp.1.bias"].double()
    w2, b2 = sd[prefix + "time_mlp.3.weight"].double(), sd[prefix + "time_mlp.3.bias"].double()
    h = F.gelu(F.linear(_sinusoid(t, w1.shape[1]), w1, b1))
    return F.linear(h, w2, b2)


def load_reference_state_dict(module_or_model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load a checkpoint saved by the authors' public code into converted layers.

    Per layer it expects ``weight``, ``bias``, ``dm.weight``, ``dm.bias``, ``time_mlp.{1,3}.*``
    and optionally the schedule buffers (``betas``, ``alphas_cumprod``, ...). The time
    embedding is folded into the denoise bias once, at the layer's own t:
    b_d <- dm.bias + dm.weight e_t (docs/method.md, section 5, T1). Other keys are loaded
    as they are; the load is strict.
    """
    layers = _required_denoise_layers(module_or_model, "load_reference_state_dict")
    out: dict[str, Tensor] = dict(state_dict)
    for name, layer in layers:
        prefix = f"{name}." if name else ""
        if isinstance(layer, DenoiseConv2d):
            raise ValueError(
                f"{prefix or 'layer'} is a DenoiseConv2d: the public code's Conv2d denoiser is not a "
                "reverse step (docs/method.md, Conv2d) and cannot be loaded into one"
            )
        if prefix + "dm.weight" not in state_dict:
            raise KeyError(f"{prefix}dm.weight missing: not a checkpoint of the reference layout")
        betas = state_dict.get(prefix + "betas")
        if betas is not None:
            ours = layer.schedule.betas
            if betas.shape != ours.shape or not torch.allclose(betas.double(), ours, rtol=1e-5, atol=1e-9):
                raise ValueError(f"{prefix}betas: the checkpoint's schedule differs from {layer.schedule}")
        w_d = state_dict[prefix + "dm.weight"].double()
        b_d = state_dict[prefix + "dm.bias"].double()
        if prefix + "time_mlp.1.weight" in state_dict:
            b_d = b_d + w_d @ _time_embedding(state_dict, prefix, layer._t)
        if layer.denoise_bias is None:
            raise ValueError(
                f"{prefix or 'layer'} has no bias, but the reference denoiser has one (dm.bias and the "
                "time embedding); convert this layer with a bias to load it"
            )
        for key in list(out):
            if key.startswith(prefix) and key[len(prefix):].split(".")[0] in _REFERENCE_ONLY:
                del out[key]
        out[prefix + "denoise_weight"] = w_d.to(layer.denoise_weight.dtype)
        out[prefix + "denoise_bias"] = b_d.to(layer.denoise_bias.dtype)
        out[prefix + "t"] = layer.t.detach().clone()
    module_or_model.load_state_dict(out, strict=True)
    return module_or_model


# Keys of the reference layer that have no counterpart here (folded or derived from t).
_REFERENCE_ONLY = {
    "dm",
    "time_mlp",
    "betas",
    "sqrt_betas",
    "alphas",
    "sqrt_alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
}
