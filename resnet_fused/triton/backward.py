"""Backward of whole pre-activation blocks (launcher level), DESIGN section 4.

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

The bottleneck's 1x1 convs run fused Triton GEMMs (``conv1x1_backward.py``): the activation
recompute and the BN backward apply in the operand prologues, the ReLU mask and BN sums in the
dgrad epilogue, the projection's dgrad as a second K-loop. The 3x3 convs (and the basic block)
run dgrad and wgrad through ATen (cuDNN on a GPU) on the recomputed activation, with the BN/ReLU
backward in Triton kernels around them, the hybrid DESIGN section 7 argues for at the 3x3.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import configs
from .bn_backward import bn_backward_apply, bn_backward_coefficients, relu_grad_sums
from .conv1x1_backward import GradPrologue, conv1x1_dgrad, conv1x1_wgrad
from .elementwise import bn_relu_apply

__all__ = ["SavedNorm", "bottleneck_backward", "basic_block_backward"]


@dataclass
class SavedNorm:
    """One BatchNorm as the backward needs it: parameters and the statistics the forward used."""

    weight: Tensor
    bias: Tensor
    mean: Tensor      # [C], fp32 (fp64 for fp64 data): batch mean (train) or running mean
    var: Tensor       # [C], likewise: biased batch var (train) or running var
    eps: float
    training: bool

    def __post_init__(self) -> None:
        self.invstd = torch.rsqrt(self.var + self.eps)
        self.scale = self.weight.to(self.var.dtype) * self.invstd
        self.shift = self.bias.to(self.var.dtype) - self.mean * self.scale


def _conv_backward(grad: Tensor, inp: Tensor, weight: Tensor, stride: int, groups: int) -> tuple[Tensor, Tensor]:
    """(input gradient, weight gradient) of conv2d(inp, weight, stride, padding=k//2, groups)."""
    pad = weight.shape[-1] // 2
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, inp, weight, None, [stride, stride], [pad, pad], [1, 1], False, [0, 0], groups,
        [True, True, False])
    return grad_input, grad_weight


def _coefficients(part: Tensor, v: Tensor, norm: SavedNorm):
    """dgamma, dbeta and the apply coefficients of the norm whose input was ``v``."""
    count = v.numel() // v.shape[1]
    return bn_backward_coefficients(part, norm.weight, norm.mean, norm.invstd, count, norm.training)


def _norm_backward(grad_act: Tensor, v: Tensor, norm: SavedNorm, extra: Optional[Tensor] = None):
    """ReLU mask, BN sums and coefficients for the norm whose input was ``v``."""
    g_masked, part = relu_grad_sums(grad_act, v, norm.scale, norm.shift, norm.mean, norm.invstd, extra)
    return g_masked, _coefficients(part, v, norm)


def _shortcut_grad(kind: str, grad_out: Tensor) -> Optional[Tensor]:
    return grad_out if kind in ("identity", "subsample") else None


