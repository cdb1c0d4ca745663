"""The closing pass of a post-activation (ResNet v1 / v1.5) block, forward and backward, NHWC.

A post-activation unit ends with ``out = relu(bn(y) + shortcut)``: ``y`` is the last conv's
output and the shortcut is either the block input (identity) or ``bn_d(yd)``, a projection
``yd = conv1x1_s(x)`` with its own BatchNorm. Both BatchNorms need the batch statistics of the
whole conv output before anything can be applied, so in train mode this cannot live in the
producing conv's epilogue: it is one elementwise pass with both affines (fp32 math, one rounding
to the storage dtype).

Backward (g = dL/dout), one pass, nothing saved but the conv outputs (recomputed by the caller):

    g' = g * [y * scale + shift + sc_term > 0]       sc_term = sc (identity) or sc * sc_scale + sc_shift
    partials of sum g', sum g' * xhat   over y       -> the last norm's dbeta, dgamma
    partials of sum g' * xhat_d          over yd      -> the projection norm's dgamma (dbeta_d = dbeta)

The partials have the layout of ``bn_backward.relu_grad_sums`` ([2, P, C], per M tile), so the
kernel set's ``bn_backward_coefficients`` reduces them.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import launch

__all__ = ["postact_out", "postact_out_backward"]


@triton.jit
def _z_tile(y_ptr, sc_ptr, scale_ptr, shift_ptr, sc_scale_ptr, sc_shift_ptr, offs, mask, cols, col_valid,
            PROJ: tl.constexpr):
    """(z = bn(y) + shortcut term, y, sc) of one tile, in the per-channel vectors' dtype."""
    scale = tl.load(scale_ptr + cols, mask=col_valid, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=col_valid, other=0.0)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(scale.dtype)
    sc = tl.load(sc_ptr + offs, mask=mask, other=0.0).to(scale.dtype)
    z = y * scale[None, :] + shift[None, :]
    if PROJ:
        sc_scale = tl.load(sc_scale_ptr + cols, mask=col_valid, other=0.0)
        sc_shift = tl.load(sc_shift_ptr + cols, mask=col_valid, other=0.0)
        z += sc * sc_scale[None, :] + sc_shift[None, :]
    else:
        z += sc
    return z, y, sc


@triton.jit
def _postact_out_kernel(y_ptr, sc_ptr, scale_ptr, shift_ptr, sc_scale_ptr, sc_shift_ptr, out_ptr, M, C,
                        PROJ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_valid = cols < C
    mask = (rows < M)[:, None] & col_valid[None, :]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    z, y, sc = _z_tile(y_ptr, sc_ptr, scale_ptr, shift_ptr, sc_scale_ptr, sc_shift_ptr, offs, mask, cols,
                       col_valid, PROJ)
    out = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _postact_out_backward_kernel(
    g_ptr, y_ptr, sc_ptr, scale_ptr, shift_ptr, sc_scale_ptr, sc_shift_ptr,
    mean_ptr, invstd_ptr, sc_mean_ptr, sc_invstd_ptr,
    out_ptr, part_ptr, sc_part_ptr, M, C,
    PROJ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_valid = cols < C
    mask = (rows < M)[:, None] & col_valid[None, :]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    z, y, sc = _z_tile(y_ptr, sc_ptr, scale_ptr, shift_ptr, sc_scale_ptr, sc_shift_ptr, offs, mask, cols,
                       col_valid, PROJ)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(z.dtype)
    g = tl.where(mask & (z > 0.0), g, 0.0)
    g_stored = g.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, g_stored, mask=mask)
    # Sums of the value as stored: what the next dgrad/wgrad prologue reads.
    g = g_stored.to(z.dtype)
    plane = tl.num_programs(0) * C
    mean = tl.load(mean_ptr + cols, mask=col_valid, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=col_valid, other=0.0)
    sum_g = tl.sum(g, axis=0)
    tl.store(part_ptr + pid_m * C + cols, sum_g, mask=col_valid)
    tl.store(part_ptr + plane + pid_m * C + cols, tl.sum(g * ((y - mean[None, :]) * invstd[None, :]), axis=0),
             mask=col_valid)
    if PROJ:
        sc_mean = tl.load(sc_mean_ptr + cols, mask=col_valid, other=0.0)
        sc_invstd = tl.load(sc_invstd_ptr + cols, mask=col_valid, other=0.0)
        tl.store(sc_part_ptr + pid_m * C + cols, sum_g, mask=col_valid)
        tl.store(sc_part_ptr + plane + pid_m * C + cols,
                 tl.sum(g * ((sc - sc_mean[None, :]) * sc_invstd[None, :]), axis=0), mask=col_valid)


def _nhwc(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _check(y: Tensor, sc: Tensor) -> None:
    if y.shape != sc.shape:
        raise ValueError(f"post-activation closing pass: conv output {tuple(y.shape)} and shortcut "
                         f"{tuple(sc.shape)} differ")


def postact_out(y: Tensor, scale: Tensor, shift: Tensor, sc: Tensor, sc_scale: Optional[Tensor] = None,
                sc_shift: Optional[Tensor] = None, block_m: int = 64, block_c: int = 64) -> Tensor:
    """relu(y * scale + shift + sc) (identity) or relu(y * scale + shift + sc * sc_scale + sc_shift)
    (projection), per channel, channels_last, in y's dtype."""
    y, sc = _nhwc(y), _nhwc(sc)
    _check(y, sc)
    n, c, h, w = y.shape
    m = n * h * w
    out = torch.empty_like(y, memory_format=torch.channels_last)
    proj = sc_scale is not None
    launch(_postact_out_kernel, (-(-m // block_m), -(-c // block_c)), y,
           y, sc, scale, shift, sc_scale if proj else scale, sc_shift if proj else shift, out, m, c,
           PROJ=proj, BLOCK_M=block_m, BLOCK_C=block_c)
    return out


def postact_out_backward(
    grad: Tensor, y: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, invstd: Tensor, sc: Tensor,
    sc_scale: Optional[Tensor] = None, sc_shift: Optional[Tensor] = None, sc_mean: Optional[Tensor] = None,
    sc_invstd: Optional[Tensor] = None, block_m: int = 64, block_c: int = 64,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(g' = grad * [z > 0], partial sums [2, P, C] over y, partial sums [2, P, C] over the
    projection's yd or None). ``mean``/``invstd`` are the last norm's statistics (xhat of y)."""
    grad, y, sc = _nhwc(grad), _nhwc(y), _nhwc(sc)
    _check(y, sc)
    n, c, h, w = y.shape
    m = n * h * w
    p = -(-m // block_m)
    out = torch.empty_like(y, memory_format=torch.channels_last, dtype=grad.dtype)
    part = torch.empty((2, p, c), dtype=scale.dtype, device=y.device)
    proj = sc_scale is not None
    sc_part = torch.empty((2, p, c), dtype=scale.dtype, device=y.device) if proj else None
    launch(_postact_out_backward_kernel, (p, -(-c // block_c)), y,
           grad, y, sc, scale, shift, sc_scale if proj else scale, sc_shift if proj else shift,
           mean, invstd, sc_mean if proj else mean, sc_invstd if proj else invstd,
           out, part, sc_part if proj else part, m, c,
           PROJ=proj, BLOCK_M=block_m, BLOCK_C=block_c)
    return out, part, sc_part
