"""How converted models meet PyTorch's graph tools: FX leaves for timm's and torchvision's tracers.

A fused block is an FX leaf: traced, it is one ``call_module`` node, and the GraphModule calls
the block itself, which runs its fused op (``graph_forward.fx_leaf_call``). That holds for any
``torch.fx.Tracer``, so ``torch.fx.symbolic_trace`` needs nothing from here. For the tracers that
take a leaf list this module names the blocks too:

* timm: :func:`register_timm_leaves` adds the fused block classes to timm's notrace registry
  (``timm.layers.register_notrace_module``), which timm's ``create_feature_extractor``,
  ``FeatureGraphNet`` and ``features_only=True, feature_cls="fx"`` pass to their tracer. It runs
  when this package is imported after timm and on every ``rf.convert()`` (a timm model being
  converted means timm is loaded); importing this package never imports timm itself.
* torchvision: ``create_feature_extractor(model, return_nodes, tracer_kwargs=rf.interop.tracer_kwargs())``.

Stage containers (``FusedStage``, ``FusedStages``) are not leaves: they are traced through, so
``layer1`` or ``stages.0`` are graph nodes a feature extractor can return. A traced graph
therefore runs its blocks one by one (no statistics chaining between them); the answer is the
same.

TorchScript (``torch.jit.script``, ``torch.jit.save`` / ``load``) and ``torch.export`` need nothing
from here either; see ``graph_forward`` for what the scripted forward does.
"""
from __future__ import annotations

import sys

import torch.nn as nn

from .modules import FusedBasicBlock, FusedBottleneck
from .postact import FusedPostActBasicBlock, FusedPostActBottleneck, FusedTimmBasicBlock, FusedTimmBottleneck

__all__ = ["leaf_modules", "register_timm_leaves", "tracer_kwargs"]


def leaf_modules() -> list[type[nn.Module]]:
    """The fused block classes, as FX tracers' ``leaf_modules`` lists take them."""
    return [FusedBottleneck, FusedBasicBlock, FusedPostActBottleneck, FusedPostActBasicBlock,
            FusedTimmBottleneck, FusedTimmBasicBlock]


def tracer_kwargs() -> dict:
    """``tracer_kwargs`` for torchvision's ``create_feature_extractor``: the fused blocks as leaves."""
    return {"leaf_modules": leaf_modules()}


def register_timm_leaves() -> bool:
    """Register the fused blocks as timm FX leaves (``timm.layers.register_notrace_module``) when
    timm is loaded; whether it was. Registering twice is harmless (the registry is a set)."""
    if "timm" not in sys.modules:
        return False
    # A deliberate lazy import: timm is optional and already loaded here; only its notrace
    # registry is wanted.
    from timm.layers import register_notrace_module

    for cls in leaf_modules():
        register_notrace_module(cls)
    return True


register_timm_leaves()
