"""Finding and converting post-activation (ResNet v1 / v1.5) blocks: torchvision and timm models.

    import torchvision, resnet_fused as rf
    from resnet_fused.convert_postact import convert_postact, describe_postact, unconvert_postact
    model = torchvision.models.resnet50()              # or timm.create_model("resnet50"), resnext50_32x4d, ...
    converted, unfusable = convert_postact(model, backend="triton")
    describe_postact(model)                            # {path: {...}} per block
    unconvert_postact(model)                           # back to torchvision's / timm's classes

Blocks found anywhere in the module tree (never inside a block):

* torchvision's ``models.resnet.Bottleneck`` / ``BasicBlock`` (exact types; looked at only when
  torchvision's resnet module is already imported, so torchvision stays optional) ->
  :class:`~resnet_fused.postact.FusedPostActBottleneck` / ``FusedPostActBasicBlock``;
* timm's ``models.resnet.Bottleneck`` / ``BasicBlock`` (likewise) -> ``FusedTimmBottleneck`` /
  ``FusedTimmBasicBlock``;
* blocks that are already fused only get their ``backend`` set.

A block is fused when it computes exactly what the kernels do: plain ``nn.Conv2d`` without bias,
kernels 1/3/1 (basic: 3/3), zero padding k // 2, dilation 1, the stride on conv1 or conv2 (v1 /
v1.5; basic: conv1), groups on the 3x3 only (ResNeXt); norms ``nn.BatchNorm2d`` (affine; train,
eval or frozen) or torchvision's ``FrozenBatchNorm2d`` (detection backbones); ReLU activations; a
``downsample`` that is None or ``Sequential(Conv2d 1x1 stride s, norm)``; for timm no attention
(``se``), anti-aliasing (``aa``), DropBlock or drop path > 0. Everything else stays eager and is
returned with its reason: attention / anti-aliased variants, drop path > 0, average-pool
shortcuts (ResNet-D), dilation, SyncBatchNorm, blocks with hooks.

A swap moves the block's children themselves (the same conv, norm and activation modules, so the
same parameter and buffer objects, in the same order) into an object of the fused class: every
state_dict key, value, dtype, device, ``requires_grad`` flag and train/eval flag is kept, and an
optimizer built before the swap keeps updating the model. Nothing is allocated.
"""
from __future__ import annotations

import sys
from typing import Any, Iterator, Optional

import torch.nn as nn

from .backends import check_backend, resolve_backend
from .postact import (FusedPostActBasicBlock, FusedPostActBottleneck, FusedTimmBasicBlock, FusedTimmBottleneck,
                      downsample_parts, is_frozen_norm, norm_problem)

__all__ = ["convert_postact", "convert_postact_block", "unconvert_postact", "unconvert_postact_block",
           "describe_postact", "postact_block_types", "fused_postact_types",
           "find_postact_blocks", "postact_problems"]

_FUSED = {FusedPostActBottleneck: ("torchvision", "bottleneck"), FusedPostActBasicBlock: ("torchvision", "basic"),
          FusedTimmBottleneck: ("timm", "bottleneck"), FusedTimmBasicBlock: ("timm", "basic")}
_FUSED_CLASS = {v: k for k, v in _FUSED.items()}


def _eager_classes() -> dict[type, tuple[str, str]]:
    """torchvision's and timm's post-activation block classes, for the libraries already imported."""
    out: dict[type, tuple[str, str]] = {}
    tv = sys.modules.get("torchvision.models.resnet")
    if tv is not None:
        out[tv.Bottleneck] = ("torchvision", "bottleneck")
        out[tv.BasicBlock] = ("torchvision", "basic")
    tm = sys.modules.get("timm.models.resnet")
    if tm is not None:
        out[tm.Bottleneck] = ("timm", "bottleneck")
        out[tm.BasicBlock] = ("timm", "basic")
    return out


