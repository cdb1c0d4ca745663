"""Weight gradient of a conv whose input is NOT activated: the first conv of a post-activation
block (and its 1x1 projection), which reads the raw block input x.

The pre-activation kernel set's ``conv_wgrad`` always recomputes ``relu(bn(v))`` from the saved
input; a post-activation block's first conv reads x itself, so it needs the same split-K GEMM
without that prologue:

    dW[k, c, tap] = sum_m G[m, k] x[in(m, tap), c]     G = A g' + B y + C (BN-backward prologue, optional)

1x1 or 3x3 (padding k // 2), any stride, groups 1; split-K over the M output rows (the grid's third
axis runs splits x taps) with fp32 partials summed in a fixed order (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..kernel_set import GradPrologue
from .conv import _dot, _zero_acc, dot_precision
from .launch import launch

__all__ = ["plain_conv_wgrad"]


@triton.jit
def _plain_wgrad_kernel(
    g_ptr, gy_ptr, ga_ptr, gb_ptr, gc_ptr, x_ptr, part_ptr,
    M, C_out, C_in, H, W, H_out, W_out, rows_per_split,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PROLOGUE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    TAPS: tl.constexpr = KSIZE * KSIZE
    PAD: tl.constexpr = KSIZE // 2
    split = tl.program_id(2) // TAPS
    tap = tl.program_id(2) % TAPS
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_valid = ks < C_out
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_valid = cs < C_in
    dot_dtype = g_ptr.dtype.element_ty
    ct = ga_ptr.dtype.element_ty  # the coefficients' dtype: fp32, or fp64 for fp64 data
    acc = _zero_acc(BLOCK_K, BLOCK_C, dot_dtype)
    if PROLOGUE:
        a = tl.load(ga_ptr + ks, mask=k_valid, other=0.0)
        b = tl.load(gb_ptr + ks, mask=k_valid, other=0.0)
        c = tl.load(gc_ptr + ks, mask=k_valid, other=0.0)
    start = split * rows_per_split
    hw_out = H_out * W_out
    for m0 in range(start, start + rows_per_split, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_valid = (rows < M) & (rows < start + rows_per_split)
        gmask = row_valid[:, None] & k_valid[None, :]
        goffs = rows[:, None].to(tl.int64) * C_out + ks[None, :]
        g = tl.load(g_ptr + goffs, mask=gmask, other=0.0)
        if PROLOGUE:
            y = tl.load(gy_ptr + goffs, mask=gmask, other=0.0).to(ct)
            # Zero after the affine: a zero-filled load would otherwise become C.
            g = tl.where(gmask, a[None, :] * g.to(ct) + b[None, :] * y + c[None, :], 0.0)
        img = rows // hw_out
        ih = ((rows % hw_out) // W_out) * STRIDE - PAD + tap // KSIZE
        iw = (rows % W_out) * STRIDE - PAD + tap % KSIZE
        inside = row_valid & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        in_rows = (img * H + ih) * W + iw
        xt = tl.load(x_ptr + in_rows[:, None].to(tl.int64) * C_in + cs[None, :],
                     mask=inside[:, None] & c_valid[None, :], other=0.0)
        acc = _dot(tl.trans(g.to(dot_dtype)), xt.to(dot_dtype), acc, DOT_PRECISION)
    offs = ((split * TAPS + tap) * C_out + ks[:, None]).to(tl.int64) * C_in + cs[None, :]
    tl.store(part_ptr + offs, acc, mask=k_valid[:, None] & c_valid[None, :])


def _nhwc(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def plain_conv_wgrad(
    grad: Tensor, x: Tensor, *, ksize: int = 1, stride: int = 1, prologue: Optional[GradPrologue] = None,
    stats_dtype: torch.dtype = torch.float32, splits: Optional[int] = None,
    block_m: int = 32, block_k: int = 64, block_c: int = 64, num_warps: int = 4, num_stages: int = 2,
) -> Tensor:
    """dW (C_out, C_in, k, k) of ``conv2d(x, W, stride, padding=k // 2)`` given its output gradient
    ``grad`` (with the BN-backward ``prologue`` applied first), in grad's dtype."""
    grad, x = _nhwc(grad), _nhwc(x)
    n, c_out, h_out, w_out = grad.shape
    c_in, h, w = x.shape[1:]
    m = n * h_out * w_out
    if m == 0:
        return torch.zeros((c_out, c_in, ksize, ksize), dtype=grad.dtype, device=grad.device)
    if splits is None:
        splits = max(1, min(64, -(-m // 4096)))
    per_split = -(-m // splits)
    rows_per_split = -(-per_split // block_m) * block_m
    splits = -(-m // rows_per_split)
    taps = ksize * ksize
    ct = prologue.a.dtype if prologue is not None else stats_dtype
    part = torch.empty((splits, taps, c_out, c_in), dtype=ct, device=x.device)
    coeff = torch.empty((1,), dtype=ct, device=x.device)
    pro = prologue or GradPrologue(grad, coeff, coeff, coeff)
    grid = (-(-c_out // block_k), -(-c_in // block_c), splits * taps)
    launch(_plain_wgrad_kernel, grid, x,
           grad, pro.y, pro.a, pro.b, pro.c, x.to(grad.dtype), part,
           m, c_out, c_in, h, w, h_out, w_out, rows_per_split,
           KSIZE=ksize, STRIDE=stride, PROLOGUE=prologue is not None, DOT_PRECISION=dot_precision(grad.dtype),
           BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_C=block_c, num_warps=num_warps, num_stages=num_stages)
    # One split (a small batch) is already the sum: no reduction launch.
    d_w = (part[0] if splits == 1 else part.sum(0)).reshape(ksize, ksize, c_out, c_in).permute(2, 3, 0, 1)
    return d_w.contiguous().to(grad.dtype)
