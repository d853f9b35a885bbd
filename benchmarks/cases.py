"""The setup factory: one ``Case`` per Spec, shared by the speed run and the memory run.

A Case holds the shared parameters, ``n_sets`` input sets (rotated between calls on CUDA so
that no call finds its activations in L2; parameters are shared, as in a training loop) and
three callables: ``forward(*set) -> out``, ``backward(out)`` (None for a forward-only mode) and
``reset()`` (untimed: drops the .grad the last call left, so calls do not accumulate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import drep_kernels
from drep_kernels import ops
from drep_kernels.backends import select
from drep_kernels.nn import DenoiseLinear
from drep_kernels.schedule import Schedule

from . import baselines
from .shapes import TOKENS, Spec, torch_dtype

STEP = 12  # the diffusion step of the benchmarked layer (speed does not depend on it)
LAMBDA = 0.01  # weight of the denoising loss in the training objective (the authors' value)


@dataclass
class Case:
    forward: Callable[..., Any]
    backward: Optional[Callable[[Any], None]]
    sets: list[tuple]
    reset: Callable[[], None]
    owned: list[Tensor]  # parameters and inputs: they exist anyway, saved or not
    flop: Optional[float]  # the work every contender of the group must do; None: not comparable
    info: dict = field(default_factory=dict)

    def run(self, i: int = 0) -> None:
        out = self.forward(*self.sets[i % len(self.sets)])
        if self.backward is not None:
            self.backward(out)


def _grads_to_none(tensors) -> Callable[[], None]:
    tensors = [t for t in tensors if t is not None]

    def reset() -> None:
        for t in tensors:
            t.grad = None

    return reset


def n_sets(set_bytes: int, device: str) -> int:
    """Input sets to rotate: enough to cover twice the L2 on CUDA; one set on CPU."""
    if device != "cuda" or set_bytes <= 0:
        return 1
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2 = getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20
    free, _ = torch.cuda.mem_get_info()
    by_cache = math.ceil(2 * l2 / set_bytes)
    by_memory = max(1, int(0.25 * free // set_bytes))
    return max(1, min(by_cache, by_memory, 64))


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


def _make_sets(make: Callable[[torch.Generator], tuple], spec: Spec) -> list[tuple]:
    gen = torch.Generator(device=spec.device).manual_seed(1234)
    first = make(gen)
    return [first] + [make(gen) for _ in range(n_sets(_nbytes(first), spec.device) - 1)]


def _randn(gen, *shape, spec: Spec, scale: float = 1.0) -> Tensor:
    t = torch.randn(*shape, generator=gen, device=spec.device, dtype=torch.float32) * scale
    return t.to(torch_dtype(spec.dtype))


def _compile(fn, contender: str):
    # A fresh Dynamo state per case: shapes stay static (no automatic-dynamic recompile
    # carried over from the previous case) and compile time lands in the untimed warm-up.
    torch._dynamo.reset()
    mode = "max-autotune" if contender == "compile-max-autotune" else None
    return torch.compile(fn, mode=mode)


def _autocast_dtype(spec: Spec) -> Optional[torch.dtype]:
    """bf16 / fp16 on CUDA: the dtype the authors' eager baseline runs in under autocast."""
    dt = torch_dtype(spec.dtype)
    return dt if spec.device == "cuda" and dt in (torch.bfloat16, torch.float16) else None


def _param_dtype(spec: Spec) -> torch.dtype:
    """Parameters of an autocast contender stay float32; otherwise they have the row's dtype."""
    return torch.float32 if _autocast_dtype(spec) is not None else torch_dtype(spec.dtype)


def _under_autocast(fn: Callable, spec: Spec) -> Callable:
    """``fn`` under torch.autocast in the row's dtype (bf16 / fp16 rows on CUDA: how the
    authors' code trains in half precision, and so the baseline of those rows), else ``fn``."""
    dtype = _autocast_dtype(spec)
    if dtype is None:
        return fn

    def run(*args):
        with torch.autocast(spec.device, dtype=dtype):
            return fn(*args)

    return run


# --- denoising loss: forward + backward ----------------------------------------------------

