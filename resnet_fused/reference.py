"""Eager PyTorch reference for pre-activation ResNet blocks: the oracle of every test.

This module imports nothing from the rest of the package, on purpose: a bug in shared
package code must not be able to hide in both the fused path and the thing it is compared
with. It holds two layers:

* the functional reference of every operation the fused kernels implement (batch
  statistics, BN scale/shift, BN-apply + ReLU + convolution with the padding applied AFTER
  the activation, the running-statistics update, the shortcut kinds, whole blocks in train,
  eval and frozen BN modes);
* eager ``PreActBottleneck`` / ``PreActBasicBlock`` modules with timm's constructor
  convention and state_dict keys (``norm1, conv1, norm2, conv2, norm3, conv3,
  downsample.conv``), so weights move between timm, the reference and the fused blocks
  without renaming.

Numerics follow eager PyTorch: statistics and the BN affine are computed in fp32 (fp64 for
fp64 inputs) whatever the storage dtype, activations are stored in the input's dtype.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BN_MODES",
    "SHORTCUT_KINDS",
    "STRIDE_ON",
    "BatchNormReLU2d",
    "Downsample",
    "PreActBasicBlock",
    "PreActBottleneck",
    "BNParams",
    "batch_stats",
    "bn_mode",
    "bn_relu",
    "bn_relu_conv",
    "bn_scale_shift",
    "postact_block",
    "preact_basic_block",
    "preact_bottleneck",
    "resolve_shortcut",
    "shortcut_add",
    "stats_dtype",
    "update_running_stats",
]

#: How a BatchNorm layer behaves. ``train``: batch statistics, running statistics updated.
#: ``eval``: running statistics as constants. ``frozen``: eval-mode BN inside a training model
#: (fine-tuning, detection backbones): running statistics as constants, gradients still flow.
BN_MODES = ("train", "eval", "frozen")
#: ``identity``: out = f(x) + x. ``subsample``: + x[:, :, ::s, ::s] (TF-slim's resnet_v2 for a
#: strided unit whose width does not change). ``projection``: + conv1x1_s(relu(bn1(x))), the
#: projection of the PRE-ACTIVATED input (timm, MXNet, the paper's v2 models).
SHORTCUT_KINDS = ("identity", "subsample", "projection")
#: Which convolution of a bottleneck carries the stride: the 3x3 (torchvision "v1.5", timm,
#: default) or the first 1x1 (the ResNet paper's Caffe models, as counted in its FLOPs table).
STRIDE_ON = ("3x3", "1x1")


# ---------------------------------------------------------------------------------------
# Functional reference
# ---------------------------------------------------------------------------------------


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype BN statistics and scale/shift are kept in: fp64 for fp64 data, else fp32.

    fp16 scale/shift fails a mean-100, std-0.1 input by 2.6e-1 relative error, so 16-bit
    storage never means 16-bit statistics.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and BIASED variance of an (N, C, H, W) tensor, in ``stats_dtype``.

    The biased variance (divide by M = N*H*W) is what BN normalises with; the running
    variance gets the unbiased one (see :func:`update_running_stats`).
    """
    var, mean = torch.var_mean(x.to(stats_dtype(x.dtype)), dim=(0, 2, 3), unbiased=False)
    return mean, var


def bn_scale_shift(
    mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor]:
    """Fold BN into a per-channel affine: bn(x) = x * scale + shift (in the stats' dtype)."""
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    return scale, shift


def bn_relu(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """relu(x * scale + shift) per channel, computed in the stats' dtype, stored in x's dtype."""
    c = x.shape[1]
    y = x.to(scale.dtype) * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)
    return torch.relu(y).to(x.dtype)


