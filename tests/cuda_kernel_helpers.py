"""Shared inputs, references, cases and fixtures of the CUDA C++ kernel tests (tests/test_cuda_*.py).

The CUDA C++ fused convolution GEMMs (csrc/cuda/conv_*.cu) through their launchers.

On a CPU-only machine every op runs its host implementation: the SAME thread-block phase
functions the CUDA kernels run (conv_tile.cuh), block by block, all thread indices of a phase
before the next, with an ordinary array for shared memory. So these tests check the tile index
math, prologues, padding/stride predicates, epilogues and partial layouts of the GPU code, and for
fp16/bf16 the kernels' own tensor-core multiply phases too: the emulator runs their WMMA calls
through a host WMMA shim (csrc/cuda/wmma_host.cuh) with the same pointers, ldm and layouts, and
every 16-bit parity test asserts, from the shim's counters, that exactly the expected number of
warp-level mma_sync operations ran (fp32/fp64 keep the register tile: zero). A faulty copy of the
WMMA phase (a wrong ldm, a CPU-only test op) must fail the same parity checks; tests below show
it does. The references are eager PyTorch in
float64 (conv2d / aten.convolution_backward on explicitly computed activations and gradients)
from the same input values, so input rounding is not counted as error.

Tiles are 64 (M) x 64 (N) x 32 (K) (kConvTile* in conv_fused.h); the forward of a 3x3 tiles M as
8x8 blocks of output pixels of one image (conv_fwd_tiles_m), and its halo-staged kernel takes 32
(16-bit), 16 (fp32) or 8 (fp64) input channels per staged chunk. The shapes are chosen so that
some cases have several M tiles, several N tiles, partial tiles and several K steps per tap
(asserted below), while the whole file stays fast.

The host emulator starts every block with NaN-filled shared memory and runs the threads of a
phase in a scrambled order (conv_tile.cuh), so reads of unwritten staging space and
same-phase cross-thread reads fail these tests too, not only on the device.
"""
from __future__ import annotations

import glob
import math
import os
import types
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from resnet_fused import _extension

REQUIRE_C = os.environ.get("RESNET_FUSED_REQUIRE_C") == "1"
TILE_M, TILE_N, TILE_K = 64, 64, 32

# Error bound: max |out - ref| / max |ref| over the tensor; measured values in brackets.
# fp64: summation-order noise only [<= 4e-16]. fp32: a few ulps per product over K <= 9 * 72
# terms [<= 5e-7]; the mean-100 / std-0.1 case loses ~3 digits in x * scale + shift, exactly as
# eager's fp32 BN does [1e-5], so it gets its own bound. fp16/bf16: the activated operand is
# rounded to the storage dtype before the multiply (as the Triton kernel does, and as a cuDNN conv
# of a materialised activation does) and the output once more [fp16 <= 5.4e-4, bf16 <= 4.8e-3].
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
BN_LIKE_FP32_TOL = 1e-4
# The statistics epilogue is checked against var_mean of the op's own stored output, so its
# error is the partial/merge arithmetic alone (fp32 partials for 16/32-bit data).
STATS_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


@pytest.fixture(scope="module")
def ops():
    """torch.ops.resnet_fused, or a skip (a failure under RESNET_FUSED_REQUIRE_C=1) without _C."""
    if not _extension.is_available():
        message = f"resnet_fused._C is not available: {_extension.unavailable_reason()}"
        if REQUIRE_C:
            pytest.fail(f"RESNET_FUSED_REQUIRE_C=1 but {message}")
        pytest.skip(message)
    return torch.ops.resnet_fused


@pytest.fixture(scope="module")
def kernels(ops):
    from resnet_fused.cuda import kernels as module

    return module


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _data(gen, shape, dtype, mean=0.0, std=1.0, channels_last=True):
    # Per-channel offsets so that a channel mix-up cannot pass.
    c = shape[1]
    offsets = torch.linspace(-0.5, 0.5, c, dtype=torch.float64).view(1, c, 1, 1)
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean + offsets).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def _weight(gen, shape, dtype):
    fan_in = shape[1] * shape[2] * shape[3]
    return (torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in)).to(dtype)


def _affine(gen, channels, dtype, mean=0.0, std=1.0):
    """A realistic BN affine for data of the given mean/std: scale = gamma / std, shift = beta -
    mean * scale, with beta clearly nonzero so that relu(shift) != 0 (padding bugs show)."""
    gamma = 0.5 + torch.rand(channels, generator=gen, dtype=torch.float64)
    beta = 0.2 + 0.3 * torch.randn(channels, generator=gen, dtype=torch.float64)
    scale = gamma / std
    shift = beta - mean * scale
    return scale.to(_acc(dtype)), shift.to(_acc(dtype))


def _act(x, scale, shift):
    x = x.double()
    if scale is None:
        return x
    return torch.relu(x * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))


def _rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _assert_close(out, ref, tol, what):
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    err = _rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def _chan_merge(partials):
    """(mean, biased var) from partials [3, P, C], merged left to right by Chan's formula."""
    part = partials.double()
    n, mean, m2 = part[0, 0].clone(), part[1, 0].clone(), part[2, 0].clone()
    for p in range(1, part.shape[1]):
        nb, mb, m2b = part[0, p], part[1, p], part[2, p]
        total = n + nb
        delta = mb - mean
        mean = mean + delta * nb / total
        m2 = m2 + m2b + delta * delta * n * nb / total
        n = total
    return mean, m2 / n, n


#
# The CPU runs of the fp16/bf16 kernels perform their tensor-core phases through the host WMMA
# shim, which counts warp-level operations. Every GEMM block runs 8 warps; a K step of 32 is two
# k16 steps, each with two accumulators (per-tap / dgrad / wgrad: 16x16x16, two per warp's 16x32
# slab; halo: two 8x32x16 per warp's 8x64 rows), so 32 mma_sync per block and K step of 32.
WMMA_DTYPES = (torch.float16, torch.bfloat16)
MMA_PER_BLOCK_STEP = 8 * 2 * 2
HALO_CHUNK = 32  # 16-bit input channels per staged chunk (HaloLayout<T>::kK)


def _default_3x3_algo():
    # What bn_relu_conv runs without conv3x3_algo (resnet_fused.cuda.kernels reads the variable).
    return os.environ.get("RESNET_FUSED_CUDA_CONV3X3", "").strip() or "auto"


def _wmma_mma_count():
    return _extension.wmma_host_counts()["mma_sync"]


def _expected_fwd_mma(case, algo="auto"):
    """mma_sync operations of one forward run: blocks x K steps x 32 (per-tap kernel), or blocks x
    (chunks x 9 taps + projection steps) x 32 (halo kernel, conv_fwd_uses_halo)."""
    h_out, w_out = case.out_hw()
    cin_pg, cout_pg = case.c_in // case.groups, case.c_out // case.groups
    blocks = (_extension.conv_fwd_tiles_m(case.n, h_out, w_out, case.ksize) * case.groups
              * math.ceil(cout_pg / TILE_N))
    proj = math.ceil(case.shortcut_channels / TILE_K) if case.shortcut_kind == 2 else 0
    halo = case.ksize == 3 and case.stride in (1, 2) and algo != "per_tap"
    if halo:
        steps = math.ceil(cin_pg / HALO_CHUNK) * 9 + proj
    else:
        steps = case.ksize ** 2 * math.ceil(cin_pg / TILE_K) + proj
    return blocks * steps * MMA_PER_BLOCK_STEP


def _expected_dgrad_mma(case):
    cin_pg, cout_pg = case.c_in // case.groups, case.c_out // case.groups
    blocks = math.ceil(case.n * case.hw[0] * case.hw[1] / TILE_M) * case.groups * math.ceil(cin_pg / TILE_N)
    steps = case.ksize ** 2 * math.ceil(cout_pg / TILE_K) + math.ceil(case.second_channels / TILE_K)
    return blocks * steps * MMA_PER_BLOCK_STEP


def _expected_wgrad_mma(case):
    """Blocks of (output channels x input channels) per group and tap, times the K steps of every
    split (the split plan of conv_wgrad_plan in conv_fused.h)."""
    h_out, w_out = case.out_hw()
    rows = case.n * h_out * w_out
    splits = case.splits if case.splits else min(math.ceil(rows / 4096), 64)
    per = max(math.ceil(math.ceil(rows / max(splits, 1)) / TILE_K) * TILE_K, TILE_K)
    steps = sum(math.ceil((min(start + per, rows) - start) / TILE_K) for start in range(0, rows, per))
    cin_pg, cout_pg = case.c_in // case.groups, case.c_out // case.groups
    blocks = case.groups * math.ceil(cout_pg / TILE_M) * math.ceil(cin_pg / TILE_N) * case.ksize ** 2
    return blocks * steps * MMA_PER_BLOCK_STEP


def _assert_wmma_ran(before, dtype, expected, what):
    """16-bit: exactly `expected` warp-level mma_sync operations went through the host WMMA shim
    since `before`; fp32/fp64 (register tile): none."""
    ran = _wmma_mma_count() - before
    want = expected if dtype in WMMA_DTYPES else 0
    assert ran == want, f"{what}: the WMMA shim ran {ran} mma_sync operations, expected {want}"


@dataclass
class FwdCase:
    name: str
    n: int
    c_in: int
    c_out: int
    hw: tuple
    ksize: int = 3
    stride: int = 1
    groups: int = 1
    prologue: bool = True
    shortcut_kind: int = 0
    shortcut_stride: int = 1
    shortcut_channels: int = 0   # projection: channels of the block input
    proj_prologue: bool = True
    emit_stats: bool = True
    post: bool = False
    data_mean: float = 0.5
    data_std: float = 1.0
    nchw_input: bool = False
    min_tiles: dict = field(default_factory=dict)  # e.g. {"m": 2, "n": 2, "k": 2}

    def out_hw(self):
        pad = self.ksize // 2
        return tuple((s + 2 * pad - self.ksize) // self.stride + 1 for s in self.hw)


FWD_CASES = [
    FwdCase("3x3_s1_c5_to_12", 2, 5, 12, (7, 7), min_tiles={"m": 2}),
    FwdCase("3x3_s2_g2_5x6", 2, 12, 20, (5, 6), stride=2, groups=2),
    FwdCase("3x3_g4_cinpg4", 2, 16, 20, (7, 7), groups=4, min_tiles={"m": 2}),
    FwdCase("1x1_identity_add", 2, 20, 12, (7, 7), ksize=1, shortcut_kind=1, nchw_input=True),
    FwdCase("1x1_s2_subsample_add", 2, 20, 12, (7, 7), ksize=1, stride=2, shortcut_kind=1, shortcut_stride=2),
    FwdCase("3x3_s2_projection", 2, 12, 20, (7, 7), stride=2, shortcut_kind=2, shortcut_stride=2,
            shortcut_channels=5),
    FwdCase("1x1_projection_no_proj_prologue", 1, 5, 12, (4, 4), ksize=1, shortcut_kind=2, shortcut_stride=2,
            shortcut_channels=3, proj_prologue=False),
    FwdCase("big_tiles_post", 2, 40, 72, (7, 7), post=True, min_tiles={"m": 2, "n": 2, "k": 2}),
    FwdCase("no_prologue_post", 1, 3, 5, (5, 6), prologue=False, post=True, emit_stats=False),
    FwdCase("bn_like_mean100_std0.1", 2, 20, 12, (7, 7), data_mean=100.0, data_std=0.1),
]


def _fwd_inputs(case: FwdCase, dtype, gen):
    x_shape = (case.n, case.c_in) + case.hw
    x = _data(gen, x_shape, dtype, case.data_mean, case.data_std, channels_last=not case.nchw_input)
    w = _weight(gen, (case.c_out, case.c_in // case.groups, case.ksize, case.ksize), dtype)
    scale, shift = _affine(gen, case.c_in, dtype, case.data_mean, case.data_std) if case.prologue else (None, None)
    h_out, w_out = case.out_hw()
    kw = dict(scale=scale, shift=shift, stride=case.stride, groups=case.groups, shortcut_kind=case.shortcut_kind,
              shortcut_stride=case.shortcut_stride, emit_stats=case.emit_stats)
    if case.shortcut_kind == 1:
        sc_hw = (h_out * case.shortcut_stride - (case.shortcut_stride - 1),
                 w_out * case.shortcut_stride - (case.shortcut_stride - 1))
        kw["shortcut"] = _data(gen, (case.n, case.c_out) + sc_hw, dtype)
    elif case.shortcut_kind == 2:
        sc_hw = (h_out * case.shortcut_stride, w_out * case.shortcut_stride)
        kw["shortcut"] = _data(gen, (case.n, case.shortcut_channels) + sc_hw, dtype)
        kw["proj_weight"] = _weight(gen, (case.c_out, case.shortcut_channels, 1, 1), dtype)
        if case.proj_prologue:
            kw["proj_scale"], kw["proj_shift"] = _affine(gen, case.shortcut_channels, dtype, 0.5)
    if case.post:
        kw["post_scale"], kw["post_shift"] = _affine(gen, case.c_out, dtype)
    return x, w, kw


def _fwd_reference(case: FwdCase, x, w, kw, dtype):
    """(pre-rounding output in fp64, the post-epilogue function) from the same input values."""
    a = _act(x, kw["scale"], kw["shift"])
    y = F.conv2d(a, w.double(), stride=case.stride, padding=case.ksize // 2, groups=case.groups)
    if case.shortcut_kind == 1:
        s = case.shortcut_stride
        y = y + kw["shortcut"].double()[:, :, ::s, ::s]
    elif case.shortcut_kind == 2:
        a_sc = _act(kw["shortcut"], kw.get("proj_scale"), kw.get("proj_shift"))
        y = y + F.conv2d(a_sc, kw["proj_weight"].double(), stride=case.shortcut_stride)
    return y


def _tiles(rows, cols_per_group, k_per_tap):
    return {"m": math.ceil(rows / TILE_M), "n": math.ceil(cols_per_group / TILE_N),
            "k": math.ceil(k_per_tap / TILE_K)}


def _fwd_tiles(case: "FwdCase"):
    h_out, w_out = case.out_hw()
    tiles = _tiles(case.n * h_out * w_out, case.c_out // case.groups, case.c_in // case.groups)
    tiles["m"] = _extension.conv_fwd_tiles_m(case.n, h_out, w_out, case.ksize)
    return tiles


def _check_forward(kernels, case: FwdCase, dtype, gen, **launch):
    """Runs the forward of `case` once and checks the output and statistics against eager."""
    x, w, kw = _fwd_inputs(case, dtype, gen)
    h_out, w_out = case.out_hw()
    tiles = _fwd_tiles(case)
    for axis, least in case.min_tiles.items():
        assert tiles[axis] >= least, (axis, tiles)

    kernels.reset_launch_counts()
    wmma_before = _wmma_mma_count()
    out, partials = kernels.bn_relu_conv(x, w, **kw, **launch)
    assert kernels.launch_counts()["conv_fwd_cuda"] == 1
    _assert_wmma_ran(wmma_before, dtype, _expected_fwd_mma(case, launch.get("conv3x3_algo") or _default_3x3_algo()),
                     f"forward {case.name}")
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)

    y = _fwd_reference(case, x, w, kw, dtype)
    tol = BN_LIKE_FP32_TOL if (case.data_mean >= 100 and dtype == torch.float32) else TOL[dtype]
    if case.post:
        ref = torch.relu(y * kw["post_scale"].double().view(1, -1, 1, 1) + kw["post_shift"].double().view(1, -1, 1, 1))
        _assert_close(out, ref, tol, "post BN+ReLU output")
    else:
        _assert_close(out, y, tol, "output")

    if not case.emit_stats:
        assert partials is None
        return
    assert partials.shape == (3, tiles["m"], case.c_out) and partials.dtype == _acc(dtype)
    mean, var, count = _chan_merge(partials)
    assert torch.all(count == case.n * h_out * w_out)
    assert torch.all(partials[0] >= 1)  # no empty tile: every spatial tile holds a valid pixel
    if case.post:
        return  # statistics are of the pre-post value, which the op does not return; see below
    ref_var, ref_mean = torch.var_mean(out.double(), dim=(0, 2, 3), unbiased=False)
    spread = ref_var.sqrt() + ref_mean.abs()
    stats_tol = STATS_TOL[dtype]
    assert ((mean - ref_mean).abs() / spread).max() <= stats_tol
    assert ((var - ref_var).abs() / ref_var).max() <= 10 * stats_tol


# The two 3x3 forward kernels (per-tap, halo-staged) on odd shapes: 7x7 and 5x6 inputs, H and W
# not multiples of the 8x8 output tile (and tiles past both edges), stride 2, groups 2 and 4,
# channels 3/12/20/40, batch 1 and 2, prologue on and off, statistics, post epilogue, shortcut
# add (plain and subsampled) and projection, several staged channel chunks and several N tiles.
HALO_CASES = [
    FwdCase("s1_7x7_c3_to_12", 2, 3, 12, (7, 7)),
    FwdCase("s1_9x10_c12_to_20_n1", 1, 12, 20, (9, 10), min_tiles={"m": 4}),
    FwdCase("s2_5x6_g2", 2, 12, 20, (5, 6), stride=2, groups=2),
    FwdCase("s2_17x18_g4_no_prologue", 1, 20, 12, (17, 18), stride=2, groups=4, prologue=False,
            min_tiles={"m": 4}),
    FwdCase("s1_g4_cinpg5_post", 2, 20, 20, (6, 5), groups=4, post=True),
    FwdCase("s1_c40_to_72_chunks_post", 2, 40, 72, (7, 7), post=True, min_tiles={"n": 2}),
    FwdCase("s1_add", 2, 12, 12, (6, 5), shortcut_kind=1),
    FwdCase("s2_subsample_add", 2, 12, 20, (7, 7), stride=2, shortcut_kind=1, shortcut_stride=2),
    FwdCase("s2_projection", 2, 12, 20, (7, 7), stride=2, shortcut_kind=2, shortcut_stride=2, shortcut_channels=5),
    FwdCase("s1_projection_c40_no_stats", 1, 20, 12, (5, 6), shortcut_kind=2, shortcut_channels=40,
            emit_stats=False),
    FwdCase("s1_bn_like_mean100_std0.1", 2, 20, 12, (7, 7), data_mean=100.0, data_std=0.1),
]


@dataclass
class BwdCase:
    name: str
    n: int
    c_in: int
    c_out: int
    hw: tuple
    ksize: int = 3
    stride: int = 1
    groups: int = 1
    prologue: bool = True
    second_channels: int = 0
    second_stride: int = 2
    splits: Optional[int] = None
    min_tiles: dict = field(default_factory=dict)

    def out_hw(self):
        pad = self.ksize // 2
        return tuple((s + 2 * pad - self.ksize) // self.stride + 1 for s in self.hw)


DGRAD_CASES = [
    BwdCase("1x1_no_prologue", 2, 12, 20, (7, 7), ksize=1, prologue=False, min_tiles={"m": 2}),
    BwdCase("3x3_g2_5x6", 2, 12, 20, (5, 6), groups=2),
    BwdCase("3x3_s2_g4_cinpg4", 2, 16, 20, (7, 7), stride=2, groups=4),
    BwdCase("1x1_s2_holes", 2, 12, 20, (7, 7), ksize=1, stride=2),
    BwdCase("1x1_with_projection_loop", 2, 12, 5, (7, 7), ksize=1, second_channels=20, second_stride=2),
    BwdCase("3x3_s2_projection_loop_n1", 1, 5, 3, (5, 6), stride=2, second_channels=12, second_stride=2),
    BwdCase("big_tiles", 2, 72, 40, (7, 7), min_tiles={"m": 2, "n": 2, "k": 2}),
]


def _norm(gen, channels, dtype, v):
    """Saved statistics (mean, invstd) of v and an affine (scale, shift) that keeps about half of
    the activations positive."""
    var, mean = torch.var_mean(v.double(), dim=(0, 2, 3), unbiased=False)
    invstd = torch.rsqrt(var + 1e-5)
    gamma = 0.5 + torch.rand(channels, generator=gen, dtype=torch.float64)
    beta = 0.1 * torch.randn(channels, generator=gen, dtype=torch.float64)
    scale = gamma * invstd
    shift = beta - mean * scale
    return [t.to(_acc(dtype)) for t in (scale, shift, mean, invstd)]


def _grad_inputs(case: BwdCase, dtype, gen):
    h_out, w_out = case.out_hw()
    v = _data(gen, (case.n, case.c_in) + case.hw, dtype, mean=0.3, std=1.0)
    w = _weight(gen, (case.c_out, case.c_in // case.groups, case.ksize, case.ksize), dtype)
    g = _data(gen, (case.n, case.c_out, h_out, w_out), dtype, std=1.0)
    pro = None
    if case.prologue:
        y = _data(gen, g.shape, dtype, mean=0.2)
        a = (0.5 + torch.rand(case.c_out, generator=gen, dtype=torch.float64)).to(_acc(dtype))
        b = (0.3 * torch.randn(case.c_out, generator=gen, dtype=torch.float64)).to(_acc(dtype))
        c = (0.2 + 0.3 * torch.randn(case.c_out, generator=gen, dtype=torch.float64)).to(_acc(dtype))
        pro = (y, a, b, c)
    return v, w, g, pro


def _dy(g, pro):
    if pro is None:
        return g.double()
    y, a, b, c = pro
    view = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
    return view(a) * g.double() + view(b) * y.double() + view(c)


WGRAD_CASES = [
    BwdCase("1x1_4_splits", 2, 12, 20, (7, 7), ksize=1, prologue=False, splits=4),
    BwdCase("3x3_s2_g2_5x6", 2, 12, 20, (5, 6), stride=2, groups=2),
    BwdCase("3x3_g4_cinpg4_3_splits", 2, 16, 20, (7, 7), groups=4, splits=3),
    BwdCase("1x1_s2", 2, 12, 20, (7, 7), ksize=1, stride=2, splits=2),
    BwdCase("big_tiles_3_splits", 2, 40, 72, (7, 7), splits=3),
    BwdCase("1x1_auto_splits_M4608", 2, 5, 3, (48, 48), ksize=1),  # the default plan: 2 splits
]


def _wgrad_reference(case, v, g, pro, scale, shift):
    pad = case.ksize // 2
    w_shape = (case.c_out, case.c_in // case.groups, case.ksize, case.ksize)
    return torch.ops.aten.convolution_backward(
        _dy(g, pro), _act(v, scale, shift), torch.empty(w_shape, dtype=torch.float64, device=v.device), None,
        [case.stride] * 2,
        [pad] * 2, [1, 1], False, [0, 0], case.groups, [False, True, False])[1]


#
# torch.ops.resnet_fused._test_fault_wmma_conv_fwd_cuda (CPU only, test only) runs the forward with
# a COPY of its WMMA multiply phase whose A-operand load has a deliberate fault
# (csrc/cuda/wmma_test_faults.cu); the shipped phases are untouched. The launcher under test is
# pointed at it by replacing resnet_fused.cuda.kernels._ops, so the parity check is the one the
# tests above run (_check_forward), unchanged.

# One case per WMMA phase: the per-tap kernel's WmmaMma on a 1x1 and on a 3x3, the halo kernel's
# HaloWmma at stride 1 (several channel chunks, two N tiles) and at stride 2 with groups.
FAULT_RUNS = [("1x1_identity_add", "auto"), ("3x3_s2_projection", "per_tap"),
              ("s1_c40_to_72_chunks_post", "halo"), ("s2_17x18_g4_no_prologue", "halo")]


def _fault_case(name):
    return next(c for c in FWD_CASES + HALO_CASES if c.name == name)


def _ops_with_fwd_fault(ops, fault):
    """torch.ops.resnet_fused with conv_fwd_cuda replaced by the faulty copy (fault None: the real
    op behind the same wrapper, the control)."""
    class Ops:
        def __getattr__(self, name):
            return getattr(ops, name)

        def conv_fwd_cuda(self, *args):
            if fault is None:
                return ops.conv_fwd_cuda(*args)
            return ops._test_fault_wmma_conv_fwd_cuda(*args, _extension.WMMA_TEST_FAULTS[fault])

    return Ops()


SCHEMAS = {
    "conv_fwd_cuda": "resnet_fused::conv_fwd_cuda(Tensor x, Tensor w, Tensor? scale, Tensor? shift, int stride, "
                     "int groups, Tensor? shortcut, int shortcut_kind, int shortcut_stride, Tensor? proj_w, "
                     "Tensor? proj_scale, Tensor? proj_shift, bool emit_stats, Tensor? post_scale, "
                     "Tensor? post_shift, int algo=0, Tensor? pro_mean=None, Tensor? pro_var=None, float pro_eps=0., "
                     "Tensor? proj_mean=None, Tensor? proj_var=None, float proj_eps=0., Tensor? post_mean=None, "
                     "Tensor? post_var=None, float post_eps=0., bool postact_close=False) "
                     "-> (Tensor out, Tensor partials)",
    "conv_dgrad_cuda": "resnet_fused::conv_dgrad_cuda(Tensor grad, Tensor w, Tensor v, Tensor scale, Tensor shift, "
                       "Tensor mean, Tensor invstd, int stride, int groups, Tensor? pro_y, Tensor? pro_a, "
                       "Tensor? pro_b, Tensor? pro_c, Tensor? second_grad, Tensor? second_w, int second_stride) "
                       "-> (Tensor g_masked, Tensor sums)",
    "conv_wgrad_cuda": "resnet_fused::conv_wgrad_cuda(Tensor grad, Tensor v, Tensor? scale, Tensor? shift, int ksize, "
                       "int stride, int groups, Tensor? pro_y, Tensor? pro_a, Tensor? pro_b, Tensor? pro_c, "
                       "int splits=0, bool channels_last=False) -> Tensor",
    "bn_relu_apply_cuda": "resnet_fused::bn_relu_apply_cuda(Tensor x, Tensor scale, Tensor shift) -> Tensor",
    "relu_grad_sums_cuda": "resnet_fused::relu_grad_sums_cuda(Tensor grad, Tensor? extra, Tensor v, Tensor scale, "
                           "Tensor shift, Tensor mean, Tensor invstd) -> (Tensor g_masked, Tensor sums)",
    "bn_backward_apply_cuda": "resnet_fused::bn_backward_apply_cuda(Tensor g, Tensor v, Tensor a, Tensor b, "
                              "Tensor c, Tensor? shortcut_grad, int shortcut_stride) -> Tensor",
    "stats_partials_cuda": "resnet_fused::stats_partials_cuda(Tensor x) -> Tensor",
}


def _opcheck_args(gen):
    """One small argument tuple per op, with every optional path switched on."""
    dt = torch.float32
    x = _data(gen, (2, 6, 5, 5), dt)
    w = _weight(gen, (8, 3, 3, 3), dt)
    scale, shift = _affine(gen, 6, dt)
    sc = _data(gen, (2, 4, 5, 5), dt)
    pw = _weight(gen, (8, 4, 1, 1), dt)
    ps, pb = _affine(gen, 4, dt)
    post_s, post_b = _affine(gen, 8, dt)
    fwd = (x, w, scale, shift, 2, 2, sc, 2, 2, pw, ps, pb, True, post_s, post_b)
    g = _data(gen, (2, 8, 3, 3), dt)
    y = _data(gen, (2, 8, 3, 3), dt)
    a, b = _affine(gen, 8, dt)
    c = b * 0.5
    m, inv = _affine(gen, 6, dt)
    g2 = _data(gen, (2, 4, 3, 3), dt)
    w2 = _weight(gen, (4, 6, 1, 1), dt)
    dgrad = (g, w, x, scale, shift, m, inv, 2, 2, y, a, b, c, g2, w2, 2)
    wgrad = (g, x, scale, shift, 3, 2, 2, y, a, b, c, 2)
    x4 = _data(gen, (2, 6, 3, 3), dt)
    return {"conv_fwd_cuda": fwd, "conv_dgrad_cuda": dgrad, "conv_wgrad_cuda": wgrad,
            "bn_relu_apply_cuda": (x, scale, shift),
            "relu_grad_sums_cuda": (x, x * 0.5, x, scale, shift, m, inv),
            "bn_backward_apply_cuda": (x, x * 0.5, scale, shift, m, x4, 2),
            "stats_partials_cuda": (x,)}


def _bad_calls(ops, gen):
    x = _data(gen, (2, 6, 5, 5), torch.float32)
    w = _weight(gen, (8, 3, 3, 3), torch.float32)
    s, b = _affine(gen, 6, torch.float32)
    g = _data(gen, (2, 8, 5, 5), torch.float32)

    def fwd(**kw):
        args = dict(x=x, w=w, scale=None, shift=None, stride=1, groups=2, shortcut=None, shortcut_kind=0,
                    shortcut_stride=1, proj_w=None, proj_scale=None, proj_shift=None, emit_stats=False,
                    post_scale=None, post_shift=None, algo=0)
        args.update(kw)
        return lambda: ops.conv_fwd_cuda(*args.values())

    def dgrad(**kw):
        args = dict(grad=g, w=w, v=x, scale=s, shift=b, mean=s, invstd=b, stride=1, groups=2, pro_y=None,
                    pro_a=None, pro_b=None, pro_c=None, second_grad=None, second_w=None, second_stride=1)
        args.update(kw)
        return lambda: ops.conv_dgrad_cuda(*args.values())

    def wgrad(**kw):
        args = dict(grad=g, v=x, scale=s, shift=b, ksize=3, stride=1, groups=2, pro_y=None, pro_a=None,
                    pro_b=None, pro_c=None, splits=0)
        args.update(kw)
        return lambda: ops.conv_wgrad_cuda(*args.values())

    return {
        "fwd_x_3d": (fwd(x=x[0]), "x must be 4-D"),
        "fwd_w_dtype": (fwd(w=w.double()), "w has dtype Double but the data tensors have Float"),
        "fwd_int_x": (fwd(x=x.to(torch.int32), w=w.to(torch.int32)), "float32, float16, bfloat16 or float64"),
        "fwd_wrong_groups": (fwd(groups=3), "groups=3 must divide"),
        "fwd_groups_mismatch": (fwd(groups=1), r"expects 3 input channels, but x has 6"),
        "fwd_5x5": (fwd(w=_weight(gen, (8, 3, 5, 5), torch.float32)), "only 1x1 and 3x3"),
        "fwd_stride_0": (fwd(stride=0), "stride must be >= 1"),
        "fwd_scale_without_shift": (fwd(scale=s), "pass both scale and shift or neither"),
        "fwd_scale_size": (fwd(scale=s[:4], shift=b[:4]), "scale must be a 1-D tensor of 6 values"),
        "fwd_scale_dtype": (fwd(scale=s.half(), shift=b.half()), "scale must be float32 or float64"),
        "fwd_shortcut_kind_without_tensor": (fwd(shortcut_kind=1), "needs a shortcut tensor"),
        "fwd_shortcut_shape": (fwd(shortcut=_data(gen, (2, 8, 4, 4), torch.float32), shortcut_kind=1),
                               "must match the output's batch and spatial size"),
        "fwd_projection_without_weight": (fwd(shortcut=x, shortcut_kind=2), "needs proj_w"),
        "dgrad_grad_shape": (dgrad(grad=g[:, :, :4]), "grad must be the conv output's gradient"),
        "dgrad_partial_prologue": (dgrad(pro_a=s), "needs all of pro_y, pro_a, pro_b and pro_c"),
        "dgrad_v_dtype": (dgrad(v=x.double()), "v has dtype Double"),
        "fwd_bad_algo": (fwd(algo=3), "algo must be 0"),
        "fwd_halo_for_1x1": (fwd(w=_weight(gen, (8, 3, 1, 1), torch.float32), algo=2),
                             "runs 3x3 convs with stride 1 or 2 only"),
        "fwd_halo_stride_3": (fwd(stride=3, algo=2), "runs 3x3 convs with stride 1 or 2 only"),
        "wgrad_ksize": (wgrad(ksize=2), "only 1x1 and 3x3"),
        "wgrad_grad_shape": (wgrad(stride=2), "is not the output gradient"),
    }


BAD_CALL_NAMES = ["fwd_x_3d", "fwd_w_dtype", "fwd_int_x", "fwd_wrong_groups", "fwd_groups_mismatch", "fwd_5x5",
                  "fwd_stride_0", "fwd_scale_without_shift", "fwd_scale_size", "fwd_scale_dtype",
                  "fwd_shortcut_kind_without_tensor", "fwd_shortcut_shape", "fwd_projection_without_weight",
                  "fwd_bad_algo", "fwd_halo_for_1x1", "fwd_halo_stride_3", "dgrad_grad_shape",
                  "dgrad_partial_prologue", "dgrad_v_dtype", "wgrad_ksize", "wgrad_grad_shape"]


EW_SHAPES = [(2, 20, 7, 7), (1, 72, 5, 6), (3, 5, 1, 1)]  # 2 M tiles; 2 channel tiles; M = 3


#
# These run only where a GPU is present. They cover what the host emulator cannot: tensor-core
# fragments (WMMA m16n16k16 in the per-tap kernels, m8n32k16 reading the staged patch in the halo
# kernel), __syncthreads() placement, shared-memory limits and alignment, launch configuration,
# and 64-bit index math at sizes the CPU tests never reach.

needs_gpu = pytest.mark.skipif(not glob.glob("/dev/nvidia[0-9]*"), reason="needs a CUDA GPU")


# ResNet-50 / ResNeXt-50 32x4d layer shapes at batch 2 (channels and spatial sizes of the real
# networks; batch 2 keeps eager's fp64 reference cheap): (name, n, c_in, c_out, hw, ksize, stride,
# groups, shortcut_kind, shortcut_channels).
REAL_FWD_SHAPES = [
    ("conv2_x_1x1_256_to_64_56", 2, 256, 64, (56, 56), 1, 1, 1, 0, 0),
    ("conv2_x_3x3_64_56", 2, 64, 64, (56, 56), 3, 1, 1, 0, 0),
    ("conv3_x_3x3_s2_128_56_to_28", 2, 128, 128, (56, 56), 3, 2, 1, 0, 0),
    ("conv4_x_3x3_256_14", 2, 256, 256, (14, 14), 3, 1, 1, 0, 0),
    ("conv5_x_3x3_512_7", 2, 512, 512, (7, 7), 3, 1, 1, 0, 0),
    ("conv5_x_1x1_512_to_2048_7_add", 2, 512, 2048, (7, 7), 1, 1, 1, 1, 0),
    ("conv5_x_1x1_512_to_2048_projection_1024_s2", 2, 512, 2048, (7, 7), 1, 1, 1, 2, 1024),
    ("resnext_conv2_3x3_128_g32_56", 2, 128, 128, (56, 56), 3, 1, 32, 0, 0),
    ("resnext_conv3_3x3_s2_256_g32_56_to_28", 2, 256, 256, (56, 56), 3, 2, 32, 0, 0),
]


REAL_BWD_SHAPES = [
    ("conv2_x_3x3_64_56", 2, 64, 64, (56, 56), 3, 1, 1),
    ("conv3_x_3x3_s2_128_56_to_28", 2, 128, 128, (56, 56), 3, 2, 1),
    ("conv5_x_1x1_2048_to_512_7", 2, 2048, 512, (7, 7), 1, 1, 1),
    ("resnext_conv2_3x3_128_g32_56", 2, 128, 128, (56, 56), 3, 1, 32),
]

