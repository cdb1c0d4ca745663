"""The fused convolution: BN-apply + ReLU prologue, implicit GEMM, fused epilogues.

One kernel serves every convolution of a pre-activation block (1x1 and 3x3, stride 1 or 2,
groups), NHWC, fp32 accumulation:

    out[m, n] = sum_k act(x)[row(m, tap), k] * W[tap, k, n]  (+ shortcut)

* prologue: ``act = relu(x * scale + shift)`` per input channel, in fp32, applied to the
  operand tile as it is loaded, THEN the padded positions are zeroed (padding is zero in the
  activated domain; a zero-filled load would otherwise become relu(shift));
* shortcut, in the same accumulator or epilogue: ``add`` (identity, or TF-slim's subsample
  ``x[:, :, ::s, ::s]``), or ``projection``, a second K-loop over relu(bn1(x)) at the strided
  rows times the 1x1 projection weights, so [a | a1] x [W ; Ws] is one GEMM;
* epilogue: per-tile (count, mean, M2) of the stored output for the next BatchNorm (see
  ``stats.py``), and in eval mode the next BN + ReLU folded in (the kernel then stores the
  next conv's activated input, and that conv runs without a prologue).

Statistics are taken of the value as stored (rounded to the storage dtype), as eager BN sees it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..kernel_set import SHORTCUT_ADD, SHORTCUT_NONE, SHORTCUT_PROJECTION, as_dtype
from .launch import launch
from .stats import _store_tile_stats, new_partials

__all__ = ["_dot", "_zero_acc", "ConvConfig", "SHORTCUT_NONE", "SHORTCUT_ADD", "SHORTCUT_PROJECTION", "bn_relu_conv",
           "pack_weight", "dot_precision"]



@dataclass(frozen=True)
class ConvConfig:
    """Tile sizes and launch parameters of one fused convolution launch."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 2

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                    num_warps=self.num_warps, num_stages=self.num_stages)


