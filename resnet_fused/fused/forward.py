"""Forward of whole pre-activation blocks from a backend's fused kernels (launcher level).

The kernels come from a ``KernelSet`` (``kernel_set.py``): Triton's or the CUDA extension's.
Bottleneck, train mode (DESIGN section 3), one kernel per convolution:

    K0  partials of x                -> bn1 (mean, var, scale, shift)
    K1  y1 = conv1x1(relu(bn1(x)))    epilogue: partials of y1 -> bn2
    K2  y2 = conv3x3(relu(bn2(y1)))   epilogue: partials of y2 -> bn3
    K3  out = conv1x1(relu(bn3(y2))) + shortcut   (projection: a second K-loop over relu(bn1(x)))

Eval mode folds bn2 into K1's epilogue and bn3 into K2's (each stores the next conv's activated
input); bn1 stays in K1's prologue because the raw x feeds the identity shortcut. A norm that is
not training (eval or frozen) uses its running statistics as constants.

No autograd here: ``ops/blocks.py`` registers the op, its fake and its backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from .kernel_set import SHORTCUT_ADD, SHORTCUT_PROJECTION, KernelSet

__all__ = ["NormInputs", "bottleneck_forward", "basic_block_forward"]

_SHORTCUT_CODES = {"identity": SHORTCUT_ADD, "subsample": SHORTCUT_ADD, "projection": SHORTCUT_PROJECTION}


@dataclass
class NormInputs:
    """One BatchNorm's tensors as the op receives them."""

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor
    training: bool
    eps: float


@dataclass
class _Affine:
    """The statistics a norm used (fp32) and its affine form."""

    mean: Tensor
    var: Tensor
    scale: Tensor
    shift: Tensor


def _affine_from_partials(kernels: KernelSet, part: Tensor, norm: NormInputs) -> _Affine:
    return _Affine(*kernels.finalize(part, norm.weight, norm.bias, norm.eps))


def _affine_from_running(norm: NormInputs, data_dtype: torch.dtype) -> _Affine:
    ct = reference.stats_dtype(data_dtype)
    mean = norm.running_mean.to(ct)
    var = norm.running_var.to(ct)
    scale, shift = reference.bn_scale_shift(mean, var, norm.weight.to(ct), norm.bias.to(ct), norm.eps)
    return _Affine(mean.clone(), var.clone(), scale, shift)


def _input_affine(kernels: KernelSet, x: Tensor, norm: NormInputs) -> _Affine:
    if not norm.training:
        return _affine_from_running(norm, x.dtype)
    return _affine_from_partials(kernels, kernels.stats_partials(x), norm)


