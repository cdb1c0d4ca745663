"""The post-activation blocks alone: ``convert``'s walk restricted to torchvision's and timm's
ResNet v1 / v1.5 blocks, with each step's result returned instead of warned.

    import torchvision
    from resnet_fused.convert_postact import convert_postact, describe_postact, unconvert_postact
    model = torchvision.models.resnet50()              # or timm.create_model("resnet50"), resnext50_32x4d, ...
    converted, unfusable = convert_postact(model, backend="triton")
    describe_postact(model)                            # {path: {...}} per block
    unconvert_postact(model)                           # back to torchvision's / timm's classes

Which blocks are fused, and how a swap keeps the state: ``convert_adapters.PostActAdapter``.
Reasons have ``convert``'s one format.
"""
from __future__ import annotations

import torch.nn as nn

from .backends import check_backend, resolve_backend
from .convert import convert_blocks, describe_block, unconvert_blocks
from .convert_adapters import POSTACT, Unfusable, find_blocks

__all__ = ["convert_postact", "convert_postact_block", "unconvert_postact", "unconvert_postact_block",
           "describe_postact"]


def _single(block: nn.Module):
    """The walk's entry for a model that is itself a post-activation block, or None."""
    found = next(find_blocks(block, (POSTACT,)), None)
    return found if found is not None and not found.path else None


def convert_postact_block(block: nn.Module, backend: str = "auto") -> nn.Module:
    """The fused twin of one torchvision / timm post-activation block (holding its modules).
    Raises ValueError with the reasons when it cannot be fused, TypeError for another module."""
    backend = resolve_backend(check_backend(backend))
    found = _single(block)
    if found is None:
        raise TypeError(f"{type(block).__name__} is not a torchvision or timm post-activation block")
    try:
        plan = POSTACT.plan(found)
    except Unfusable as exc:
        if found.fused:  # keeps its backend, as convert does
            return block
        raise ValueError(str(exc)) from None
    if found.fused:
        block.backend = backend
        return block
    return POSTACT.fuse(found, plan, backend)


def convert_postact(model: nn.Module, backend: str = "auto") -> tuple[list[str], dict[str, str]]:
    """Swap every fusable torchvision / timm post-activation block of ``model`` in place.

    Returns (paths converted or, if already fused, given ``backend``; {path: reason} of the
    blocks left as they were). No warning here: ``convert`` reports. A model that is itself a
    block is listed as unfusable here (nothing can replace the root in place): use
    :func:`convert_postact_block` for it.
    """
    backend = resolve_backend(check_backend(backend))
    if _single(model) is not None:
        return [], {"(root)": "the model is itself a block: use convert_postact_block(model)"}
    _, converted, unfusable = convert_blocks(model, backend, (POSTACT,))
    return converted, unfusable


def unconvert_postact(model: nn.Module) -> list[str]:
    """Swap every fused post-activation block back to torchvision's / timm's class (the same
    modules and state); returns the paths. A model that is itself a fused block is not replaced
    (use ``unconvert_postact_block``)."""
    if _single(model) is not None:
        return []
    _, paths = unconvert_blocks(model, (POSTACT,))
    return paths


def unconvert_postact_block(block: nn.Module) -> nn.Module:
    """torchvision's / timm's block holding a fused block's modules and state."""
    found = _single(block)
    if found is None or not found.fused:
        raise TypeError(f"{type(block).__name__} is not a fused post-activation block")
    return POSTACT.unfuse(found)


def describe_postact(model: nn.Module) -> dict[str, dict]:
    """``describe(model, as_dict=True)``'s entries of the post-activation blocks alone."""
    return {found.path or "(root)": describe_block(found) for found in find_blocks(model, (POSTACT,))}
