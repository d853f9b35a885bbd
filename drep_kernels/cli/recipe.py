"""Converting a library model the same way wherever a run's model is built: for training, for
its final check, and in drep-fuse."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

import drep_kernels as dk

from . import UsageError

INCLUDE = {"linear": (nn.Linear,), "linear+conv": (nn.Linear, nn.Conv2d)}

# Fused and unfused logits come from the same merged (W', b'), so they agree to float32
# rounding; a converted layer whose owner reads its weight without calling it (its training
# used W, the fused model W') breaks that by O(1).
FUSE_RTOL = 1e-4
FUSE_MISMATCH = ("some converted layer's owner reads its weight without calling the layer; "
                 "leave that layer plain (drep-train --exclude)")


def fuse_matches(max_diff: float, max_logit: float) -> bool:
    """Whether fused logits are the unfused ones up to rounding (relative to the largest logit)."""
    return max_diff <= FUSE_RTOL * max(1.0, max_logit)


def probe(model: nn.Module, input_size: Sequence[int], what: str) -> torch.Tensor:
    """One zero image of ``input_size``, after checking that the model takes it (a fixed-size
    model fails here, with its own message, instead of in the first training step)."""
    x = torch.zeros(1, *input_size)
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as e:
        raise UsageError(
            f"{what} does not run on {input_size[1]}x{input_size[2]} images: {type(e).__name__}: {e} "
            "(--img-size sets the input size; timm ViTs take it at construction, so give it before training)"
        ) from e
    finally:
        model.train(training)
    return x


def convert(model: nn.Module, kind: str, exclude: Sequence[str], x: torch.Tensor) -> int:
    """``dk.convert`` with the layer types of ``kind`` ("linear" or "linear+conv"), the glob
    patterns of ``exclude`` left plain, steps numbered in the order a forward on ``x`` calls
    the layers. Runs that forward in eval mode (batch norm statistics must not move). Returns
    how many layers were converted."""
    training = model.training
    try:
        dk.convert(model.eval(), include=INCLUDE[kind], exclude=list(exclude) or None, example_inputs=(x,))
    except ValueError as e:  # more layers than the schedule has steps
        raise UsageError(str(e)) from e
    finally:
        model.train(training)
    n = len(dk.timesteps(model))
    if n == 0:
        raise UsageError(f"no layer to convert (--convert {kind}, --exclude {' '.join(exclude) or '-'})")
    return n
