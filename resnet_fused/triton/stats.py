"""Per-channel BatchNorm statistics in Triton: per-tile partials and a fixed-order merge.

Every producer of statistics (this module's pass over a raw input, and the epilogue of every
fused convolution) writes per-tile partials ``(count, mean, M2)`` of shape ``[3, P, C]``:
tile-local two-pass moments, exact within the tile. ``_bn_finalize_kernel`` merges the P
partials of each channel by Chan's parallel formula, in fp32, in an order fixed by the launch
configuration, so results are bitwise reproducible (no float atomics) and do not cancel when
|mean| >> std (where sum / sum-of-squares loses every digit: mean 1e3, std 1 in fp32).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import launch

__all__ = ["channel_stats_partials", "bn_finalize", "bn_finalize_stats", "new_partials", "stats_dtype"]


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s pairwise merge of (count, mean, M2); an empty side leaves the other as is."""
    n = n_a + n_b
    w_b = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b


@triton.jit
def _store_tile_stats(part_ptr, values, row_valid, tile_index, n_tiles, cols, col_valid, C):
    """Store one tile's per-column (count, mean, M2) into partials [3, n_tiles, C].

    ``values`` is fp32 [BLOCK_M, BLOCK_N]; rows outside ``row_valid`` do not count. Two passes
    over registers (mean, then squared deviations) keep M2 exact within the tile.
    """
    valid = row_valid[:, None] & col_valid[None, :]
    count = tl.sum(row_valid.to(values.dtype), axis=0)
    mean = tl.sum(tl.where(valid, values, 0.0), axis=0) / tl.maximum(count, 1.0)
    dev = tl.where(valid, values - mean[None, :], 0.0)
    m2 = tl.sum(dev * dev, axis=0)
    offs = tile_index * C + cols
    plane = n_tiles * C
    tl.store(part_ptr + offs, tl.zeros_like(mean) + count, mask=col_valid)
    tl.store(part_ptr + plane + offs, mean, mask=col_valid)
    tl.store(part_ptr + 2 * plane + offs, m2, mask=col_valid)


@triton.jit
def _channel_stats_partial_kernel(
    x_ptr, part_ptr,
    M, C, stride_m,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partials of an NHWC tensor viewed as [M = N*H*W, C] (row stride ``stride_m``)."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_valid = rows < M
    col_valid = cols < C
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :],
                mask=row_valid[:, None] & col_valid[None, :], other=0.0).to(part_ptr.dtype.element_ty)
    _store_tile_stats(part_ptr, x, row_valid, pid_m, tl.num_programs(0), cols, col_valid, C)


