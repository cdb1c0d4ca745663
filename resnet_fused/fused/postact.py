"""Forward and backward of whole post-activation (ResNet v1 / v1.5) blocks over a backend's kernels.

A post-activation unit is a chain of convs, each followed by BN (+ ReLU but the last), closed by
``out = relu(bn_last(y_last) + shortcut)``. Bottleneck (torchvision / timm ``Bottleneck``):
convs 1x1, 3x3 (stride on it: v1.5, or on the first 1x1: v1; groups = ResNeXt's cardinality),
1x1; basic block: 3x3 (strided), 3x3. The shortcut is the input x (identity) or
``bn_d(conv1x1_s(x))`` (projection). Train forward, one kernel per conv plus one closing pass:

    y0 = conv0(x)                                     epilogue: statistics of y0 -> bn0
    y_i = conv_i(relu(bn_{i-1}(y_{i-1})))             prologue bn+relu; epilogue: statistics -> bn_i
    yd = conv_d(x)                                    (projection) epilogue: statistics -> bn_d
    out = relu(bn_last(y_last) + (x | bn_d(yd)))      one elementwise pass, both affines

Eval (no norm training, nothing needing a gradient): every BN is a constant affine, one kernel
per conv. The inner norms fold into the producing conv's epilogue (it stores relu(bn(y)), so the
next conv has no prologue), their affines computed from the running statistics inside the conv
where the kernel set can (``affine_from_stats``). The last conv stores the closing
relu(bn_last(y) + shortcut) in its epilogue (``postact_close``: the projection a second K-loop
under its norm's affine), no torch op touching a weight or a statistic.

Running statistics: a training norm with ``update`` moves its running mean and variance and
counts the batch inside its finalize launch.

Backward (g = dL/dout). Saved by the forward: x and y0 .. y_{last-1} plus per-channel statistics;
no activation, and neither y_last, yd nor out: y_last (and yd) are recomputed by one forward conv
each, which keeps the saved bytes at most 0.55x eager's (eager saves x, every conv output, every
activation and the output). Then, as in the pre-activation backward (``fused/backward.py``):

    g'_last = g * [z > 0], sums over y_last and yd        (closing backward pass)
    conv_i (i >= 1): dgrad with the BN-backward apply of bn_i in its prologue, the ReLU mask of
        bn_{i-1} and its sums in the epilogue; wgrad with the same prologue and relu(bn(y_{i-1}))
        recomputed                                        (the kernel set's fused GEMMs)
    conv0: dgrad with bn0's backward apply in the prologue and no mask (its input is x, not an
        activation), the projection's dgrad as a second K-loop into the same accumulator;
        wgrad over the raw x; dx += g'_last for the identity shortcut.

The link between two convs, conv(relu(bn(y))) forward and backward, is ``chain.py``'s, shared
with the pre-activation blocks; this module supplies the two ends. Kernels: the kernel set's
(``KernelSet``), whose post-activation methods are the closing pass
(``postact_out``), its backward (``postact_out_backward``) and the weight gradient over the raw
input (``plain_conv_wgrad``).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..kernel_set import SHORTCUT_ADD, SHORTCUT_PROJECTION, Affine, BNBackward, KernelSet, NormInputs, SavedNorm
from .chain import (act_conv, act_conv_backward, aten_conv_backward, coefficients, fused_3x3, grad_prologue,
                    norm_affine)

__all__ = ["postact_forward", "postact_backward"]


def _eval_forward(kernels: KernelSet, x: Tensor, weights: Sequence[Tensor], w_proj: Optional[Tensor],
                  norms: Sequence[NormInputs], strides: Sequence[int], groups: Sequence[int]) -> Tensor:
    """Every norm a constant affine, one kernel per conv: the inner norms in the producing conv's
    epilogue (it stores relu(bn(y)), the next conv has no prologue); the last conv stores the
    closing relu(bn_last(y) + shortcut), the projection a second K-loop in it."""
    h = x
    for w, nm, s, g in zip(weights[:-1], norms, strides, groups):
        post = norm_affine(kernels, None, nm, h, lazy=True)
        h, _ = kernels.conv(h, w, stride=s, groups=g, **post.args("post_scale", "post_shift", "post_stats"))
    n_convs = len(weights)
    last = norm_affine(kernels, None, norms[n_convs - 1], h, lazy=True)
    if w_proj is None:
        sc = dict(shortcut=x, shortcut_kind=SHORTCUT_ADD, shortcut_stride=1)
    else:
        proj = norm_affine(kernels, None, norms[n_convs], x, lazy=True)
        sc = dict(shortcut=x, shortcut_kind=SHORTCUT_PROJECTION, shortcut_stride=_total_stride(strides),
                  proj_weight=w_proj, **proj.args("proj_scale", "proj_shift", "proj_stats"))
    out, _ = kernels.conv(h, weights[-1], stride=strides[-1], groups=groups[-1], postact_close=True, **sc,
                          **last.args("post_scale", "post_shift", "post_stats"))
    return out


def _total_stride(strides: Sequence[int]) -> int:
    total = 1
    for s in strides:
        total *= s
    return total


def postact_forward(
    kernels: KernelSet, x: Tensor, weights: Sequence[Tensor], w_proj: Optional[Tensor],
    norms: Sequence[NormInputs], *, strides: Sequence[int], groups: Sequence[int], fold_eval: bool,
) -> tuple[Tensor, list[Tensor], list[Affine]]:
    """(out, [y0 .. y_{last-1}] for the backward, the affines of every norm: one per conv, then
    the projection's; neither when folded)."""
    x = x.contiguous(memory_format=torch.channels_last)
    n_convs = len(weights)
    fold = fold_eval and not any(nm.training for nm in norms)
    if fold:
        return _eval_forward(kernels, x, weights, w_proj, norms, strides, groups), [], []
    ys: list[Tensor] = []
    affines = []
    h, prev = x, None
    for i, (w, s, g) in enumerate(zip(weights, strides, groups)):
        emit = norms[i].training
        if prev is None:
            y, part = kernels.conv(h, w, stride=s, groups=g, emit_stats=emit)
        else:
            y, part, _ = act_conv(kernels, h, w, prev, stride=s, groups=g, emit_stats=emit)
        prev = norm_affine(kernels, part, norms[i], y)
        ys.append(y)
        affines.append(prev)
        h = y
    sc, sc_scale, sc_shift = x, None, None
    if w_proj is not None:
        yd, part_d = kernels.conv(x, w_proj, stride=_total_stride(strides), emit_stats=norms[n_convs].training)
        proj = norm_affine(kernels, part_d, norms[n_convs], yd)
        affines.append(proj)
        sc, sc_scale, sc_shift = yd, proj.scale, proj.shift
    last = affines[n_convs - 1]
    out = kernels.postact_out(ys[-1], last.scale, last.shift, sc, sc_scale, sc_shift)
    return out, ys[:-1], affines


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _pass_all(channels: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """(zeros, ones) per channel: the (scale, shift) = (0, 1) prologue whose ReLU mask passes
    every element, and zero (mean, invstd). Constants the kernels only read, made once per
    shape instead of two allocations per backward."""
    zero = torch.zeros(channels, dtype=dtype, device=device)
    return zero, torch.ones_like(zero)


def _recompute_last(kernels: KernelSet, ys: Sequence[Tensor], x: Tensor, weights: Sequence[Tensor],
                    norms: Sequence[SavedNorm], strides: Sequence[int], groups: Sequence[int]) -> Tensor:
    """y_last again, from the saved input of the last conv (same kernel as the forward: bitwise
    the same values where the forward ran the same kernel)."""
    if len(ys) == 0:
        return kernels.conv(x, weights[-1], stride=strides[-1], groups=groups[-1])[0]
    prev = norms[len(weights) - 2]
    affine = Affine(prev.stats.view(5, -1))
    return act_conv(kernels, ys[-1], weights[-1], affine, stride=strides[-1], groups=groups[-1],
                    emit_stats=False)[0]


def postact_backward(
    kernels: KernelSet, grad_out: Tensor, x: Tensor, ys: Sequence[Tensor], weights: Sequence[Tensor],
    w_proj: Optional[Tensor], norms: Sequence[SavedNorm], *, strides: Sequence[int], groups: Sequence[int],
) -> dict:
    """Gradients: ``x``, ``weights`` (list), ``w_proj``, ``bn_weight`` / ``bn_bias`` (lists, one per norm)."""
    x = x.contiguous(memory_format=torch.channels_last)
    g = grad_out.contiguous(memory_format=torch.channels_last)
    n_convs = len(weights)
    last_norm = norms[n_convs - 1]
    y_last = _recompute_last(kernels, ys, x, weights, norms, strides, groups)
    total = _total_stride(strides)
    if w_proj is not None:
        yd, _ = kernels.conv(x, w_proj, stride=total)
        proj_norm = norms[n_convs]
        g_z, part, part_d = kernels.postact_out_backward(g, y_last, last_norm, yd, proj_norm)
    else:
        g_z, part, part_d = kernels.postact_out_backward(g, y_last, last_norm, x, None)
    coeffs: list[Optional[BNBackward]] = [None] * len(norms)
    coeffs[n_convs - 1] = coefficients(kernels, part, y_last, last_norm)
    d_ws: list[Optional[Tensor]] = [None] * n_convs
    grad, prologue = g_z, grad_prologue(y_last, coeffs[n_convs - 1])
    all_ys = list(ys) + [y_last]
    for i in range(n_convs - 1, 0, -1):
        grad, coeffs[i - 1], d_ws[i], _ = act_conv_backward(
            kernels, grad, weights[i], all_ys[i - 1], norms[i - 1], stride=strides[i], groups=groups[i],
            prologue=prologue)
        prologue = grad_prologue(all_ys[i - 1], coeffs[i - 1])
    del all_ys, y_last
    # The projection's dy is needed whole (the dgrad's second K-loop has no prologue).
    dyd = None
    d_wp = None
    if w_proj is not None:
        coeffs[n_convs] = coefficients(kernels, part_d, yd, norms[n_convs])
        dyd = kernels.bn_backward_apply(g_z, yd, coeffs[n_convs])
        del yd
        d_wp = kernels.plain_conv_wgrad(dyd, x, w_proj, stride=total, prologue=None)
    # conv0: its input is x itself, no activation: no ReLU mask (scale 0, shift 1 passes all).
    w0, s0, g0 = weights[0], strides[0], groups[0]
    if fused_3x3(kernels, x, w0, s0, g0):
        zero, one = _pass_all(x.shape[1], prologue.a.dtype, x.device)
        second = dict(second_grad=dyd, second_weight=w_proj, second_stride=total) if dyd is not None else {}
        dx, _ = kernels.conv_dgrad(grad, w0, x, zero, one, zero, zero, stride=s0, groups=g0, prologue=prologue,
                                   **second)
        d_ws[0] = kernels.plain_conv_wgrad(grad, x, w0, stride=s0, prologue=prologue) if g0 == 1 else \
            aten_conv_backward(kernels.bn_backward_apply(grad, prologue.y, prologue), x, w0, s0, g0,
                                (False, True))[1]
    else:  # hybrid 3x3
        dy0 = kernels.bn_backward_apply(grad, prologue.y, prologue)
        dx, d_ws[0] = aten_conv_backward(dy0, x, w0, s0, g0)
        if dyd is not None:
            dx = dx + aten_conv_backward(dyd, x, w_proj, total, 1, (True, False))[0]
    if w_proj is None:
        dx = dx + g_z
    return dict(x=dx, weights=d_ws, w_proj=d_wp,
                bn_weight=[c.dgamma for c in coeffs], bn_bias=[c.dbeta for c in coeffs])