def bn_relu_conv(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    weight: Tensor,
    stride: int = 1,
    groups: int = 1,
) -> Tensor:
    """conv(relu(x * scale + shift), weight) with 'same' zero padding (kernel // 2).

    The padding is zero in the ACTIVATED domain: F.conv2d pads its input, which here is the
    activation. A kernel that applies the prologue to a zero-filled padded load would get
    relu(shift) instead; this function is the definition the kernels must match.
    """
    k = weight.shape[-1]
    return F.conv2d(bn_relu(x, scale, shift), weight, stride=stride, padding=k // 2, groups=groups)


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: Optional[float],
) -> None:
    """In-place running-statistics update with nn.BatchNorm2d's formulas.

    ``var`` is the biased batch variance over ``count`` = N*H*W values; the running variance
    gets the unbiased one (x count / (count - 1)). ``momentum=None`` is the cumulative moving
    average, whose factor 1/num_batches_tracked is computed on the device (no host sync).
    """
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        # The factor and the blend in fp32 (fp64 for fp64 buffers) whatever the buffer dtype, as
        # eager's BatchNorm computes them: 1 / 257 in bf16 is off by 0.4%.
        ct = torch.float64 if running_mean.dtype == torch.float64 else torch.float32
        if momentum is None:
            if num_batches_tracked is None:
                raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
            factor = 1.0 / num_batches_tracked.to(ct)
        else:
            factor = momentum
        unbiased = var * (count / max(count - 1, 1))
        for buf, new in ((running_mean, mean), (running_var, unbiased)):
            if buf.dtype == ct:
                buf.lerp_(new.to(ct), factor)
            else:
                buf.copy_(buf.to(ct).lerp_(new.to(ct), factor))


class BNParams(NamedTuple):
    """The tensors and settings of one BatchNorm layer, as the functional reference takes them."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    eps: float = 1e-5
    momentum: Optional[float] = 0.1

    @classmethod
    def of(cls, bn: nn.BatchNorm2d) -> "BNParams":
        return cls(bn.weight, bn.bias, bn.running_mean, bn.running_var,
                   bn.num_batches_tracked, bn.eps, bn.momentum)


def bn_mode(bn: nn.BatchNorm2d) -> str:
    """The BN_MODES entry an nn.BatchNorm2d is in, by PyTorch's own rule.

    Batch statistics are used in training mode and whenever there are no running statistics;
    an eval-mode BN inside a model being trained is ``frozen`` when anything it touches needs
    a gradient, ``eval`` otherwise (the two compute the same forward).
    """
    if bn.training or bn.running_mean is None:
        return "train"
    return "frozen" if torch.is_grad_enabled() else "eval"


def _scale_shift(x: Tensor, p: BNParams, mode: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(scale, shift, mean, var) of a norm in ``mode``; in train mode also updates its running
    statistics (when it has them)."""
    if mode not in BN_MODES:
        raise ValueError(f"BN mode must be one of {BN_MODES}, got {mode!r}")
    if mode == "train":
        mean, var = batch_stats(x)
        if p.running_mean is not None:
            count = x.numel() // x.shape[1]
            update_running_stats(p.running_mean, p.running_var, p.num_batches_tracked,
                                 mean, var, count, p.momentum)
    else:
        if p.running_mean is None:
            raise ValueError(f"BN mode {mode!r} needs running statistics")
        mean, var = p.running_mean.to(stats_dtype(x.dtype)), p.running_var.to(stats_dtype(x.dtype))
    scale, shift = bn_scale_shift(mean, var, p.weight, p.bias, p.eps)
    return scale, shift, mean, var


def resolve_shortcut(in_chs: int, out_chs: int, stride: int, shortcut: Optional[str]) -> str:
    """The shortcut kind a unit uses; ``None`` picks the standard one.

    Identity when the shape is unchanged, a projection when the width changes, and a
    projection (timm, torchvision) for a strided unit of unchanged width unless
    ``subsample`` (TF-slim's resnet_v2) is asked for.
    """
    if shortcut is None:
        return "identity" if (in_chs == out_chs and stride == 1) else "projection"
    if shortcut not in SHORTCUT_KINDS:
        raise ValueError(f"shortcut must be one of {SHORTCUT_KINDS} or None, got {shortcut!r}")
    if shortcut == "identity" and (in_chs != out_chs or stride != 1):
        raise ValueError(
            f"an identity shortcut needs in_chs == out_chs and stride 1, got in_chs={in_chs}, "
            f"out_chs={out_chs}, stride={stride}; use 'projection' (or 'subsample' for a "
            "strided unit of unchanged width)")
    if shortcut == "subsample" and in_chs != out_chs:
        raise ValueError(
            f"a subsample shortcut keeps the width, so it needs in_chs == out_chs, got "
            f"{in_chs} != {out_chs}; use 'projection'")
    return shortcut


