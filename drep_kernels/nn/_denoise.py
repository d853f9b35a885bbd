"""What every DenoiseRep layer shares, whatever torch layer it extends (``DenoiseLayerMixin``)."""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .. import precision
from ..backends import kernels, select
from ..ops.denoise_loss import denoise_loss_op, flat_noise_and_seed
from ..schedule import Coefficients, Schedule

_INITS = ("zeros", "linear")

# Set to True on every plain layer ``to_plain`` makes, so that ``drep_kernels.denoise_loss``
# and ``set_phase`` can tell a fused model (which has no denoisers left to train) from one that
# was never converted, and say which.
FUSED = "_drep_fused"


@torch.compiler.assume_constant_result  # a property of the device type: no graph break (torch 2.11
def _autocast_available(device_type: str) -> bool:  # cannot trace the builtin it calls)
    return torch.amp.is_autocast_available(device_type)


def autocast_off(device: torch.device):
    """A context without autocast on ``device``: the ops then compute in the dtypes they specify
    (docs/method.md, "Precision"); under autocast the torch backend's matmuls would be recast."""
    # Only when autocast is on: entering torch.autocast costs a few microseconds per call, and
    # a layer calls this twice per step.
    if _autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast runs matmuls in on ``device`` (bf16 / fp16), or None when it is off."""
    if _autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class DenoiseLayerMixin:
    """The surface of a layer read as reverse-diffusion step ``t`` with a K x K denoiser, on
    top of the torch layer it precedes in the MRO (``class DenoiseLinear(DenoiseLayerMixin,
    nn.Linear)``): the step and its coefficients, the denoiser and its init, the merge cache,
    the loss and its hand-over, pickling. Every layer type has this one surface, so that
    ``drep_kernels.denoise_loss``, ``fuse`` and the training phases treat them alike.

    A layer class supplies its constructor (calling ``_init_denoiser`` after the torch
    layer's), ``_merge`` (its formula for (W', b')), ``_plain_layer`` (the empty torch layer
    ``to_plain`` fills) and ``forward``.
    """

    def _init_denoiser(
        self,
        width: int,
        bias: bool,
        *,
        t: int,
        schedule: Optional[Schedule],
        init: str,
        label_augmented: bool,
        device,
        dtype,
    ) -> None:
        """Set up the step ``t`` and a ``width`` x ``width`` denoiser (with b_d iff ``bias``)."""
        self.schedule = schedule if schedule is not None else Schedule()
        self._set_t(t)
        self.register_buffer("t", torch.tensor(self._t, dtype=torch.int64, device=device))
        factory = {"device": device, "dtype": dtype}
        self.denoise_weight = nn.Parameter(torch.empty(width, width, **factory))
        if bias:
            self.denoise_bias = nn.Parameter(torch.empty(width, **factory))
        else:
            self.register_parameter("denoise_bias", None)
        self.label_augmented = bool(label_augmented)
        self._merge_cache: Optional[tuple] = None
        self._stash: Optional[tuple] = None  # (loss sum, dL/dW_d sum, dL/db_d sum)
        self._stash_versions: Optional[tuple] = None
        self._stash_params: Optional[tuple] = None  # the denoiser parameters the forward used
        self._phase: Optional[str] = None  # the last set_phase (a compile guard: _wants_loss)
        self.reset_denoiser(init)

    # -- step, denoiser, state ------------------------------------------------------------
    def reset_denoiser(self, init: str = "zeros") -> None:
        """Re-initialise the denoiser: ``"zeros"`` or ``"linear"`` (nn.Linear's init over the
        denoiser's width K: in_features for ``DenoiseLinear``, out_channels for ``DenoiseConv2d``)."""
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        with torch.no_grad():
            if init == "zeros":
                self.denoise_weight.zero_()
                if self.denoise_bias is not None:
                    self.denoise_bias.zero_()
            else:
                bound = 1.0 / math.sqrt(self.denoise_weight.shape[0])
                self.denoise_weight.uniform_(-bound, bound)
                if self.denoise_bias is not None:
                    self.denoise_bias.uniform_(-bound, bound)

    def _set_t(self, t) -> None:
        if isinstance(t, Tensor):
            t = int(t.item())
        self.coefficients: Coefficients = self.schedule.coefficients(t)  # validates t
        self._t = t

    def _denoiser_state_keys(self) -> list[str]:
        """The state-dict keys this layer adds to the plain torch layer's."""
        return ["denoise_weight"] + (["denoise_bias"] if self.denoise_bias is not None else []) + ["t"]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        own = self._denoiser_state_keys()
        present = [k for k in own if prefix + k in state_dict]
        # A plain layer's checkpoint (the pretrained model before convert): its weight and bias
        # load, the denoiser and t stay as they are, and strict loading passes.
        plain = not present and prefix + "weight" in state_dict
        if present and len(present) < len(own):
            # Half a denoiser (say W_d without its t) is no checkpoint of anything. Torch passes
            # strict=True here whatever the caller's strict, so this is an error either way, and
            # nothing of this layer is loaded (no W_d paired with another step's coefficients).
            absent = [prefix + k for k in own if k not in present]
            error_msgs.append(
                f"{type(self).__name__} {prefix[:-1] or '(the module itself)'}: the state dict has "
                f"{', '.join(prefix + k for k in present)} but not {', '.join(absent)}. Give all of the "
                "denoiser's keys (a converted model's checkpoint) or none of them (a plain model's: the "
                "denoiser and t then stay as they are); the authors' checkpoints load with "
                "drep_kernels.load_reference_state_dict."
            )
            return
        n_missing = len(missing_keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if plain:
            skipped = {prefix + k for k in own}
            missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k not in skipped]
        if prefix + "t" in state_dict:  # keep the Python-side coefficients in step with the buffer
            self._set_t(self.t)
        self._merge_cache = None

    def __getstate__(self):
        # A cached merge may carry autograd history, and unread losses are not state.
        state = self.__dict__.copy()
        state["_merge_cache"] = None
        state["_stash"] = None
        state["_stash_versions"] = None
        state["_stash_params"] = None
        return state

    def denoiser_parameters(self) -> list[nn.Parameter]:
        """The denoiser's parameters (W_d and, if present, b_d)."""
        return [p for p in (self.denoise_weight, self.denoise_bias) if p is not None]

    # -- merge ----------------------------------------------------------------------------
    def _merge_key(self) -> tuple:
        params = (self.weight, self.bias, self.denoise_weight, self.denoise_bias)
        return (
            tuple(None if p is None else (p._version, p.data_ptr(), p.requires_grad, p.dtype) for p in params),
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            self.label_augmented,
            self._t,
        )

    def merged_weight_and_bias(self) -> tuple[Tensor, Optional[Tensor]]:
        """(W', b') of the current parameters, W' with the weight's shape; b' is None for a
        bias-free layer.

        Cached, keyed on the parameters' versions: recomputed only after a parameter changed
        (an optimizer step, a load). With grad enabled the result is differentiable in W, b
        and, only when ``label_augmented``, in the denoiser.
        """
        compiling = torch.compiler.is_compiling()
        if not compiling:
            key = self._merge_key()
            if self._merge_cache is not None and self._merge_cache[0] == key:
                return self._merge_cache[1], self._merge_cache[2]
        dw, db = self.denoise_weight, self.denoise_bias
        if not self.label_augmented:
            dw = dw.detach()
            db = db.detach() if db is not None else None
        with autocast_off(self.weight.device):
            merged = self._merge(dw, db)
        if not compiling:
            self._merge_cache = (key, *merged)
        return merged

    def to_plain(self) -> nn.Module:
        """The deployable layer: the plain torch layer, same architecture, holding (W', b');
        ``drep_kernels.fuse`` calls this on every layer type."""
        with torch.no_grad():
            w, b = self.merged_weight_and_bias()
            plain = self._plain_layer(b is not None, device=w.device, dtype=w.dtype)
            plain.weight.copy_(w)
            if b is not None:
                plain.bias.copy_(b)
        plain.train(self.training)
        setattr(plain, FUSED, True)
        return plain

    def fuse(self) -> nn.Module:
        """``to_plain()`` under the name ``timm.utils.reparameterize_model`` looks for: it replaces
        every child that has ``fuse`` by what ``fuse()`` returns."""
        return self.to_plain()

    # -- losses ---------------------------------------------------------------------------
    def _wants_loss(self) -> bool:
        trains = self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.denoiser_parameters())
        if torch.compiler.is_compiling() and self._phase is not None:
            # torch 2.11's Dynamo does not guard on a parameter's requires_grad, so a graph
            # traced in one phase would run on in the next (computing a loss in the backbone
            # phase). A branch on the phase set_phase recorded puts it in the graph's guards;
            # the result is the same either way (newer torch guards requires_grad itself).
            trains = trains if self._phase == "backbone" else trains
        return trains

    def _loss_terms(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, dL/dW_d, dL/db_d) of L1/L2 on the (M, K) rows, as the op computes them (with
        autocast off). For callers that cannot go through ``linear_denoise`` (autocast,
        DenoiseConv2d).

        Under autocast the rows come in the autocast dtype (``autocast_rows``) and W_d, b_d are
        cast to it, as autocast casts a Linear's parameters: the op's GEMMs then run in bf16 /
        fp16 on tensor cores (docs/method.md, "Precision"), with no float32 copy of the rows.
        The gradients come out of the op in float32 whatever the dtype, so the float32
        parameters lose nothing by the cast. Otherwise the rows are cast to the denoiser's dtype."""
        rows = rows.detach()
        wd, bd = self.denoise_weight, self.denoise_bias
        if rows.dtype in precision.HALF_DTYPES and wd.dtype == torch.float32:
            wd = wd.detach().to(rows.dtype)
            bd = bd.detach().to(rows.dtype) if bd is not None else None
        else:
            rows = rows.to(wd.dtype)
        noise, seed = flat_noise_and_seed(rows, None, None)
        co = self.coefficients
        backend = select("denoise_loss", rows.device)
        with torch.no_grad(), autocast_off(rows.device):  # the gradients come out of the op itself
            if torch.compiler.is_compiling():
                return denoise_loss_op(rows, wd, bd, co.a, co.s, noise, seed, backend, True)
            # Eager: the op's kernel, as the op would call it. The custom op adds only what this
            # call does not use (autograd, under no_grad here; a fake kernel, for the traced
            # branch above) and ~10 us of Python dispatch per call (host_step benchmark).
            return kernels(backend).denoise_loss_fwd(rows, wd, bd, co.a, co.s, noise, seed, True)

    def autocast_rows(self, x: Tensor) -> Tensor:
        """x as a layer's matmul sees it under autocast: float32 cast to the autocast dtype
        (once, for both the layer and its loss); x itself without autocast or in another dtype."""
        dtype = autocast_dtype(x.device)
        return x.to(dtype) if dtype is not None and x.dtype == torch.float32 else x

    def _stash_loss(self, value: Tensor, grad_dw: Tensor, grad_db: Tensor) -> None:
        """Keep the loss as (value, dL/dW_d, dL/db_d) sums, never as a graph.

        The op computed the loss's gradients in its forward pass (L2); summing them here keeps
        one K x K accumulator per layer however many forwards pass before the loss is read,
        and a loss that is never read holds no autograd graph at all.
        """
        if self.denoise_bias is None:
            grad_db = None
        if not torch.compiler.is_compiling():
            versions = tuple(p._version for p in self.denoiser_parameters())
            if self._stash is not None and versions != self._stash_versions:
                # The denoiser changed since these losses were made: their gradients belong to
                # the old parameters. Drop them rather than apply them to the new ones.
                warnings.warn(
                    f"{type(self).__name__}: denoising losses were produced but never collected before "
                    "the denoiser changed; call drep_kernels.denoise_loss(model) after each forward. "
                    "Dropping them.",
                    stacklevel=3,
                )
                self._stash = None
            self._stash_versions = versions
        # The gradients belong to the parameter objects this forward used. Under FSDP2 these
        # are the unsharded ones, whose gradients it reduce-scatters; by the time the loss is
        # read the module holds the sharded ones again.
        self._stash_params = (self.denoise_weight, self.denoise_bias)
        if self._stash is None:
            self._stash = (value, grad_dw, grad_db)
        else:
            v, gw, gb = self._stash
            self._stash = (v + value, gw + grad_dw, None if gb is None else gb + grad_db)

    def take_loss(self) -> Optional[Tensor]:
        """The sum of the losses produced since the last call (None if none), as a 0-d tensor
        differentiable in the denoiser; the layer forgets them."""
        if self._stash is None:
            return None
        (value, grad_dw, grad_db), self._stash = self._stash, None
        (denoise_weight, denoise_bias), self._stash_params = self._stash_params, None
        return _StashedLoss.apply(value, grad_dw, grad_db, denoise_weight, denoise_bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, t={self._t}"


class _StashedLoss(torch.autograd.Function):
    """A loss whose gradients were computed when it was made: backward only scales them (L2)."""

    @staticmethod
    def forward(ctx, value, grad_dw, grad_db, denoise_weight, denoise_bias):
        ctx.save_for_backward(grad_dw, grad_db)
        ctx.dtype = denoise_weight.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        grad_dw, grad_db = ctx.saved_tensors
        dw = precision.scaled_grad(grad, grad_dw, ctx.dtype) if ctx.needs_input_grad[3] else None
        db = precision.scaled_grad(grad, grad_db, ctx.dtype) if ctx.needs_input_grad[4] and grad_db is not None else None
        return None, None, None, dw, db
