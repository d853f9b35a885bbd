"""Drop-in modules."""
from .conv import DenoiseConv2d
from .linear import DenoiseLinear

__all__ = ["DenoiseConv2d", "DenoiseLinear"]
