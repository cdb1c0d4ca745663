"""Swap the ResNet blocks of an existing model for fused ones, in place.

    import resnet_fused as rf
    model = timm.create_model("resnetv2_50")      # or rf.resnet_v2_50(), or your own model
    rf.convert(model, backend="triton")           # blocks -> FusedBottleneck / FusedBasicBlock
    print(rf.describe(model))                      # one line per block: what runs where
    rf.unconvert(model)                            # back to eager reference blocks

What is converted (found anywhere in the module tree, by one walk over the per-kind adapters of
``convert_adapters``):

* this package's eager ``reference.PreActBottleneck`` / ``PreActBasicBlock`` -> ``FusedBottleneck``
  / ``FusedBasicBlock``; blocks that are already fused only get their ``backend`` set;
* timm's ResNet-v2 ``PreActBottleneck`` / ``PreActBasic`` (timm stays optional: it is looked at only
  when the model's classes come from it), when they compute exactly what the fused block does:
  ``BatchNormAct2d`` norms with a ReLU and no drop layer, plain ``nn.Conv2d`` convs without bias,
  kernels 1/3/1 (basic: 3/3) with symmetric zero padding k//2 and dilation 1, at most one strided
  conv, ``downsample`` None or a ``DownsampleConv`` (1x1 conv, ``Identity`` norm), and no drop
  path (``Identity`` or ``DropPath(0.0)``); a ``DownsampleAvg`` whose pool is ``Identity`` (stride 1)
  is the projection it computes and is fused too;
* torchvision's and timm's post-activation ``Bottleneck`` / ``BasicBlock`` (ResNet v1 / v1.5,
  ResNeXt) -> ``FusedPostActBottleneck`` / ``FusedPostActBasicBlock`` / ``FusedTimmBottleneck`` /
  ``FusedTimmBasicBlock`` (see ``convert_adapters.PostActAdapter``), timm's stride-1
  ``Sequential(Identity, Conv2d 1x1, norm)`` projection included.

Everything else that looks like such a block (GroupNorm, weight-standardized convs, drop path > 0,
shortcuts that average-pool, attention, anti-aliasing, dilation, SyncBatchNorm, hooks on the block)
is left as it is, and one warning lists each such block with its reason, in one format for every
kind: ``subject: problem; ...``.

What a swap keeps: every state_dict key (in the same order) and value, and more: the parameter
and buffer OBJECTS themselves move into the new block, so their dtype, device and
``requires_grad`` flags are unchanged and an optimizer built before the swap keeps updating the
model's parameters. The train/eval flag of the block and of each submodule is copied. The new
block is built on the meta device first (a post-activation block's children themselves move into
an object of the fused class), so a swap allocates nothing.

Not kept: Python attributes you set on a block object yourself (the new object is a different
instance). Blocks carrying hooks are not converted (the hooks would be lost or, on submodules,
never fire inside a fused kernel).

Stage fusion (``stage.py``): every plain ``nn.Sequential`` that holds a fused block becomes a
``FusedStage`` and every plain ``nn.Sequential`` of such stages (timm's and this package's
``stages``) a ``FusedStages``, by switching the object's class (same object, children, keys):
the blocks then hand bn1's input statistics to each other, so only the network's first block
takes its own. ``unconvert`` switches them back. ``describe(model, statistics=True)`` says, per
block, whether its input statistics come chained or from its own pass.
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch.nn as nn

from . import interop
from .backends import AUTO_CUDA_TABLE, check_backend, resolve_backend
from .convert_adapters import ADAPTERS, SYNC_BATCHNORM_REASON, Found, Unfusable, find_blocks
from .models import ResNetV2
from .modules import chains_statistics
from .stage import FusedStage, FusedStages, _stage_blocks

__all__ = ["convert", "unconvert", "describe", "BACKEND_DESCRIPTIONS", "SYNC_BATCHNORM_REASON"]

#: What ``describe`` says a fused block's ``backend`` runs.
BACKEND_DESCRIPTIONS = {
    "triton": "triton",
    "cuda": "cuda",
    "reference": "reference",
    "auto": "auto (triton on CUDA, eager on CPU)",
}
_AUTO_WITH_TABLE = "auto (cuda where AUTO_CUDA_TABLE measured it faster, else triton, on CUDA; eager on CPU)"
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


# ---------------------------------------------------------------------------------------
# Swapping
# ---------------------------------------------------------------------------------------


def _replace(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path`` in ``model``; returns the model's new root (``new`` for path '')."""
    if not path:
        return new
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)
    return model


def _check_model(model: object, what: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} expects an nn.Module, got {type(model).__name__}")
    return model