@triton.jit
def _zero_acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, dtype: tl.constexpr):
    """The accumulator: fp32, or fp64 for fp64 operands (the slow path gradcheck runs)."""
    if dtype == tl.float64:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    return acc


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b on tensor cores; fp64 (no tensor-core dot) as a broadcast multiply-reduce."""
    if a.dtype == tl.float64:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _channel_affine(scale_ptr, shift_ptr, mean_ptr, var_ptr, eps, cols, valid, ct: tl.constexpr,
                    FROM_STATS: tl.constexpr):
    """Per-channel (scale, shift) in ``ct``: loaded, or with ``FROM_STATS`` computed from a
    norm's (weight, bias) at scale_ptr / shift_ptr and its running (mean, var): eval-mode BN
    costs a few per-channel operations per tile instead of separate launches."""
    if FROM_STATS:
        w = tl.load(scale_ptr + cols, mask=valid, other=0.0).to(ct)
        b = tl.load(shift_ptr + cols, mask=valid, other=0.0).to(ct)
        mean = tl.load(mean_ptr + cols, mask=valid, other=0.0).to(ct)
        var = tl.load(var_ptr + cols, mask=valid, other=1.0).to(ct)
        scale = w / tl.sqrt(var + eps)
        shift = b - mean * scale
    else:
        scale = tl.load(scale_ptr + cols, mask=valid, other=0.0).to(ct)
        shift = tl.load(shift_ptr + cols, mask=valid, other=0.0).to(ct)
    return scale, shift


@triton.jit
def _bn_relu_load(ptr, row_offsets, row_valid, ks, k_valid, scale_ptr, shift_ptr, mean_ptr, var_ptr, eps,
                  PROLOGUE: tl.constexpr, FROM_STATS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  CT: tl.constexpr):
    """Load an operand tile [BLOCK_M, BLOCK_K], activate it, zero what lies outside the image."""
    valid = row_valid[:, None] & k_valid[None, :]
    a = tl.load(ptr + row_offsets[:, None] + ks[None, :], mask=valid, other=0.0)
    if PROLOGUE:
        scale, shift = _channel_affine(scale_ptr, shift_ptr, mean_ptr, var_ptr, eps, ks, k_valid, CT, FROM_STATS)
        # NaN must propagate as in eager (max's default would turn it into 0 and hide it).
        act = tl.maximum(a.to(CT) * scale[None, :] + shift[None, :], 0.0,
                         propagate_nan=tl.PropagateNan.ALL)
        # Padding and tile overhang are zero in the ACTIVATED domain: relu(shift) is not zero.
        a = tl.where(valid, act, 0.0)
    return a.to(DOT_DTYPE)


@triton.jit
def _bn_relu_conv_kernel(
    x_ptr, x_scale_ptr, x_shift_ptr, w_ptr, out_ptr,
    sc_ptr, sc_scale_ptr, sc_shift_ptr, sc_w_ptr,
    part_ptr, post_scale_ptr, post_shift_ptr,
    x_mean_ptr, x_var_ptr, sc_mean_ptr, sc_var_ptr, post_mean_ptr, post_var_ptr,
    M, H_in, W_in, C_in, H_out, W_out, C_out, cin_pg, cout_pg,
    H_sc, W_sc, C_sc,
    x_eps, sc_eps, post_eps,
    w_sn, w_sc, w_sh, w_sw, scw_sn, scw_sc,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, SC_STRIDE: tl.constexpr,
    PROLOGUE: tl.constexpr, SHORTCUT: tl.constexpr, SC_PROLOGUE: tl.constexpr,
    EMIT_STATS: tl.constexpr, POST_BN_RELU: tl.constexpr,
    PRO_STATS: tl.constexpr, SC_STATS: tl.constexpr, POST_STATS: tl.constexpr,
    CLOSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Weights are read in PyTorch's own layout, W[c_out, c_in / groups, kh, kw] at its strides
    (w_sn, w_sc, w_sh, w_sw: contiguous or channels_last parameters alike): B[k = tap * cin_pg + c,
    n] = W[n, c, tap], no packed copy per call. ``*_STATS``: that
    affine comes from (weight, bias, running mean, running var, eps), eval mode's norms.
    ``CLOSE``: the post-activation closing in the epilogue, relu(bn(y) + shortcut) with the
    post affine on the conv output and, for a projection, the sc affine on the second K-loop's
    own accumulator (its input taken raw, no prologue) instead of a prologue."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_tiles_m = tl.num_programs(0)
    tiles_per_group = tl.cdiv(cout_pg, BLOCK_N)
    group = pid_n // tiles_per_group
    cols_local = (pid_n % tiles_per_group) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols_local < cout_pg
    cols = group * cout_pg + cols_local

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < M
    hw_out = H_out * W_out
    img = rows // hw_out
    oh = (rows % hw_out) // W_out
    ow = rows % W_out
    dot_dtype = w_ptr.dtype.element_ty
    CT: tl.constexpr = tl.float64 if dot_dtype == tl.float64 else tl.float32
    TAPS: tl.constexpr = KSIZE * KSIZE
    w_cols = cols.to(tl.int64) * w_sn

    acc = _zero_acc(BLOCK_M, BLOCK_N, dot_dtype)
    PAD: tl.constexpr = KSIZE // 2
    for tap in tl.static_range(KSIZE * KSIZE):
        ih = oh * STRIDE - PAD + tap // KSIZE
        iw = ow * STRIDE - PAD + tap % KSIZE
        inside = row_valid & (ih >= 0) & (ih < H_in) & (iw >= 0) & (iw < W_in)
        row_offsets = ((img * H_in + ih) * W_in + iw).to(tl.int64) * C_in + group * cin_pg
        for k0 in range(0, cin_pg, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_valid = ks < cin_pg
            a = _bn_relu_load(x_ptr, row_offsets, inside, ks, k_valid,
                              x_scale_ptr + group * cin_pg, x_shift_ptr + group * cin_pg,
                              x_mean_ptr + group * cin_pg, x_var_ptr + group * cin_pg, x_eps,
                              PROLOGUE, PRO_STATS, dot_dtype, CT)
            b = tl.load(w_ptr + w_cols[None, :] + (ks * w_sc + (tap // KSIZE) * w_sh + (tap % KSIZE) * w_sw)[:, None],
                        mask=k_valid[:, None] & col_valid[None, :], other=0.0)
            acc = _dot(a, b, acc, DOT_PRECISION)

    acc_sc = acc
    if CLOSE:
        acc_sc = _zero_acc(BLOCK_M, BLOCK_N, dot_dtype)
    if SHORTCUT != 0:
        # Shortcut rows: the block input at the strided output position.
        sc_rows = ((img * H_sc + oh * SC_STRIDE) * W_sc + ow * SC_STRIDE).to(tl.int64) * C_sc
        if SHORTCUT == 2:
            for k0 in range(0, C_sc, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_valid = ks < C_sc
                a = _bn_relu_load(sc_ptr, sc_rows, row_valid, ks, k_valid, sc_scale_ptr, sc_shift_ptr,
                                  sc_mean_ptr, sc_var_ptr, sc_eps, SC_PROLOGUE, SC_STATS, dot_dtype, CT)
                b = tl.load(sc_w_ptr + cols[None, :].to(tl.int64) * scw_sn + ks[:, None] * scw_sc,
                            mask=k_valid[:, None] & col_valid[None, :], other=0.0)
                if CLOSE:
                    acc_sc = _dot(a, b, acc_sc, DOT_PRECISION)
                else:
                    acc = _dot(a, b, acc, DOT_PRECISION)
        else:
            res = tl.load(sc_ptr + sc_rows[:, None] + cols[None, :],
                          mask=row_valid[:, None] & col_valid[None, :], other=0.0)
            if CLOSE:
                acc_sc = res.to(acc.dtype)
            else:
                acc += res.to(acc.dtype)

    if CLOSE:
        # relu(bn(y) + shortcut), each conv output rounded to the data dtype first, as eager
        # stores it before its BatchNorm.
        post_scale, post_shift = _channel_affine(post_scale_ptr, post_shift_ptr, post_mean_ptr, post_var_ptr,
                                                 post_eps, cols, col_valid, CT, POST_STATS)
        z = acc.to(out_ptr.dtype.element_ty).to(CT) * post_scale[None, :] + post_shift[None, :]
        sc_val = acc_sc.to(out_ptr.dtype.element_ty).to(CT)
        if SHORTCUT == 2:
            sc_scale, sc_shift = _channel_affine(sc_scale_ptr, sc_shift_ptr, sc_mean_ptr, sc_var_ptr,
                                                 sc_eps, cols, col_valid, CT, SC_STATS)
            sc_val = sc_val * sc_scale[None, :] + sc_shift[None, :]
        acc = tl.maximum(z + sc_val, 0.0, propagate_nan=tl.PropagateNan.ALL).to(acc.dtype)

    y = acc.to(out_ptr.dtype.element_ty)
    if EMIT_STATS:
        _store_tile_stats(part_ptr, y.to(acc.dtype), row_valid, pid_m, n_tiles_m, cols, col_valid, C_out)
    if POST_BN_RELU:
        post_scale, post_shift = _channel_affine(post_scale_ptr, post_shift_ptr, post_mean_ptr, post_var_ptr,
                                                 post_eps, cols, col_valid, CT, POST_STATS)
        y = tl.maximum(y.to(acc.dtype) * post_scale[None, :] + post_shift[None, :], 0.0,
                       propagate_nan=tl.PropagateNan.ALL)
        y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * C_out + cols[None, :], y,
             mask=row_valid[:, None] & col_valid[None, :])


def pack_weight(weight: Tensor) -> Tensor:
    """(C_out, C_in/groups, kh, kw) -> [kh*kw*C_in/groups, C_out]: the GEMM's B, K-major by tap."""
    c_out = weight.shape[0]
    return weight.permute(2, 3, 1, 0).reshape(-1, c_out).contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 convs use TF32 only when PyTorch's own conv flag allows it, as cuDNN would."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def _nhwc(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def bn_relu_conv(
    x: Tensor,
    weight: Tensor,
    *,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    stride: int = 1,
    groups: int = 1,
    shortcut: Optional[Tensor] = None,
    shortcut_kind: int = SHORTCUT_NONE,
    shortcut_stride: int = 1,
    proj_weight: Optional[Tensor] = None,
    proj_scale: Optional[Tensor] = None,
    proj_shift: Optional[Tensor] = None,
    emit_stats: bool = False,
    post_scale: Optional[Tensor] = None,
    post_shift: Optional[Tensor] = None,
    config: ConvConfig = ConvConfig(),
    scale_stats: Optional[tuple] = None,
    proj_stats: Optional[tuple] = None,
    post_stats: Optional[tuple] = None,
    postact_close: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """conv(relu(x * scale + shift), weight) with the fused shortcut and epilogues.

    ``x`` and ``shortcut`` are (N, C, H, W) tensors, used in channels_last memory; ``scale`` /
    ``shift`` (fp32, per input channel) None means no prologue. Returns the channels_last output
    and, with ``emit_stats``, its statistics partials [3, n_tiles_m, C_out].

    ``postact_close``: store the post-activation closing ``relu(y * post_scale + post_shift +
    sc)``, sc the identity shortcut or, for a projection, ``conv1x1(shortcut) * proj_scale +
    proj_shift`` (the projection's own norm; its input taken raw). Needs ``post_scale`` /
    ``post_shift`` (or ``post_stats``) and a shortcut; ``emit_stats`` is not combined with it.
    """
    if postact_close and (post_scale is None or shortcut is None or emit_stats or
                          (shortcut_kind == SHORTCUT_PROJECTION and proj_scale is None)):
        raise ValueError("postact_close needs post_scale/post_shift, a shortcut (a projection with its "
                         "proj_scale/proj_shift) and no emit_stats")
    n, c_in, h_in, w_in = x.shape
    c_out, cin_pg, kh, kw = weight.shape
    if kh != kw or kh not in (1, 3):
        raise ValueError(f"fused conv supports 1x1 and 3x3 kernels, got {kh}x{kw}")
    if cin_pg * groups != c_in:
        raise ValueError(f"weight {tuple(weight.shape)} with groups={groups} does not match {c_in} channels")
    pad = kh // 2
    h_out = (h_in + 2 * pad - kh) // stride + 1
    w_out = (w_in + 2 * pad - kw) // stride + 1
    m = n * h_out * w_out
    x = _nhwc(x)
    out = torch.empty((n, c_out, h_out, w_out), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    n_tiles_m = -(-m // config.block_m)
    part = new_partials(n_tiles_m, c_out, x.device, x.dtype) if emit_stats else out
    w = as_dtype(weight, x.dtype)  # read at its strides: no copy for a contiguous or channels_last parameter
    if shortcut is not None:
        shortcut = _nhwc(shortcut)
        _, c_sc, h_sc, w_sc = shortcut.shape
    else:
        shortcut, c_sc, h_sc, w_sc = x, 0, 1, 1
    sc_w = as_dtype(proj_weight, x.dtype) if proj_weight is not None else w
    dummy = out  # pointer arguments a constexpr switch never reads
    pro_m, pro_v, pro_eps = scale_stats if scale_stats is not None else (dummy, dummy, 0.0)
    sc_m, sc_v, sc_eps = proj_stats if proj_stats is not None else (dummy, dummy, 0.0)
    post_m, post_v, post_eps = post_stats if post_stats is not None else (dummy, dummy, 0.0)
    cout_pg = c_out // groups
    grid = (n_tiles_m, groups * -(-cout_pg // config.block_n))
    launch(
        _bn_relu_conv_kernel, grid, x,
        x, scale if scale is not None else dummy, shift if shift is not None else dummy, w, out,
        shortcut, proj_scale if proj_scale is not None else dummy,
        proj_shift if proj_shift is not None else dummy, sc_w,
        part, post_scale if post_scale is not None else dummy,
        post_shift if post_shift is not None else dummy,
        pro_m, pro_v, sc_m, sc_v, post_m, post_v,
        m, h_in, w_in, c_in, h_out, w_out, c_out, cin_pg, cout_pg,
        h_sc, w_sc, c_sc,
        float(pro_eps), float(sc_eps), float(post_eps),
        *w.stride(), sc_w.stride(0), sc_w.stride(1),
        KSIZE=kh, STRIDE=stride, SC_STRIDE=shortcut_stride,
        PROLOGUE=scale is not None, SHORTCUT=shortcut_kind, SC_PROLOGUE=proj_scale is not None and not postact_close,
        EMIT_STATS=emit_stats, POST_BN_RELU=post_scale is not None and not postact_close,
        PRO_STATS=scale_stats is not None, SC_STATS=proj_stats is not None, POST_STATS=post_stats is not None,
        CLOSE=postact_close,
        DOT_PRECISION=dot_precision(x.dtype),
        **config.meta(),
    )
    return out, (part if emit_stats else None)
