"""drep-kernels: fused kernels for DenoiseRep (Xu et al., NeurIPS 2024).

Public API:
    Schedule, DenoiseLinear, DenoiseConv2d       -- the schedule and the drop-in layers
    convert, timesteps, denoise_loss, set_phase,
    phase_plan, fuse, load_reference_state_dict  -- the model-level recipe
    ops                                          -- the registered ops (namespace ``drep``)
    backends()                                   -- the backends usable here
"""
from . import ops
from .backends import backends
from .model import convert, denoise_loss, fuse, load_reference_state_dict, phase_plan, set_phase, timesteps
from .nn import DenoiseConv2d, DenoiseLinear
from .schedule import Coefficients, Schedule

__version__ = "0.1.0"

__all__ = [
    "Coefficients",
    "DenoiseConv2d",
    "DenoiseLinear",
    "Schedule",
    "backends",
    "convert",
    "denoise_loss",
    "fuse",
    "load_reference_state_dict",
    "ops",
    "phase_plan",
    "set_phase",
    "timesteps",
]
