"""Stage-level fusion: blocks hand the statistics of their output to the next block.

A fused block's train-mode forward starts with K0, a pass over its whole input only to take
bn1's statistics. Inside a stage that input was written one kernel earlier by the previous
block's last conv, whose epilogue takes the same statistics on the way out (of the value as
stored, after the shortcut add). ``FusedStage`` runs its blocks chaining those partials, so
only a stage's (or, through ``FusedStages``, the network's) first block takes its own; the
rest save one full read of their input each.

* ``FusedStage(nn.Sequential)``: same children, same state_dict keys as the ``nn.Sequential``
  it replaces (``stages.N.blocks`` in timm and this package), so checkpoints load both ways.
* ``FusedStages(nn.Sequential)``: the container of the stages; it carries the partials across
  stage boundaries, into each stage's ``blocks`` when the stage is a plain holder of them
  (this package's ``ResNetStage``, timm's ``ResNetStage`` without gradient checkpointing).

The chain breaks (the next block takes its own statistics pass) where it must: a child that is
not a fused block, or that runs the reference for this input; hooks on a block or stage (they
must see a normal call), or global module hooks; a block whose bn1 does not use batch
statistics (eval or frozen: nothing to hand over). Everything is decided from module state and
the input's device, never from tensor values: no host sync, and ``torch.compile(fullgraph=True)``
and CUDA-graph capture see straight-line code. The partials are non-differentiable: gradients
and bn1's backward are those of the unchained blocks.

Intermediate outputs stay channels_last inside a chain; the output comes back in the input's
memory format, as a single block's does.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules import module as _module_globals

from .modules import chains_statistics
from .ops.blocks import runs_fused

from . import graph_forward

__all__ = ["FusedStage", "FusedStages", "chain_report"]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, attr, None) for attr in _HOOK_DICTS)


def _global_hooks() -> bool:
    return any(getattr(_module_globals, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def _fused_block(module: nn.Module, x: Tensor) -> bool:
    """Whether ``module`` is a fused block that runs its fused op for ``x`` and can be called
    through ``_forward_stats`` (no hooks on it: hooks need a normal call)."""
    if not chains_statistics(module) or _has_hooks(module):
        return False
    backend = module._fused_backend(x)
    return backend is not None and runs_fused(x, backend)


def _is_nchw(x: Tensor) -> bool:
    return x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)


def _run_chain(blocks: list[nn.Module], x: Tensor, in_stats: Optional[Tensor], emit_last: bool
               ) -> tuple[Tensor, Optional[Tensor]]:
    """Run ``blocks`` in order, chaining statistics partials between consecutive fused blocks.

    ``in_stats``: partials of ``x`` (or None); ``emit_last``: whoever follows wants the last
    block's output partials. Returns (output, its partials or None).
    """
    chained = [_fused_block(b, x) for b in blocks]
    wants = [c and b._needs_input_stats() for b, c in zip(blocks, chained)]
    stats = in_stats
    for i, block in enumerate(blocks):
        emit = chained[i] and (wants[i + 1] if i + 1 < len(blocks) else emit_last)
        if chained[i]:
            block._check_input(x)
            x, stats = block._forward_stats(x, stats if wants[i] else None, emit)
        else:
            x, stats = block(x), None
    return x, stats


class FusedStage(nn.Sequential):
    """An ``nn.Sequential`` of blocks that chains the statistics partials between fused blocks.

    Drop-in for the ``nn.Sequential`` holding a stage's blocks: same children and keys.
    ``forward(x)`` returns what the ``nn.Sequential`` would; ``unconvert()`` turns it back.
    """

    _script_forward = graph_forward.SequentialScript._script_forward

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._script_forward(x)
        return self._chained_forward(x)

    @torch.jit.unused
    def _chained_forward(self, x: Tensor) -> Tensor:
        if _global_hooks() or not isinstance(x, Tensor):
            return super().forward(x)
        nchw = _is_nchw(x)
        out, _ = self._forward_chain(x, None, False)
        return out.contiguous() if nchw else out

    def _forward_chain(self, x: Tensor, in_stats: Optional[Tensor], emit_last: bool
                       ) -> tuple[Tensor, Optional[Tensor]]:
        return _run_chain(list(self), x, in_stats, emit_last)

    def _first_wants_stats(self, x: Tensor) -> bool:
        first = next(iter(self), None)
        return first is not None and _fused_block(first, x) and first._needs_input_stats()


def _stage_blocks(stage: nn.Module) -> Optional[FusedStage]:
    """The FusedStage a stage only wraps (its forward is ``self.blocks(x)``: a class that says so
    itself with ``forward_is_blocks``, not inherited, or timm's ``ResNetStage``), else None."""
    if _has_hooks(stage):
        return None
    cls = type(stage)
    # sys.modules, not an import: timm stays optional and is looked at only if loaded.
    timm_stage = getattr(sys.modules.get("timm.models.resnetv2"), "ResNetStage", None)
    if cls.__dict__.get("forward_is_blocks", False) or (timm_stage is not None and cls is timm_stage
                              and not getattr(stage, "grad_checkpointing", False)):
        blocks = getattr(stage, "blocks", None)
        if isinstance(blocks, FusedStage) and not _has_hooks(blocks):
            return blocks
    return None


class FusedStages(nn.Sequential):
    """An ``nn.Sequential`` of stages (``model.stages``) that carries the statistics partials
    across stage boundaries: only the network's first block takes its own input statistics.

    A stage is entered through its ``blocks`` when it is a plain holder of a ``FusedStage``
    (``_stage_blocks``); any other child is called normally and the chain restarts after it.
    """

    _script_forward = graph_forward.SequentialScript._script_forward

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._script_forward(x)
        return self._chained_forward(x)

    @torch.jit.unused
    def _chained_forward(self, x: Tensor) -> Tensor:
        if _global_hooks() or not isinstance(x, Tensor):
            return super().forward(x)
        nchw = _is_nchw(x)
        children = list(self)
        inner = [_stage_blocks(c) for c in children]
        stats = None
        for i, child in enumerate(children):
            if inner[i] is None:
                x, stats = child(x), None
                continue
            nxt = inner[i + 1] if i + 1 < len(children) else None
            emit = nxt is not None and nxt._first_wants_stats(x)
            x, stats = inner[i]._forward_chain(x, stats, emit)
        return x.contiguous() if nchw and x.dim() == 4 else x


def chain_report(model: nn.Module) -> dict[str, str]:
    """For ``describe``: per FusedStage / FusedStages path, how statistics flow."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, FusedStages):
            out[name] = "stages chained: statistics partials cross stage boundaries"
        elif isinstance(m, FusedStage):
            out[name] = "stage chained: each fused block takes its input statistics from the previous block"
    return out
