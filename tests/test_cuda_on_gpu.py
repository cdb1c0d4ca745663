"""The CUDA kernels on a GPU: device against host emulation, and against eager at real
ResNet shapes (skipped without a GPU).

Shared cases, references and fixtures, and how the host emulator runs the kernels on the CPU:
tests/cuda_kernel_helpers.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cuda_kernel_helpers import (  # noqa: F401 (fixtures: kernels, ops)
    BwdCase,
    DGRAD_CASES,
    FWD_CASES,
    FwdCase,
    HALO_CASES,
    REAL_BWD_SHAPES,
    REAL_FWD_SHAPES,
    STATS_TOL,
    TOL,
    WGRAD_CASES,
    _act,
    _affine,
    _assert_close,
    _chan_merge,
    _dy,
    _fwd_inputs,
    _fwd_reference,
    _grad_inputs,
    _norm,
    _weight,
    _wgrad_reference,
    kernels,
    needs_gpu,
    ops,
)
from resnet_fused import _extension


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_cuda_matches_host(kernels, dtype, gen):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # fp16/bf16: the same WMMA phases on the tensor cores and on the host shim: same rounding of
    # the operands, exact products, possibly a different fp32 summation order inside an mma.
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    fwd_runs = [(case, "auto") for case in (FWD_CASES[3], FWD_CASES[6])]  # 1x1 kernels
    fwd_runs += [(case, algo) for case in HALO_CASES for algo in ("per_tap", "halo")]
    for case, algo in fwd_runs:
        x, w, kw = _fwd_inputs(case, dtype, gen)
        host = kernels.bn_relu_conv(x, w, **kw, conv3x3_algo=algo)
        to_cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        dev = kernels.bn_relu_conv(x.cuda(), w.cuda(), **to_cuda, conv3x3_algo=algo)
        torch.cuda.synchronize()
        _assert_close(dev[0].cpu(), host[0].double(), tol, f"{case.name} {algo} cuda vs host")
        if case.emit_stats:
            assert dev[1].shape == host[1].shape
            torch.testing.assert_close(dev[1][0].cpu(), host[1][0])  # counts: exact
            mean_d, var_d, _ = _chan_merge(dev[1].cpu())
            mean_h, var_h, _ = _chan_merge(host[1])
            torch.testing.assert_close(mean_d, mean_h, rtol=10 * tol, atol=10 * tol)
            torch.testing.assert_close(var_d, var_h, rtol=10 * tol, atol=10 * tol)
    case = DGRAD_CASES[-1]
    v, w, g, pro = _grad_inputs(case, dtype, gen)
    norm = _norm(gen, case.c_in, dtype, v)
    host = kernels.conv_dgrad(g, w, v, *norm, prologue=kernels.GradPrologue(*pro))
    dev = kernels.conv_dgrad(g.cuda(), w.cuda(), v.cuda(), *(t.cuda() for t in norm),
                             prologue=kernels.GradPrologue(*(t.cuda() for t in pro)))
    _assert_close(dev[0].cpu(), host[0].double(), tol, "dgrad cuda vs host")
    case = WGRAD_CASES[-1]
    v, _, g, pro = _grad_inputs(case, dtype, gen)
    scale, shift = _affine(gen, case.c_in, dtype, 0.3)
    host = kernels.conv_wgrad(g, v, scale, shift, ksize=case.ksize, prologue=kernels.GradPrologue(*pro), splits=3)
    dev = kernels.conv_wgrad(g.cuda(), v.cuda(), scale.cuda(), shift.cuda(), ksize=case.ksize,
                             prologue=kernels.GradPrologue(*(t.cuda() for t in pro)), splits=3)
    _assert_close(dev.cpu(), host.double(), tol, "wgrad cuda vs host")

@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", REAL_FWD_SHAPES, ids=lambda s: s[0])
def test_cuda_forward_real_shapes_match_eager(kernels, shape, dtype, gen):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    name, n, c_in, c_out, hw, ksize, stride, groups, kind, sc_channels = shape
    case = FwdCase(name, n, c_in, c_out, hw, ksize=ksize, stride=stride, groups=groups, shortcut_kind=kind,
                   shortcut_stride=2 if kind == 2 else 1, shortcut_channels=sc_channels)
    x, w, kw = _fwd_inputs(case, dtype, gen)
    cuda = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    kw_cuda = {k: cuda(v) for k, v in kw.items()}
    ref = _fwd_reference(case, cuda(x), cuda(w), kw_cuda, dtype)
    h_out, w_out = case.out_hw()
    for algo in (("per_tap", "halo") if ksize == 3 else ("auto",)):
        out, partials = kernels.bn_relu_conv(cuda(x), cuda(w), **kw_cuda, conv3x3_algo=algo)
        torch.cuda.synchronize()
        _assert_close(out, ref, TOL[dtype], f"{name} {algo}")
        assert partials.shape == (3, _extension.conv_fwd_tiles_m(n, h_out, w_out, ksize), c_out)
        mean, var, count = _chan_merge(partials)
        assert torch.all(count == n * h_out * w_out)
        ref_var, ref_mean = torch.var_mean(out.double(), dim=(0, 2, 3), unbiased=False)
        assert ((mean - ref_mean).abs() / (ref_var.sqrt() + ref_mean.abs())).max() <= STATS_TOL[dtype]

@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", REAL_BWD_SHAPES, ids=lambda s: s[0])
def test_cuda_backward_real_shapes_match_eager(kernels, shape, dtype, gen):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    name, n, c_in, c_out, hw, ksize, stride, groups = shape
    case = BwdCase(name, n, c_in, c_out, hw, ksize=ksize, stride=stride, groups=groups)
    v, w, g, pro = (t.cuda() if isinstance(t, torch.Tensor) else t for t in _grad_inputs(case, dtype, gen))
    pro = tuple(t.cuda() for t in pro)
    scale, shift, mean, invstd = (t.cuda() for t in _norm(gen, c_in, dtype, v.cpu()))
    pad = ksize // 2
    g_masked, sums = kernels.conv_dgrad(g, w, v, scale, shift, mean, invstd, stride=stride, groups=groups,
                                        prologue=kernels.GradPrologue(*pro))
    d_a = torch.ops.aten.convolution_backward(
        _dy(g, pro), v.double(), w.double(), None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], groups,
        [True, False, False])[0]
    mask = (v.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)) > 0
    _assert_close(g_masked, d_a * mask, TOL[dtype], f"{name} dgrad")
    torch.testing.assert_close(sums[0].double().sum(0), g_masked.double().sum((0, 2, 3)), rtol=1e-4, atol=1e-3)
    dw = kernels.conv_wgrad(g, v, scale, shift, ksize=ksize, stride=stride, groups=groups,
                            prologue=kernels.GradPrologue(*pro))
    ref = _wgrad_reference(case, v, g, pro, scale, shift)
    _assert_close(dw, ref, TOL[dtype], f"{name} wgrad")

@needs_gpu
def test_cuda_indices_past_2_to_the_31(kernels, gen):
    # x has 2 * 64 * 4100 * 4100 > 2**31 elements: every offset into the second image is past
    # int32. A 1x1 and both 3x3 kernels are compared with eager on the bottom-right 8x8 output
    # pixels of the last image (a crop is exact for a 1x1; for the 3x3 the crop keeps its
    # bottom/right padding and drops the first row and column, whose top/left neighbours it lacks).
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GB of GPU memory")
    dtype = torch.bfloat16
    n, c, side = 2, 64, 4100
    assert n * c * side * side > 2**31
    x = torch.empty((n, c, side, side), dtype=dtype, device="cuda", memory_format=torch.channels_last)
    x.normal_(0.3, 1.0)
    scale, shift = (t.cuda() for t in _affine(gen, c, dtype, 0.3))
    crop = x[1:, :, -9:, -9:]
    for ksize, algo in ((1, "auto"), (3, "per_tap"), (3, "halo")):
        w = _weight(gen, (c, c, ksize, ksize), dtype).cuda()
        out, partials = kernels.bn_relu_conv(x, w, scale=scale, shift=shift, emit_stats=True, conv3x3_algo=algo)
        ref = F.conv2d(_act(crop, scale, shift), w.double(), padding=ksize // 2)[:, :, 1:, 1:]
        _assert_close(out[1:, :, -8:, -8:], ref, TOL[dtype], f"{ksize}x{ksize} {algo} at the end of a >2^31 tensor")
        assert torch.all(partials[0].double().sum(0) == n * side * side)  # > 2**24: sum in fp64
        del out, partials
    act = kernels.bn_relu_apply(x, scale, shift)
    _assert_close(act[1:, :, -8:, -8:], _act(crop, scale, shift)[:, :, 1:, 1:], TOL[dtype], "bn_relu_apply")
    del act
    partials = kernels.channel_stats_partials(x)
    assert torch.all(partials[0].double().sum(0) == n * side * side)
