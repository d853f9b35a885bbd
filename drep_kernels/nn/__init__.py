"""Drop-in modules."""
from .linear import DenoiseLinear

__all__ = ["DenoiseLinear"]
