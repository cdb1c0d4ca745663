"""Swap the pre-activation blocks of an existing model for fused ones, in place.

    import resnet_fused as rf
    model = timm.create_model("resnetv2_50")      # or rf.resnet_v2_50(), or your own model
    rf.convert(model, backend="triton")           # blocks -> FusedBottleneck / FusedBasicBlock
    print(rf.describe(model))                      # one line per block: what runs where
    rf.unconvert(model)                            # back to eager reference blocks

What is converted (found anywhere in the module tree):

* this package's eager ``reference.PreActBottleneck`` / ``PreActBasicBlock`` -> ``FusedBottleneck``
  / ``FusedBasicBlock``; blocks that are already fused only get their ``backend`` set;
* timm's ResNet-v2 ``PreActBottleneck`` / ``PreActBasic`` (timm stays optional: it is looked at only
  when the model's classes come from it), when they compute exactly what the fused block does:
  ``BatchNormAct2d`` norms with a ReLU and no drop layer, plain ``nn.Conv2d`` convs without bias,
  kernels 1/3/1 (basic: 3/3) with symmetric zero padding k//2 and dilation 1, at most one strided
  conv, ``downsample`` None or a ``DownsampleConv`` (1x1 conv, ``Identity`` norm), and no drop
  path (``Identity`` or ``DropPath(0.0)``).

Everything else that looks like such a block (GroupNorm, weight-standardized convs, drop path > 0,
average-pool shortcuts, dilation, SyncBatchNorm, hooks on the block) is left as it is, and one
warning lists each such block with the reason.

What a swap keeps: every state_dict key (in the same order) and value, and more: the parameter
and buffer OBJECTS themselves move into the new block, so their dtype, device and
``requires_grad`` flags are unchanged and an optimizer built before the swap keeps updating the
model's parameters. The train/eval flag of the block and of each submodule is copied. The new
block is built on the meta device first, so a swap allocates nothing.

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

import math
import sys
import warnings
from typing import Any, Iterator, Optional, Union

import torch
import torch.nn as nn

from . import convert_postact, interop, reference
from .backends import AUTO_CUDA_TABLE, check_backend, resolve_backend
from .models import ResNetV2
from .modules import FusedBasicBlock, FusedBottleneck, _FusedBlock
from .stage import FusedStage, FusedStages, _stage_blocks

__all__ = ["convert", "unconvert", "describe", "BACKEND_DESCRIPTIONS", "SYNC_BATCHNORM_REASON"]

#: The reason given for a block whose norms are SyncBatchNorm: the fused kernels compute
#: per-process batch statistics, SyncBatchNorm reduces them across processes.
SYNC_BATCHNORM_REASON = "SyncBatchNorm (cross-process statistics) is not fused"

#: What ``describe`` says a fused block's ``backend`` runs.
BACKEND_DESCRIPTIONS = {
    "triton": "triton",
    "cuda": "cuda",
    "reference": "reference",
    "auto": "auto (triton on CUDA, eager on CPU)",
}
_AUTO_WITH_TABLE = "auto (cuda where AUTO_CUDA_TABLE measured it faster, else triton, on CUDA; eager on CPU)"

_FUSED_CLASSES = {"bottleneck": FusedBottleneck, "basic": FusedBasicBlock}
_REFERENCE_CLASSES = {"bottleneck": reference.PreActBottleneck, "basic": reference.PreActBasicBlock}


class _Unfusable(Exception):
    """A block the fused kernels cannot compute exactly; ``str(exc)`` is the reason."""


# ---------------------------------------------------------------------------------------
# Finding blocks
# ---------------------------------------------------------------------------------------


def _timm_blocks() -> dict[type, str]:
    """timm's pre-activation block classes, if (and only if) timm's resnetv2 is loaded.

    A model can only contain timm blocks when their module is already imported, so looking in
    sys.modules keeps timm optional and never pays for importing it.
    """
    resnetv2 = sys.modules.get("timm.models.resnetv2")
    if resnetv2 is None:
        return {}
    return {resnetv2.PreActBottleneck: "bottleneck", resnetv2.PreActBasic: "basic"}


def _classify(module: nn.Module, timm_blocks: dict[type, str]) -> Optional[tuple[str, str]]:
    """(origin, kind) of a pre-activation block: origin ``fused`` | ``reference`` | ``timm``,
    kind ``bottleneck`` | ``basic``; None for any other module."""
    if isinstance(module, FusedBottleneck):
        return "fused", "bottleneck"
    if isinstance(module, FusedBasicBlock):
        return "fused", "basic"
    # Exact types: a user subclass of a reference or timm block may override forward(), and a
    # fused block would silently drop whatever the override adds.
    if type(module) is reference.PreActBottleneck:
        return "reference", "bottleneck"
    if type(module) is reference.PreActBasicBlock:
        return "reference", "basic"
    kind = timm_blocks.get(type(module))
    return ("timm", kind) if kind is not None else None


def _find_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, str]]:
    """(path, block, origin, kind) for each block, in module order; never looks inside a block."""
    timm_blocks = _timm_blocks()

    # No de-duplication: a block reachable by two paths is yielded at both, so that a swap
    # replaces it in every parent (convert keeps one new block per old block object).
    def visit(path: str, module: nn.Module) -> Iterator[tuple[str, nn.Module, str, str]]:
        found = _classify(module, timm_blocks)
        if found is not None:
            yield (path, module, *found)
            return
        for name, child in module.named_children():
            yield from visit(f"{path}.{name}" if path else name, child)

    yield from visit("", model)


# ---------------------------------------------------------------------------------------
# What a block computes: the fused constructor's arguments, or why it cannot be fused
# ---------------------------------------------------------------------------------------


# A reason is (subject, problem): "conv1, conv2, conv3: StdConv2d (...)" reads better than three
# copies of the problem, so reasons with the same problem are listed once with all subjects.
_Reasons = list[tuple[str, str]]


def _format_reasons(reasons: _Reasons) -> str:
    by_problem: dict[str, list[str]] = {}
    for subject, problem in reasons:
        subjects = by_problem.setdefault(problem, [])
        if subject and subject not in subjects:
            subjects.append(subject)
    return "; ".join(f"{', '.join(subjects)}: {problem}" if subjects else problem
                     for problem, subjects in by_problem.items())


def _check_norm(name: str, norm: Any, origin: str, reasons: _Reasons) -> None:
    if origin == "timm":
        from timm.layers import BatchNormAct2d  # loaded already: the block came from timm

        if type(norm) is not BatchNormAct2d:
            reasons.append((name, f"{type(norm).__name__} (only BatchNorm + ReLU norms are fused)"))
            return
        act, drop = getattr(norm, "act", None), getattr(norm, "drop", None)
        if type(act) is not nn.ReLU:
            reasons.append((name, f"activation {type(act).__name__} (only ReLU is fused)"))
        if drop is not None and type(drop) is not nn.Identity:
            reasons.append((name, f"drop layer {type(drop).__name__} after the norm is not fused"))
    elif type(norm) is not reference.BatchNormReLU2d:
        reasons.append((name, f"{type(norm).__name__} (only BatchNormReLU2d norms are fused)"))
        return
    if not norm.affine or not norm.track_running_stats:
        reasons.append((name, f"affine={norm.affine}, track_running_stats={norm.track_running_stats} "
                              "(the fused blocks need both)"))


def _check_conv(name: str, conv: Any, kernel: int, reasons: _Reasons) -> int:
    """The conv's stride, after checking it is the plain conv the fused kernel computes."""
    if type(conv) is not nn.Conv2d:
        what = type(conv).__name__
        if "Std" in what:
            reasons.append((name, f"{what} (weight standardization is not fused)"))
        else:
            reasons.append((name, f"{what} (only plain nn.Conv2d is fused)"))
        return 1
    if conv.bias is not None:
        reasons.append((name, "conv bias is not fused"))
    if tuple(conv.kernel_size) != (kernel, kernel):
        reasons.append((name, f"kernel size {tuple(conv.kernel_size)}, the fused block needs "
                              f"{kernel}x{kernel}"))
        return 1
    if tuple(conv.dilation) != (1, 1):
        reasons.append((name, f"dilated convolution (dilation {conv.dilation[0]}) is not fused"))
        return 1
    if tuple(conv.padding) != (kernel // 2, kernel // 2) or conv.padding_mode != "zeros":
        reasons.append((name, f"padding {conv.padding!r} ({conv.padding_mode}); the fused block pads "
                              f"{kernel // 2} zeros on each side"))
    if conv.stride[0] != conv.stride[1]:
        reasons.append((name, f"asymmetric stride {tuple(conv.stride)} is not fused"))
    return int(conv.stride[0])


def _check_drop_path(block: nn.Module, reasons: _Reasons) -> None:
    drop_path = getattr(block, "drop_path", None)
    if drop_path is None or type(drop_path) is nn.Identity:
        return
    prob = getattr(drop_path, "drop_prob", None)
    if type(drop_path).__name__ == "DropPath" and prob == 0:
        return
    reasons.append(("drop_path", f"{type(drop_path).__name__}(drop_prob={prob:.3g}): stochastic depth "
                                 "is not fused"))


def _check_hooks(block: nn.Module, reasons: _Reasons) -> None:
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    for name, m in block.named_modules():
        if any(getattr(m, attr, None) for attr in hook_dicts):
            reasons.append((name or "the block", "hooks registered here would be lost by the swap or not "
                            "fire inside the fused kernels (remove them, convert, register them again)"))


def _bottle_ratio(out_chs: int, mid_chs: int) -> float:
    """A ratio r with int(out_chs * r) == mid_chs exactly (what the reference computes)."""
    ratio = mid_chs / out_chs
    for _ in range(8):  # mid/out * out can land one ulp below mid; step up until int() gives mid
        if int(out_chs * ratio) == mid_chs:
            return ratio
        ratio = math.nextafter(ratio, math.inf)
    raise _Unfusable(f"no bottle_ratio gives a middle width of {mid_chs} at {out_chs} output channels")


def _shortcut(block: nn.Module, origin: str, in_chs: int, out_chs: int, stride: int,
              reasons: _Reasons) -> str:
    downsample = getattr(block, "downsample", None)
    if origin != "timm":
        kind = getattr(block, "shortcut", "projection" if downsample is not None else "identity")
        if (downsample is not None) != (kind == "projection"):
            reasons.append(("downsample", f"{type(downsample).__name__} does not match shortcut {kind!r}"))
        if downsample is not None and type(downsample) is not reference.Downsample:
            reasons.append(("downsample", f"{type(downsample).__name__} (only a 1x1 projection is fused)"))
            return kind
    else:
        if downsample is None:
            if in_chs != out_chs or stride != 1:
                reasons.append(("downsample", f"missing for a block that changes the shape ({in_chs}->"
                                              f"{out_chs} channels, stride {stride})"))
            return "identity"
        kind = type(downsample).__name__
        if kind == "DownsampleAvg":
            reasons.append(("", "avg-pool shortcut (DownsampleAvg) is not fused"))
            return "projection"
        if kind != "DownsampleConv":
            reasons.append(("downsample", f"{kind} (only DownsampleConv is fused)"))
            return "projection"
        if type(getattr(downsample, "norm", None)) is not nn.Identity:
            reasons.append(("downsample.norm", "a normalized shortcut (preact=False) is not fused"))
        kind = "projection"
    if downsample is not None:
        conv = getattr(downsample, "conv", None)
        ds_stride = _check_conv("downsample.conv", conv, 1, reasons)
        if type(conv) is nn.Conv2d and ((conv.in_channels, conv.out_channels, conv.groups, ds_stride)
                                        != (in_chs, out_chs, 1, stride)):
            reasons.append(("downsample.conv", f"{conv.in_channels}->{conv.out_channels}, stride {ds_stride}, "
                                               f"groups {conv.groups} does not match the block ({in_chs}->"
                                               f"{out_chs}, stride {stride})"))
    return kind


def _width(norm: Any) -> Optional[int]:
    return getattr(norm, "num_features", getattr(norm, "num_channels", None))


def _block_args(block: nn.Module, origin: str, kind: str) -> dict:
    """The fused/reference block constructor's keyword arguments, derived from the module.

    Raises _Unfusable with every reason when the block computes something the fused kernels do
    not.
    """
    reasons: _Reasons = []
    names = ("norm1", "norm2", "norm3") if kind == "bottleneck" else ("norm1", "norm2")
    norms = [getattr(block, n, None) for n in names]
    if any(isinstance(n, nn.SyncBatchNorm) for n in norms):  # the one reason that matters then
        raise _Unfusable(SYNC_BATCHNORM_REASON)
    for name, norm in zip(names, norms):
        _check_norm(name, norm, origin, reasons)
    _check_drop_path(block, reasons)
    if origin != "fused":  # a fused block is not swapped: its hooks stay where they are
        _check_hooks(block, reasons)
    if kind == "bottleneck":
        c1, c2, c3 = block.conv1, block.conv2, block.conv3
        s1, s2, s3 = (_check_conv("conv1", c1, 1, reasons), _check_conv("conv2", c2, 3, reasons),
                      _check_conv("conv3", c3, 1, reasons))
        in_chs, mid_chs, out_chs, groups = c1.in_channels, c1.out_channels, c3.out_channels, c2.groups
        widths_ok = (c2.in_channels == c2.out_channels == c3.in_channels == mid_chs
                     and c1.groups == c3.groups == 1)
        if s3 != 1 or (s1 > 1 and s2 > 1):
            reasons.append(("", f"strides conv1={s1}, conv2={s2}, conv3={s3}: the fused block strides "
                                "one of conv1 / conv2 only"))
        stride, stride_on = (s1, "1x1") if s1 > 1 else (s2, "3x3")
    else:
        c1, c2 = block.conv1, block.conv2
        s1, s2 = _check_conv("conv1", c1, 3, reasons), _check_conv("conv2", c2, 3, reasons)
        in_chs, mid_chs, out_chs, groups = c1.in_channels, c1.out_channels, c2.out_channels, c1.groups
        widths_ok = c2.in_channels == mid_chs and c2.groups == groups
        if s2 != 1:
            reasons.append(("conv2", f"stride {s2}: the fused basic block strides conv1 only"))
        stride, stride_on = s1, "3x3"
    if not widths_ok or [_width(n) for n in norms] != [in_chs] + [mid_chs] * (len(norms) - 1):
        reasons.append(("", "the convs' and norms' widths do not chain as in a pre-activation block"))
    shortcut = _shortcut(block, origin, in_chs, out_chs, stride, reasons)
    if reasons:
        raise _Unfusable(_format_reasons(reasons))
    return dict(in_chs=in_chs, out_chs=out_chs, bottle_ratio=_bottle_ratio(out_chs, mid_chs),
                stride=stride, groups=groups, shortcut=shortcut, stride_on=stride_on,
                eps=float(norms[0].eps), momentum=norms[0].momentum)


# ---------------------------------------------------------------------------------------
# Swapping
# ---------------------------------------------------------------------------------------


def _build(old: nn.Module, cls: type, kwargs: dict, backend: Optional[str]) -> nn.Module:
    """A ``cls`` block holding ``old``'s parameter and buffer objects, modes and norm settings.

    Not load_state_dict: copying would give new tensors (an optimizer built before the swap
    would update orphans), and load_state_dict(assign=True) resets requires_grad to the new
    module's. Moving the objects keeps everything, and the key check below is load_state_dict's
    strict=True check. Raises _Unfusable before ``old`` or the model is touched.
    """
    with torch.device("meta"):  # nothing allocated: every tensor is replaced below
        new = cls(**kwargs) if backend is None else cls(**kwargs, backend=backend)
    old_state, new_state = old.state_dict(keep_vars=True), new.state_dict(keep_vars=True)
    if set(old_state) != set(new_state):
        raise _Unfusable(f"state_dict keys differ: missing {sorted(set(new_state) - set(old_state))}, "
                         f"unexpected {sorted(set(old_state) - set(new_state))}")
    for key, value in old_state.items():
        if new_state[key].shape != value.shape:
            raise _Unfusable(f"{key} has shape {tuple(value.shape)}, the fused block expects "
                             f"{tuple(new_state[key].shape)}")
    for key, value in old_state.items():
        path, _, attr = key.rpartition(".")
        owner = new.get_submodule(path)
        if attr in owner._parameters:
            owner._parameters[attr] = value
        else:
            owner._buffers[attr] = value
    # Keep the old block's child order, so state_dict() lists the keys in the same order.
    order = [name for name, _ in old.named_children() if name in new._modules]
    new._modules = type(new._modules)(
        [(n, new._modules[n]) for n in order] + [(n, m) for n, m in new._modules.items() if n not in order])
    for name, module in new.named_modules():
        try:
            module.training = old.get_submodule(name).training
        except AttributeError:
            module.training = old.training
    for name in ("norm1", "norm2", "norm3"):  # per-norm settings (the constructor takes one of each)
        if hasattr(new, name):
            getattr(new, name).eps = float(getattr(old, name).eps)
            getattr(new, name).momentum = getattr(old, name).momentum
    return new


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
        if type(m) is nn.Sequential and any(isinstance(c, _FusedBlock) for c in m.children()):
            m.__class__ = FusedStage
    for m in list(model.modules()):
        if type(m) is nn.Sequential and any(_stage_blocks(c) is not None for c in m.children()):
            m.__class__ = FusedStages


def _plain_containers(model: nn.Module) -> None:
    """Undo ``_fuse_containers``: FusedStage / FusedStages back to nn.Sequential."""
    for m in list(model.modules()):
        if type(m) in (FusedStage, FusedStages):
            m.__class__ = nn.Sequential


def _postact_module(model: nn.Module):
    """``convert_postact`` when ``model`` may hold post-activation blocks (torchvision's or timm's
    ResNet classes, or this package's fused ones), else None."""
    libraries = {type(m).__module__.split(".")[0] for m in model.modules()}
    if not libraries & {"torchvision", "timm", "resnet_fused"}:
        return None
    return convert_postact


def _set_model_backend(model: nn.Module, backend: str) -> None:
    if isinstance(model, ResNetV2):
        model.backend = backend


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Swap every fusable pre-activation block of ``model`` for its fused block, in place.

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
    skipped: list[tuple[str, str]] = []
    swapped: dict[int, nn.Module] = {}  # a block shared by two parents stays shared
    root = model
    for path, block, origin, kind in list(_find_blocks(model)):
        try:
            kwargs = _block_args(block, origin, kind)
        except _Unfusable as exc:
            # A fused block holding what it cannot compute (SyncBatchNorm put in by
            # convert_sync_batchnorm, say) keeps its backend: convert never makes it worse.
            skipped.append((path or "(root)", str(exc)))
            continue
        if origin == "fused":
            block.backend = backend
            continue
        if id(block) not in swapped:
            try:
                swapped[id(block)] = _build(block, _FUSED_CLASSES[kind], kwargs, backend)
            except _Unfusable as exc:
                skipped.append((path or "(root)", str(exc)))
                continue
        root = _replace(root, path, swapped[id(block)])
    if root is model:
        # Post-activation units (torchvision / timm ResNet v1, v1.5, ResNeXt): convert_postact.py.
        if _postact_module(model) is not None:
            postact = _postact_module(model)
            if type(model) in postact.postact_block_types():
                try:
                    root = postact.convert_postact_block(model, backend)
                except ValueError as exc:
                    skipped.append(("(root)", str(exc)))
            else:
                _, unfusable = postact.convert_postact(model, backend)
                skipped += list(unfusable.items())
    if skipped:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in skipped)
        warnings.warn(f"resnet_fused.convert: {len(skipped)} block(s) not converted, left as they "
                      f"were:\n{lines}", UserWarning, stacklevel=2)
    _fuse_containers(root)
    _set_model_backend(root, backend)
    return root