def shortcut_add(
    y: Tensor, x: Tensor, a1: Tensor, kind: str, stride: int, weight: Optional[Tensor]
) -> Tensor:
    """y + shortcut, the shortcut taken from the raw input x or the pre-activated a1."""
    if kind == "identity":
        return y + x
    if kind == "subsample":
        return y + x[:, :, ::stride, ::stride]
    if kind == "projection":
        return y + F.conv2d(a1, weight, stride=stride)
    raise ValueError(f"shortcut kind must be one of {SHORTCUT_KINDS}, got {kind!r}")


def preact_bottleneck(
    x: Tensor,
    bn1: BNParams, w1: Tensor,
    bn2: BNParams, w2: Tensor,
    bn3: BNParams, w3: Tensor,
    w_proj: Optional[Tensor] = None,
    *,
    stride: int = 1,
    groups: int = 1,
    shortcut: str = "identity",
    stride_on: str = "3x3",
    modes: tuple[str, str, str] = ("train", "train", "train"),
    record: Optional[dict] = None,
) -> Tensor:
    """The full pre-activation bottleneck, one BN mode per norm (train / eval / frozen).

    a1 = relu(bn1(x)); y1 = conv1x1(a1); y2 = conv3x3(relu(bn2(y1)), stride, groups);
    y3 = conv1x1(relu(bn3(y2))); out = y3 + shortcut. When ``record`` is a dict, it receives
    ``stats``, the (mean, biased var) each norm used, and ``convs``, the outputs y1, y2.
    """
    s1, s2 = (stride, 1) if stride_on == "1x1" else (1, stride)
    scale1, shift1, *stats1 = _scale_shift(x, bn1, modes[0])
    a1 = bn_relu(x, scale1, shift1)
    y1 = F.conv2d(a1, w1, stride=s1)
    scale2, shift2, *stats2 = _scale_shift(y1, bn2, modes[1])
    y2 = bn_relu_conv(y1, scale2, shift2, w2, stride=s2, groups=groups)
    scale3, shift3, *stats3 = _scale_shift(y2, bn3, modes[2])
    y3 = bn_relu_conv(y2, scale3, shift3, w3)
    if record is not None:
        record.update(stats=[tuple(stats1), tuple(stats2), tuple(stats3)], convs=[y1, y2])
    return shortcut_add(y3, x, a1, shortcut, stride, w_proj)


