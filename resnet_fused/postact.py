"""Fused post-activation ResNet blocks: drop-ins for torchvision's and timm's ``Bottleneck`` /
``BasicBlock`` (ResNet v1.5 and v1, ResNeXt), running ``resnet_fused::postact_block_forward``.

* :class:`FusedPostActBottleneck` / :class:`FusedPostActBasicBlock`: torchvision's constructor
  (``inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer``) and
  submodules ``conv1, bn1, conv2, bn2, conv3, bn3, relu, downsample`` (state_dict keys
  ``conv1.weight``, ``bn1.*``, ..., ``downsample.0.weight``, ``downsample.1.*``), plus the keyword
  ``stride_on`` ("3x3": v1.5, torchvision's; "1x1": v1, the stride on the first 1x1) and
  ``backend``.
* :class:`FusedTimmBottleneck` / :class:`FusedTimmBasicBlock`: timm's ``resnet`` constructor
  (``cardinality, reduce_first, first_dilation, act_layer, attn_layer, aa_layer, drop_block,
  drop_path``, ...) and submodules (``act1``..``act3``, ``aa``, ``se``, ``drop_block``,
  ``drop_path``), same keys as timm. Options the kernels do not compute (attention, anti-aliasing,
  DropBlock, drop path, dilation, an activation other than ReLU) raise ValueError: keep timm's
  block for those (``convert`` leaves them eager and lists them).

Norms: ``nn.BatchNorm2d`` (affine; train, eval or frozen = eval mode inside a training model) or
``torchvision.ops.FrozenBatchNorm2d`` (always a constant affine; its parameters are buffers).
A downsample is ``None`` or ``Sequential(Conv2d 1x1 stride s, norm)``. Dtypes as eager: after
``.to(dtype)`` everything in that dtype (statistics in fp32); under autocast the convs in the
autocast dtype, BN in fp32. The output keeps the input's memory format (NCHW or channels_last).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import graph_forward
from .backends import resolve_backend
from .modules import _FusedBlock, member
from .ops import postact_blocks as postact_ops

__all__ = ["FusedPostActBottleneck", "FusedPostActBasicBlock", "FusedTimmBottleneck", "FusedTimmBasicBlock",
           "is_frozen_norm", "downsample_parts", "postact_units", "build_postact_unit"]


def is_frozen_norm(norm: nn.Module) -> bool:
    """torchvision's FrozenBatchNorm2d (or a class of that name with the same buffers)."""
    return type(norm).__name__ == "FrozenBatchNorm2d" and all(
        isinstance(getattr(norm, k, None), Tensor) for k in ("weight", "bias", "running_mean", "running_var"))


def norm_problem(norm: Any) -> Optional[str]:
    """Why the fused kernels cannot compute ``norm``, or None."""
    if is_frozen_norm(norm):
        return None
    if type(norm) is not nn.BatchNorm2d:
        return f"{type(norm).__name__} (only BatchNorm2d and FrozenBatchNorm2d are fused)"
    if not norm.affine:
        return "BatchNorm2d(affine=False) is not fused"
    return None


def downsample_parts(downsample: Optional[nn.Module]) -> Optional[tuple[nn.Conv2d, nn.Module]]:
    """(conv, norm) of a ``Sequential(Conv2d 1x1, norm)`` downsample; None for no downsample.
    Raises ValueError for any other downsample."""
    if downsample is None:
        return None
    if type(downsample) is not nn.Sequential or len(downsample) != 2 or type(downsample[0]) is not nn.Conv2d:
        raise ValueError(f"downsample {type(downsample).__name__}: only Sequential(Conv2d 1x1, BatchNorm) is fused "
                         "(average-pool shortcuts (ResNet-D) and others are not)")
    conv, norm = downsample[0], downsample[1]
    if tuple(conv.kernel_size) != (1, 1) or conv.bias is not None or conv.groups != 1 or \
            tuple(conv.padding) != (0, 0) or tuple(conv.dilation) != (1, 1) or conv.stride[0] != conv.stride[1]:
        raise ValueError("downsample conv: only a 1x1 conv without bias, padding, dilation or groups is fused")
    problem = norm_problem(norm)
    if problem is not None:
        raise ValueError(f"downsample norm: {problem}")
    return conv, norm