def _eager_class(library: str, kind: str) -> type:
    if library == "torchvision":
        from torchvision.models import resnet as lib
    else:
        from timm.models import resnet as lib
    return lib.Bottleneck if kind == "bottleneck" else lib.BasicBlock


def find_postact_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, str, str]]:
    """(path, block, origin "fused" | "eager", library "torchvision" | "timm", kind) per block."""
    eager = _eager_classes()

    def visit(path: str, module: nn.Module):
        if type(module) in _FUSED:
            yield (path, module, "fused", *_FUSED[type(module)])
            return
        if type(module) in eager:
            yield (path, module, "eager", *eager[type(module)])
            return
        for name, child in module.named_children():
            yield from visit(f"{path}.{name}" if path else name, child)

    yield from visit("", model)


def _conv_problem(name: str, conv: Any, kernel: int, group_ok: bool) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return f"{name}: {type(conv).__name__} (only plain nn.Conv2d is fused)"
    if conv.bias is not None:
        return f"{name}: conv bias is not fused"
    if tuple(conv.kernel_size) != (kernel, kernel):
        return f"{name}: kernel {tuple(conv.kernel_size)}, the fused block needs {kernel}x{kernel}"
    if tuple(conv.dilation) != (1, 1):
        return f"{name}: dilated convolution (dilation {conv.dilation[0]}) is not fused"
    if tuple(conv.padding) != (kernel // 2, kernel // 2) or conv.padding_mode != "zeros":
        return f"{name}: padding {conv.padding!r} ({conv.padding_mode}) is not the zero padding k // 2"
    if conv.stride[0] != conv.stride[1]:
        return f"{name}: asymmetric stride {tuple(conv.stride)} is not fused"
    if conv.groups != 1 and not group_ok:
        return f"{name}: groups {conv.groups} on this conv are not fused"
    return None


def _hooked(block: nn.Module) -> Optional[str]:
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    for name, m in block.named_modules():
        if any(getattr(m, attr, None) for attr in hook_dicts):
            return (f"{name or 'the block'}: hooks registered here would be lost by the swap or not fire inside "
                    "the fused kernels (remove them, convert, register them again)")
    return None


def _drop_path_problem(drop_path: Any) -> Optional[str]:
    if drop_path is None or type(drop_path) is nn.Identity:
        return None
    prob = getattr(drop_path, "drop_prob", None)
    if type(drop_path).__name__ == "DropPath" and prob == 0:
        return None
    return f"drop_path: {type(drop_path).__name__}(drop_prob={prob}): stochastic depth (drop path > 0) is not fused"


def _width(norm: Any) -> Optional[int]:
    if hasattr(norm, "num_features"):
        return norm.num_features
    weight = getattr(norm, "weight", None)
    return weight.shape[0] if weight is not None else None


def postact_problems(block: nn.Module, library: str, kind: str) -> list[str]:
    """Every reason the fused kernels cannot compute ``block`` (empty: fusable)."""
    problems: list[str] = []
    names = ("1", "2", "3") if kind == "bottleneck" else ("1", "2")
    convs = [getattr(block, f"conv{i}", None) for i in names]
    norms = [getattr(block, f"bn{i}", None) for i in names]
    for i, conv in zip(names, convs):
        kernel = 3 if (kind == "basic" or i == "2") else 1
        problem = _conv_problem(f"conv{i}", conv, kernel, group_ok=(kind == "bottleneck" and i == "2"))
        if problem:
            problems.append(problem)
    for i, norm in zip(names, norms):
        if isinstance(norm, nn.SyncBatchNorm):
            problems.append(f"bn{i}: SyncBatchNorm (cross-process statistics) is not fused")
        elif norm_problem(norm):
            problems.append(f"bn{i}: {norm_problem(norm)}")
    if not problems:
        strides = [int(c.stride[0]) for c in convs]
        if kind == "bottleneck" and (strides[2] != 1 or (strides[0] > 1 and strides[1] > 1)):
            problems.append(f"strides {strides}: the fused bottleneck strides conv1 or conv2 only")
        if kind == "basic" and strides[1] != 1:
            problems.append(f"conv2: stride {strides[1]}: the fused basic block strides conv1 only")
        total = strides[0] * strides[1]
        widths = [(c.in_channels, c.out_channels) for c in convs]
        if any(widths[j][1] != widths[j + 1][0] for j in range(len(widths) - 1)) or \
                [_width(n) for n in norms] != [w[1] for w in widths]:
            problems.append("the convs' and norms' widths do not chain as in a ResNet block")
        downsample = getattr(block, "downsample", None)
        if downsample is None:
            if widths[0][0] != widths[-1][1] or total != 1:
                problems.append("downsample: missing for a block that changes the shape")
        elif type(downsample) is nn.Sequential and any(type(m).__name__ in ("AvgPool2d", "AvgPool2dSame")
                                                        for m in downsample):
            problems.append("downsample: average-pool shortcut (ResNet-D) is not fused")
        else:
            try:
                conv, _ = downsample_parts(downsample)
                if (conv.in_channels, conv.out_channels, int(conv.stride[0])) != (widths[0][0], widths[-1][1], total):
                    problems.append("downsample: its conv does not match the block's channels and stride")
            except ValueError as exc:
                problems.append(str(exc))
    if library == "timm":
        for name in ("act1", "act2", "act3") if kind == "bottleneck" else ("act1", "act2"):
            if type(getattr(block, name, None)) is not nn.ReLU:
                problems.append(f"{name}: {type(getattr(block, name, None)).__name__} (only ReLU is fused)")
        if getattr(block, "se", None) is not None:
            problems.append(f"se: attention ({type(block.se).__name__}) is not fused")
        if type(getattr(block, "aa", None)) not in (nn.Identity, type(None)):
            problems.append(f"aa: anti-aliasing ({type(block.aa).__name__}) is not fused")
        if type(getattr(block, "drop_block", None)) not in (nn.Identity, type(None)):
            problems.append(f"drop_block: {type(block.drop_block).__name__} is not fused")
        problem = _drop_path_problem(getattr(block, "drop_path", None))
        if problem:
            problems.append(problem)
    elif type(getattr(block, "relu", None)) is not nn.ReLU:
        problems.append(f"relu: {type(getattr(block, 'relu', None)).__name__} (only ReLU is fused)")
    hooked = _hooked(block)
    if hooked:
        problems.append(hooked)
    return problems


def _moved(old: nn.Module, cls: type) -> nn.Module:
    """An object of ``cls`` holding ``old``'s children, parameters, buffers and attributes (the
    same objects, in the same order)."""
    new = cls.__new__(cls)
    state = dict(old.__dict__)
    for key in ("_modules", "_parameters", "_buffers"):
        state[key] = type(state[key])(state[key])
    new.__dict__.update(state)
    return new


def _fused_from(block: nn.Module, library: str, kind: str, backend: str) -> nn.Module:
    new = _moved(block, _FUSED_CLASS[(library, kind)])
    new.backend = backend
    if kind == "bottleneck" and library == "torchvision":
        new.stride_on = "1x1" if block.conv1.stride[0] > 1 else "3x3"
    return new


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)


