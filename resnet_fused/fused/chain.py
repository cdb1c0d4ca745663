"""The middle of every block's chain, written once: ``conv(relu(bn(y)))`` forward and backward.

Pre-activation blocks (``forward.py`` / ``backward.py``) and post-activation ones
(``postact.py``) differ only at their two ends (where the first norm's statistics come from, and
the shortcut in the last epilogue vs the closing pass); between them each conv reads the
previous conv's output through a BatchNorm + ReLU, and that link is this module:

* the norm's affine: finalized from the conv epilogue's statistics partials (a training norm,
  with its running update in the same launch), or constant from the running statistics, formed
  inside the conv where the kernel set can (``affine_from_stats``: no launch);
* the conv with that affine in its operand prologue and the next norm's statistics (or, in eval,
  the next norm's affine + ReLU) in its epilogue: the fused kernel for a 1x1 and for a 3x3 where
  the kernel set says so (``fuse_3x3``), else the hybrid (BN+ReLU pass, ATen's conv, statistics
  pass);
* its backward: the dgrad with the BN-backward apply of the norm after the conv in its prologue,
  the ReLU mask and the BN sums in its epilogue (a projection's dgrad as a second K-loop), the
  wgrad with the same prologue and the activation recomputed, then the norm's backward
  coefficients; the hybrid materialises dy and the activation once and runs ATen's dgrad and
  wgrad on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernel_set import (Affine, BNBackward, GradPrologue, KernelSet, NormInputs, SavedNorm, channels_last_weight,
                          stats_dtype)

__all__ = ["norm_affine", "materialized", "prologue_args", "post_args", "fused_3x3", "act_conv", "Projection",
           "act_conv_backward", "coefficients", "aten_conv_backward", "grad_prologue"]


def norm_affine(kernels: KernelSet, part: Optional[Tensor], norm: NormInputs, of: Tensor,
                lazy: bool = False) -> Affine:
    """The affine of ``norm`` applied to ``of`` (its input). A training norm: one finalize launch
    over the partials of ``of`` (the running update and the batch count in the same launch when
    ``norm.update``; the count N*H*W is a host number). Any other norm: constant, from its running
    statistics; ``lazy`` leaves it to the conv that applies it where the kernel set can (no
    launch; only where nothing needs the statistics later), else one finalize launch."""
    if norm.training:
        return Affine(kernels.finalize_stats(
            part, norm.weight, norm.bias, norm.eps, running_mean=norm.running_mean, running_var=norm.running_var,
            num_batches_tracked=norm.num_batches_tracked, momentum=norm.momentum, update=norm.update,
            count=of.numel() // max(of.shape[1], 1)))
    if lazy and kernels.affine_from_stats:
        return Affine(norm=norm)
    return Affine(kernels.finalize_stats(None, norm.weight, norm.bias, norm.eps, running_mean=norm.running_mean,
                                         running_var=norm.running_var, from_running=True,
                                         dtype=stats_dtype(of.dtype)))


def materialized(kernels: KernelSet, affine: Affine, of: Tensor) -> Affine:
    """``affine`` with its scale and shift as tensors (a lazy one finalized now)."""
    return affine if affine.stats is not None else norm_affine(kernels, None, affine.norm, of)


def prologue_args(affine: Optional[Affine]) -> dict:
    return affine.args() if affine is not None else {}


def post_args(affine: Optional[Affine]) -> dict:
    return affine.args("post_scale", "post_shift", "post_stats") if affine is not None else {}


def fused_3x3(kernels: KernelSet, x: Tensor, weight: Tensor, stride: int, groups: int) -> bool:
    """Whether a conv of ``weight`` over ``x`` runs as the fused kernel: every 1x1, and a 3x3 where
    the kernel set's selector says so."""
    if weight.shape[-1] == 1:
        return True
    n, _, h, w = x.shape
    m = n * ((h - 1) // stride + 1) * ((w - 1) // stride + 1)
    return kernels.fuse_3x3(m, weight.shape[0] // groups, weight.shape[1] * 9, x.dtype, x.device)


def act_conv(kernels: KernelSet, x: Tensor, weight: Tensor, affine: Optional[Affine], *, stride: int, groups: int,
             emit_stats: bool, post: Optional[Affine] = None) -> tuple[Tensor, Optional[Tensor], bool]:
    """conv(relu(affine(x))) (``affine`` None: conv(x)) without shortcut.

    Returns (output, statistics partials of the output when ``emit_stats``, whether ``post`` (the
    next BN + ReLU, eval mode) was applied to the output). The fused kernel applies it in its
    epilogue; the hybrid's ATen conv has no epilogue, so the caller applies ``post`` in the next
    conv's prologue instead.
    """
    if fused_3x3(kernels, x, weight, stride, groups):
        out, part = kernels.conv(x, weight, **prologue_args(affine), stride=stride, groups=groups,
                                 emit_stats=emit_stats, **post_args(post))
        return out, part, post is not None
    act = x
    if affine is not None:
        affine = materialized(kernels, affine, x)
        act = kernels.bn_relu_apply(x, affine.scale, affine.shift)
    y = F.conv2d(act, weight.to(act.dtype), stride=stride, padding=1, groups=groups)
    y = y.contiguous(memory_format=torch.channels_last)
    return y, (kernels.stats_partials(y) if emit_stats else None), False


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------


def aten_conv_backward(grad: Tensor, inp: Tensor, weight: Tensor, stride: int, groups: int,
                       mask: tuple[bool, bool] = (True, True)) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(input gradient, weight gradient) of conv2d(inp, weight, stride, padding=k//2, groups),
    each only where ``mask`` asks."""
    pad = weight.shape[-1] // 2
    d_in, d_w, _ = torch.ops.aten.convolution_backward(
        grad, inp, weight.to(grad.dtype), None, [stride, stride], [pad, pad], [1, 1], False, [0, 0], groups,
        [mask[0], mask[1], False])
    return d_in, d_w


def coefficients(kernels: KernelSet, part: Tensor, v: Tensor, norm: SavedNorm) -> BNBackward:
    """dgamma, dbeta and the apply coefficients of the norm whose input was ``v``."""
    count = v.numel() // v.shape[1]
    return kernels.bn_backward_coefficients(part, norm.weight, norm.mean, norm.invstd, count, norm.training)


def grad_prologue(y: Tensor, coeff: BNBackward) -> GradPrologue:
    """The BN-backward apply dy = A g + B y + C of the norm that read ``y``, as an operand prologue."""
    return GradPrologue(y, coeff.a, coeff.b, coeff.c)


@dataclass
class Projection:
    """A 1x1 projection shortcut reading the same activation as the conv it is paired with."""

    grad: Tensor      # the block-output gradient
    weight: Tensor
    stride: int


def act_conv_backward(
    kernels: KernelSet, grad: Tensor, weight: Tensor, v: Tensor, norm: SavedNorm, *, stride: int,
    groups: int = 1, prologue: Optional[GradPrologue] = None, projection: Optional[Projection] = None,
) -> tuple[Tensor, BNBackward, Tensor, Optional[Tensor]]:
    """Backward through conv(relu(norm(v))) given its output gradient ``grad`` (the BN-backward
    ``prologue`` of the norm after the conv still to apply): (g' masked at ``norm``'s ReLU,
    ``norm``'s backward coefficients, dW, the projection's dW).

    Fused: the kernel set's dgrad and wgrad with every elementwise step in their prologues and
    epilogue (a channels_last 3x3 weight gets its gradient in its own layout). Hybrid 3x3: dy and
    the activation materialised once, ATen's dgrad and wgrad on them.
    """
    if fused_3x3(kernels, v, weight, stride, groups):
        second = dict(second_grad=projection.grad, second_weight=projection.weight,
                      second_stride=projection.stride) if projection is not None else {}
        g_masked, part = kernels.conv_dgrad(grad, weight, v, norm.scale, norm.shift, norm.mean, norm.invstd,
                                            stride=stride, groups=groups, prologue=prologue, **second)
        d_w = kernels.conv_wgrad(grad, v, norm.scale, norm.shift, ksize=weight.shape[-1], stride=stride,
                                 groups=groups, channels_last=channels_last_weight(weight), prologue=prologue)
        d_wp = None
        if projection is not None:
            d_wp = kernels.conv_wgrad(projection.grad, v, norm.scale, norm.shift, ksize=1,
                                      stride=projection.stride, groups=1, prologue=None)
        return g_masked, coefficients(kernels, part, v, norm), d_w, d_wp
    dy = kernels.bn_backward_apply(grad, prologue.y, prologue) if prologue is not None else grad
    act = kernels.bn_relu_apply(v, norm.scale, norm.shift)
    d_act, d_w = aten_conv_backward(dy, act, weight, stride, groups)
    del dy
    d_act_proj, d_wp = (aten_conv_backward(projection.grad, act, projection.weight, projection.stride, 1)
                        if projection is not None else (None, None))
    del act
    g_masked, part = kernels.relu_grad_sums(d_act, v, norm.scale, norm.shift, norm.mean, norm.invstd,
                                            d_act_proj)
    return g_masked, coefficients(kernels, part, v, norm), d_w, d_wp
