"""Per-channel BatchNorm statistics in Triton: per-tile partials and a fixed-order merge.

Every producer of statistics (this module's pass over a raw input, and the epilogue of every
fused convolution) writes per-tile partials ``(count, mean, M2)`` of shape ``[3, P, C]``:
tile-local two-pass moments, exact within the tile. ``_bn_finalize_kernel`` merges the P
partials of each channel by Chan's parallel formula, in fp32, in an order fixed by the launch
configuration, so results are bitwise reproducible (no float atomics) and do not cancel when
|mean| >> std (where sum / sum-of-squares loses every digit: mean 1e3, std 1 in fp32).

Many partials (a large batch: 6,272 for a 56x56 map at batch 256) are merged in two launches:
``_bn_partials_chunk_kernel`` merges chunks of consecutive partials on a 2-D grid (channel
blocks x chunks, :func:`split_grid`), enough programs to fill the GPU, into partials of the
chunks [3, chunks, C]; the finalize then merges those, in chunk order. Both orders are fixed
by (P, C) and the block sizes alone, so the result is still reproducible bit for bit.
"""
from __future__ import annotations

import struct
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import launch

__all__ = ["channel_stats_partials", "bn_finalize", "bn_finalize_stats", "new_partials", "split_grid",
           "stats_dtype", "SPLIT_TARGET_PROGRAMS"]

#: Programs a split reduction aims for: two per SM of a 132-SM H100 / H200.
SPLIT_TARGET_PROGRAMS = 264
#: Fewest partials one chunk program merges: fewer than twice this many take one launch.
SPLIT_MIN_CHUNK = 4
#: Channels per program of the chunk pass (128 contiguous bytes of fp32 per partial row).
SPLIT_BLOCK_C = 32
#: Partials per step of a chunk program's loop.
SPLIT_BLOCK_P = 16


