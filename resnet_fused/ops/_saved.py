"""Saving tensors for backward by name, through ``ctx.save_for_backward`` only.

Backward code reads ``saved["x"]``, never ``ctx.saved_tensors[3]``; and nothing is stored as a
tensor attribute of ctx (which would bypass autograd's saved-tensor checks and hooks).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

__all__ = ["save_named", "load_saved"]


def save_named(ctx, **tensors: Optional[Tensor]) -> None:
    """Save the non-None tensors under their keyword names."""
    names = tuple(k for k, v in tensors.items() if v is not None)
    ctx.saved_names = names
    ctx.save_for_backward(*(tensors[k] for k in names))


def load_saved(ctx) -> dict[str, Tensor]:
    """The tensors saved by :func:`save_named`, by name (absent names were None)."""
    return dict(zip(ctx.saved_names, ctx.saved_tensors))
