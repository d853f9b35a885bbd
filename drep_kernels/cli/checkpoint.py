"""drep-train's checkpoints: everything a run needs to continue bitwise where it stopped.

One file, written by rank 0 after every epoch: the run's configuration and architecture, the
model's full state dict (converted: denoisers and steps included), the optimizer's (keyed by
parameter name, so a checkpoint of one process resumes on several and the other way round),
the LR scheduler's, the gradient scaler's, the epochs done with their log rows, and every
process's random generators (the data order depends only on seed and epoch; augmentation,
dropout and the denoising noise draw from these).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from . import UsageError
from .zoo import read_state_dict

FORMAT = "drep-train/1"


def rng_state() -> dict[str, Any]:
    """This process's generators, in types ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts on CPU, keyed by parameter name; on rank 0 only when
    sharded (every rank must call it: FSDP2 gathers the shards)."""
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """The inverse of ``full_state``, on every rank (each holds the whole checkpoint)."""
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    # A parameter that has not trained yet (the backbone after a denoiser phase) has no
    # optimizer state, and must go on without one, as it did in the run. DCP refuses that when
    # strict, and before loading gives every parameter a state (a step with zero gradients),
    # which would count one step too many in Adam's bias correction: drop those.
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True, strict=False))
    saved = set(optim_state["state"])
    for name, param in model.named_parameters():
        if name not in saved:
            optimizer.state.pop(param, None)


def save(path: Path, payload: Mapping[str, Any]) -> None:
    """Write through a temporary file: a run killed while saving keeps its previous checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(payload), tmp)
    os.replace(tmp, path)


def read(path: str) -> dict[str, Any]:
    """A drep-train checkpoint, or a UsageError saying what ``path`` is not."""
    ckpt = read_state_dict(path, "--resume")
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != FORMAT:
        raise UsageError(f"--resume {path} is not a drep-train checkpoint (format {FORMAT})")
    return dict(ckpt)


def is_train_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT
