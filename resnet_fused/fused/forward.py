"""Forward of whole pre-activation blocks from a backend's fused kernels (launcher level).

The kernels come from a ``KernelSet`` (``kernel_set.py``): Triton's or the CUDA extension's.
Bottleneck, train mode (docs/design.md section 3), one kernel per convolution:

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

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..kernel_set import SHORTCUT_ADD, SHORTCUT_PROJECTION, Affine, KernelSet, NormInputs
from .chain import act_conv, fused_3x3, norm_affine, post_args, prologue_args

__all__ = ["NormInputs", "bottleneck_forward", "basic_block_forward", "last_conv_is_fused"]

_SHORTCUT_CODES = {"identity": SHORTCUT_ADD, "subsample": SHORTCUT_ADD, "projection": SHORTCUT_PROJECTION}


def _input_affine(kernels: KernelSet, x: Tensor, norm: NormInputs, in_stats: Optional[Tensor], lazy: bool) -> Affine:
    """bn1's affine. A training bn1 takes the statistics partials of x from the caller (the
    previous block's last conv took them in its epilogue) or from a pass over x (K0)."""
    if norm.training and in_stats is None:
        in_stats = kernels.stats_partials(x)
    return norm_affine(kernels, in_stats, norm, x, lazy)


def _shortcut_args(x: Tensor, a1: Affine, kind: str, stride: int, w_proj: Optional[Tensor]) -> dict:
    if kind == "projection":
        return dict(shortcut=x, shortcut_kind=SHORTCUT_PROJECTION, shortcut_stride=stride,
                    proj_weight=w_proj, **a1.args("proj_scale", "proj_shift", "proj_stats"))
    return dict(shortcut=x, shortcut_kind=_SHORTCUT_CODES[kind], shortcut_stride=stride)


def _last_conv3x3(kernels: KernelSet, y1: Tensor, w2: Tensor, a2: Optional[Affine], x: Tensor, a1: Affine,
                  *, kind: str, stride: int, groups: int, w_proj: Optional[Tensor], emit_stats: bool
                  ) -> tuple[Tensor, Optional[Tensor]]:
    """The basic block's second 3x3 with the shortcut, following the 3x3 selector like every
    other 3x3: the fused kernel (shortcut in its accumulator, statistics in its epilogue), or
    the hybrid: BN+ReLU pass, ATen's conv, then the shortcut (a projection as the fused 1x1
    kernel adding the conv's output; an identity/subsample as an add) and a statistics pass."""
    if fused_3x3(kernels, y1, w2, 1, groups):
        return kernels.conv(y1, w2, **prologue_args(a2), groups=groups, emit_stats=emit_stats,
                            **_shortcut_args(x, a1, kind, stride, w_proj))
    y, _, _ = act_conv(kernels, y1, w2, a2, stride=1, groups=groups, emit_stats=False)
    if kind == "projection":
        out, _ = kernels.conv(x, w_proj, **prologue_args(a1), stride=stride, shortcut=y,
                              shortcut_kind=SHORTCUT_ADD)
    else:
        out = (y + x[:, :, ::stride, ::stride]).contiguous(memory_format=torch.channels_last)
    return out, (kernels.stats_partials(out) if emit_stats else None)


def last_conv_is_fused(kernels: KernelSet, kind: str, x_shape, w_last_shape, groups: int, dtype: torch.dtype,
                       device: torch.device) -> bool:
    """Whether the block's last conv runs as the fused kernel (its partials have the conv's P)
    rather than the hybrid 3x3 (partials from a statistics pass): what the fakes need."""
    if kind == "bottleneck":
        return True
    n, _, h, w = x_shape
    m = n * h * w
    return kernels.fuse_3x3(m, w_last_shape[0] // groups, w_last_shape[1] * 9, dtype, device)


def bottleneck_forward(
    kernels: KernelSet, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, w_proj: Optional[Tensor],
    norms: Sequence[NormInputs], *, stride: int, groups: int, shortcut: str, stride_on: str,
    fold_eval: bool, in_stats: Optional[Tensor] = None, emit_stats: bool = False,
) -> tuple[Tensor, list[Tensor], list[Optional[Tensor]], Optional[Tensor]]:
    """The bottleneck forward: (output, [y1, y2] for the backward (none when folded), each norm's
    [5, C] statistics (None when folded), the output's statistics partials (``emit_stats``)).

    ``in_stats``: partials [3, P, C_in] of x, taken by the caller (the previous block's last
    conv), replacing K0. With ``fold`` (eval, nothing training), bn2 and bn3 are constants
    applied in the producing conv's epilogue, so K1 stores relu(bn2(y1)) and K2 relu(bn3(y2))
    (when K2 has an epilogue: the hybrid 3x3 leaves bn3 to K3's prologue), and every eval
    affine is computed inside the convs where the kernel set can.
    """
    x = x.contiguous(memory_format=torch.channels_last)  # read once per kernel, NHWC
    s1, s2 = (stride, 1) if stride_on == "1x1" else (1, stride)
    bn1, bn2, bn3 = norms
    fold = fold_eval and not (bn1.training or bn2.training or bn3.training)
    a1 = _input_affine(kernels, x, bn1, in_stats, fold)

    const2 = norm_affine(kernels, None, bn2, x, lazy=True) if fold else None
    y1, part1 = kernels.conv(x, w1, **prologue_args(a1), stride=s1, emit_stats=bn2.training, **post_args(const2))
    a2 = const2 or norm_affine(kernels, part1, bn2, y1)

    const3 = norm_affine(kernels, None, bn3, x, lazy=True) if fold else None
    y2, part2, folded3 = act_conv(kernels, y1, w2, None if fold else a2, stride=s2, groups=groups,
                                  emit_stats=bn3.training, post=const3)
    a3 = const3 or norm_affine(kernels, part2, bn3, y2)

    out, part = kernels.conv(y2, w3, **prologue_args(None if folded3 else a3), emit_stats=emit_stats,
                             **_shortcut_args(x, a1, shortcut, stride, w_proj))
    stats = [None] * 3 if fold else [a1.stats, a2.stats, a3.stats]
    return out, ([] if fold else [y1, y2]), stats, part


def basic_block_forward(
    kernels: KernelSet, x: Tensor, w1: Tensor, w2: Tensor, w_proj: Optional[Tensor],
    norms: Sequence[NormInputs], *, stride: int, groups: int, shortcut: str, fold_eval: bool,
    in_stats: Optional[Tensor] = None, emit_stats: bool = False,
) -> tuple[Tensor, list[Tensor], list[Optional[Tensor]], Optional[Tensor]]:
    """The basic block forward: two 3x3 convs, the second with the shortcut; returns as
    :func:`bottleneck_forward` (conv outputs [y1])."""
    x = x.contiguous(memory_format=torch.channels_last)
    bn1, bn2 = norms
    fold = fold_eval and not (bn1.training or bn2.training)
    a1 = _input_affine(kernels, x, bn1, in_stats, fold)

    const2 = norm_affine(kernels, None, bn2, x, lazy=True) if fold else None
    y1, part1, folded2 = act_conv(kernels, x, w1, a1, stride=stride, groups=groups, emit_stats=bn2.training,
                                  post=const2)
    a2 = const2 or norm_affine(kernels, part1, bn2, y1)

    out, part = _last_conv3x3(kernels, y1, w2, None if folded2 else a2, x, a1, kind=shortcut, stride=stride,
                              groups=groups, w_proj=w_proj, emit_stats=emit_stats)
    stats = [None] * 2 if fold else [a1.stats, a2.stats]
    return out, ([] if fold else [y1]), stats, part