def postact_block_types() -> frozenset:
    """Every class ``convert_postact_block`` accepts: the eager torchvision / timm blocks of the
    libraries already imported, and the fused ones."""
    return frozenset(_eager_classes()) | frozenset(_FUSED)


def fused_postact_types() -> frozenset:
    """The fused post-activation block classes (``unconvert_postact_block`` takes these)."""
    return frozenset(_FUSED)


def convert_postact_block(block: nn.Module, backend: str = "auto") -> nn.Module:
    """The fused twin of one torchvision / timm post-activation block (holding its modules).
    Raises ValueError with the reasons when it cannot be fused, TypeError for another module."""
    backend = resolve_backend(check_backend(backend))
    found = _eager_classes().get(type(block))
    if type(block) in _FUSED:
        block.backend = backend
        return block
    if found is None:
        raise TypeError(f"{type(block).__name__} is not a torchvision or timm post-activation block")
    problems = postact_problems(block, *found)
    if problems:
        raise ValueError("; ".join(problems))
    return _fused_from(block, *found, backend)


def convert_postact(model: nn.Module, backend: str = "auto") -> tuple[list[str], dict[str, str]]:
    """Swap every fusable torchvision / timm post-activation block of ``model`` in place.

    Returns (paths converted or, if already fused, given ``backend``; {path: reason} of the
    blocks left eager). No warning here: the caller (``convert``) reports. A model that is itself
    a block is listed as unfusable here (nothing can replace the root in place): use
    :func:`convert_postact_block` for it.
    """
    backend = resolve_backend(check_backend(backend))
    converted: list[str] = []
    unfusable: dict[str, str] = {}
    swapped: dict[int, nn.Module] = {}
    for path, block, origin, library, kind in list(find_postact_blocks(model)):
        if origin == "fused":
            problems = postact_problems(block, library, kind)
            if problems:  # e.g. SyncBatchNorm swapped in after conversion: keep, report
                unfusable[path or "(root)"] = "; ".join(problems)
            block.backend = backend
            converted.append(path or "(root)")
            continue
        if not path:
            unfusable["(root)"] = "the model is itself a block: use convert_postact_block(model)"
            continue
        problems = postact_problems(block, library, kind)
        if problems:
            unfusable[path] = "; ".join(problems)
            continue
        if id(block) not in swapped:
            swapped[id(block)] = _fused_from(block, library, kind, backend)
        _replace(model, path, swapped[id(block)])
        converted.append(path)
    return converted, unfusable