def loss_case(spec: Spec) -> Case:
    M, K = spec.shape.M, spec.shape.K
    dt, dev = torch_dtype(spec.dtype), spec.device
    co = Schedule().coefficients(STEP)
    flop = 4.0 * M * K * K
    gen = torch.Generator(device=dev).manual_seed(0)
    c = spec.contender
    if c == "floor":
        w = _randn(gen, K, K, spec=spec, scale=K**-0.5)
        sets = _make_sets(lambda g: (_randn(g, M, K, spec=spec), _randn(g, M, K, spec=spec)), spec)
        return Case(lambda x, g: baselines.floor_loss(x, w, g), None, sets, lambda: None, [w], flop)
    sets = _make_sets(lambda g: (_randn(g, M // TOKENS, TOKENS, K, spec=spec),), spec)
    if c in ("eager", "compile", "compile-max-autotune"):
        # bf16 / fp16 rows: the authors' code as it trains in that dtype, float32 parameters
        # under autocast (see _under_autocast).
        den = baselines.ReferenceDenoiser(K, STEP, device=dev, dtype=_param_dtype(spec))
        loss = _under_autocast(den.loss, spec)
        fn = loss if c == "eager" else _compile(loss, c)
        params = list(den.parameters())
        return Case(fn, lambda loss: loss.backward(), sets, _grads_to_none(params), params, flop)
    # drep[<backend>]: the environment (DREP_BACKEND) picks the backend; see the test.
    w_d = nn.Parameter(_randn(gen, K, K, spec=spec, scale=K**-0.5))
    b_d = nn.Parameter(_randn(gen, K, spec=spec, scale=0.01))

    def forward(x):
        return ops.denoise_loss(x, w_d, b_d, co.a, co.s)

    info = {"backend_used": select("denoise_loss", torch.device(dev))}
    return Case(forward, lambda loss: loss.backward(), sets, _grads_to_none([w_d, b_d]), [w_d, b_d], flop, info)


# --- merge: forward, or forward + backward in the backbone phase -------------------------

def merge_case(spec: Spec) -> Case:
    out, K = spec.shape.out, spec.shape.K
    dev = spec.device
    co = Schedule().coefficients(STEP)
    full = spec.mode == "full"
    flop = (4.0 if full else 2.0) * out * K * K
    c = spec.contender

    def make(g):
        W = _randn(g, out, K, spec=spec, scale=K**-0.5).requires_grad_(full)
        b = _randn(g, out, spec=spec, scale=0.01).requires_grad_(full)
        w_d = _randn(g, K, K, spec=spec, scale=K**-0.5)
        b_d = _randn(g, K, spec=spec, scale=0.01)
        grads = (_randn(g, out, K, spec=spec), _randn(g, out, spec=spec)) if full else ()
        return (W, b, w_d, b_d) + grads

    sets = _make_sets(make, spec)
    owned = [t for s in sets for t in s]
    reset = _grads_to_none(t for s in sets for t in s[:2])
    if c == "floor":
        if full:
            fn = lambda W, b, w_d, b_d, gW, gb: baselines.floor_merge_backward(W.detach(), w_d, gW, co.c1, co.c3)
        else:
            fn = lambda W, b, w_d, b_d: baselines.floor_merge(W, w_d, co.c1, co.c3)
        return Case(fn, None, sets, reset, owned, flop)
    if c in ("eager", "compile", "compile-max-autotune"):
        # The public code indexes c1, c3 out of its schedule buffers at every merge.
        tables = baselines.schedule_tables(device=dev, dtype=torch_dtype(spec.dtype))
        c1_table, c3_table = tables["c1"], tables["c3"]

        def merge(W, b, w_d, b_d):
            return baselines.reference_merge_tensors(W, b, w_d, b_d, c1_table[STEP], c3_table[STEP])

        fn = merge if c == "eager" else _compile(merge, c)
        info = {}
    else:
        def fn(W, b, w_d, b_d):
            return ops.merge_weights(W, b, w_d, b_d, co.c1, co.c3)

        info = {"backend_used": select("merge_weights", torch.device(dev))}
    if not full:
        return Case(fn, None, sets, reset, owned, flop, info)

    def forward(W, b, w_d, b_d, gW, gb):
        return fn(W, b, w_d, b_d), (gW, gb)

    def backward(out_and_grads):
        merged, grads = out_and_grads
        torch.autograd.backward(merged, grads)

    return Case(forward, backward, sets, reset, owned, flop, info)


# --- a converted layer's training step, and inference ---------------------------------------

def _linear(spec: Spec, seed: int = 0, dtype: Optional[torch.dtype] = None) -> nn.Linear:
    torch.manual_seed(seed)
    dtype = dtype if dtype is not None else torch_dtype(spec.dtype)
    return nn.Linear(spec.shape.K, spec.shape.out, device=spec.device, dtype=dtype)


def step_case(spec: Spec) -> Case:
    """forward, task loss + 0.01 * denoising loss, backward, SGD step.

    The SGD step changes the trained parameters, so a merge cached on their versions is
    recomputed every step, as in training. Denoiser phase: backbone frozen, the input needs no
    gradient (nothing before the layer trains). Backbone phase: the input needs its gradient
    (the layers before train too). The plain nn.Linear reference trains W, b and the input.
    bf16 / fp16 rows on CUDA train as mixed precision does: float32 parameters, the forward
    under autocast, for every contender alike."""
    M, K = spec.shape.M, spec.shape.K
    phase, c = spec.mode, spec.contender
    x_grad = c == "linear" or phase == "backbone"

    def make(g):
        x = _randn(g, M // TOKENS, TOKENS, K, spec=spec).requires_grad_(x_grad)
        return x, _randn(g, M // TOKENS, TOKENS, spec.shape.out, spec=spec)

    sets = _make_sets(make, spec)
    lin = _linear(spec, dtype=_param_dtype(spec))
    info = {}
    if c == "linear":
        model = lin

        def forward(x, target):
            return F.mse_loss(model(x), target)
    elif c == "eager":
        model = baselines.ReferenceDenoiseLinear(lin, STEP)
        model.set_phase(phase)

        def forward(x, target):
            return F.mse_loss(model(x), target) + LAMBDA * model.take_loss()
    else:
        model = DenoiseLinear.from_linear(lin, STEP, init="linear")
        drep_kernels.set_phase(model, phase)
        dev = torch.device(spec.device)
        info = {"backend_used": f"loss={select('denoise_loss', dev)},merge={select('merge_weights', dev)}"}

        def forward(x, target):
            return F.mse_loss(model(x), target) + LAMBDA * drep_kernels.denoise_loss(model)

    forward = _under_autocast(forward, spec)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-6)

    def backward(loss):
        loss.backward()
        opt.step()

    reset = _grads_to_none(params + [s[0] for s in sets])
    owned = list(model.parameters()) + [t for s in sets for t in s]
    return Case(forward, backward, sets, reset, owned, None, info)


def inference_case(spec: Spec) -> Case:
    """The deployed layer: plain nn.Linear, the fused DenoiseLinear, DenoiseLinear in eval."""
    M, K, out = spec.shape.M, spec.shape.K, spec.shape.out
    sets = _make_sets(lambda g: (_randn(g, M // TOKENS, TOKENS, K, spec=spec),), spec)
    lin = _linear(spec)
    c = spec.contender
    if c == "linear":
        model = lin
    else:
        layer = DenoiseLinear.from_linear(lin, STEP, init="linear").eval()
        model = layer if c == "drep[eval]" else drep_kernels.fuse(layer)
    model.eval()

    @torch.no_grad()
    def forward(x):
        return model(x)

    info = {"module": type(model).__name__}
    return Case(forward, None, sets, lambda: None, list(model.parameters()), 2.0 * M * K * out, info)


FACTORIES = {
    "denoise_loss": loss_case,
    "merge_weights": merge_case,
    "train_step": step_case,
    "host_step": step_case,
    "inference": inference_case,
}


def make_case(spec: Spec) -> Case:
    return FACTORIES[spec.op](spec)
