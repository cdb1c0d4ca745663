"""What ``convert`` knows about each kind of block: one walk over per-kind adapters.

An adapter names the block classes of its kind (this package's, timm's, torchvision's), says
why a block cannot be fused (every reason as ``(subject, problem)``, formatted one way for all
kinds by :func:`format_reasons`), and swaps a block for its fused twin and back:

* :class:`PreActAdapter`: this package's ``reference.PreActBottleneck`` / ``PreActBasicBlock`` and
  timm's ResNet-v2 ``PreActBottleneck`` / ``PreActBasic`` <-> ``FusedBottleneck`` /
  ``FusedBasicBlock``. The swap builds the fused block on the meta device and moves the old
  block's parameter and buffer objects into it, key by key.
* :class:`PostActAdapter`: torchvision's and timm's ResNet ``Bottleneck`` / ``BasicBlock`` <->
  ``FusedPostActBottleneck`` / ``FusedPostActBasicBlock`` / ``FusedTimmBottleneck`` /
  ``FusedTimmBasicBlock``. The swap moves the block's children themselves into an object of the
  other class.

A library's classes are looked up in ``sys.modules`` only: a model can hold timm or torchvision
blocks only when their module is already imported, so both libraries stay optional and are
never imported from here.

A shortcut that is a projection in all but form is fused as the projection it is: timm's
``DownsampleAvg`` whose pool is ``nn.Identity`` (stride 1) and timm resnet's
``Sequential(Identity, Conv2d 1x1, norm)``. A shortcut that really average-pools is not.
"""
from __future__ import annotations

import math
import sys
from collections import OrderedDict
from typing import Any, Iterator, NamedTuple, Optional

import torch
import torch.nn as nn

from . import reference
from .modules import FusedBasicBlock, FusedBottleneck
from .postact import (FusedPostActBasicBlock, FusedPostActBottleneck, FusedTimmBasicBlock, FusedTimmBottleneck,
                      is_frozen_norm, norm_problem)

__all__ = ["Unfusable", "Reasons", "format_reasons", "SYNC_BATCHNORM_REASON", "Found", "find_blocks",
           "PreActAdapter", "PostActAdapter", "PREACT", "POSTACT", "ADAPTERS"]

#: The reason given for a block whose norms are SyncBatchNorm: the fused kernels compute
#: per-process batch statistics, SyncBatchNorm reduces them across processes.
SYNC_BATCHNORM_REASON = "SyncBatchNorm (cross-process statistics) is not fused"

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_POOLS = ("AvgPool2d", "AvgPool2dSame")


class Unfusable(Exception):
    """A block the fused kernels cannot compute exactly; ``str(exc)`` is the reason."""


#: A reason is (subject, problem): "conv1, conv2, conv3: StdConv2d (...)" reads better than three
#: copies of the problem, so reasons with the same problem are listed once with all subjects.
Reasons = list[tuple[str, str]]


def format_reasons(reasons: Reasons) -> str:
    """``"subject, subject: problem; problem; ..."``: the one reason format of every kind."""
    by_problem: dict[str, list[str]] = {}
    for subject, problem in reasons:
        subjects = by_problem.setdefault(problem, [])
        if subject and subject not in subjects:
            subjects.append(subject)
    return "; ".join(f"{', '.join(subjects)}: {problem}" if subjects else problem
                     for problem, subjects in by_problem.items())


# ---------------------------------------------------------------------------------------
# Checks every kind shares
# ---------------------------------------------------------------------------------------


def check_conv(name: str, conv: Any, kernel: int, reasons: Reasons, groups_ok: bool = True) -> int:
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
    if conv.groups != 1 and not groups_ok:
        reasons.append((name, f"groups {conv.groups} on this conv are not fused"))
    return int(conv.stride[0])


def check_drop_path(block: nn.Module, reasons: Reasons) -> None:
    drop_path = getattr(block, "drop_path", None)
    if drop_path is None or type(drop_path) is nn.Identity:
        return
    prob = getattr(drop_path, "drop_prob", None)
    if type(drop_path).__name__ == "DropPath" and prob == 0:
        return
    shown = f"{prob:.3g}" if isinstance(prob, (int, float)) else repr(prob)
    reasons.append(("drop_path", f"{type(drop_path).__name__}(drop_prob={shown}): stochastic depth "
                                 "(drop path > 0) is not fused"))