def split_grid(p: int, c: int, block_c: int = SPLIT_BLOCK_C) -> tuple[int, int, int]:
    """(channel blocks, chunks, partials per chunk) of the chunk pass over P partials of C
    channels: as many chunks as reach :data:`SPLIT_TARGET_PROGRAMS` programs, each of at least
    :data:`SPLIT_MIN_CHUNK` partials (the last one may be shorter). One chunk means no chunk
    pass: the finalize (or the coefficients kernel) reads the partials itself. Plain integer
    arithmetic, shared by the Triton launchers and the tests that check the grids."""
    n_cb = max(1, -(-c // block_c))
    n_chunks = max(1, min(p // SPLIT_MIN_CHUNK, -(-SPLIT_TARGET_PROGRAMS // n_cb)))
    chunk = max(1, -(-p // n_chunks))
    return n_cb, max(1, -(-p // chunk)), chunk


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
def _bn_partials_chunk_kernel(
    part_ptr, out_ptr,
    P, C, CHUNK,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (channel block, chunk k) merges partials [k * CHUNK, (k + 1) * CHUNK) of its
    channels (Chan's formula, blocks of BLOCK_P with a fixed tree, then in order) into row k of
    ``out`` [3, chunks, C]."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.program_id(1)
    col_valid = cols < C
    n = tl.zeros([BLOCK_C], dtype=part_ptr.dtype.element_ty)
    mean = tl.zeros([BLOCK_C], dtype=part_ptr.dtype.element_ty)
    m2 = tl.zeros([BLOCK_C], dtype=part_ptr.dtype.element_ty)
    plane = P * C
    start = k * CHUNK
    end = tl.minimum(start + CHUNK, P)
    for p0 in range(start, end, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < end)[:, None] & col_valid[None, :]
        offs = ps[:, None].to(tl.int64) * C + cols[None, :]
        bn = tl.load(part_ptr + offs, mask=mask, other=0.0)
        bmean = tl.load(part_ptr + plane + offs, mask=mask, other=0.0)
        bm2 = tl.load(part_ptr + 2 * plane + offs, mask=mask, other=0.0)
        bn, bmean, bm2 = tl.reduce((bn, bmean, bm2), 0, _chan_merge)
        n, mean, m2 = _chan_merge(n, mean, m2, bn, bmean, bm2)
    out_plane = tl.num_programs(1) * C
    offs = k * C + cols
    tl.store(out_ptr + offs, n, mask=col_valid)
    tl.store(out_ptr + out_plane + offs, mean, mask=col_valid)
    tl.store(out_ptr + 2 * out_plane + offs, m2, mask=col_valid)


@triton.jit
def _bn_finalize_kernel(
    part_ptr, weight_ptr, bias_ptr, out_ptr,
    run_mean_ptr, run_var_ptr, nbt_ptr,
    P, C, eps, momentum, momentum_mid, momentum_lo,
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
    computed here from ``num_batches_tracked`` (no host sync); that needs every program to
    read the count before one writes it, so the launcher runs a single program then
    (``CUMULATIVE``). With a fixed momentum only program 0 touches the count.

    The running update is computed in fp32, or in fp64 for fp64 running buffers; there the
    momentum arrives as three fp32 scalars (``momentum + momentum_mid + momentum_lo`` is the
    Python float exactly) and the cumulative factor is divided in fp64.
    """
    pid = tl.program_id(0)
    n_cblocks = tl.cdiv(C, BLOCK_C)
    if CUMULATIVE:
        batches = tl.load(nbt_ptr) + 1
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
                if run_mean_ptr.dtype.element_ty == tl.float64:
                    ut = tl.float64
                    if CUMULATIVE:
                        factor = 1.0 / batches.to(tl.float64)
                    else:
                        factor = (tl.cast(momentum, tl.float64) + tl.cast(momentum_mid, tl.float64)
                                  + tl.cast(momentum_lo, tl.float64))
                else:
                    ut = mean.dtype
                    if CUMULATIVE:
                        factor = 1.0 / batches.to(tl.float32)
                    else:
                        factor = tl.cast(momentum, tl.float32)
                new_m = (1.0 - factor) * rm.to(ut) + factor * mean.to(ut)
                new_v = (1.0 - factor) * rv.to(ut) + factor * unbiased.to(ut)
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
    n_tiles = -(-m // block_m)
    part = new_partials(n_tiles, c, x.device, x.dtype)
    launch(_channel_stats_partial_kernel, (n_tiles, -(-c // block_c)), x,
           x, part, m, c, c, BLOCK_M=block_m, BLOCK_C=block_c)
    return part


def _fp32(x: float) -> float:
    """x rounded to the nearest fp32 (what Triton makes of a Python float argument)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _momentum_terms(momentum: Optional[float], fp64: bool) -> tuple[float, float, float]:
    """The momentum as three fp32 values whose fp64 sum is exactly the Python float (fp64
    running buffers: Triton passes Python floats as fp32), or (momentum, 0, 0)."""
    m = 0.0 if momentum is None else float(momentum)
    if not fp64:
        return m, 0.0, 0.0
    hi = _fp32(m)
    mid = _fp32(m - hi)
    return hi, mid, _fp32(m - hi - mid)


def _merge_chunks(part: Tensor, p: int, c: int) -> tuple[Tensor, int]:
    """(partials, P) for the finalize: the partials themselves, or when :func:`split_grid`
    gives more than one chunk, the chunks' partials [3, chunks, C] from the chunk pass."""
    n_cb, n_chunks, chunk = split_grid(p, c)
    if n_chunks == 1:
        return part, p
    merged = torch.empty((3, n_chunks, c), dtype=part.dtype, device=part.device)
    launch(_bn_partials_chunk_kernel, (n_cb, n_chunks), part,
           part, merged, p, c, chunk, BLOCK_P=SPLIT_BLOCK_P, BLOCK_C=SPLIT_BLOCK_C)
    return merged, n_chunks


def bn_finalize_stats(
    part: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float, *,
    running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
    num_batches_tracked: Optional[Tensor] = None, momentum: Optional[float] = 0.1,
    update: bool = False, from_running: bool = False, dtype: Optional[torch.dtype] = None,
    count: Optional[int] = None, block_p: int = 64, block_c: int = 64,
) -> Tensor:
    """[5, C] = (mean, biased var, invstd, scale, shift) of one BatchNorm, in one launch, or two
    when the partials are many (:func:`split_grid`: a chunk pass first).

    From the partials [3, P, C] (train), or from the running statistics (``from_running``: an
    eval or frozen norm; ``part`` may be None, ``dtype`` then gives the statistics dtype). With
    ``update`` the same launch moves ``running_mean`` / ``running_var`` with nn.BatchNorm2d's
    formulas and adds 1 to ``num_batches_tracked`` (``momentum=None``: the cumulative average,
    its factor computed on the device, in fp64 for fp64 running buffers, else fp32). No host
    synchronisation. ``count`` (the values per channel) is accepted for the KernelSet
    interface; the kernel merges the partials' counts.
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
    if not from_running:
        part_arg, p = _merge_chunks(part, p, c)
    dummy = out
    mom_hi, mom_mid, mom_lo = _momentum_terms(momentum, update and running_mean.dtype == torch.float64)
    grid = (1 if cumulative else -(-c // block_c),)
    launch(_bn_finalize_kernel, grid, out,
           part_arg, weight if weight is not None else dummy, bias if bias is not None else dummy, out,
           running_mean if running_mean is not None and running_mean.numel() else dummy,
           running_var if running_var is not None and running_var.numel() else dummy,
           num_batches_tracked if num_batches_tracked is not None else dummy,
           p, c, eps, mom_hi, mom_mid, mom_lo,
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
