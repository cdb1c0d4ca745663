"""BatchNorm + ReLU backward pieces (docs/design.md section 4), NHWC, fp32 math.

With g' = dL/da * [z > 0] the gradient after the ReLU mask (z = v * scale + shift the
pre-activation of the saved BN input v) and xhat = (v - mean) * invstd:

    dbeta = sum g'        dgamma = sum g' * xhat        (per channel, over M = N*H*W)
    dv = A g' + B v + C   with A = gamma * invstd and, in train mode,
                          B = -A * invstd * dgamma / M,  C = -A * dbeta / M - B * mean
                          (eval / frozen BN: B = C = 0; its statistics are constants).

``relu_grad_sums`` applies the mask and writes per-tile partials of the two sums (fixed-order
merge later: deterministic, no atomics); ``bn_backward_coefficients`` reduces them into
dgamma, dbeta, A, B, C (many partials: a chunk pass on a 2-D grid sums chunks of them first,
``stats.split_grid``, and the coefficients kernel sums the chunks in order);
``bn_backward_apply`` forms dv, optionally adding the shortcut's gradient (identity, or
TF-slim's subsample scattered back to the strided positions) in the same pass that writes dx.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..kernel_set import BNBackward
from .launch import launch
from .stats import SPLIT_BLOCK_C, SPLIT_BLOCK_P, split_grid

__all__ = ["relu_grad_sums", "bn_backward_coefficients", "bn_backward_apply", "BNBackward"]


@triton.jit
def _relu_mask_store_sums(g, v_ptr, scale, shift_ptr, mean_ptr, invstd_ptr, out_ptr, part_ptr,
                          offs, mask, pid_m, cols, col_valid, C):
    """g' = g * [v * scale + shift > 0] stored at ``offs``, and this tile's partial sums of g'
    and g' * xhat (dbeta, dgamma) into part [2, tiles, C]. Shared by the standalone pass and
    the fused 1x1 dgrad epilogue."""
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(scale.dtype)
    shift = tl.load(shift_ptr + cols, mask=col_valid, other=0.0)
    g = tl.where(mask & (v * scale[None, :] + shift[None, :] > 0.0), g, 0.0)
    g_stored = g.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, g_stored, mask=mask)
    # Sums of the value as stored, which is what the next dgrad/wgrad reads.
    g = g_stored.to(scale.dtype)
    mean = tl.load(mean_ptr + cols, mask=col_valid, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=col_valid, other=0.0)
    xhat = (v - mean[None, :]) * invstd[None, :]
    plane = tl.num_programs(0) * C
    tl.store(part_ptr + pid_m * C + cols, tl.sum(g, axis=0), mask=col_valid)
    tl.store(part_ptr + plane + pid_m * C + cols, tl.sum(g * xhat, axis=0), mask=col_valid)


@triton.jit
def _relu_grad_sums_kernel(
    grad_ptr, extra_ptr, v_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, out_ptr, part_ptr,
    M, C,
    HAS_EXTRA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_valid = rows < M
    col_valid = cols < C
    mask = row_valid[:, None] & col_valid[None, :]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    scale = tl.load(scale_ptr + cols, mask=col_valid, other=0.0)
    ct = scale.dtype  # fp32, or fp64 for fp64 data
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ct)
    if HAS_EXTRA:
        # A second gradient of the same activation (the projection shortcut reads a1 too):
        # added BEFORE the ReLU mask and the sums.
        g += tl.load(extra_ptr + offs, mask=mask, other=0.0).to(ct)
    _relu_mask_store_sums(g, v_ptr, scale, shift_ptr, mean_ptr, invstd_ptr, out_ptr, part_ptr,
                          offs, mask, pid_m, cols, col_valid, C)


@triton.jit
def _bn_sums_chunk_kernel(
    part_ptr, out_ptr,
    P, C, CHUNK,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (channel block, chunk k) sums partials [k * CHUNK, (k + 1) * CHUNK) of both sums
    [2, P, C] (blocks of BLOCK_P, each a fixed tree, added in order) into row k of ``out``
    [2, chunks, C]."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.program_id(1)
    col_valid = cols < C
    s0 = tl.zeros([BLOCK_C], dtype=part_ptr.dtype.element_ty)
    s1 = tl.zeros([BLOCK_C], dtype=part_ptr.dtype.element_ty)
    plane = P * C
    start = k * CHUNK
    end = tl.minimum(start + CHUNK, P)
    for p0 in range(start, end, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < end)[:, None] & col_valid[None, :]
        offs = ps[:, None].to(tl.int64) * C + cols[None, :]
        s0 += tl.sum(tl.load(part_ptr + offs, mask=mask, other=0.0), axis=0)
        s1 += tl.sum(tl.load(part_ptr + plane + offs, mask=mask, other=0.0), axis=0)
    offs = k * C + cols
    tl.store(out_ptr + offs, s0, mask=col_valid)
    tl.store(out_ptr + tl.num_programs(1) * C + offs, s1, mask=col_valid)


@triton.jit
def _bn_backward_coefficients_kernel(
    part_ptr, weight_ptr, mean_ptr, invstd_ptr,
    dgamma_ptr, dbeta_ptr, a_ptr, b_ptr, c_ptr,
    P, C, count,
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_valid = cols < C
    dbeta = tl.zeros([BLOCK_C], dtype=part_ptr.dtype.element_ty)
    dgamma = tl.zeros([BLOCK_C], dtype=part_ptr.dtype.element_ty)
    plane = P * C
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < P)[:, None] & col_valid[None, :]
        offs = ps[:, None] * C + cols[None, :]
        dbeta += tl.sum(tl.load(part_ptr + offs, mask=mask, other=0.0), axis=0)
        dgamma += tl.sum(tl.load(part_ptr + plane + offs, mask=mask, other=0.0), axis=0)
    invstd = tl.load(invstd_ptr + cols, mask=col_valid, other=0.0)
    a = invstd
    if HAS_WEIGHT:
        a = a * tl.load(weight_ptr + cols, mask=col_valid, other=0.0).to(a.dtype)
    if TRAINING:
        mean = tl.load(mean_ptr + cols, mask=col_valid, other=0.0)
        b = -a * invstd * dgamma / count
        c = -a * dbeta / count - b * mean
    else:
        b = tl.zeros_like(a)
        c = tl.zeros_like(a)
    tl.store(dgamma_ptr + cols, dgamma, mask=col_valid)
    tl.store(dbeta_ptr + cols, dbeta, mask=col_valid)
    tl.store(a_ptr + cols, a, mask=col_valid)
    tl.store(b_ptr + cols, b, mask=col_valid)
    tl.store(c_ptr + cols, c, mask=col_valid)


@triton.jit
def _bn_backward_apply_kernel(
    g_ptr, v_ptr, a_ptr, b_ptr, c_ptr, sc_ptr, out_ptr,
    M, C, H, W, H_sc, W_sc,
    SHORTCUT: tl.constexpr, SC_STRIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_valid = rows < M
    col_valid = cols < C
    mask = row_valid[:, None] & col_valid[None, :]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    a = tl.load(a_ptr + cols, mask=col_valid, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(a.dtype)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(a.dtype)
    b = tl.load(b_ptr + cols, mask=col_valid, other=0.0)
    c = tl.load(c_ptr + cols, mask=col_valid, other=0.0)
    dv = a[None, :] * g + b[None, :] * v + c[None, :]
    if SHORTCUT:
        # The shortcut's gradient: the block-output gradient at the (strided) position this
        # input row feeds; rows off the stride grid get nothing.
        hw = H * W
        img = rows // hw
        ih = (rows % hw) // W
        iw = rows % W
        on_grid = (ih % SC_STRIDE == 0) & (iw % SC_STRIDE == 0) & row_valid
        sc_rows = ((img * H_sc + ih // SC_STRIDE) * W_sc + iw // SC_STRIDE).to(tl.int64) * C
        dv += tl.load(sc_ptr + sc_rows[:, None] + cols[None, :], mask=on_grid[:, None] & col_valid[None, :],
                      other=0.0).to(a.dtype)
    tl.store(out_ptr + offs, dv.to(out_ptr.dtype.element_ty), mask=mask)


def _nhwc(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def relu_grad_sums(grad: Tensor, v: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, invstd: Tensor,
                   extra: Optional[Tensor] = None, block_m: int = 64, block_c: int = 64
                   ) -> tuple[Tensor, Tensor]:
    """(g' = (grad + extra) * [v * scale + shift > 0], partial sums [2, P, C])."""
    grad, v = _nhwc(grad), _nhwc(v)
    n, c, h, w = v.shape
    m = n * h * w
    p = -(-m // block_m)
    out = torch.empty_like(v, memory_format=torch.channels_last, dtype=grad.dtype)
    part = torch.empty((2, p, c), dtype=scale.dtype, device=v.device)
    extra = _nhwc(extra) if extra is not None else None
    launch(_relu_grad_sums_kernel, (p, -(-c // block_c)), v,
           grad, extra if extra is not None else grad, v, scale, shift, mean, invstd, out, part, m, c,
           HAS_EXTRA=extra is not None, BLOCK_M=block_m, BLOCK_C=block_c)
    return out, part


def bn_backward_coefficients(part: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor,
                             count: int, training: bool, block_p: int = 64, block_c: int = 64) -> BNBackward:
    """dgamma, dbeta and the coefficients A, B, C of dv = A g' + B v + C from the partial sums
    [2, P, C]: one launch, or two when the partials are many (``stats.split_grid``)."""
    _, p, c = part.shape
    n_cb, n_chunks, chunk = split_grid(p, c)
    if n_chunks > 1:
        sums = torch.empty((2, n_chunks, c), dtype=part.dtype, device=part.device)
        launch(_bn_sums_chunk_kernel, (n_cb, n_chunks), part,
               part, sums, p, c, chunk, BLOCK_P=SPLIT_BLOCK_P, BLOCK_C=SPLIT_BLOCK_C)
        part, p = sums, n_chunks
    # Separate buffers: dgamma and dbeta are returned as gradients and must not alias.
    dgamma, dbeta, a, b, cc = (torch.empty(c, dtype=part.dtype, device=part.device) for _ in range(5))
    launch(_bn_backward_coefficients_kernel, (-(-c // block_c),), part,
           part, weight if weight is not None else part, mean, invstd, dgamma, dbeta, a, b, cc,
           p, c, float(count), TRAINING=training, HAS_WEIGHT=weight is not None,
           BLOCK_P=block_p, BLOCK_C=block_c)
    return BNBackward(dgamma, dbeta, a, b, cc)


def bn_backward_apply(g: Tensor, v: Tensor, coeff: BNBackward, shortcut_grad: Optional[Tensor] = None,
                      shortcut_stride: int = 1, block_m: int = 64, block_c: int = 64) -> Tensor:
    """dv = A g' + B v + C (+ the shortcut's gradient), channels_last, in v's dtype."""
    g, v = _nhwc(g), _nhwc(v)
    n, c, h, w = v.shape
    m = n * h * w
    out = torch.empty_like(v, memory_format=torch.channels_last)
    if shortcut_grad is not None:
        shortcut_grad = _nhwc(shortcut_grad)
        h_sc, w_sc = shortcut_grad.shape[2:]
    else:
        h_sc, w_sc = 1, 1
    launch(_bn_backward_apply_kernel, (-(-m // block_m), -(-c // block_c)), v,
           g, v, coeff.a, coeff.b, coeff.c, shortcut_grad if shortcut_grad is not None else g, out,
           m, c, h, w, h_sc, w_sc, SHORTCUT=shortcut_grad is not None, SC_STRIDE=shortcut_stride,
           BLOCK_M=block_m, BLOCK_C=block_c)
    return out
