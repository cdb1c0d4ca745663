"""Fused backward GEMMs of the convolutions, 1x1 and 3x3, strided and grouped (docs/design.md section 4).

dgrad: for every input position p of the conv and input channel c,
``dA[p, c] = sum_{tap, k} G[o(p, tap), k] W[k, c, tap]`` over the output channels k of c's
group, where o(p, tap) is the output position whose ``tap`` reads p (none when p falls in a
stride hole or the tap would need an output outside the image), with

* prologue on G: the BN backward apply of the norm AFTER this conv, ``A g' + B y + C`` from the
  masked gradient g' and that norm's saved input y (so dy is never written to memory), zeroed
  at invalid positions after the affine (a zero-filled load would otherwise become C);
* a second K-loop into the same accumulator for the projection shortcut (a 1x1 conv reading the
  same activation a1), so its gradient joins this conv's BEFORE the mask and sums below;
* epilogue: the ReLU mask of the norm BEFORE this conv (recomputed from its saved input v) and
  per-tile partial sums of g' and g' * xhat: that norm's dbeta and dgamma.

wgrad: ``dW[k, c, tap] = sum_m G[m, k] a[in(m, tap), c]`` with the same prologue on G and
``a = relu(bn(v))`` recomputed from the saved input at the tap's (strided) position, zero at
padding; split-K over the M output rows (the grid's third axis runs splits x taps) with fp32
partials reduced in a fixed order (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..kernel_set import GradPrologue, as_dtype
from .bn_backward import _relu_mask_store_sums
from .conv import _dot, _zero_acc, dot_precision
from .launch import launch

__all__ = ["conv_dgrad", "conv_wgrad", "GradPrologue"]


@triton.jit
def _grad_tile(g_ptr, y_ptr, a_ptr, b_ptr, c_ptr, rows, row_valid, ks, k_valid, K,
               PROLOGUE: tl.constexpr):
    """A [BLOCK_M, BLOCK_K] tile of the gradient operand (row stride K, absolute channels
    ``ks``), BN-backward applied, in the coefficients' dtype, zero outside."""
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
def _conv_dgrad_kernel(
    g_ptr, gy_ptr, ga_ptr, gb_ptr, gc_ptr, w_ptr,
    g2_ptr, w2_ptr,
    v_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr,
    out_ptr, part_ptr,
    M, H, W, C_in, C_out, H_out, W_out, cin_pg, cout_pg, K2, H2, W2,
    w_sn, w_sc, w_sh, w_sw, w2_sn, w2_sc,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, STRIDE2: tl.constexpr,
    PROLOGUE: tl.constexpr, SECOND: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dA over rows = input positions [M = N*H*W], columns = input channels of one group."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles_per_group = tl.cdiv(cin_pg, BLOCK_N)
    group = pid_n // tiles_per_group
    cols_local = (pid_n % tiles_per_group) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols_local < cin_pg
    cols = group * cin_pg + cols_local
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < M
    hw = H * W
    img = rows // hw
    ih = (rows % hw) // W
    iw = rows % W
    dot_dtype = w_ptr.dtype.element_ty

    acc = _zero_acc(BLOCK_M, BLOCK_N, dot_dtype)
    PAD: tl.constexpr = KSIZE // 2
    for tap in tl.static_range(KSIZE * KSIZE):
        # The output position whose tap (kh, kw) reads (ih, iw): th = oh * STRIDE.
        th = ih + PAD - tap // KSIZE
        tw = iw + PAD - tap % KSIZE
        on_grid = row_valid & (th >= 0) & (tw >= 0) & (th % STRIDE == 0) & (tw % STRIDE == 0)
        oh = tl.where(on_grid, th // STRIDE, 0)
        ow = tl.where(on_grid, tw // STRIDE, 0)
        on_grid = on_grid & (oh < H_out) & (ow < W_out)
        g_rows = (img * H_out + oh) * W_out + ow
        for k0 in range(0, cout_pg, BLOCK_K):
            ks_local = k0 + tl.arange(0, BLOCK_K)
            k_valid = ks_local < cout_pg
            ks = group * cout_pg + ks_local
            g = _grad_tile(g_ptr, gy_ptr, ga_ptr, gb_ptr, gc_ptr, g_rows, on_grid, ks, k_valid, C_out, PROLOGUE)
            # Weights in PyTorch's layout W[C_out, cin_pg, kh, kw] at its strides: B[k, c] = W[k, c, tap].
            w = tl.load(w_ptr + ks[:, None].to(tl.int64) * w_sn + cols_local[None, :] * w_sc
                        + (tap // KSIZE) * w_sh + (tap % KSIZE) * w_sw,
                        mask=k_valid[:, None] & col_valid[None, :], other=0.0)
            acc = _dot(g.to(dot_dtype), w, acc, DOT_PRECISION)
    if SECOND:
        # The 1x1 projection shortcut (no groups) reads the same activation: its dgrad joins here.
        on_grid2 = row_valid & (ih % STRIDE2 == 0) & (iw % STRIDE2 == 0)
        g2_rows = (img * H2 + ih // STRIDE2) * W2 + iw // STRIDE2
        for k0 in range(0, K2, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_valid = ks < K2
            g = _grad_tile(g2_ptr, g2_ptr, ga_ptr, gb_ptr, gc_ptr, g2_rows, on_grid2, ks, k_valid, K2, False)
            w = tl.load(w2_ptr + ks[:, None].to(tl.int64) * w2_sn + cols[None, :] * w2_sc,
                        mask=k_valid[:, None] & col_valid[None, :], other=0.0)
            acc = _dot(g.to(dot_dtype), w, acc, DOT_PRECISION)

    # Epilogue: the ReLU mask of the norm that produced this conv's input, and its sums.
    valid = row_valid[:, None] & col_valid[None, :]
    offs = rows[:, None].to(tl.int64) * C_in + cols[None, :]
    scale = tl.load(scale_ptr + cols, mask=col_valid, other=0.0)
    _relu_mask_store_sums(acc.to(scale.dtype), v_ptr, scale, shift_ptr, mean_ptr, invstd_ptr, out_ptr,
                          part_ptr, offs, valid, pid_m, cols, col_valid, C_in)


@triton.jit
def _conv_wgrad_kernel(
    g_ptr, gy_ptr, ga_ptr, gb_ptr, gc_ptr,
    v_ptr, scale_ptr, shift_ptr,
    part_ptr,
    M, C_out, C_in, cin_pg, cout_pg, H, W, H_out, W_out, rows_per_split,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PROLOGUE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, TAPS_OUTER: tl.constexpr = False,
):
    """Partial dW [C_out, cin_pg] of one tap over one split of the M = N*H_out*W_out rows.

    ``TAPS_OUTER`` stores the partials as [splits, C_out, kh, kw, cin_pg] in memory: viewed as
    [splits, C_out, cin_pg, kh, kw], split 0 is then a channels_last weight's layout."""
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    TAPS: tl.constexpr = KSIZE * KSIZE
    PAD: tl.constexpr = KSIZE // 2
    split = tl.program_id(2) // TAPS
    tap = tl.program_id(2) % TAPS
    tiles_per_group = tl.cdiv(cout_pg, BLOCK_K)
    group = pid_k // tiles_per_group
    ks_local = (pid_k % tiles_per_group) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_valid = ks_local < cout_pg
    ks = group * cout_pg + ks_local
    cs_local = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_valid = cs_local < cin_pg
    cs = group * cin_pg + cs_local
    dot_dtype = g_ptr.dtype.element_ty
    acc = _zero_acc(BLOCK_K, BLOCK_C, dot_dtype)
    scale = tl.load(scale_ptr + cs, mask=c_valid, other=0.0)
    shift = tl.load(shift_ptr + cs, mask=c_valid, other=0.0)
    start = split * rows_per_split
    hw_out = H_out * W_out
    for m0 in range(start, start + rows_per_split, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_valid = (rows < M) & (rows < start + rows_per_split)
        g = _grad_tile(g_ptr, gy_ptr, ga_ptr, gb_ptr, gc_ptr, rows, row_valid, ks, k_valid, C_out, PROLOGUE)
        img = rows // hw_out
        ih = ((rows % hw_out) // W_out) * STRIDE - PAD + tap // KSIZE
        iw = (rows % W_out) * STRIDE - PAD + tap % KSIZE
        inside = row_valid & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        amask = inside[:, None] & c_valid[None, :]
        in_rows = (img * H + ih) * W + iw
        v = tl.load(v_ptr + in_rows[:, None].to(tl.int64) * C_in + cs[None, :], mask=amask, other=0.0)
        # Padding is zero in the activated domain: relu(shift) is not zero.
        a = tl.where(amask, tl.maximum(v.to(scale.dtype) * scale[None, :] + shift[None, :], 0.0,
                                        propagate_nan=tl.PropagateNan.ALL), 0.0)
        acc = _dot(tl.trans(g.to(dot_dtype)), a.to(dot_dtype), acc, DOT_PRECISION)
    # Partials [splits, C_out, cin_pg, kh, kw]: split 0 alone is dW in PyTorch's layout
    # (contiguous, or channels_last with TAPS_OUTER).
    if TAPS_OUTER:
        offs = ((split * C_out + ks[:, None]).to(tl.int64) * TAPS + tap) * cin_pg + cs_local[None, :]
    else:
        offs = (((split * C_out + ks[:, None]).to(tl.int64) * cin_pg + cs_local[None, :]) * TAPS + tap)
    tl.store(part_ptr + offs, acc.to(part_ptr.dtype.element_ty), mask=k_valid[:, None] & c_valid[None, :])


def _nhwc(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _out_size(size: int, ksize: int, stride: int) -> int:
    return (size + 2 * (ksize // 2) - ksize) // stride + 1


def conv_dgrad(
    grad: Tensor, weight: Tensor, v: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, invstd: Tensor,
    *, stride: int = 1, groups: int = 1, prologue: Optional[GradPrologue] = None,
    second_grad: Optional[Tensor] = None, second_weight: Optional[Tensor] = None, second_stride: int = 1,
    block_m: int = 64, block_n: int = 64, block_k: int = 32, num_warps: int = 4, num_stages: int = 2,
) -> tuple[Tensor, Tensor]:
    """(g' = masked input gradient, partial sums [2, P, C_in]) of a 1x1 or 3x3 conv (padding
    k // 2) whose input was relu(v * scale + shift); see the module docstring."""
    grad, v = _nhwc(grad), _nhwc(v)
    n, c_in, h, w = v.shape
    c_out, cin_pg, ksize = weight.shape[0], weight.shape[1], weight.shape[-1]
    h_out, w_out = _out_size(h, ksize, stride), _out_size(w, ksize, stride)
    if tuple(grad.shape) != (n, c_out, h_out, w_out) or cin_pg * groups != c_in:
        raise ValueError(f"conv_dgrad: grad {tuple(grad.shape)}, weight {tuple(weight.shape)} (groups {groups}) "
                         f"and input {tuple(v.shape)} do not fit a stride-{stride} conv")
    m = n * h * w
    p = -(-m // block_m)
    out = torch.empty_like(v, memory_format=torch.channels_last, dtype=grad.dtype)
    part = torch.empty((2, p, c_in), dtype=scale.dtype, device=v.device)
    w_packed = as_dtype(weight, grad.dtype)  # read in place at its strides: [C_out, cin_pg, kh, kw]
    if second_grad is not None:
        second_grad = _nhwc(second_grad)
        w2 = as_dtype(second_weight, grad.dtype)
        w2 = w2[:, :, 0, 0] if w2.dim() == 4 else w2
        k2, h2, w2_sp = second_grad.shape[1], second_grad.shape[2], second_grad.shape[3]
    else:
        second_grad, w2, k2, h2, w2_sp = grad, w_packed[:, :, 0, 0], 0, 1, 1
    pro = prologue or GradPrologue(grad, scale, scale, scale)
    cout_pg = c_out // groups
    launch(_conv_dgrad_kernel, (p, groups * -(-cin_pg // block_n)), v,
           grad, pro.y, pro.a, pro.b, pro.c, w_packed, second_grad, w2,
           v, scale, shift, mean, invstd, out, part,
           m, h, w, c_in, c_out, h_out, w_out, cin_pg, cout_pg, k2, h2, w2_sp,
           *w_packed.stride(), w2.stride(0), w2.stride(1),
           KSIZE=ksize, STRIDE=stride, STRIDE2=second_stride, PROLOGUE=prologue is not None,
           SECOND=k2 > 0, DOT_PRECISION=dot_precision(grad.dtype),
           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return out, part


def conv_wgrad(
    grad: Tensor, v: Tensor, scale: Tensor, shift: Tensor, *, ksize: int = 1, stride: int = 1, groups: int = 1,
    prologue: Optional[GradPrologue] = None, splits: Optional[int] = None, channels_last: bool = False,
    block_m: int = 32, block_k: int = 64, block_c: int = 64, num_warps: int = 4, num_stages: int = 2,
) -> Tensor:
    """dW (C_out, C_in / groups, k, k) of a conv with input relu(v * scale + shift) and output
    gradient ``grad`` (BN-backward ``prologue`` applied first), split-K over the rows, fp32
    partials summed in a fixed order. ``channels_last``: dW comes out channels_last (the layout
    of a channels_last weight, so autograd accumulates it without a layout copy)."""
    grad, v = _nhwc(grad), _nhwc(v)
    n, c_out, h_out, w_out = grad.shape
    c_in, h, w = v.shape[1:]
    cin_pg, cout_pg = c_in // groups, c_out // groups
    m = n * h_out * w_out
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if m == 0:  # an empty batch: no rows, a zero weight gradient (as eager gives)
        return torch.empty((c_out, cin_pg, ksize, ksize), dtype=grad.dtype, device=grad.device,
                           memory_format=layout).zero_()
    if splits is None:
        splits = max(1, min(64, -(-m // 4096)))
    per_split = -(-m // splits)
    rows_per_split = -(-per_split // block_m) * block_m
    splits = -(-m // rows_per_split)
    taps = ksize * ksize
    # One split stores dW itself, in grad's dtype (no reduction, no cast launches); more store
    # fp32 partials, summed in a fixed order.
    part_dtype = grad.dtype if splits == 1 else scale.dtype
    if channels_last:
        part = torch.empty((splits, c_out, ksize, ksize, cin_pg), dtype=part_dtype,
                           device=v.device).permute(0, 1, 4, 2, 3)
    else:
        part = torch.empty((splits, c_out, cin_pg, ksize, ksize), dtype=part_dtype, device=v.device)
    pro = prologue or GradPrologue(grad, scale, scale, scale)
    grid = (groups * -(-cout_pg // block_k), -(-cin_pg // block_c), splits * taps)
    launch(_conv_wgrad_kernel, grid, v,
           grad, pro.y, pro.a, pro.b, pro.c, v, scale, shift, part,
           m, c_out, c_in, cin_pg, cout_pg, h, w, h_out, w_out, rows_per_split,
           KSIZE=ksize, STRIDE=stride, PROLOGUE=prologue is not None, DOT_PRECISION=dot_precision(grad.dtype),
           BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_C=block_c, TAPS_OUTER=channels_last,
           num_warps=num_warps, num_stages=num_stages)
    if splits == 1:
        return part[0]
    # torch's sum over the split dimension is a fixed-order reduction (no atomics), into dW's layout.
    total = torch.empty((c_out, cin_pg, ksize, ksize), dtype=part.dtype, device=v.device, memory_format=layout)
    return torch.sum(part, 0, out=total).to(grad.dtype)