def bottleneck_backward(
    grad_out: Tensor, x: Tensor, y1: Tensor, y2: Tensor,
    w1: Tensor, w2: Tensor, w3: Tensor, w_proj: Optional[Tensor], norms: Sequence[SavedNorm],
    *, stride: int, groups: int, shortcut: str, stride_on: str,
) -> dict[str, Optional[Tensor]]:
    """Gradients of the bottleneck: x, w1, w2, w3, w_proj, bn_weight{i}, bn_bias{i}.

    The 1x1 convs run the fused GEMMs of ``conv1x1_backward`` (no activation or dy materialised:
    recompute in the operand prologues, mask and sums in the dgrad epilogue, the projection's
    dgrad as conv1's second K-loop); the 3x3 runs through ATen on the recomputed a2.
    """
    s1, s2 = (stride, 1) if stride_on == "1x1" else (1, stride)
    n1, n2, n3 = norms
    cfg = configs.backward_config(x.dtype, x.device)
    meta = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    g = grad_out.contiguous(memory_format=torch.channels_last)

    # conv3 (1x1): g3' = (g W3^T) * mask(bn3(y2)), sums -> bn3; dW3 = relu(bn3(y2))^T g
    g3, part3 = conv1x1_dgrad(g, w3, y2, n3.scale, n3.shift, n3.mean, n3.invstd, **cfg.dgrad_meta(), **meta)
    d_w3 = conv1x1_wgrad(g, y2, n3.scale, n3.shift, **cfg.wgrad_meta(), **meta)
    d_wp = None
    if shortcut == "projection":
        d_wp = conv1x1_wgrad(g, x, n1.scale, n1.shift, stride=stride, **cfg.wgrad_meta(), **meta)
    c3 = _coefficients(part3, y2, n3)

    # conv2 (3x3, strided, grouped): dy2 = A3 g3' + B3 y2 + C3 materialised for ATen
    dy2 = bn_backward_apply(g3, y2, c3)
    del g3
    a2 = bn_relu_apply(y1, n2.scale, n2.shift)
    d_a2, d_w2 = _conv_backward(dy2, a2, w2, s2, groups)
    del a2, dy2
    g2, c2 = _norm_backward(d_a2, y1, n2)
    del d_a2

    # conv1 (1x1) with the projection's dgrad in the same accumulator, before bn1's mask
    dy1 = GradPrologue(y1, c2.a, c2.b, c2.c)
    proj = dict(second_grad=g, second_weight=w_proj, second_stride=stride) if shortcut == "projection" else {}
    g1, part1 = conv1x1_dgrad(g2, w1, x, n1.scale, n1.shift, n1.mean, n1.invstd, stride=s1, prologue=dy1,
                              **proj, **cfg.dgrad_meta(), **meta)
    d_w1 = conv1x1_wgrad(g2, x, n1.scale, n1.shift, stride=s1, prologue=dy1, **cfg.wgrad_meta(), **meta)
    del g2
    c1 = _coefficients(part1, x, n1)
    dx = bn_backward_apply(g1, x, c1, _shortcut_grad(shortcut, g), stride)
    return dict(x=dx, w1=d_w1, w2=d_w2, w3=d_w3, w_proj=d_wp,
                bn_weight0=c1.dgamma, bn_weight1=c2.dgamma, bn_weight2=c3.dgamma,
                bn_bias0=c1.dbeta, bn_bias1=c2.dbeta, bn_bias2=c3.dbeta)


def basic_block_backward(
    grad_out: Tensor, x: Tensor, y1: Tensor, w1: Tensor, w2: Tensor, w_proj: Optional[Tensor],
    norms: Sequence[SavedNorm], *, stride: int, groups: int, shortcut: str,
) -> dict[str, Optional[Tensor]]:
    """Gradients of the basic block: x, w1, w2, w_proj, bn_weight{i}, bn_bias{i}."""
    n1, n2 = norms
    g = grad_out.contiguous(memory_format=torch.channels_last)
    a2 = bn_relu_apply(y1, n2.scale, n2.shift)
    d_a2, d_w2 = _conv_backward(g, a2, w2, 1, groups)
    del a2
    a1 = bn_relu_apply(x, n1.scale, n1.shift)
    d_a1_proj, d_wp = _conv_backward(g, a1, w_proj, stride, 1) if shortcut == "projection" else (None, None)
    g2, c2 = _norm_backward(d_a2, y1, n2)
    dy1 = bn_backward_apply(g2, y1, c2)
    del g2, d_a2
    d_a1, d_w1 = _conv_backward(dy1, a1, w1, stride, groups)
    del a1, dy1
    g1, c1 = _norm_backward(d_a1, x, n1, extra=d_a1_proj)
    dx = bn_backward_apply(g1, x, c1, _shortcut_grad(shortcut, g), stride)
    return dict(x=dx, w1=d_w1, w2=d_w2, w_proj=d_wp,
                bn_weight0=c1.dgamma, bn_weight1=c2.dgamma, bn_bias0=c1.dbeta, bn_bias1=c2.dbeta)