def preact_basic_block(
    x: Tensor,
    bn1: BNParams, w1: Tensor,
    bn2: BNParams, w2: Tensor,
    w_proj: Optional[Tensor] = None,
    *,
    stride: int = 1,
    groups: int = 1,
    shortcut: str = "identity",
    modes: tuple[str, str] = ("train", "train"),
    record: Optional[dict] = None,
) -> Tensor:
    """The pre-activation basic block: two 3x3 convs, the first one strided (``record`` as
    :func:`preact_bottleneck`, with ``convs`` = [y1])."""
    scale1, shift1, *stats1 = _scale_shift(x, bn1, modes[0])
    a1 = bn_relu(x, scale1, shift1)
    y1 = F.conv2d(a1, w1, stride=stride, padding=w1.shape[-1] // 2, groups=groups)
    scale2, shift2, *stats2 = _scale_shift(y1, bn2, modes[1])
    y2 = bn_relu_conv(y1, scale2, shift2, w2, groups=groups)
    if record is not None:
        record.update(stats=[tuple(stats1), tuple(stats2)], convs=[y1])
    return shortcut_add(y2, x, a1, shortcut, stride, w_proj)


def postact_block(x: Tensor, weights: Sequence[Tensor], w_proj: Optional[Tensor],
                  bn_weights: Sequence[Tensor], bn_biases: Sequence[Tensor],
                  means: Sequence[Tensor], vars_: Sequence[Tensor], training: Sequence[bool],
                  eps: Sequence[float], strides: Sequence[int], groups: Sequence[int],
                  record: Optional[dict] = None) -> Tensor:
    """A post-activation unit (torchvision's / timm's Bottleneck and BasicBlock): convs, each
    followed by BN (+ ReLU but the last), closed by ``relu(bn_last(y_last) + shortcut)``, the
    shortcut x or ``bn_d(conv1x1_s(x))`` (``w_proj``; its norm is the last of the lists). A
    training norm uses batch statistics (and records them in ``record["stats"]``, the conv
    outputs but the last in ``record["convs"]``); any other uses ``means``/``vars_`` as
    constants. Nothing is updated."""
    convs, stats = [], []

    def bn(y: Tensor, i: int) -> Tensor:
        if training[i]:
            with torch.no_grad():
                stats.append(batch_stats(y))
            return F.batch_norm(y, None, None, bn_weights[i], bn_biases[i], True, 0.0, eps[i])
        stats.append((means[i].to(stats_dtype(y.dtype)), vars_[i].to(stats_dtype(y.dtype))))
        return F.batch_norm(y, means[i], vars_[i], bn_weights[i], bn_biases[i], False, 0.0, eps[i])

    h = x
    last = len(weights) - 1
    total = 1
    for i, (w, s, g) in enumerate(zip(weights, strides, groups)):
        y = F.conv2d(h, w, stride=s, padding=w.shape[-1] // 2, groups=g)
        convs.append(y)
        h = bn(y, i)
        if i < last:
            h = F.relu(h)
        total *= s
    sc = x if w_proj is None else bn(F.conv2d(x, w_proj, stride=total), len(weights))
    out = F.relu(h + sc)
    if record is not None:
        record["convs"], record["stats"] = convs[:-1], stats
    return out


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------


class BatchNormReLU2d(nn.BatchNorm2d):
    """BatchNorm2d followed by ReLU, with nn.BatchNorm2d's state_dict keys.

    The same keys as timm's ``BatchNormAct2d`` (weight, bias, running_mean, running_var,
    num_batches_tracked), so norm layers load across timm, the reference and fused blocks.
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._script_forward(x)
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: Tensor) -> Tensor:
        return torch.relu(super().forward(x))

    def _script_forward(self, x: Tensor) -> Tensor:
        """nn.BatchNorm2d's forward spelled out for TorchScript (which compiles no ``super()``)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            tracked = self.num_batches_tracked
            if tracked is not None:
                tracked.add_(1)
                factor = 1.0 / float(tracked) if self.momentum is None else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        tracking = not self.training or self.track_running_stats
        y = F.batch_norm(x, self.running_mean if tracking else None, self.running_var if tracking else None,
                         self.weight, self.bias, use_batch, factor, self.eps)
        return torch.relu(y)


class Downsample(nn.Module):
    """The projection shortcut: a strided 1x1 conv of the pre-activated input (key ``conv``)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_block_args(in_chs: int, out_chs: int, mid_chs: int, stride: int, groups: int) -> None:
    _check_positive(in_chs=in_chs, out_chs=out_chs, stride=stride, groups=groups)
    if mid_chs < 1:
        raise ValueError(f"the block's middle width must be >= 1, got {mid_chs}")
    if mid_chs % groups:
        raise ValueError(
            f"groups={groups} must divide the grouped conv's width ({mid_chs} channels)")


def _make_norm(chs: int, eps: float, momentum: Optional[float]) -> BatchNormReLU2d:
    return BatchNormReLU2d(chs, eps=eps, momentum=momentum)


class _PreActBlock(nn.Module):
    """What both reference blocks share: the shortcut and input checking."""

    def _init_common(self, in_chs: int, out_chs: Optional[int], bottle_ratio: float, stride: int,
                     groups: int, shortcut: Optional[str], stride_on: str) -> tuple[int, int, int]:
        """Check the shared constructor arguments, set the attributes and the shortcut."""
        out_chs = in_chs if out_chs is None else out_chs
        _check_positive(in_chs=in_chs, out_chs=out_chs)
        mid_chs = int(out_chs * bottle_ratio)
        _check_block_args(in_chs, out_chs, mid_chs, stride, groups)
        if stride_on not in STRIDE_ON:
            raise ValueError(f"stride_on must be one of {STRIDE_ON}, got {stride_on!r}")
        self.in_chs, self.out_chs, self.mid_chs = in_chs, out_chs, mid_chs
        self.stride, self.groups, self.stride_on = stride, groups, stride_on
        self.shortcut = resolve_shortcut(in_chs, out_chs, stride, shortcut)
        self.downsample = Downsample(in_chs, out_chs, stride) if self.shortcut == "projection" else None
        return in_chs, out_chs, mid_chs

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"{type(self).__name__} expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chs:
            raise ValueError(
                f"{type(self).__name__} was built for {self.in_chs} input channels, got an input "
                f"with {x.shape[1]} (shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got {x.dtype}")

    def _add_shortcut(self, y: Tensor, x: Tensor, x_preact: Tensor) -> Tensor:
        if self.shortcut == "identity":
            return y + x
        if self.shortcut == "subsample":
            return y + x[:, :, :: self.stride, :: self.stride]
        return y + self.downsample(x_preact)


class PreActBottleneck(_PreActBlock):
    """Pre-activation (v2) bottleneck, timm's ``PreActBottleneck`` semantics and keys.

    Args:
        in_chs: input channels.
        out_chs: output channels (default ``in_chs``).
        bottle_ratio: middle width = ``int(out_chs * bottle_ratio)``; ResNeXt-50 32x4d is
            ``bottle_ratio=0.5, groups=32`` (mid 128 at out 256). timm rounds the middle width
            to a multiple of 8; the two agree for every standard model, and not rounding lets
            odd widths (12, 20) be built and tested.
        stride: spatial stride of the unit.
        groups: groups of the 3x3 conv (ResNeXt).
        shortcut: ``None`` (identity if the shape is unchanged, else projection),
            ``"identity"``, ``"subsample"`` or ``"projection"``; see :data:`SHORTCUT_KINDS`.
        stride_on: ``"3x3"`` (default) or ``"1x1"``: which conv carries the stride.
        eps, momentum: the BatchNorm settings of all three norms.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: Optional[int] = None,
        bottle_ratio: float = 0.25,
        stride: int = 1,
        groups: int = 1,
        shortcut: Optional[str] = None,
        stride_on: str = "3x3",
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
    ):
        super().__init__()
        in_chs, out_chs, mid_chs = self._init_common(in_chs, out_chs, bottle_ratio, stride, groups,
                                                     shortcut, stride_on)
        s1, s2 = (stride, 1) if stride_on == "1x1" else (1, stride)
        self.norm1 = _make_norm(in_chs, eps, momentum)
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, stride=s1, bias=False)
        self.norm2 = _make_norm(mid_chs, eps, momentum)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, 3, stride=s2, padding=1, groups=groups, bias=False)
        self.norm3 = _make_norm(mid_chs, eps, momentum)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, bias=False)

    def zero_init_last(self) -> None:
        """Zero the last conv, so the unit starts as its shortcut (Goyal et al., 2017)."""
        nn.init.zeros_(self.conv3.weight)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        x_preact = self.norm1(x)
        y = self.conv1(x_preact)
        y = self.conv2(self.norm2(y))
        y = self.conv3(self.norm3(y))
        return self._add_shortcut(y, x, x_preact)