class _PostActBlock(_FusedBlock, nn.Module):
    """What the four drop-ins share beyond the fused-block base (modules.py's ``_FusedBlock``:
    the plan cache, casts and checks, fold decision, norm arguments, op call): the chain of
    (conv, norm) pairs, the eager forward, and the post-activation op."""

    kind = "bottleneck"
    _takes_stats = False

    #: Subclasses: the (conv, norm) submodule names in chain order.
    _CHAIN: tuple[tuple[str, str], ...] = ()

    def _chain(self) -> list[tuple[nn.Conv2d, nn.Module]]:
        """The (conv, norm) submodules in chain order (read from ``_modules``: see ``member``)."""
        m = self._modules
        return [(m[conv], m[norm]) for conv, norm in self._CHAIN]

    def _check_fusable(self) -> None:
        for i, (conv, norm) in enumerate(self._chain()):
            problem = norm_problem(norm)
            if problem is not None:
                raise ValueError(f"{type(self).__name__}: norm {i + 1}: {problem}")
            if tuple(conv.dilation) != (1, 1):
                raise ValueError(f"{type(self).__name__}: dilated convolutions are not fused; keep the eager block")
        downsample_parts(self.downsample)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
        c_in = self.conv1.in_channels
        if x.shape[1] != c_in:
            raise ValueError(f"{type(self).__name__} was built for {c_in} input channels, got an input with "
                             f"{x.shape[1]} (shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got {x.dtype}")
        # Once per call signature (the plan): the downsample is still a fusable projection, so
        # the per-call accessors below may index it without checking.
        downsample_parts(self.downsample)

    # --- eager ---------------------------------------------------------------------------
    def _reference_forward(self, x: Tensor) -> Tensor:
        chain = self._chain()
        h = x
        for i, (conv, norm) in enumerate(chain):
            h = norm(conv(h))
            if i < len(chain) - 1:
                h = F.relu(h)
        sc = self.downsample(x) if self.downsample is not None else x
        return F.relu(h + sc)

    # --- the chain, as the fused-block base reads it ----------------------------------------
    def _projection(self) -> Optional[nn.Sequential]:
        """The downsample, a Sequential(Conv2d 1x1, norm) checked at construction and once per
        call signature (``_check_input``); per call only its form is looked at (anything else
        gets ``downsample_parts``'s error)."""
        ds = member(self, "downsample", None)
        if ds is None or (type(ds) is nn.Sequential and len(ds) == 2):
            return ds
        downsample_parts(ds)  # raises, saying what is fused
        return ds

    def _norms(self) -> list[nn.Module]:
        norms = [norm for _, norm in self._chain()]
        ds = self._projection()
        return norms + [ds[1]] if ds is not None else norms

    def _conv_weights(self) -> list[Tensor]:
        return [member(conv, "weight") for conv, _ in self._chain()]

    def _proj_weight(self) -> Optional[Tensor]:
        ds = self._projection()
        return member(ds[0], "weight") if ds is not None else None

    @staticmethod
    def _trains(norm: nn.Module) -> bool:
        if is_frozen_norm(norm):
            return False
        return bool(norm.training or member(norm, "running_mean", None) is None)

    def _kind(self) -> str:
        return f"postact_{self.kind}"

    def _op_config(self) -> dict:
        return dict(strides=[int(conv.stride[0]) for conv, _ in self._chain()],
                    groups=[int(conv.groups) for conv, _ in self._chain()])

    def _counts(self, shape) -> tuple[int, ...]:
        n, _, h, w = shape
        counts = []
        for conv, _ in self._chain():
            s = int(conv.stride[0])
            h, w = (h - 1) // s + 1, (w - 1) // s + 1
            counts.append(n * h * w)
        return tuple(counts + ([counts[-1]] if self.downsample is not None else []))

    def _call_op(self, x, weights, w_proj, bn_weights, bn_biases, kw, needs_grad):
        return postact_ops.postact_call(x, weights, w_proj, bn_weights, bn_biases, kw, needs_grad)

    _script_forward = graph_forward.PostActScript._script_forward

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._script_forward(x)
        return self._fused_forward(x)

    @torch.jit.unused
    def _fused_forward(self, x: Tensor) -> Tensor:
        if graph_forward.is_fx_proxy(x):
            return graph_forward.fx_leaf_call(self, x)
        return self._eager_call(x)