def unconvert(model: nn.Module) -> nn.Module:
    """Swap every fused block of ``model`` back to the eager ``reference.PreActBottleneck`` /
    ``PreActBasicBlock``, in place, keeping the same state (same tensors, modes and settings).

    timm blocks that were never converted stay timm blocks; a converted timm block comes back as
    this package's reference block (same computation, same state_dict keys). Returns ``model``
    (or the new block when ``model`` itself is a fused block).
    """
    _check_model(model, "unconvert")
    swapped: dict[int, nn.Module] = {}
    root = model
    for path, block, origin, kind in list(_find_blocks(model)):
        if origin != "fused":
            continue
        if id(block) not in swapped:
            kwargs = dict(in_chs=block.in_chs, out_chs=block.out_chs,
                          bottle_ratio=_bottle_ratio(block.out_chs, block.mid_chs), stride=block.stride,
                          groups=block.groups, shortcut=block.shortcut, stride_on=block.stride_on,
                          eps=float(block.norm1.eps), momentum=block.norm1.momentum)
            swapped[id(block)] = _build(block, _REFERENCE_CLASSES[kind], kwargs, None)
        root = _replace(root, path, swapped[id(block)])
    postact = _postact_module(root)
    if postact is not None:
        if type(root) in postact.fused_postact_types():
            root = postact.unconvert_postact_block(root)
        else:
            postact.unconvert_postact(root)
    _plain_containers(root)
    _set_model_backend(root, "reference")
    return root