class PreActBasicBlock(_PreActBlock):
    """Pre-activation basic block (two 3x3 convs), timm's ``PreActBasic`` semantics and keys.

    Same arguments as :class:`PreActBottleneck`; ``bottle_ratio`` (default 1.0) sets the width
    between the two convs, ``groups`` applies to both, the stride is on the first 3x3.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: Optional[int] = None,
        bottle_ratio: float = 1.0,
        stride: int = 1,
        groups: int = 1,
        shortcut: Optional[str] = None,
        stride_on: str = "3x3",
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
    ):
        super().__init__()
        if not (isinstance(groups, int) and groups > 0 and in_chs % groups == 0
                and (out_chs or in_chs) % groups == 0):
            raise ValueError(f"groups={groups} must divide in_chs={in_chs} and out_chs={out_chs or in_chs}")
        in_chs, out_chs, mid_chs = self._init_common(in_chs, out_chs, bottle_ratio, stride, groups,
                                                     shortcut, stride_on)
        self.norm1 = _make_norm(in_chs, eps, momentum)
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.norm2 = _make_norm(mid_chs, eps, momentum)
        self.conv2 = nn.Conv2d(mid_chs, out_chs, 3, padding=1, groups=groups, bias=False)

    def zero_init_last(self) -> None:
        """Zero the last conv, so the unit starts as its shortcut."""
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        x_preact = self.norm1(x)
        y = self.conv1(x_preact)
        y = self.conv2(self.norm2(y))
        return self._add_shortcut(y, x, x_preact)
