"""The C++ elementwise BN/ReLU passes (bn_relu_apply, relu_grad_sums, bn_backward_apply,
stats_partials) against float64 references.

Shared cases, references and fixtures, and how the host emulator runs the kernels on the CPU:
tests/cuda_kernel_helpers.py.
"""
from __future__ import annotations

import math
import types

import pytest
import torch

from cuda_kernel_helpers import (  # noqa: F401 (fixtures: kernels, ops)
    EW_SHAPES,
    TILE_M,
    TOL,
    _assert_close,
    _chan_merge,
    _data,
    _norm,
    kernels,
    ops,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", EW_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_elementwise_passes(kernels, shape, dtype, gen):
    n, c, h, w = shape
    x = _data(gen, shape, dtype, mean=0.3, channels_last=False)  # NCHW in: copied by the op
    scale, shift, mean, invstd = _norm(gen, c, dtype, x)
    view = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
    tol = TOL[dtype]
    kernels.reset_launch_counts()

    act = kernels.bn_relu_apply(x, scale, shift)
    assert act.is_contiguous(memory_format=torch.channels_last) and act.dtype == dtype
    _assert_close(act, torch.relu(x.double() * view(scale) + view(shift)), tol, "bn_relu_apply")

    grad, extra = _data(gen, shape, dtype), _data(gen, shape, dtype)
    g_masked, sums = kernels.relu_grad_sums(grad, x, scale, shift, mean, invstd, extra=extra)
    mask = x.double() * view(scale) + view(shift) > 0
    _assert_close(g_masked, (grad.double() + extra.double()) * mask, tol, "relu_grad_sums g'")
    stored = g_masked.double()
    xhat = (x.double() - view(mean)) * view(invstd)
    assert sums.shape == (2, math.ceil(n * h * w / TILE_M), c)
    torch.testing.assert_close(sums[0].double().sum(0), stored.sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums[1].double().sum(0), (stored * xhat).sum((0, 2, 3)), rtol=1e-5, atol=1e-5)

    coeff = types.SimpleNamespace(a=scale, b=shift, c=mean)  # any object with per-channel a, b, c
    sc = _data(gen, (n, c, math.ceil(h / 2), math.ceil(w / 2)), dtype)
    dv = kernels.bn_backward_apply(g_masked, x, coeff, shortcut_grad=sc, shortcut_stride=2)
    ref = view(scale) * g_masked.double() + view(shift) * x.double() + view(mean)
    ref[:, :, ::2, ::2] += sc.double()
    _assert_close(dv, ref, tol, "bn_backward_apply")

    partials = kernels.channel_stats_partials(x)
    m, var, count = _chan_merge(partials)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    assert torch.all(count == n * h * w)
    torch.testing.assert_close(m, ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, ref_var, rtol=2e-5, atol=1e-9)
    assert set(kernels.launch_counts()) == {"bn_relu_apply_cuda", "relu_grad_sums_cuda", "bn_backward_apply_cuda",
                                            "stats_partials_cuda"}
