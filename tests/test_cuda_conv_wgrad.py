"""The C++ fused weight-gradient conv (wgrad) against eager: split-K, determinism, 16-bit.

Shared cases, references and fixtures, and how the host emulator runs the kernels on the CPU:
tests/cuda_kernel_helpers.py.
"""
from __future__ import annotations

import pytest
import torch

from cuda_kernel_helpers import (  # noqa: F401 (fixtures: kernels, ops)
    ALL_DTYPES,
    TOL,
    WGRAD_CASES,
    _affine,
    _assert_close,
    _assert_wmma_ran,
    _expected_wgrad_mma,
    _grad_inputs,
    _wgrad_reference,
    _wmma_mma_count,
    kernels,
    ops,
)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", WGRAD_CASES, ids=lambda c: c.name)
def test_wgrad_matches_eager(kernels, case, dtype, gen):
    v, _, g, pro = _grad_inputs(case, dtype, gen)
    scale, shift = _affine(gen, case.c_in, dtype, 0.3)
    kernels.reset_launch_counts()
    prologue = kernels.GradPrologue(*pro) if pro is not None else None
    wmma_before = _wmma_mma_count()
    dw = kernels.conv_wgrad(g, v, scale, shift, ksize=case.ksize, stride=case.stride, groups=case.groups,
                            prologue=prologue, splits=case.splits)
    assert kernels.launch_counts()["conv_wgrad_cuda"] == 1
    _assert_wmma_ran(wmma_before, dtype, _expected_wgrad_mma(case), f"wgrad {case.name}")
    assert dw.shape == (case.c_out, case.c_in // case.groups, case.ksize, case.ksize) and dw.dtype == dtype
    assert dw.is_contiguous()
    _assert_close(dw, _wgrad_reference(case, v, g, pro, scale, shift), TOL[dtype], "weight gradient")

@pytest.mark.parametrize("case", [c for c in WGRAD_CASES if c.ksize == 3], ids=lambda c: c.name)
def test_wgrad_channels_last_is_the_same_gradient(kernels, case, gen):
    """``channels_last=True`` stores dW in a channels_last weight's layout: the same values (bitwise:
    only the store's address changes), strides of ``torch.channels_last``, no copy op."""
    v, _, g, pro = _grad_inputs(case, torch.float32, gen)
    scale, shift = _affine(gen, case.c_in, torch.float32, 0.3)
    prologue = kernels.GradPrologue(*pro) if pro is not None else None
    args = dict(ksize=case.ksize, stride=case.stride, groups=case.groups, prologue=prologue, splits=case.splits)
    plain = kernels.conv_wgrad(g, v, scale, shift, **args)
    cl = kernels.conv_wgrad(g, v, scale, shift, channels_last=True, **args)
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    assert torch.equal(cl, plain)
    raw = kernels.plain_conv_wgrad(g, v, ksize=case.ksize, stride=case.stride, prologue=prologue,
                                   channels_last=True) if case.groups == 1 else None
    if raw is not None:
        assert raw.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(raw, kernels.plain_conv_wgrad(g, v, ksize=case.ksize, stride=case.stride,
                                                         prologue=prologue))


def test_wgrad_splits_are_deterministic_and_agree(kernels, gen):
    case = next(c for c in WGRAD_CASES if c.name == "big_tiles_3_splits")
    v, _, g, pro = _grad_inputs(case, torch.float32, gen)
    scale, shift = _affine(gen, case.c_in, torch.float32, 0.3)
    prologue = kernels.GradPrologue(*pro)
    runs = [kernels.conv_wgrad(g, v, scale, shift, ksize=3, prologue=prologue, splits=s) for s in (3, 3, 1)]
    assert torch.equal(runs[0].view(torch.int32), runs[1].view(torch.int32))
    torch.testing.assert_close(runs[0], runs[2], rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_wgrad_16bit(kernels, dtype, gen):
    case = next(c for c in WGRAD_CASES if c.name == "3x3_g4_cinpg4_3_splits")
    v, _, g, pro = _grad_inputs(case, dtype, gen)
    scale, shift = _affine(gen, case.c_in, dtype, 0.3)
    wmma_before = _wmma_mma_count()
    dw = kernels.conv_wgrad(g, v, scale, shift, ksize=3, groups=4, prologue=kernels.GradPrologue(*pro), splits=3)
    _assert_wmma_ran(wmma_before, dtype, _expected_wgrad_mma(case), "16-bit wgrad")
    _assert_close(dw, _wgrad_reference(case, v, g, pro, scale, shift), TOL[dtype], "16-bit weight gradient")
