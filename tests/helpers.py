"""Shared test utilities (imported by the test modules; pytest puts tests/ on sys.path)."""
from __future__ import annotations

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN anywhere fails)."""
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def randomize_bn(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics.

    Default BN state (weight 1, bias 0, mean 0, var 1) hides bugs that swap or drop terms;
    a nonzero bias in particular is what makes relu(shift) differ from zero at padded positions.
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
