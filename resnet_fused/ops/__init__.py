"""The fused op set: one file per op (registration, fake, autograd), dispatching by backend."""
from . import blocks
from . import postact_blocks
from .bn_stats import batch_stats

__all__ = ["batch_stats", "blocks", "postact_blocks"]