def unconvert_postact(model: nn.Module) -> list[str]:
    """Swap every fused post-activation block back to torchvision's / timm's class (the same
    modules and state); returns the paths. A model that is itself a fused block is not replaced
    (use ``unconvert_postact_block``)."""
    paths = []
    swapped: dict[int, nn.Module] = {}
    for path, block, origin, library, kind in list(find_postact_blocks(model)):
        if origin != "fused" or not path:
            continue
        if id(block) not in swapped:
            swapped[id(block)] = unconvert_postact_block(block)
        _replace(model, path, swapped[id(block)])
        paths.append(path)
    return paths


def unconvert_postact_block(block: nn.Module) -> nn.Module:
    """torchvision's / timm's block holding a fused block's modules and state."""
    library, kind = _FUSED[type(block)]
    new = _moved(block, _eager_class(library, kind))
    for attr in ("backend", "stride_on"):
        new.__dict__.pop(attr, None)
    return new


def describe_postact(model: nn.Module) -> dict[str, dict]:
    """{path: {"type", "origin" ("fused" | "torchvision" | "timm"), "kind", "backend", "fused",
    "runs", "reason", "norms"}} per post-activation block, in module order; the format of
    ``describe(model, as_dict=True)``, plus "norms": "batch" | "frozen" | "mixed"."""
    info: dict[str, dict] = {}
    for path, block, origin, library, kind in find_postact_blocks(model):
        problems = postact_problems(block, library, kind)
        reason = "; ".join(problems) or None
        norms = [m for name, m in block.named_children() if name.startswith("bn")]
        frozen = [is_frozen_norm(m) for m in norms]
        norm_kind = "frozen" if all(frozen) else ("mixed" if any(frozen) else "batch")
        if origin == "fused":
            runs = block.backend + (f", but: {reason}" if reason else "")
            fused = block.backend != "reference"
            backend = block.backend
        else:
            runs = f"not fused: {reason}" if reason else "not fused: eager block, convert() can fuse it"
            fused, backend = False, None
        info[path or "(root)"] = dict(
            type=f"{library} {type(block).__name__}", origin="fused" if origin == "fused" else library,
            kind=f"postact_{kind}", backend=backend, fused=fused, runs=runs,
            reason=reason if reason else (None if origin == "fused" else "eager block, convert() can fuse it"),
            norms=norm_kind)
    return info
