"""Backward of whole pre-activation blocks (launcher level), docs/design.md section 4.

Saved by the forward: the block input x and the conv outputs y1 (, y2), plus per-channel
statistics; never an activation. The activations a = relu(bn(y)) are recomputed here, used,
and dropped. Per conv, from the top:

    dA      = dgrad(g_below)                       input gradient of the conv, w.r.t. its activation
    g'      = dA * [bn(y) > 0]                     ReLU mask; per-tile sums -> dgamma, dbeta
    dy      = A g' + B y + C                       BN backward apply (coefficients from the sums)
    dW      = wgrad(a, g_below)

The projection shortcut reads a1, so its input gradient is added to conv1's BEFORE bn1's mask
and sums; identity and subsample gradients are added after bn1's backward apply, in the pass that
writes dx.

Every conv's dgrad and wgrad are the kernel set's fused GEMMs: the activation recompute and the
BN backward apply in the operand prologues, the ReLU mask and BN sums in the dgrad epilogue, the
projection's dgrad as a second K-loop. The 3x3 follows the forward's choice (``fuse_3x3``):
fused, those kernels at the 3x3 too (strided, grouped); else the hybrid, which materialises the
activation and dy once and runs ATen's (cuDNN's) dgrad and wgrad on them, with the kernel set's
BN/ReLU backward around them (docs/design.md section 7: a per-tap prologue repeats its loads and math
nine times).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..kernel_set import GradPrologue, KernelSet, SavedNorm

__all__ = ["SavedNorm", "bottleneck_backward", "basic_block_backward"]


def _channels_last_weight(weight: Tensor) -> bool:
    """Whether a weight is stored channels_last (a model after ``.to(memory_format=
    torch.channels_last)``; a 1x1 is both layouts at once): its gradient is made that way."""
    return weight.shape[-1] > 1 and weight.is_contiguous(memory_format=torch.channels_last) \
        and not weight.is_contiguous()


def _conv_backward(grad: Tensor, inp: Tensor, weight: Tensor, stride: int, groups: int) -> tuple[Tensor, Tensor]:
    """(input gradient, weight gradient) of conv2d(inp, weight, stride, padding=k//2, groups)."""
    pad = weight.shape[-1] // 2
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, inp, weight, None, [stride, stride], [pad, pad], [1, 1], False, [0, 0], groups,
        [True, True, False])
    return grad_input, grad_weight


def _coefficients(kernels: KernelSet, part: Tensor, v: Tensor, norm: SavedNorm):
    """dgamma, dbeta and the apply coefficients of the norm whose input was ``v``."""
    count = v.numel() // v.shape[1]
    return kernels.bn_backward_coefficients(part, norm.weight, norm.mean, norm.invstd, count, norm.training)


def _shortcut_grad(kind: str, grad_out: Tensor) -> Optional[Tensor]:
    return grad_out if kind in ("identity", "subsample") else None


@dataclass
class _Projection:
    """A 1x1 projection shortcut reading the same activation as the conv it is paired with."""

    grad: Tensor      # the block-output gradient
    weight: Tensor
    stride: int


def _bn_relu_conv_backward(
    kernels: KernelSet, grad: Tensor, weight: Tensor, v: Tensor, norm: SavedNorm, *, stride: int,
    groups: int = 1, prologue: Optional[GradPrologue] = None, projection: Optional[_Projection] = None,
):
    """Backward through conv(relu(norm(v))) given its output gradient ``grad`` (the BN backward
    ``prologue`` of the norm after the conv still to apply): (g' masked at ``norm``'s ReLU,
    ``norm``'s backward coefficients, dW, the projection's dW).

    1x1 convs, and fused 3x3s: the kernel set's dgrad and wgrad with every elementwise step in
    their prologues and epilogue. Hybrid 3x3: dy and the activation materialised once, ATen's
    dgrad and wgrad on them.
    """
    ksize = weight.shape[-1]
    n, c_out, h_out, w_out = grad.shape
    if ksize == 1 or kernels.fuse_3x3(n * h_out * w_out, c_out // groups, weight.shape[1] * 9,
                                      grad.dtype, grad.device):
        second = dict(second_grad=projection.grad, second_weight=projection.weight,
                      second_stride=projection.stride) if projection is not None else {}
        g_masked, part = kernels.conv_dgrad(grad, weight, v, norm.scale, norm.shift, norm.mean, norm.invstd,
                                            stride=stride, groups=groups, prologue=prologue, **second)
        d_w = kernels.conv_wgrad(grad, v, norm.scale, norm.shift, ksize=ksize, stride=stride, groups=groups,
                                 channels_last=_channels_last_weight(weight),
                                 prologue=prologue)
        d_wp = None
        if projection is not None:
            d_wp = kernels.conv_wgrad(projection.grad, v, norm.scale, norm.shift, ksize=1,
                                      stride=projection.stride, groups=1, prologue=None)
        return g_masked, _coefficients(kernels, part, v, norm), d_w, d_wp
    dy = kernels.bn_backward_apply(grad, prologue.y, prologue) if prologue is not None else grad
    act = kernels.bn_relu_apply(v, norm.scale, norm.shift)
    d_act, d_w = _conv_backward(dy, act, weight, stride, groups)
    del dy
    d_act_proj, d_wp = (_conv_backward(projection.grad, act, projection.weight, projection.stride, 1)
                        if projection is not None else (None, None))
    del act
    g_masked, part = kernels.relu_grad_sums(d_act, v, norm.scale, norm.shift, norm.mean, norm.invstd,
                                            d_act_proj)
    return g_masked, _coefficients(kernels, part, v, norm), d_w, d_wp


