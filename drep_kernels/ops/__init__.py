"""The registered ops (namespace ``drep``), each reached through a checked public wrapper.

- ``denoise_loss``   -> ``torch.ops.drep.denoise_loss``   (ops/denoise_loss.py)
- ``merge_weights``  -> ``torch.ops.drep.merge_weights``  (ops/merge_weights.py)
- ``linear_denoise`` -> ``torch.ops.drep.linear_denoise`` (ops/linear_denoise.py)

Each wrapper checks its arguments, picks the backend (``drep_kernels.backends.select``) and
calls the op; the op's fake kernel and autograd formula sit beside it.
"""
from .denoise_loss import denoise_loss
from .linear_denoise import linear_denoise
from .merge_weights import merge_weights

__all__ = ["denoise_loss", "linear_denoise", "merge_weights"]