def _norm(norm_layer: Optional[Callable[..., nn.Module]], channels: int, **dd: Any) -> nn.Module:
    return (norm_layer or nn.BatchNorm2d)(channels, **dd)


class FusedPostActBottleneck(_PostActBlock):
    """torchvision's ``Bottleneck`` (v1.5: stride on the 3x3), fused; ``stride_on="1x1"`` puts
    the stride on conv1 (ResNet v1). Same arguments, submodules and state_dict keys."""

    expansion = 4
    kind = "bottleneck"

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, *, stride_on: str = "3x3",
                 backend: str = "triton") -> None:
        super().__init__()
        if stride_on not in ("3x3", "1x1"):
            raise ValueError(f"stride_on must be '3x3' or '1x1', got {stride_on!r}")
        width = int(planes * (base_width / 64.0)) * groups
        s1, s2 = (stride, 1) if stride_on == "1x1" else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, width, 1, stride=s1, bias=False)
        self.bn1 = _norm(norm_layer, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=s2, padding=dilation, groups=groups, bias=False,
                               dilation=dilation)
        self.bn2 = _norm(norm_layer, width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = _norm(norm_layer, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.stride_on = stride_on
        self.backend = resolve_backend(backend)
        if self.backend != "reference":
            self._check_fusable()

    _CHAIN = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


class FusedPostActBasicBlock(_PostActBlock):
    """torchvision's ``BasicBlock``, fused. Same arguments, submodules and state_dict keys."""

    expansion = 1
    kind = "basic"

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, *, backend: str = "triton") -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm_layer, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = _norm(norm_layer, planes)
        self.downsample = downsample
        self.stride = stride
        self.backend = resolve_backend(backend)
        if self.backend != "reference":
            self._check_fusable()

    _CHAIN = (("conv1", "bn1"), ("conv2", "bn2"))


def _check_timm_options(act_layer, attn_layer, aa_layer, drop_block, drop_path, dilation, first_dilation) -> None:
    if act_layer is not nn.ReLU:
        raise ValueError(f"act_layer {getattr(act_layer, '__name__', act_layer)}: only ReLU is fused")
    if attn_layer is not None:
        raise ValueError("attention (attn_layer) is not fused; keep timm's block")
    if aa_layer is not None:
        raise ValueError("anti-aliasing (aa_layer) is not fused; keep timm's block")
    if drop_block is not None:
        raise ValueError("DropBlock is not fused; keep timm's block")
    if drop_path is not None and not (type(drop_path) is nn.Identity or getattr(drop_path, "drop_prob", None) == 0):
        raise ValueError("drop path > 0 (stochastic depth) is not fused; keep timm's block")
    if dilation != 1 or (first_dilation or dilation) != 1:
        raise ValueError("dilation is not fused; keep timm's block")


class FusedTimmBottleneck(_PostActBlock):
    """timm's ``resnet.Bottleneck``, fused (ReLU, no attention / anti-aliasing / DropBlock /
    drop path / dilation). Same arguments, submodules and state_dict keys."""

    expansion = 4
    kind = "bottleneck"

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 cardinality: int = 1, base_width: int = 64, reduce_first: int = 1, dilation: int = 1,
                 first_dilation: Optional[int] = None, act_layer: type = nn.ReLU,
                 norm_layer: type = nn.BatchNorm2d, attn_layer: Optional[type] = None,
                 aa_layer: Optional[type] = None, drop_block: Optional[type] = None,
                 drop_path: Optional[nn.Module] = None, device=None, dtype=None, *, backend: str = "triton") -> None:
        super().__init__()
        _check_timm_options(act_layer, attn_layer, aa_layer, drop_block, drop_path, dilation, first_dilation)
        dd = dict(device=device, dtype=dtype)
        width = int(math.floor(planes * (base_width / 64)) * cardinality)
        first_planes = width // reduce_first
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, first_planes, kernel_size=1, bias=False, **dd)
        self.bn1 = norm_layer(first_planes, **dd)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(first_planes, width, 3, stride=stride, padding=1, groups=cardinality, bias=False, **dd)
        self.bn2 = norm_layer(width, **dd)
        self.drop_block = nn.Identity()
        self.act2 = act_layer(inplace=True)
        self.aa = nn.Identity()
        self.conv3 = nn.Conv2d(width, outplanes, kernel_size=1, bias=False, **dd)
        self.bn3 = norm_layer(outplanes, **dd)
        self.se = None
        self.act3 = act_layer(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation
        self.drop_path = drop_path
        self.backend = resolve_backend(backend)
        if self.backend != "reference":
            self._check_fusable()

    def zero_init_last(self) -> None:
        if getattr(self.bn3, "weight", None) is not None:
            nn.init.zeros_(self.bn3.weight)

    _CHAIN = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


class FusedTimmBasicBlock(_PostActBlock):
    """timm's ``resnet.BasicBlock``, fused (same restrictions as :class:`FusedTimmBottleneck`)."""

    expansion = 1
    kind = "basic"

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 cardinality: int = 1, base_width: int = 64, reduce_first: int = 1, dilation: int = 1,
                 first_dilation: Optional[int] = None, act_layer: type = nn.ReLU,
                 norm_layer: type = nn.BatchNorm2d, attn_layer: Optional[type] = None,
                 aa_layer: Optional[type] = None, drop_block: Optional[type] = None,
                 drop_path: Optional[nn.Module] = None, device=None, dtype=None, *, backend: str = "triton") -> None:
        super().__init__()
        if cardinality != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports cardinality 1 and base_width 64")
        _check_timm_options(act_layer, attn_layer, aa_layer, drop_block, drop_path, dilation, first_dilation)
        dd = dict(device=device, dtype=dtype)
        first_planes = planes // reduce_first
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, first_planes, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn1 = norm_layer(first_planes, **dd)
        self.drop_block = nn.Identity()
        self.act1 = act_layer(inplace=True)
        self.aa = nn.Identity()
        self.conv2 = nn.Conv2d(first_planes, outplanes, 3, padding=1, bias=False, **dd)
        self.bn2 = norm_layer(outplanes, **dd)
        self.se = None
        self.act2 = act_layer(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation
        self.drop_path = drop_path
        self.backend = resolve_backend(backend)
        if self.backend != "reference":
            self._check_fusable()

    def zero_init_last(self) -> None:
        if getattr(self.bn2, "weight", None) is not None:
            nn.init.zeros_(self.bn2.weight)

    _CHAIN = (("conv1", "bn1"), ("conv2", "bn2"))


def postact_units(batch: int = 256) -> list[dict]:
    """The distinct post-activation units of torchvision's resnet50 (v1.5) at 224x224: one dict per
    unit shape, for block benchmarks (``FusedPostActBottleneck(**args)``, input ``(batch, *input)``)."""
    units = []
    inplanes, size = 64, 56
    for stage, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=2):
        units.append(dict(name=f"conv{stage}_x-projection", args=dict(inplanes=inplanes, planes=planes, stride=stride),
                          projection=True, input=(inplanes, size, size), batch=batch))
        size //= stride
        inplanes = planes * 4
        units.append(dict(name=f"conv{stage}_x-identity", args=dict(inplanes=inplanes, planes=planes),
                          projection=False, input=(inplanes, size, size), batch=batch))
    return units


def build_postact_unit(unit: dict, backend: str = "triton") -> FusedPostActBottleneck:
    """The block of one :func:`postact_units` entry (with its projection when it has one);
    ``backend="reference"`` gives the eager twin (torchvision's computation, same keys)."""
    args = dict(unit["args"])
    downsample = None
    if unit["projection"]:
        out = args["planes"] * FusedPostActBottleneck.expansion
        downsample = nn.Sequential(nn.Conv2d(args["inplanes"], out, 1, stride=args.get("stride", 1), bias=False),
                                   nn.BatchNorm2d(out))
    return FusedPostActBottleneck(**args, downsample=downsample, backend=backend)
