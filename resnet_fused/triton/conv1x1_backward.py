"""Fused backward GEMMs of the 1x1 convolutions (DESIGN section 4).

dgrad: ``dA[p] = sum_k G[o(p), k] W[k, :]`` for every input position p of the conv, where o(p)
is the output position p feeds (p on the stride grid; positions off it get nothing), with

* prologue on G: the BN backward apply of the norm AFTER this conv, ``A g' + B y + C`` from the
  masked gradient g' and that norm's saved input y (so dy is never written to memory);
* a second K-loop into the same accumulator for the projection shortcut, which reads the same
  activation a1 (its gradient must join conv1's BEFORE bn1's ReLU mask and sums);
* epilogue: the ReLU mask of the norm BEFORE this conv (recomputed from its saved input v) and
  per-tile partial sums of g' and g' * xhat: that norm's dbeta and dgamma.

wgrad: ``dW[k, c] = sum_m G[m, k] a[row(m), c]`` with the same prologue on G and ``a =
relu(bn(v))`` recomputed from the saved input at the strided rows; split-K over M with fp32
partials reduced in a fixed order (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .bn_backward import _relu_mask_store_sums
from .conv import _dot, _zero_acc, dot_precision
from .launch import launch

__all__ = ["conv1x1_dgrad", "conv1x1_wgrad", "GradPrologue"]


@triton.jit
def _grad_tile(g_ptr, y_ptr, a_ptr, b_ptr, c_ptr, rows, row_valid, ks, k_valid, K,
               PROLOGUE: tl.constexpr):
    """A [BLOCK_M, BLOCK_K] tile of the gradient operand, BN-backward applied, fp32, zero outside."""
    mask = row_valid[:, None] & k_valid[None, :]
    offs = rows[:, None].to(tl.int64) * K + ks[None, :]
    ct = a_ptr.dtype.element_ty  # the coefficients' dtype: fp32, or fp64 for fp64 data
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ct)
    if PROLOGUE:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ct)
        a = tl.load(a_ptr + ks, mask=k_valid, other=0.0)
        b = tl.load(b_ptr + ks, mask=k_valid, other=0.0)
        c = tl.load(c_ptr + ks, mask=k_valid, other=0.0)
        # Zero after the affine: a zero-filled load would otherwise become C.
        g = tl.where(mask, a[None, :] * g + b[None, :] * y + c[None, :], 0.0)
    return g


@triton.jit
def _conv1x1_dgrad_kernel(
    g_ptr, gy_ptr, ga_ptr, gb_ptr, gc_ptr, w_ptr,
    g2_ptr, w2_ptr,
    v_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr,
    out_ptr, part_ptr,
    M, H, W, N, K, H_out, W_out, K2, H2, W2,
    STRIDE: tl.constexpr, STRIDE2: tl.constexpr, PROLOGUE: tl.constexpr, SECOND: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < M
    col_valid = cols < N
    hw = H * W
    img = rows // hw
    ih = (rows % hw) // W
    iw = rows % W
    dot_dtype = w_ptr.dtype.element_ty

    on_grid = row_valid & (ih % STRIDE == 0) & (iw % STRIDE == 0)
    g_rows = (img * H_out + ih // STRIDE) * W_out + iw // STRIDE
    acc = _zero_acc(BLOCK_M, BLOCK_N, dot_dtype)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_valid = ks < K
        g = _grad_tile(g_ptr, gy_ptr, ga_ptr, gb_ptr, gc_ptr, g_rows, on_grid, ks, k_valid, K, PROLOGUE)
        w = tl.load(w_ptr + ks[:, None].to(tl.int64) * N + cols[None, :],
                    mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        acc = _dot(g.to(dot_dtype), w, acc, DOT_PRECISION)
    if SECOND:
        on_grid2 = row_valid & (ih % STRIDE2 == 0) & (iw % STRIDE2 == 0)
        g2_rows = (img * H2 + ih // STRIDE2) * W2 + iw // STRIDE2
        for k0 in range(0, K2, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_valid = ks < K2
            g = _grad_tile(g2_ptr, g2_ptr, ga_ptr, gb_ptr, gc_ptr, g2_rows, on_grid2, ks, k_valid, K2, False)
            w = tl.load(w2_ptr + ks[:, None].to(tl.int64) * N + cols[None, :],
                        mask=k_valid[:, None] & col_valid[None, :], other=0.0)
            acc = _dot(g.to(dot_dtype), w, acc, DOT_PRECISION)

    # Epilogue: the ReLU mask of the norm that produced this conv's input, and its sums.
    valid = row_valid[:, None] & col_valid[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    scale = tl.load(scale_ptr + cols, mask=col_valid, other=0.0)
    _relu_mask_store_sums(acc.to(scale.dtype), v_ptr, scale, shift_ptr, mean_ptr, invstd_ptr, out_ptr,
                          part_ptr, offs, valid, pid_m, cols, col_valid, N)


@triton.jit
def _conv1x1_wgrad_kernel(
    g_ptr, gy_ptr, ga_ptr, gb_ptr, gc_ptr,
    v_ptr, scale_ptr, shift_ptr,
    part_ptr,
    M, K, C, H, W, H_out, W_out, rows_per_split,
    STRIDE: tl.constexpr, PROLOGUE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partial dW [K, C] over one split of the M = N*H_out*W_out output rows."""
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    split = tl.program_id(2)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    k_valid = ks < K
    c_valid = cs < C
    dot_dtype = g_ptr.dtype.element_ty
    acc = _zero_acc(BLOCK_K, BLOCK_C, dot_dtype)
    scale = tl.load(scale_ptr + cs, mask=c_valid, other=0.0)
    shift = tl.load(shift_ptr + cs, mask=c_valid, other=0.0)
    start = split * rows_per_split
    hw_out = H_out * W_out
    for m0 in range(start, start + rows_per_split, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_valid = (rows < M) & (rows < start + rows_per_split)
        g = _grad_tile(g_ptr, gy_ptr, ga_ptr, gb_ptr, gc_ptr, rows, row_valid, ks, k_valid, K, PROLOGUE)
        img = rows // hw_out
        in_rows = (img * H + ((rows % hw_out) // W_out) * STRIDE) * W + (rows % W_out) * STRIDE
        amask = row_valid[:, None] & c_valid[None, :]
        v = tl.load(v_ptr + in_rows[:, None].to(tl.int64) * C + cs[None, :], mask=amask, other=0.0)
        a = tl.where(amask, tl.maximum(v.to(scale.dtype) * scale[None, :] + shift[None, :], 0.0,
                                        propagate_nan=tl.PropagateNan.ALL), 0.0)
        acc = _dot(tl.trans(g.to(dot_dtype)), a.to(dot_dtype), acc, DOT_PRECISION)
    offs = (split * K + ks[:, None]).to(tl.int64) * C + cs[None, :]
    tl.store(part_ptr + offs, acc, mask=k_valid[:, None] & c_valid[None, :])


class GradPrologue:
    """The BN-backward apply on a gradient operand: dy = a * g' + b * y + c (per channel)."""

    def __init__(self, y: Tensor, a: Tensor, b: Tensor, c: Tensor):
        self.y, self.a, self.b, self.c = y.contiguous(memory_format=torch.channels_last), a, b, c


def _nhwc(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def conv1x1_dgrad(
    grad: Tensor, weight: Tensor, v: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, invstd: Tensor,
    *, stride: int = 1, prologue: Optional[GradPrologue] = None,
    second_grad: Optional[Tensor] = None, second_weight: Optional[Tensor] = None, second_stride: int = 1,
    block_m: int = 64, block_n: int = 64, block_k: int = 32, num_warps: int = 4, num_stages: int = 2,
) -> tuple[Tensor, Tensor]:
    """(g' = masked input gradient, partial sums [2, P, C_in]) of a 1x1 conv whose input was
    relu(v * scale + shift); see the module docstring."""
    grad, v = _nhwc(grad), _nhwc(v)
    n, c_in, h, w = v.shape
    c_out = weight.shape[0]
    m = n * h * w
    p = triton.cdiv(m, block_m)
    out = torch.empty_like(v, memory_format=torch.channels_last, dtype=grad.dtype)
    part = torch.empty((2, p, c_in), dtype=scale.dtype, device=v.device)
    w_kn = weight.reshape(c_out, c_in).to(grad.dtype).contiguous()
    if second_grad is not None:
        second_grad = _nhwc(second_grad)
        w2 = second_weight.reshape(second_weight.shape[0], c_in).to(grad.dtype).contiguous()
        k2, h2, w2_sp = second_grad.shape[1], second_grad.shape[2], second_grad.shape[3]
    else:
        second_grad, w2, k2, h2, w2_sp = grad, w_kn, 0, 1, 1
    pro = prologue or GradPrologue(grad, scale, scale, scale)
    launch(_conv1x1_dgrad_kernel, (p, triton.cdiv(c_in, block_n)), v,
           grad, pro.y, pro.a, pro.b, pro.c, w_kn, second_grad, w2,
           v, scale, shift, mean, invstd, out, part,
           m, h, w, c_in, c_out, grad.shape[2], grad.shape[3], k2, h2, w2_sp,
           STRIDE=stride, STRIDE2=second_stride, PROLOGUE=prologue is not None,
           SECOND=k2 > 0, DOT_PRECISION=dot_precision(grad.dtype),
           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return out, part


def conv1x1_wgrad(
    grad: Tensor, v: Tensor, scale: Tensor, shift: Tensor, *, stride: int = 1,
    prologue: Optional[GradPrologue] = None, splits: Optional[int] = None,
    block_m: int = 32, block_k: int = 64, block_c: int = 64, num_warps: int = 4, num_stages: int = 2,
) -> Tensor:
    """dW (C_out, C_in, 1, 1) of a 1x1 conv with input relu(v * scale + shift) and output gradient
    ``grad`` (BN-backward ``prologue`` applied first), split-K over the rows, fp32 partials."""
    grad, v = _nhwc(grad), _nhwc(v)
    n, k, h_out, w_out = grad.shape
    c, h, w = v.shape[1:]
    m = n * h_out * w_out
    if m == 0:  # an empty batch: no rows, a zero weight gradient (as eager gives)
        return torch.zeros((k, c, 1, 1), dtype=grad.dtype, device=grad.device)
    if splits is None:
        splits = max(1, min(64, triton.cdiv(m, 4096)))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), block_m) * block_m
    splits = triton.cdiv(m, rows_per_split)
    part = torch.empty((splits, k, c), dtype=scale.dtype, device=v.device)
    pro = prologue or GradPrologue(grad, scale, scale, scale)
    launch(_conv1x1_wgrad_kernel, (triton.cdiv(k, block_k), triton.cdiv(c, block_c), splits), v,
           grad, pro.y, pro.a, pro.b, pro.c, v, scale, shift, part,
           m, k, c, h, w, h_out, w_out, rows_per_split,
           STRIDE=stride, PROLOGUE=prologue is not None, DOT_PRECISION=dot_precision(grad.dtype),
           BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_C=block_c, num_warps=num_warps, num_stages=num_stages)
    # torch's sum over the split dimension is a fixed-order reduction (no atomics).
    return part.sum(0).reshape(k, c, 1, 1).to(grad.dtype)