def check_hooks(block: nn.Module, reasons: Reasons) -> None:
    for name, m in block.named_modules():
        if any(getattr(m, attr, None) for attr in _HOOK_DICTS):
            reasons.append((name or "the block", "hooks registered here would be lost by the swap or not "
                            "fire inside the fused kernels (remove them, convert, register them again)"))


def _width(norm: Any) -> Optional[int]:
    if hasattr(norm, "num_features"):
        return norm.num_features
    if hasattr(norm, "num_channels"):
        return norm.num_channels
    weight = getattr(norm, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) else None


def _is_pool(module: nn.Module) -> bool:
    return type(module).__name__ in _POOLS or isinstance(module, nn.AvgPool2d)


class Found(NamedTuple):
    """One block of a model: where it is, which adapter handles it, and what it is."""

    path: str
    block: nn.Module
    adapter: "_Adapter"
    fused: bool    # one of this package's fused blocks
    library: str   # "resnet_fused" (fused pre-activation), "reference", "timm" or "torchvision"
    kind: str      # "bottleneck" | "basic"


class _Adapter:
    """One kind of block. Subclasses fill in the class table, the checks and the two swaps."""

    #: ``describe``'s kind of a block of this adapter: ``f"{kind_prefix}{kind}"``.
    kind_prefix = ""
    #: Whether fused blocks of this kind take chained input statistics (stage fusion).
    chains_statistics = False

    def classes(self) -> dict[type, tuple[bool, str, str]]:
        """{class: (fused, library, kind)} of the blocks this adapter handles."""
        raise NotImplementedError

    def plan(self, found: Found) -> Any:
        """What the swap needs; raises Unfusable with every reason the kernels cannot compute
        the block."""
        raise NotImplementedError

    def fuse(self, found: Found, plan: Any, backend: str) -> nn.Module:
        """The fused twin of an eager block, holding its parameters and buffers."""
        raise NotImplementedError

    def unfuse(self, found: Found) -> nn.Module:
        """The eager twin of a fused block, holding its parameters and buffers."""
        raise NotImplementedError

    def describe_extra(self, block: nn.Module) -> dict:
        return {}


def find_blocks(model: nn.Module, adapters: tuple[_Adapter, ...]) -> Iterator[Found]:
    """Every block any of ``adapters`` handles, in module order; never looks inside a block.

    No de-duplication: a block reachable by two paths is yielded at both, so that a swap
    replaces it in every parent (the callers keep one new block per old block object).
    """
    table: dict[type, tuple[_Adapter, tuple[bool, str, str]]] = {}
    for adapter in adapters:
        table.update({cls: (adapter, info) for cls, info in adapter.classes().items()})

    # Exact types: a user subclass of a library block may override forward(), and a fused block
    # would silently drop whatever the override adds.
    def visit(path: str, module: nn.Module) -> Iterator[Found]:
        hit = table.get(type(module))
        if hit is not None:
            yield Found(path, module, hit[0], *hit[1])
            return
        for name, child in module.named_children():
            yield from visit(f"{path}.{name}" if path else name, child)

    yield from visit("", model)


def _sync_batchnorm(norms: list) -> None:
    if any(isinstance(n, nn.SyncBatchNorm) for n in norms):  # the one reason that matters then
        raise Unfusable(SYNC_BATCHNORM_REASON)


# ---------------------------------------------------------------------------------------
# Pre-activation blocks
# ---------------------------------------------------------------------------------------


def bottle_ratio(out_chs: int, mid_chs: int) -> float:
    """A ratio r with int(out_chs * r) == mid_chs exactly (what the reference computes)."""
    ratio = mid_chs / out_chs
    for _ in range(8):  # mid/out * out can land one ulp below mid; step up until int() gives mid
        if int(out_chs * ratio) == mid_chs:
            return ratio
        ratio = math.nextafter(ratio, math.inf)
    raise Unfusable(f"no bottle_ratio gives a middle width of {mid_chs} at {out_chs} output channels")