def _grad_prologue(y: Tensor, coeff) -> GradPrologue:
    return GradPrologue(y, coeff.a, coeff.b, coeff.c)


def bottleneck_backward(
    kernels: KernelSet, grad_out: Tensor, x: Tensor, y1: Tensor, y2: Tensor,
    w1: Tensor, w2: Tensor, w3: Tensor, w_proj: Optional[Tensor], norms: Sequence[SavedNorm],
    *, stride: int, groups: int, shortcut: str, stride_on: str,
) -> dict[str, Optional[Tensor]]:
    """Gradients of the bottleneck: x, w1, w2, w3, w_proj, bn_weight{i}, bn_bias{i}.

    No activation and no dy of a 1x1 is materialised: recompute in the operand prologues, mask
    and sums in the dgrad epilogues, the projection's dgrad as conv1's second K-loop.
    """
    s1, s2 = (stride, 1) if stride_on == "1x1" else (1, stride)
    n1, n2, n3 = norms
    g = grad_out.contiguous(memory_format=torch.channels_last)
    g3, c3, d_w3, _ = _bn_relu_conv_backward(kernels, g, w3, y2, n3, stride=1)
    g2, c2, d_w2, _ = _bn_relu_conv_backward(kernels, g3, w2, y1, n2, stride=s2, groups=groups,
                                             prologue=_grad_prologue(y2, c3))
    del g3
    proj = _Projection(g, w_proj, stride) if shortcut == "projection" else None
    g1, c1, d_w1, d_wp = _bn_relu_conv_backward(kernels, g2, w1, x, n1, stride=s1, prologue=_grad_prologue(y1, c2),
                                                projection=proj)
    del g2
    dx = kernels.bn_backward_apply(g1, x, c1, _shortcut_grad(shortcut, g), stride)
    return dict(x=dx, w1=d_w1, w2=d_w2, w3=d_w3, w_proj=d_wp,
                bn_weight0=c1.dgamma, bn_weight1=c2.dgamma, bn_weight2=c3.dgamma,
                bn_bias0=c1.dbeta, bn_bias1=c2.dbeta, bn_bias2=c3.dbeta)


def basic_block_backward(
    kernels: KernelSet, grad_out: Tensor, x: Tensor, y1: Tensor, w1: Tensor, w2: Tensor, w_proj: Optional[Tensor],
    norms: Sequence[SavedNorm], *, stride: int, groups: int, shortcut: str,
) -> dict[str, Optional[Tensor]]:
    """Gradients of the basic block: x, w1, w2, w_proj, bn_weight{i}, bn_bias{i}."""
    n1, n2 = norms
    g = grad_out.contiguous(memory_format=torch.channels_last)
    g2, c2, d_w2, _ = _bn_relu_conv_backward(kernels, g, w2, y1, n2, stride=1, groups=groups)
    proj = _Projection(g, w_proj, stride) if shortcut == "projection" else None
    g1, c1, d_w1, d_wp = _bn_relu_conv_backward(kernels, g2, w1, x, n1, stride=stride, groups=groups,
                                                prologue=_grad_prologue(y1, c2), projection=proj)
    del g2
    dx = kernels.bn_backward_apply(g1, x, c1, _shortcut_grad(shortcut, g), stride)
    return dict(x=dx, w1=d_w1, w2=d_w2, w_proj=d_wp,
                bn_weight0=c1.dgamma, bn_weight1=c2.dgamma, bn_bias0=c1.dbeta, bn_bias1=c2.dbeta)
