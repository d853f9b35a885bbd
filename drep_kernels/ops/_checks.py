"""Argument checks shared by the public op wrappers: clear errors naming the argument."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, value: object, *, optional: bool = False) -> Optional[Tensor]:
    if value is None and optional:
        return None
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    return value


def same_dtype_and_device(named: dict[str, Optional[Tensor]]) -> None:
    items = [(n, t) for n, t in named.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; cast them to one dtype"
            )
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def shape(name: str, t: Optional[Tensor], expected: tuple[int, ...]) -> None:
    if t is not None and tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")


def finite(name: str, value: object) -> float:
    if isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Python float, not a tensor")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)