def _build(old: nn.Module, cls: type, kwargs: dict, backend: Optional[str]) -> nn.Module:
    """A ``cls`` block holding ``old``'s parameter and buffer objects, modes and norm settings.

    Not load_state_dict: copying would give new tensors (an optimizer built before the swap
    would update orphans), and load_state_dict(assign=True) resets requires_grad to the new
    module's. Moving the objects keeps everything, and the key check below is load_state_dict's
    strict=True check. Raises Unfusable before ``old`` or the model is touched.
    """
    with torch.device("meta"):  # nothing allocated: every tensor is replaced below
        new = cls(**kwargs) if backend is None else cls(**kwargs, backend=backend)
    old_state, new_state = old.state_dict(keep_vars=True), new.state_dict(keep_vars=True)
    if set(old_state) != set(new_state):
        raise Unfusable(f"state_dict keys differ: missing {sorted(set(new_state) - set(old_state))}, "
                        f"unexpected {sorted(set(old_state) - set(new_state))}")
    for key, value in old_state.items():
        if new_state[key].shape != value.shape:
            raise Unfusable(f"{key} has shape {tuple(value.shape)}, the fused block expects "
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


class PreActAdapter(_Adapter):
    """This package's and timm's pre-activation (ResNet v2) blocks.

    A timm block is fused when it computes exactly what the fused block does: ``BatchNormAct2d``
    norms with a ReLU and no drop layer, plain ``nn.Conv2d`` convs without bias, kernels 1/3/1
    (basic: 3/3) with symmetric zero padding k//2 and dilation 1, at most one strided conv,
    ``downsample`` None, a ``DownsampleConv`` (1x1 conv, ``Identity`` norm) or a
    ``DownsampleAvg`` whose pool is ``Identity`` (stride 1), and no drop path.
    """

    chains_statistics = True
    _FUSED = {"bottleneck": FusedBottleneck, "basic": FusedBasicBlock}
    _REFERENCE = {"bottleneck": reference.PreActBottleneck, "basic": reference.PreActBasicBlock}

    def classes(self) -> dict[type, tuple[bool, str, str]]:
        out = {FusedBottleneck: (True, "resnet_fused", "bottleneck"), FusedBasicBlock: (True, "resnet_fused", "basic"),
               reference.PreActBottleneck: (False, "reference", "bottleneck"),
               reference.PreActBasicBlock: (False, "reference", "basic")}
        resnetv2 = sys.modules.get("timm.models.resnetv2")
        if resnetv2 is not None:
            out[resnetv2.PreActBottleneck] = (False, "timm", "bottleneck")
            out[resnetv2.PreActBasic] = (False, "timm", "basic")
        return out

    @staticmethod
    def _check_norm(name: str, norm: Any, library: str, reasons: Reasons) -> None:
        if library == "timm":
            # Loaded already: the block came from timm, whose blocks import its norm layers.
            norm_act = sys.modules.get("timm.layers.norm_act")
            if norm_act is None or type(norm) is not norm_act.BatchNormAct2d:
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

    @staticmethod
    def _shortcut(block: nn.Module, library: str, in_chs: int, out_chs: int, stride: int,
                  reasons: Reasons) -> str:
        downsample = getattr(block, "downsample", None)
        if library != "timm":
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
                if type(getattr(downsample, "pool", None)) is not nn.Identity:
                    reasons.append(("downsample", "average-pool shortcut (DownsampleAvg) is not fused"))
                    return "projection"
            elif kind != "DownsampleConv":
                reasons.append(("downsample", f"{kind} (only DownsampleConv, or DownsampleAvg without a "
                                              "pool, is fused)"))
                return "projection"
            if type(getattr(downsample, "norm", None)) is not nn.Identity:
                reasons.append(("downsample.norm", "a normalized shortcut (preact=False) is not fused"))
            kind = "projection"
        if downsample is not None:
            conv = getattr(downsample, "conv", None)
            ds_stride = check_conv("downsample.conv", conv, 1, reasons)
            if type(conv) is nn.Conv2d and ((conv.in_channels, conv.out_channels, conv.groups, ds_stride)
                                            != (in_chs, out_chs, 1, stride)):
                reasons.append(("downsample.conv", f"{conv.in_channels}->{conv.out_channels}, stride {ds_stride}, "
                                                   f"groups {conv.groups} does not match the block ({in_chs}->"
                                                   f"{out_chs}, stride {stride})"))
        return kind

    def plan(self, found: Found) -> dict:
        """The fused/reference block constructor's keyword arguments, derived from the module."""
        block, library, kind = found.block, found.library, found.kind
        reasons: Reasons = []
        names = ("norm1", "norm2", "norm3") if kind == "bottleneck" else ("norm1", "norm2")
        norms = [getattr(block, n, None) for n in names]
        _sync_batchnorm(norms)
        for name, norm in zip(names, norms):
            self._check_norm(name, norm, library, reasons)
        check_drop_path(block, reasons)
        if not found.fused:  # a fused block is not swapped: its hooks stay where they are
            check_hooks(block, reasons)
        if kind == "bottleneck":
            c1, c2, c3 = block.conv1, block.conv2, block.conv3
            s1, s2, s3 = (check_conv("conv1", c1, 1, reasons), check_conv("conv2", c2, 3, reasons),
                          check_conv("conv3", c3, 1, reasons))
            in_chs, mid_chs, out_chs, groups = c1.in_channels, c1.out_channels, c3.out_channels, c2.groups
            widths_ok = (c2.in_channels == c2.out_channels == c3.in_channels == mid_chs
                         and c1.groups == c3.groups == 1)
            if s3 != 1 or (s1 > 1 and s2 > 1):
                reasons.append(("", f"strides conv1={s1}, conv2={s2}, conv3={s3}: the fused block strides "
                                    "one of conv1 / conv2 only"))
            stride, stride_on = (s1, "1x1") if s1 > 1 else (s2, "3x3")
        else:
            c1, c2 = block.conv1, block.conv2
            s1, s2 = check_conv("conv1", c1, 3, reasons), check_conv("conv2", c2, 3, reasons)
            in_chs, mid_chs, out_chs, groups = c1.in_channels, c1.out_channels, c2.out_channels, c1.groups
            widths_ok = c2.in_channels == mid_chs and c2.groups == groups
            if s2 != 1:
                reasons.append(("conv2", f"stride {s2}: the fused basic block strides conv1 only"))
            stride, stride_on = s1, "3x3"
        if not widths_ok or [_width(n) for n in norms] != [in_chs] + [mid_chs] * (len(norms) - 1):
            reasons.append(("", "the convs' and norms' widths do not chain as in a pre-activation block"))
        shortcut = self._shortcut(block, library, in_chs, out_chs, stride, reasons)
        if reasons:
            raise Unfusable(format_reasons(reasons))
        return dict(in_chs=in_chs, out_chs=out_chs, bottle_ratio=bottle_ratio(out_chs, mid_chs),
                    stride=stride, groups=groups, shortcut=shortcut, stride_on=stride_on,
                    eps=float(norms[0].eps), momentum=norms[0].momentum)

    def fuse(self, found: Found, plan: dict, backend: str) -> nn.Module:
        return _build(found.block, self._FUSED[found.kind], plan, backend)

    def unfuse(self, found: Found) -> nn.Module:
        block = found.block
        kwargs = dict(in_chs=block.in_chs, out_chs=block.out_chs,
                      bottle_ratio=bottle_ratio(block.out_chs, block.mid_chs), stride=block.stride,
                      groups=block.groups, shortcut=block.shortcut, stride_on=block.stride_on,
                      eps=float(block.norm1.eps), momentum=block.norm1.momentum)
        return _build(block, self._REFERENCE[found.kind], kwargs, None)


# ---------------------------------------------------------------------------------------
# Post-activation blocks
# ---------------------------------------------------------------------------------------


def _moved(old: nn.Module, cls: type) -> nn.Module:
    """An object of ``cls`` holding ``old``'s children, parameters, buffers and attributes (the
    same objects, in the same order)."""
    new = cls.__new__(cls)
    state = dict(old.__dict__)
    for key in ("_modules", "_parameters", "_buffers"):
        state[key] = type(state[key])(state[key])
    new.__dict__.update(state)
    return new


def _resequenced(seq: nn.Sequential, modules: "OrderedDict[str, nn.Module]") -> nn.Sequential:
    """A new ``nn.Sequential`` with ``seq``'s attributes and hooks and ``modules`` as children,
    under their own keys (so state_dict keys stay what they were)."""
    new = _moved(seq, nn.Sequential)
    new._modules = type(seq._modules)(modules)
    return new


class PostActAdapter(_Adapter):
    """torchvision's and timm's post-activation (ResNet v1 / v1.5, ResNeXt) blocks.

    A block is fused when it computes exactly what the kernels do: plain ``nn.Conv2d`` without
    bias, kernels 1/3/1 (basic: 3/3), zero padding k // 2, dilation 1, the stride on conv1 or
    conv2 (v1 / v1.5; basic: conv1), groups on the 3x3 only (ResNeXt); norms ``nn.BatchNorm2d``
    (affine; train, eval or frozen) or torchvision's ``FrozenBatchNorm2d``; ReLU activations; a
    ``downsample`` that is None or ``Sequential(Conv2d 1x1 stride s, norm)``, which may hold
    ``nn.Identity`` entries too (timm's stride-1 ``avg_down`` projection); for timm no attention
    (``se``), anti-aliasing (``aa``), DropBlock or drop path > 0.
    """

    kind_prefix = "postact_"
    _FUSED = {FusedPostActBottleneck: ("torchvision", "bottleneck"), FusedPostActBasicBlock: ("torchvision", "basic"),
              FusedTimmBottleneck: ("timm", "bottleneck"), FusedTimmBasicBlock: ("timm", "basic")}
    _FUSED_CLASS = {v: k for k, v in _FUSED.items()}

    def classes(self) -> dict[type, tuple[bool, str, str]]:
        out = {cls: (True, *info) for cls, info in self._FUSED.items()}
        for library, name in (("torchvision", "torchvision.models.resnet"), ("timm", "timm.models.resnet")):
            lib = sys.modules.get(name)
            if lib is not None:
                out[lib.Bottleneck] = (False, library, "bottleneck")
                out[lib.BasicBlock] = (False, library, "basic")
        return out

    @staticmethod
    def _eager_class(library: str, kind: str) -> type:
        # Loaded already: a fused block of this library exists only after one of its blocks was
        # converted (or the user built one, importing the library to do so).
        name = "torchvision.models.resnet" if library == "torchvision" else "timm.models.resnet"
        lib = sys.modules.get(name)
        if lib is None:
            raise Unfusable(f"{name} is not imported: import it to get its {kind} block back")
        return lib.Bottleneck if kind == "bottleneck" else lib.BasicBlock

    @staticmethod
    def _downsample(downsample: Any, in_chs: int, out_chs: int, stride: int, reasons: Reasons) -> None:
        if downsample is None:
            if in_chs != out_chs or stride != 1:
                reasons.append(("downsample", f"missing for a block that changes the shape ({in_chs}->"
                                              f"{out_chs} channels, stride {stride})"))
            return
        if type(downsample) is not nn.Sequential:
            reasons.append(("downsample", f"{type(downsample).__name__} (only Sequential(Conv2d 1x1, norm) "
                                          "is fused)"))
            return
        if any(_is_pool(m) for m in downsample):
            reasons.append(("downsample", "average-pool shortcut (ResNet-D) is not fused"))
            return
        parts = [(key, m) for key, m in downsample.named_children() if type(m) is not nn.Identity]
        if len(parts) != 2 or type(parts[0][1]) is not nn.Conv2d:
            reasons.append(("downsample", "only Sequential(Conv2d 1x1, norm) is fused, with "
                                          f"nn.Identity entries at most; this one holds "
                                          f"{', '.join(type(m).__name__ for _, m in parts) or 'nothing else'}"))
            return
        (conv_key, conv), (norm_key, norm) = parts
        ds_stride = check_conv(f"downsample.{conv_key}", conv, 1, reasons, groups_ok=False)
        if isinstance(norm, nn.SyncBatchNorm):
            raise Unfusable(SYNC_BATCHNORM_REASON)
        problem = norm_problem(norm)
        if problem is not None:
            reasons.append((f"downsample.{norm_key}", problem))
        if type(conv) is nn.Conv2d and (conv.in_channels, conv.out_channels, ds_stride) != (in_chs, out_chs, stride):
            reasons.append((f"downsample.{conv_key}", f"{conv.in_channels}->{conv.out_channels}, stride {ds_stride} "
                                                      f"does not match the block ({in_chs}->{out_chs}, stride "
                                                      f"{stride})"))

    def plan(self, found: Found) -> None:
        block, library, kind = found.block, found.library, found.kind
        reasons: Reasons = []
        names = ("1", "2", "3") if kind == "bottleneck" else ("1", "2")
        convs = [getattr(block, f"conv{i}", None) for i in names]
        norms = [getattr(block, f"bn{i}", None) for i in names]
        _sync_batchnorm(norms)
        strides = []
        for i, conv in zip(names, convs):
            kernel = 3 if (kind == "basic" or i == "2") else 1
            strides.append(check_conv(f"conv{i}", conv, kernel, reasons,
                                      groups_ok=(kind == "bottleneck" and i == "2")))
        for i, norm in zip(names, norms):
            problem = norm_problem(norm)
            if problem:
                reasons.append((f"bn{i}", problem))
        if not reasons:  # the shapes are only meaningful for plain convs
            if kind == "bottleneck" and (strides[2] != 1 or (strides[0] > 1 and strides[1] > 1)):
                reasons.append(("", f"strides conv1={strides[0]}, conv2={strides[1]}, conv3={strides[2]}: "
                                    "the fused block strides one of conv1 / conv2 only"))
            if kind == "basic" and strides[1] != 1:
                reasons.append(("conv2", f"stride {strides[1]}: the fused basic block strides conv1 only"))
            widths = [(c.in_channels, c.out_channels) for c in convs]
            if any(widths[j][1] != widths[j + 1][0] for j in range(len(widths) - 1)) or \
                    [_width(n) for n in norms] != [w[1] for w in widths]:
                reasons.append(("", "the convs' and norms' widths do not chain as in a ResNet block"))
            self._downsample(getattr(block, "downsample", None), widths[0][0], widths[-1][1],
                             strides[0] * strides[1], reasons)
        if library == "timm":
            for name in ("act1", "act2", "act3") if kind == "bottleneck" else ("act1", "act2"):
                act = getattr(block, name, None)
                if type(act) is not nn.ReLU:
                    reasons.append((name, f"{type(act).__name__} (only ReLU is fused)"))
            if getattr(block, "se", None) is not None:
                reasons.append(("se", f"attention ({type(block.se).__name__}) is not fused"))
            if type(getattr(block, "aa", None)) not in (nn.Identity, type(None)):
                reasons.append(("aa", f"anti-aliasing ({type(block.aa).__name__}) is not fused"))
            if type(getattr(block, "drop_block", None)) not in (nn.Identity, type(None)):
                reasons.append(("drop_block", f"{type(block.drop_block).__name__} is not fused"))
            check_drop_path(block, reasons)
        elif type(getattr(block, "relu", None)) is not nn.ReLU:
            reasons.append(("relu", f"{type(getattr(block, 'relu', None)).__name__} (only ReLU is fused)"))
        if not found.fused:  # a fused block is not swapped: its hooks stay where they are
            check_hooks(block, reasons)
        if reasons:
            raise Unfusable(format_reasons(reasons))
        return None

    def fuse(self, found: Found, plan: None, backend: str) -> nn.Module:
        block, library, kind = found.block, found.library, found.kind
        new = _moved(block, self._FUSED_CLASS[(library, kind)])
        new.backend = backend
        if kind == "bottleneck" and library == "torchvision":
            new.stride_on = "1x1" if block.conv1.stride[0] > 1 else "3x3"
        downsample = new._modules.get("downsample")
        if downsample is not None and any(type(m) is nn.Identity for m in downsample):
            # The fused block reads its projection as Sequential(conv, norm): the no-op entries go,
            # the conv and norm keep their keys (and so their state_dict keys).
            new._modules["downsample"] = _resequenced(downsample, OrderedDict(
                (k, m) for k, m in downsample.named_children() if type(m) is not nn.Identity))
        return new

    def unfuse(self, found: Found) -> nn.Module:
        new = _moved(found.block, self._eager_class(found.library, found.kind))
        for attr in ("backend", "stride_on"):
            new.__dict__.pop(attr, None)
        downsample = new._modules.get("downsample")
        if type(downsample) is nn.Sequential:
            keys = list(downsample._modules)
            if all(k.isdigit() for k in keys) and keys != [str(i) for i in range(len(keys))]:
                # The no-op entries fuse() dropped come back, so the block prints as it was built.
                modules = OrderedDict()
                for i in range(int(max(keys, key=int)) + 1):
                    if str(i) in downsample._modules:
                        modules[str(i)] = downsample._modules[str(i)]
                    else:
                        modules[str(i)] = nn.Identity()
                        modules[str(i)].training = downsample.training
                new._modules["downsample"] = _resequenced(downsample, modules)
        return new

    def describe_extra(self, block: nn.Module) -> dict:
        frozen = [is_frozen_norm(m) for name, m in block.named_children() if name.startswith("bn")]
        return {"norms": "frozen" if all(frozen) else ("mixed" if any(frozen) else "batch")}


PREACT = PreActAdapter()
POSTACT = PostActAdapter()
#: Every kind ``convert`` handles, in the order a block's class is looked up.
ADAPTERS = (PREACT, POSTACT)