@triton.jit
def _bn_finalize_kernel(
    part_ptr, weight_ptr, bias_ptr, out_ptr,
    run_mean_ptr, run_var_ptr, nbt_ptr,
    P, C, eps, momentum,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FROM_RUNNING: tl.constexpr,
    UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr, COUNT_BATCH: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One BatchNorm's statistics step, one launch: merge the partials [3, P, C] (or read the
    running statistics, ``FROM_RUNNING``), write ``out`` [5, C] = (mean, biased var, invstd,
    scale, shift), and with ``UPDATE`` move the running statistics (unbiased variance) and count
    the batch in ``num_batches_tracked``.

    Each step reduces a [BLOCK_P, BLOCK_C] block of partials with a fixed reduction tree, then
    merges it into the running result: P / BLOCK_P sequential steps, all in a fixed order.
    Programs stride over the channel blocks. The momentum=None factor 1 / (batches + 1) is
    computed here in fp32 from ``num_batches_tracked`` (no host sync); that needs every program to
    read the count before one writes it, so the launcher runs a single program then
    (``CUMULATIVE``). With a fixed momentum only program 0 touches the count.
    """
    pid = tl.program_id(0)
    n_cblocks = tl.cdiv(C, BLOCK_C)
    if CUMULATIVE:
        batches = tl.load(nbt_ptr) + 1
        factor = 1.0 / batches.to(tl.float32)
    else:
        factor = momentum
    for cb in range(pid, n_cblocks, tl.num_programs(0)):
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        col_valid = cols < C
        if FROM_RUNNING:
            mean = tl.load(run_mean_ptr + cols, mask=col_valid, other=0.0).to(out_ptr.dtype.element_ty)
            var = tl.load(run_var_ptr + cols, mask=col_valid, other=1.0).to(out_ptr.dtype.element_ty)
        else:
            n = tl.zeros([BLOCK_C], dtype=part_ptr.dtype.element_ty)
            mean = tl.zeros([BLOCK_C], dtype=part_ptr.dtype.element_ty)
            m2 = tl.zeros([BLOCK_C], dtype=part_ptr.dtype.element_ty)
            plane = P * C
            for p0 in range(0, P, BLOCK_P):
                ps = p0 + tl.arange(0, BLOCK_P)
                mask = (ps < P)[:, None] & col_valid[None, :]
                offs = ps[:, None] * C + cols[None, :]
                bn = tl.load(part_ptr + offs, mask=mask, other=0.0)
                bmean = tl.load(part_ptr + plane + offs, mask=mask, other=0.0)
                bm2 = tl.load(part_ptr + 2 * plane + offs, mask=mask, other=0.0)
                bn, bmean, bm2 = tl.reduce((bn, bmean, bm2), 0, _chan_merge)
                n, mean, m2 = _chan_merge(n, mean, m2, bn, bmean, bm2)
            var = m2 / tl.maximum(n, 1.0)
            if UPDATE:
                # nn.BatchNorm2d: running = (1 - f) * running + f * batch, the variance unbiased;
                # an empty batch moves nothing (it still counts as a batch).
                unbiased = m2 / tl.maximum(n - 1.0, 1.0)
                rm = tl.load(run_mean_ptr + cols, mask=col_valid, other=0.0)
                rv = tl.load(run_var_ptr + cols, mask=col_valid, other=0.0)
                ct = mean.dtype
                new_m = (1.0 - factor) * rm.to(ct) + factor * mean
                new_v = (1.0 - factor) * rv.to(ct) + factor * unbiased
                moved = col_valid & (n > 0)
                tl.store(run_mean_ptr + cols, new_m.to(rm.dtype), mask=moved)
                tl.store(run_var_ptr + cols, new_v.to(rv.dtype), mask=moved)
        invstd = 1.0 / tl.sqrt(var + eps)
        scale = invstd
        if HAS_WEIGHT:
            scale = scale * tl.load(weight_ptr + cols, mask=col_valid, other=1.0).to(scale.dtype)
        shift = -mean * scale
        if HAS_BIAS:
            shift = shift + tl.load(bias_ptr + cols, mask=col_valid, other=0.0).to(shift.dtype)
        tl.store(out_ptr + cols, mean, mask=col_valid)
        tl.store(out_ptr + C + cols, var, mask=col_valid)
        tl.store(out_ptr + 2 * C + cols, invstd, mask=col_valid)
        tl.store(out_ptr + 3 * C + cols, scale, mask=col_valid)
        tl.store(out_ptr + 4 * C + cols, shift, mask=col_valid)
    if COUNT_BATCH:
        if pid == 0:
            if CUMULATIVE:
                tl.store(nbt_ptr, batches)
            else:
                tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and BN affines are fp32, or fp64 for fp64 data (the gradcheck path)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_partials(n_tiles: int, channels: int, device: torch.device, data_dtype: torch.dtype) -> Tensor:
    """Uninitialised partials buffer [3, n_tiles, channels] (every entry is written once)."""
    return torch.empty((3, n_tiles, channels), dtype=stats_dtype(data_dtype), device=device)


def channel_stats_partials(x: Tensor, block_m: int = 128, block_c: int = 64) -> Tensor:
    """Partials of an (N, C, H, W) tensor, read in channels_last memory (copied there if not)."""
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    m = n * h * w
    n_tiles = triton.cdiv(m, block_m)
    part = new_partials(n_tiles, c, x.device, x.dtype)
    launch(_channel_stats_partial_kernel, (n_tiles, triton.cdiv(c, block_c)), x,
           x, part, m, c, c, BLOCK_M=block_m, BLOCK_C=block_c)
    return part


def bn_finalize_stats(
    part: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float, *,
    running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
    num_batches_tracked: Optional[Tensor] = None, momentum: Optional[float] = 0.1,
    update: bool = False, from_running: bool = False, dtype: Optional[torch.dtype] = None,
    count: Optional[int] = None, block_p: int = 64, block_c: int = 64,
) -> Tensor:
    """[5, C] = (mean, biased var, invstd, scale, shift) of one BatchNorm, one launch.

    From the partials [3, P, C] (train), or from the running statistics (``from_running``: an
    eval or frozen norm; ``part`` may be None, ``dtype`` then gives the statistics dtype). With
    ``update`` the same launch moves ``running_mean`` / ``running_var`` with nn.BatchNorm2d's
    formulas and adds 1 to ``num_batches_tracked`` (``momentum=None``: the cumulative average,
    its factor computed on the device in fp32). No host synchronisation. ``count`` (the values
    per channel) is accepted for the KernelSet interface; the kernel merges the partials' counts.
    """
    if from_running:
        c = running_mean.shape[0]
        ct = dtype if dtype is not None else stats_dtype(running_mean.dtype)
        part_arg, p, device = running_mean, 1, running_mean.device
    else:
        _, p, c = part.shape
        ct, part_arg, device = part.dtype, part, part.device
    out = torch.empty((5, c), dtype=ct, device=device)
    update = update and not from_running and running_mean is not None and running_mean.numel() > 0
    count_batch = update and num_batches_tracked is not None
    cumulative = momentum is None and update
    if cumulative and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    dummy = out
    grid = (1 if cumulative else triton.cdiv(c, block_c),)
    launch(_bn_finalize_kernel, grid, out,
           part_arg, weight if weight is not None else dummy, bias if bias is not None else dummy, out,
           running_mean if running_mean is not None and running_mean.numel() else dummy,
           running_var if running_var is not None and running_var.numel() else dummy,
           num_batches_tracked if num_batches_tracked is not None else dummy,
           p, c, eps, 0.0 if momentum is None else float(momentum),
           HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, FROM_RUNNING=from_running,
           UPDATE=update, CUMULATIVE=cumulative, COUNT_BATCH=count_batch,
           BLOCK_P=block_p, BLOCK_C=block_c)
    return out


def bn_finalize(
    part: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
    block_p: int = 64, block_c: int = 64, **kwargs,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, biased var, scale, shift), each [C] in the partials' dtype, from partials [3, P, C];
    keywords of :func:`bn_finalize_stats` (the running-statistics update) pass through."""
    out = bn_finalize_stats(part, weight, bias, eps, block_p=block_p, block_c=block_c, **kwargs)
    mean, var, _, scale, shift = out.unbind(0)
    return mean, var, scale, shift