def _runs(block: nn.Module, origin: str, kind: str) -> tuple[bool, str, Optional[str]]:
    """(fused, what runs, reason if not fused) for one block."""
    if origin == "fused":
        backend = block.backend
        runs = _AUTO_WITH_TABLE if backend == "auto" and AUTO_CUDA_TABLE else BACKEND_DESCRIPTIONS.get(backend, backend)
        try:
            _block_args(block, origin, kind)
        except _Unfusable as exc:  # e.g. SyncBatchNorm swapped into a fused block: say so
            return backend != "reference", f"{runs}, but: {exc}", str(exc)
        return backend != "reference", runs, None
    if origin == "reference":
        return False, "reference", None
    try:
        _block_args(block, origin, kind)
    except _Unfusable as exc:
        return False, f"not fused: {exc}", str(exc)
    reason = "eager timm block, convert() can fuse it"
    return False, f"not fused: {reason}", reason


def _statistics_sources(model: nn.Module) -> dict[int, str]:
    """id(block) -> where a fused block's train-mode input statistics come from (structure only:
    eval/frozen norms need none, and a block running the reference takes none)."""
    out: dict[int, str] = {}

    def chain(blocks: list, carried: bool) -> bool:
        prev_fused = carried
        for b in blocks:
            fused = isinstance(b, _FusedBlock) and not any(getattr(b, a, None) for a in (
                "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
            if isinstance(b, _FusedBlock):
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
            if not all(id(b) in out for b in blocks if isinstance(b, _FusedBlock)):
                chain(blocks, False)
    return out


def describe(model: nn.Module, as_dict: bool = False, statistics: bool = False) -> Union[str, dict[str, dict]]:
    """What runs each pre-activation block of ``model``.

    Returns one line per block, ``"<path>: <type> -> <what runs>"``, where what runs is
    ``triton``, ``cuda``, ``reference`` (eager), ``auto (triton on CUDA, eager on CPU)``, or
    ``not fused: <reason>`` (an unconverted timm block: why it cannot be fused, or that
    ``convert()`` can fuse it). A fused block holding something its kernels ignore (a
    SyncBatchNorm swapped in after it was built) reads ``<backend>, but: <reason>``. The path of
    a model that is itself a block is ``(root)``; a model without blocks gives an empty string.

    With ``as_dict=True``: ``{path: {"type": class name, "origin": "fused" | "reference" | "timm",
    "kind": "bottleneck" | "basic", "backend": the fused block's backend or None, "fused": bool
    (fused kernels may run), "runs": the text above, "reason": why not fusable, or None}}`` in
    module order.

    With ``statistics=True`` each line ends with ``[input statistics: ...]`` and each dict entry
    gains ``input_stats``: for a fused block, whether its train-mode bn1 statistics come chained
    from the previous block's last conv (stage fusion, ``stage.py``) or from its own pass (the
    first block of a chain: the network's first, or after a break), None for other blocks.
    """
    _check_model(model, "describe")
    if not isinstance(as_dict, bool):
        raise TypeError(f"as_dict must be a bool, got {type(as_dict).__name__}")
    if not isinstance(statistics, bool):
        raise TypeError(f"statistics must be a bool, got {type(statistics).__name__}")
    sources = _statistics_sources(model) if statistics else {}
    info: dict[str, dict] = {}
    for path, block, origin, kind in _find_blocks(model):
        fused, runs, reason = _runs(block, origin, kind)
        prefix = "timm " if origin == "timm" else ""
        info[path or "(root)"] = dict(
            type=f"{prefix}{type(block).__name__}", origin=origin, kind=kind,
            backend=block.backend if origin == "fused" else None, fused=fused, runs=runs, reason=reason)
        if statistics:
            info[path or "(root)"]["input_stats"] = sources.get(id(block), "own statistics pass"
                                                                if origin == "fused" else None)
    postact = _postact_module(model)
    if postact is not None:
        for path, entry in postact.describe_postact(model).items():
            if statistics:
                entry["input_stats"] = None
            info[path] = entry
    if as_dict:
        return info
    return "\n".join(f"{path}: {d['type']} -> {d['runs']}"
                     + (f" [input statistics: {d['input_stats']}]" if d.get("input_stats") else "")
                     for path, d in info.items())
