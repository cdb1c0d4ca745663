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

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..kernel_set import KernelSet, SavedNorm
from .chain import Projection, act_conv_backward, grad_prologue

__all__ = ["SavedNorm", "bottleneck_backward", "basic_block_backward"]


def _shortcut_grad(kind: str, grad_out: Tensor) -> Optional[Tensor]:
    return grad_out if kind in ("identity", "subsample") else None


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
    g3, c3, d_w3, _ = act_conv_backward(kernels, g, w3, y2, n3, stride=1)
    g2, c2, d_w2, _ = act_conv_backward(kernels, g3, w2, y1, n2, stride=s2, groups=groups,
                                             prologue=grad_prologue(y2, c3))
    del g3
    proj = Projection(g, w_proj, stride) if shortcut == "projection" else None
    g1, c1, d_w1, d_wp = act_conv_backward(kernels, g2, w1, x, n1, stride=s1, prologue=grad_prologue(y1, c2),
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
    g2, c2, d_w2, _ = act_conv_backward(kernels, g, w2, y1, n2, stride=1, groups=groups)
    proj = Projection(g, w_proj, stride) if shortcut == "projection" else None
    g1, c1, d_w1, d_wp = act_conv_backward(kernels, g2, w1, x, n1, stride=stride, groups=groups,
                                       prologue=grad_prologue(y1, c2), projection=proj)
    del g2
    dx = kernels.bn_backward_apply(g1, x, c1, _shortcut_grad(shortcut, g), stride)
    return dict(x=dx, w1=d_w1, w2=d_w2, w_proj=d_wp,
                bn_weight0=c1.dgamma, bn_weight1=c2.dgamma, bn_bias0=c1.dbeta, bn_bias1=c2.dbeta)
