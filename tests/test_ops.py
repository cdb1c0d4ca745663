"""The public op layer (``resnet_fused.ops``): dispatch and input contract."""
from __future__ import annotations

import pytest
import torch

import resnet_fused as rf
from helpers import requires_cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_batch_stats_reference_on_cpu(dtype, memory_format, gen):
    x = (torch.randn(3, 5, 7, 7, generator=gen, dtype=torch.float64) * 0.1 + 100).to(dtype)
    mean, var = rf.batch_stats(x.contiguous(memory_format=memory_format))
    xd = x.double()
    assert mean.dtype == var.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(mean.double(), xd.mean(dim=(0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), xd.var(dim=(0, 2, 3), unbiased=False), rtol=1e-3, atol=0)


@pytest.mark.parametrize("bad,exc,match", [
    (torch.randn(4, 5, 6), ValueError, "4-D"),
    (torch.ones(2, 3, 4, 4, dtype=torch.int32), TypeError, "accepts dtypes"),
    (torch.randn(0, 3, 4, 4), ValueError, "one value per channel"),
    ("x", TypeError, "torch.Tensor"),
])
def test_batch_stats_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        rf.batch_stats(bad)


def test_batch_stats_cuda_backend_needs_cuda_tensor_or_extension(gen):
    x = torch.randn(2, 3, 4, 4, generator=gen)
    with pytest.raises((RuntimeError, ValueError), match="resnet_fused._C|CUDA tensor"):
        rf.batch_stats(x, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        rf.batch_stats(x, backend="gpu")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_batch_stats_cuda_matches_reference(dtype, gen):
    if "cuda" not in rf.available_backends() and not rf._extension.is_available():
        pytest.skip("resnet_fused._C is not built")
    x = (torch.randn(8, 20, 9, 7, generator=gen) * 0.1 + 100).to(dtype).cuda()
    mean, var = rf.batch_stats(x, backend="cuda")
    rmean, rvar = rf.reference.batch_stats(x)
    torch.testing.assert_close(mean, rmean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var, rvar, rtol=1e-4, atol=0)
