"""The precision policy of the denoising loss and the merge: which dtype every operand, product
and sum has, for each input dtype and where the GEMMs run (docs/method.md, "Precision"). Every
backend takes its dtypes from here; the torch backend applies the same roundings, so it is the
oracle of each policy.

Where the GEMMs run on tensor cores (the cuda and triton backends, and the torch backend on
CUDA tensors):

=====================  ==================  ==========================  =====================
input dtype            eps; GEMM operands  accumulation, loss, sums,   float32 GEMMs
                       (x_noisy, W_d, G')  dL/dW_d, dL/db_d
=====================  ==================  ==========================  =====================
bfloat16 / float16     the input dtype     float32                     -
float32                float32             float32                     TF32 iff torch's own
                                                                       float32 matmuls use it
float64                float64             float64                     -
=====================  ==================  ==========================  =====================

eps is rounded once to the GEMM dtype, as the authors' eager code draws it under autocast
(``torch.randn_like`` of bf16 activations); x_noisy = a x + s eps is formed from that eps in the
accumulation dtype and rounded once to the GEMM dtype, as the eager code's ``F.linear`` gets it
in bf16; D = p + b_d - eps and its sums stay in the accumulation dtype.
G' = sign(D) + 2 D (L2 without its 1 / (M K)) is rounded to the GEMM dtype for GEMM 2; float16
stores G' 2^-14 (``grad_scale``; every non-zero |G'| is at least 1, so the scaled value loses no
bits) and saturates at float16's largest finite value, so G' overflows only past |D| ~ 5.4e8.
dL/db_d sums G' before that rounding. TF32 follows ``torch.backends.cuda.matmul`` exactly: the
user's choice for torch's float32 matmuls is the backend's too, and nothing changes unless it
is made.

On the CPU (the cpu backend, the torch backend on CPU tensors) half-precision inputs are
computed in float32 throughout, eps, x_noisy and G' included: the CPU GEMMs are float32 BLAS,
and rounding their operands would cost accuracy and gain nothing.
"""
from __future__ import annotations

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)

# float16's G' scale (see the module doc) and largest finite value.
GRAD_SCALE = {torch.float16: 2.0**-14}
FLOAT16_MAX = 65504.0


# Backends whose GEMMs run on tensor cores (Triton's kernels are GPU kernels even when
# TRITON_INTERPRET=1 runs them on the CPU: they keep their GPU rounding there).
TENSOR_CORE_BACKENDS = ("cuda", "triton")


def on_tensor_cores(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` runs the GEMMs of tensors on ``device`` on tensor cores."""
    return backend in TENSOR_CORE_BACKENDS or (backend == "torch" and device.type == "cuda")


def gemm_dtype(dtype: torch.dtype, tensor_cores: bool) -> torch.dtype:
    """The dtype of both GEMMs' operands for inputs of ``dtype``: the input dtype on tensor
    cores, else the accumulation dtype."""
    return dtype if tensor_cores else accumulate_dtype(dtype)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation, loss, partial sums and gradients: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_scale(gemm: torch.dtype) -> float:
    """The factor G' is stored with in the GEMM dtype ``gemm`` (2^-14 for float16, else 1)."""
    return GRAD_SCALE.get(gemm, 1.0)


def float32_uses_tf32() -> bool:
    """Whether torch runs float32 CUDA matmuls on TF32 tensor cores (its float32 matmul
    precision setting: ``torch.backends.cuda.matmul.fp32_precision = "tf32"``, or the older
    ``allow_tf32`` / ``torch.set_float32_matmul_precision("high")``)."""
    try:
        p = torch.backends.cuda.matmul.fp32_precision
        if p == "none":  # inherits the global setting
            p = torch.backends.fp32_precision
        return p == "tf32"
    except (AttributeError, RuntimeError):  # torch without the fp32_precision API
        return bool(torch.backends.cuda.matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for GEMM operands of ``dtype``: "tf32" for float32 exactly
    when torch would use TF32, else "ieee" (bf16 / fp16 run on tensor cores either way)."""
    return "tf32" if dtype == torch.float32 and float32_uses_tf32() else "ieee"


def tensor_core_dot(gemm: torch.dtype) -> bool:
    """Whether a Triton dot of operands of dtype ``gemm`` runs on tensor cores: bf16 / fp16
    always, float32 exactly when it is TF32 (``dot_precision``); float64 never."""
    return gemm in HALF_DTYPES or dot_precision(gemm) == "tf32"


def scaled_grad(grad_loss: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad_loss * grad (a gradient the loss computed in forward, float32 / float64) rounded
    once to the parameter dtype ``dtype``: the product is formed in grad's dtype and rounded on
    the store, in one kernel. Where that kernel cannot serve (a differentiable backward, with
    create_graph, or a batched one, under vmap: an out= op has neither a derivative nor a
    batching rule) the product is cast afterwards: the same single rounding, one launch more."""
    if grad.dtype == dtype:
        return grad_loss * grad
    if torch.is_grad_enabled():
        return (grad_loss * grad).to(dtype)
    try:
        return torch.mul(grad_loss, grad, out=torch.empty_like(grad, dtype=dtype))
    except RuntimeError:  # batched (vmap; autograd.grad's is_grads_batched is not detectable)
        return (grad_loss * grad).to(dtype)


def round_to_gemm(t: torch.Tensor, gemm: torch.dtype) -> torch.Tensor:
    """``t`` (accumulation dtype) rounded once to the GEMM dtype ``gemm``, back in ``t``'s dtype
    (the torch backend's, and the tests', form of the policy's operand rounding)."""
    return t.to(gemm).to(t.dtype)


def grad_to_gemm(g: torch.Tensor, gemm: torch.dtype) -> torch.Tensor:
    """G' (accumulation dtype) as stored for GEMM 2: times ``grad_scale(gemm)``, in ``gemm``
    (float16 saturating at its largest finite value; NaN stays NaN)."""
    if gemm == torch.float16:
        g = torch.where(g.isnan(), g, (g * grad_scale(gemm)).clamp(-FLOAT16_MAX, FLOAT16_MAX))
    return g.to(gemm)