def _fuse_containers(model: nn.Module) -> None:
    """Stage fusion (stage.py): every plain ``nn.Sequential`` holding a fused block becomes a
    ``FusedStage``, and every plain ``nn.Sequential`` of such stages (timm's and this package's
    ``stages``) a ``FusedStages``. Both subclass nn.Sequential without adding state, so the
    object is kept (its class is switched): same identity, children, keys and hooks."""
    for m in list(model.modules()):
        if type(m) is nn.Sequential and any(chains_statistics(c) for c in m.children()):
            m.__class__ = FusedStage
    for m in list(model.modules()):
        if type(m) is nn.Sequential and any(_stage_blocks(c) is not None for c in m.children()):
            m.__class__ = FusedStages


def _plain_containers(model: nn.Module) -> None:
    """Undo ``_fuse_containers``: FusedStage / FusedStages back to nn.Sequential."""
    for m in list(model.modules()):
        if type(m) in (FusedStage, FusedStages):
            m.__class__ = nn.Sequential


def _set_model_backend(model: nn.Module, backend: str) -> None:
    if isinstance(model, ResNetV2):
        model.backend = backend


def convert_blocks(model: nn.Module, backend: str, adapters: tuple = ADAPTERS) -> tuple[nn.Module, list[str],
                                                                                         dict[str, str]]:
    """The walk ``convert`` runs: (the model's root, paths converted or already fused and given
    ``backend``, {path: reason} of the blocks left as they were). ``backend`` is resolved."""
    converted: list[str] = []
    skipped: dict[str, str] = {}
    swapped: dict[int, nn.Module] = {}  # a block shared by two parents stays shared
    root = model
    for found in list(find_blocks(model, adapters)):
        path = found.path or "(root)"
        try:
            plan = found.adapter.plan(found)
        except Unfusable as exc:
            # A fused block holding what it cannot compute (SyncBatchNorm put in by
            # convert_sync_batchnorm, say) keeps its backend: convert never makes it worse.
            skipped[path] = str(exc)
            continue
        if found.fused:
            found.block.backend = backend
            converted.append(path)
            continue
        if id(found.block) not in swapped:
            try:
                swapped[id(found.block)] = found.adapter.fuse(found, plan, backend)
            except Unfusable as exc:
                skipped[path] = str(exc)
                continue
        root = _replace(root, found.path, swapped[id(found.block)])
        converted.append(path)
    return root, converted, skipped


def unconvert_blocks(model: nn.Module, adapters: tuple = ADAPTERS) -> tuple[nn.Module, list[str]]:
    """The walk ``unconvert`` runs: (the model's root, paths swapped back)."""
    swapped: dict[int, nn.Module] = {}
    root, paths = model, []
    for found in list(find_blocks(model, adapters)):
        if not found.fused:
            continue
        if id(found.block) not in swapped:
            swapped[id(found.block)] = found.adapter.unfuse(found)
        root = _replace(root, found.path, swapped[id(found.block)])
        paths.append(found.path or "(root)")
    return root, paths


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Swap every fusable block of ``model`` for its fused block, in place.

    Args:
        model: any nn.Module; blocks are found anywhere in its tree (see the module docstring
            for which blocks qualify).
        backend: the fused blocks' ``backend`` (``"auto"``, ``"triton"``, ``"cuda"``,
            ``"reference"``); already fused blocks get it too.

    Returns:
        ``model`` (the same object), or the new block when ``model`` itself is a block.

    Blocks that cannot be fused stay as they are and are listed, each with its path and reason,
    in ONE ``UserWarning``. Raises TypeError / ValueError for a bad argument, and what
    ``backends.resolve_backend`` raises for a backend this installation cannot run, before
    anything is changed.
    """
    interop.register_timm_leaves()  # the fused blocks as timm's FX leaves, timm being loaded
    _check_model(model, "convert")
    backend = resolve_backend(check_backend(backend))
    root, _, skipped = convert_blocks(model, backend)
    if skipped:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in skipped.items())
        warnings.warn(f"resnet_fused.convert: {len(skipped)} block(s) not converted, left as they "
                      f"were:\n{lines}", UserWarning, stacklevel=2)
    _fuse_containers(root)
    _set_model_backend(root, backend)
    return root


def unconvert(model: nn.Module) -> nn.Module:
    """Swap every fused block of ``model`` back to an eager block, in place, keeping the same
    state (same tensors, modes and settings).

    A fused pre-activation block comes back as this package's ``reference.PreActBottleneck`` /
    ``PreActBasicBlock`` (a converted timm block too: same computation, same state_dict keys); a
    fused post-activation block as torchvision's / timm's block. Blocks that were never converted
    stay as they are. Returns ``model`` (or the new block when ``model`` itself is a fused block).
    """
    _check_model(model, "unconvert")
    root, _ = unconvert_blocks(model)
    _plain_containers(root)
    _set_model_backend(root, "reference")
    return root


# ---------------------------------------------------------------------------------------
# Describing
# ---------------------------------------------------------------------------------------


def _runs_text(backend: str) -> str:
    if backend == "auto" and AUTO_CUDA_TABLE:
        return _AUTO_WITH_TABLE
    return BACKEND_DESCRIPTIONS.get(backend, backend)


def describe_block(found: Found) -> dict:
    """One block's ``describe(..., as_dict=True)`` entry (without ``input_stats``)."""
    block, library = found.block, found.library
    try:
        found.adapter.plan(found)
        reason: Optional[str] = None
    except Unfusable as exc:
        reason = str(exc)
    if found.fused:
        runs = _runs_text(block.backend)
        if reason:  # e.g. SyncBatchNorm swapped into a fused block: say so
            runs = f"{runs}, but: {reason}"
        fused, backend = block.backend != "reference", block.backend
    elif library == "reference":  # this package's eager block: the reference by design
        runs, fused, backend = "reference", False, None
    else:
        if reason is None:
            reason = f"eager {library} block, convert() can fuse it"
        runs, fused, backend = f"not fused: {reason}", False, None
    prefix = "" if library in ("resnet_fused", "reference") else f"{library} "
    return dict(type=f"{prefix}{type(block).__name__}", origin="fused" if found.fused else library,
                kind=f"{found.adapter.kind_prefix}{found.kind}", backend=backend, fused=fused, runs=runs,
                reason=reason, **found.adapter.describe_extra(block))


