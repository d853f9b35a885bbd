"""The ``triton`` backend: Triton kernels for the denoising loss and the weight merge.

Kernel functions with the torch backend's signatures and semantics
(``drep_kernels/backends/reference.py``):

- ``denoise_loss_fwd``   (denoise_loss.py): L1 and L2; per row chunk one noise pass (eps drawn
  in-kernel once, N1, and stored) and two tensor-core GEMMs, plus the sum of the dL/dW_d GEMM's
  row splits where it splits;
- ``merge_weights_fwd``  (merge_weights.py): M1 and M2 in one launch;
- ``merge_weights_bwd``  (merge_weights.py): M3, and M4 with M5, one launch each.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before this module
is imported). Dtypes follow the tensor-core precision policy (``drep_kernels.precision``):
bf16 / fp16 GEMM operands as they are, float32 ones as TF32 exactly when torch's float32
matmuls use it, float32 accumulation (float64 for float64). The backend registry imports this
module only when the triton backend is used, so ``import drep_kernels`` never needs triton.
"""
from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - the registry checks this first
    raise ImportError(f"the triton backend needs the triton package: {e}") from e

from .denoise_loss import denoise_loss_fwd
from .merge_weights import merge_weights_bwd, merge_weights_fwd

__all__ = ["denoise_loss_fwd", "merge_weights_bwd", "merge_weights_fwd"]
