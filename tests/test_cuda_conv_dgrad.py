"""The C++ fused input-gradient conv (dgrad) against eager: BN-backward prologue, ReLU mask,
the projection's second gradient and the [2, P, C] sums.

Shared cases, references and fixtures, and how the host emulator runs the kernels on the CPU:
tests/cuda_kernel_helpers.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from cuda_kernel_helpers import (  # noqa: F401 (fixtures: kernels, ops)
    ALL_DTYPES,
    DGRAD_CASES,
    TOL,
    _acc,
    _assert_close,
    _assert_wmma_ran,
    _data,
    _dy,
    _expected_dgrad_mma,
    _grad_inputs,
    _norm,
    _tiles,
    _weight,
    _wmma_mma_count,
    kernels,
    ops,
)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", DGRAD_CASES, ids=lambda c: c.name)
def test_dgrad_matches_eager(kernels, case, dtype, gen):
    v, w, g, pro = _grad_inputs(case, dtype, gen)
    scale, shift, mean, invstd = _norm(gen, case.c_in, dtype, v)
    tiles = _tiles(v.numel() // case.c_in, case.c_in // case.groups, case.c_out // case.groups)
    for axis, least in case.min_tiles.items():
        assert tiles[axis] >= least, (axis, tiles)
    extra = {}
    if case.second_channels:
        s2 = case.second_stride
        h2, w2 = (math.ceil(s / s2) for s in case.hw)
        extra = dict(second_grad=_data(gen, (case.n, case.second_channels, h2, w2), dtype),
                     second_weight=_weight(gen, (case.second_channels, case.c_in, 1, 1), dtype), second_stride=s2)

    kernels.reset_launch_counts()
    prologue = kernels.GradPrologue(*pro) if pro is not None else None
    wmma_before = _wmma_mma_count()
    g_masked, sums = kernels.conv_dgrad(g, w, v, scale, shift, mean, invstd, stride=case.stride,
                                        groups=case.groups, prologue=prologue, **extra)
    assert kernels.launch_counts()["conv_dgrad_cuda"] == 1
    _assert_wmma_ran(wmma_before, dtype, _expected_dgrad_mma(case), f"dgrad {case.name}")
    assert g_masked.dtype == dtype and g_masked.is_contiguous(memory_format=torch.channels_last)

    pad = case.ksize // 2
    d_a = torch.ops.aten.convolution_backward(
        _dy(g, pro), v.double(), w.double(), None, [case.stride] * 2, [pad] * 2, [1, 1], False, [0, 0],
        case.groups, [True, False, False])[0]
    if case.second_channels:
        d_a = d_a + torch.ops.aten.convolution_backward(
            extra["second_grad"].double(), v.double(), extra["second_weight"].double(), None,
            [case.second_stride] * 2, [0, 0], [1, 1], False, [0, 0], 1, [True, False, False])[0]
    mask = (v.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)) > 0
    ref = d_a * mask
    _assert_close(g_masked, ref, TOL[dtype], "masked input gradient")
    assert torch.all(g_masked[~mask] == 0)

    assert sums.shape == (2, tiles["m"], case.c_in) and sums.dtype == _acc(dtype)
    xhat = (v.double() - mean.double().view(1, -1, 1, 1)) * invstd.double().view(1, -1, 1, 1)
    # Of g' as stored, merged in a fixed order by the caller (here: torch's sum over P).
    stored = g_masked.double()
    _assert_close(sums[0].double().sum(0), stored.sum((0, 2, 3)), 10 * TOL[dtype], "sum g'")
    _assert_close(sums[1].double().sum(0), (stored * xhat).sum((0, 2, 3)), 10 * TOL[dtype], "sum g' xhat")

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dgrad_16bit(kernels, dtype, gen):
    case = next(c for c in DGRAD_CASES if c.name == "big_tiles")
    v, w, g, pro = _grad_inputs(case, dtype, gen)
    scale, shift, mean, invstd = _norm(gen, case.c_in, dtype, v)
    wmma_before = _wmma_mma_count()
    g_masked, sums = kernels.conv_dgrad(g, w, v, scale, shift, mean, invstd, prologue=kernels.GradPrologue(*pro))
    _assert_wmma_ran(wmma_before, dtype, _expected_dgrad_mma(case), "16-bit dgrad")
    d_a = torch.ops.aten.convolution_backward(_dy(g, pro), v.double(), w.double(), None, [1, 1], [1, 1], [1, 1],
                                              False, [0, 0], 1, [True, False, False])[0]
    mask = (v.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)) > 0
    _assert_close(g_masked, d_a * mask, TOL[dtype], "16-bit masked input gradient")
    torch.testing.assert_close(sums[0].double().sum(0), g_masked.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