def _conv3x3(kernels: KernelSet, x: Tensor, weight: Tensor, affine: Optional[_Affine], *, stride: int,
             groups: int, emit_stats: bool, post: Optional[_Affine] = None
             ) -> tuple[Tensor, Optional[Tensor], bool]:
    """A 3x3 conv without shortcut: the fused kernel or the hybrid, as the kernel set says.

    Returns (output, statistics partials, whether ``post`` (the next BN + ReLU, eval mode) was
    folded into the output). The fused kernel folds it into its epilogue; the hybrid's cuDNN
    conv has no epilogue, so the caller applies ``post`` in the next conv's prologue instead.
    """
    n, _, h, w = x.shape
    c_out, cin_pg = weight.shape[:2]
    m = n * ((h - 1) // stride + 1) * ((w - 1) // stride + 1)
    if kernels.fuse_3x3(m, c_out // groups, cin_pg * 9, x.dtype, x.device):
        out, part = kernels.conv(x, weight, **_prologue(affine), stride=stride, groups=groups,
                                 emit_stats=emit_stats, **_post(post))
        return out, part, post is not None
    act = kernels.bn_relu_apply(x, affine.scale, affine.shift) if affine is not None else x
    y = F.conv2d(act, weight.to(act.dtype), stride=stride, padding=1, groups=groups)
    y = y.contiguous(memory_format=torch.channels_last)
    return y, (kernels.stats_partials(y) if emit_stats else None), False


def _next_affine(kernels: KernelSet, part: Optional[Tensor], norm: NormInputs, data_dtype: torch.dtype) -> _Affine:
    return _affine_from_partials(kernels, part, norm) if norm.training else _affine_from_running(norm, data_dtype)


def _shortcut_args(x: Tensor, a1: _Affine, kind: str, stride: int, w_proj: Optional[Tensor]) -> dict:
    if kind == "projection":
        return dict(shortcut=x, shortcut_kind=SHORTCUT_PROJECTION, shortcut_stride=stride,
                    proj_weight=w_proj, proj_scale=a1.scale, proj_shift=a1.shift)
    return dict(shortcut=x, shortcut_kind=_SHORTCUT_CODES[kind], shortcut_stride=stride)


def _prologue(affine: Optional[_Affine]) -> dict:
    return dict(scale=affine.scale, shift=affine.shift) if affine is not None else {}


def _post(affine: Optional[_Affine]) -> dict:
    return dict(post_scale=affine.scale, post_shift=affine.shift) if affine is not None else {}


def bottleneck_forward(
    kernels: KernelSet, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, w_proj: Optional[Tensor],
    norms: Sequence[NormInputs], *, stride: int, groups: int, shortcut: str, stride_on: str,
    fold_eval: bool,
) -> tuple[Tensor, list[Tensor], list[_Affine]]:
    """The bottleneck forward: (output, [y1, y2] for the backward (none when folded), affines).

    With ``fold`` (eval, nothing training), bn2 and bn3 are constants applied in the producing
    conv's epilogue, so K1 stores relu(bn2(y1)) and K2 relu(bn3(y2)) (when K2 has an epilogue:
    the hybrid 3x3 leaves bn3 to K3's prologue).
    """
    x = x.contiguous(memory_format=torch.channels_last)  # read once per kernel, NHWC
    s1, s2 = (stride, 1) if stride_on == "1x1" else (1, stride)
    bn1, bn2, bn3 = norms
    fold = fold_eval and not (bn1.training or bn2.training or bn3.training)
    a1 = _input_affine(kernels, x, bn1)

    const2 = _affine_from_running(bn2, x.dtype) if fold else None
    y1, part1 = kernels.conv(x, w1, **_prologue(a1), stride=s1, emit_stats=bn2.training, **_post(const2))
    a2 = const2 or _next_affine(kernels, part1, bn2, x.dtype)

    const3 = _affine_from_running(bn3, x.dtype) if fold else None
    y2, part2, folded3 = _conv3x3(kernels, y1, w2, None if fold else a2, stride=s2, groups=groups,
                                  emit_stats=bn3.training, post=const3)
    a3 = const3 or _next_affine(kernels, part2, bn3, x.dtype)

    out, _ = kernels.conv(y2, w3, **_prologue(None if folded3 else a3),
                   **_shortcut_args(x, a1, shortcut, stride, w_proj))
    return out, ([] if fold else [y1, y2]), [a1, a2, a3]


def basic_block_forward(
    kernels: KernelSet, x: Tensor, w1: Tensor, w2: Tensor, w_proj: Optional[Tensor],
    norms: Sequence[NormInputs], *, stride: int, groups: int, shortcut: str, fold_eval: bool,
) -> tuple[Tensor, list[Tensor], list[_Affine]]:
    """The basic block forward: two 3x3 convs, the second with the fused shortcut; returns
    (output, [y1] (none when folded), affines)."""
    x = x.contiguous(memory_format=torch.channels_last)
    bn1, bn2 = norms
    fold = fold_eval and not (bn1.training or bn2.training)
    a1 = _input_affine(kernels, x, bn1)

    const2 = _affine_from_running(bn2, x.dtype) if fold else None
    y1, part1, folded2 = _conv3x3(kernels, x, w1, a1, stride=stride, groups=groups, emit_stats=bn2.training,
                                  post=const2)
    a2 = const2 or _next_affine(kernels, part1, bn2, x.dtype)

    out, _ = kernels.conv(y1, w2, **_prologue(None if folded2 else a2), groups=groups,
                   **_shortcut_args(x, a1, shortcut, stride, w_proj))
    return out, ([] if fold else [y1]), [a1, a2]