def _statistics_sources(model: nn.Module) -> dict[int, str]:
    """id(block) -> where a fused block's train-mode input statistics come from (structure only:
    eval/frozen norms need none, and a block running the reference takes none)."""
    out: dict[int, str] = {}

    def chain(blocks: list, carried: bool) -> bool:
        prev_fused = carried
        for b in blocks:
            fused = chains_statistics(b) and not any(getattr(b, a, None) for a in _HOOK_DICTS)
            if chains_statistics(b):
                out[id(b)] = ("chained from the previous block's last conv" if fused and prev_fused
                              else "own statistics pass")
            prev_fused = fused
        return prev_fused

    for m in model.modules():
        if type(m) is FusedStages:
            carried = False
            for child in m.children():
                inner = _stage_blocks(child)
                carried = chain(list(inner), carried) if inner is not None else False
    for m in model.modules():
        if type(m) is FusedStage:
            blocks = list(m)
            if not all(id(b) in out for b in blocks if chains_statistics(b)):
                chain(blocks, False)
    return out


def describe(model: nn.Module, as_dict: bool = False, statistics: bool = False) -> Union[str, dict[str, dict]]:
    """What runs each block of ``model``.

    Returns one line per block, ``"<path>: <type> -> <what runs>"``, where what runs is
    ``triton``, ``cuda``, ``reference`` (eager), ``auto (triton on CUDA, eager on CPU)``, or
    ``not fused: <reason>`` (an unconverted timm / torchvision block: why it cannot be fused, or
    that ``convert()`` can fuse it). A fused block holding something its kernels ignore (a
    SyncBatchNorm swapped in after it was built) reads ``<backend>, but: <reason>``. The path of
    a model that is itself a block is ``(root)``; a model without blocks gives an empty string.
    The type of a timm / torchvision block is prefixed with its library.

    With ``as_dict=True``: ``{path: {"type": the type above, "origin": "fused" | "reference" |
    "timm" | "torchvision", "kind": "bottleneck" | "basic" | "postact_bottleneck" |
    "postact_basic", "backend": the fused block's backend or None, "fused": bool (fused kernels
    may run), "runs": the text above, "reason": why not fusable, or None}}`` in module order; a
    post-activation entry also has ``"norms"``: ``"batch" | "frozen" | "mixed"``.

    With ``statistics=True`` each line ends with ``[input statistics: ...]`` and each dict entry
    gains ``input_stats``: for a fused pre-activation block, whether its train-mode bn1
    statistics come chained from the previous block's last conv (stage fusion, ``stage.py``) or
    from its own pass (the first block of a chain: the network's first, or after a break), None
    for other blocks.
    """
    _check_model(model, "describe")
    if not isinstance(as_dict, bool):
        raise TypeError(f"as_dict must be a bool, got {type(as_dict).__name__}")
    if not isinstance(statistics, bool):
        raise TypeError(f"statistics must be a bool, got {type(statistics).__name__}")
    sources = _statistics_sources(model) if statistics else {}
    info: dict[str, dict] = {}
    for found in find_blocks(model, ADAPTERS):
        entry = describe_block(found)
        if statistics:
            own = "own statistics pass" if found.fused and found.adapter.chains_statistics else None
            entry["input_stats"] = sources.get(id(found.block), own)
        info[found.path or "(root)"] = entry
    if as_dict:
        return info
    return "\n".join(f"{path}: {d['type']} -> {d['runs']}"
                     + (f" [input statistics: {d['input_stats']}]" if d.get("input_stats") else "")
                     for path, d in info.items())
