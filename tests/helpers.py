"""Shared test utilities (imported by the test modules; pytest puts tests/ on sys.path)."""
from __future__ import annotations

import os

import pytest
import torch

from resnet_fused.triton.configs import BackwardConfig, StatsConfig
from resnet_fused.triton.conv import ConvConfig

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


# ---- Tolerances: one rule, one table ------------------------------------------------------
#
# The fused result's error against a float64 reference may be at most 2x the error eager
# PyTorch makes in the same dtype, plus a floor of two units of roundoff of the storage dtype.
# The floor covers rounding the fused kernels do in a different place than eager (the residual
# added to the fp32 accumulator before the one final rounding, where eager rounds the conv
# output first; statistics taken in fp32 tiles instead of one reduction), each at most about
# one ulp in relative norm; it matters only where eager itself happens to be nearly exact.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24,
                 torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def tolerance(dtype: torch.dtype, eager_err: float) -> float:
    return 2.0 * eager_err + 2.0 * UNIT_ROUNDOFF[dtype]


def assert_parity(fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
                  what: str = "") -> None:
    """The 2x-eager rule: rel_err(fused, exact) <= 2 rel_err(eager, exact) + floor(dtype)."""
    assert fused.shape == exact.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(exact.shape)}"
    err, eager_err = rel_err(fused, exact), rel_err(eager, exact)
    bound = tolerance(dtype, eager_err)
    assert err <= bound, f"{what}: fused error {err:.3e} > bound {bound:.3e} (eager {eager_err:.3e}, {dtype})"


# ---- Running the Triton path: device, skip rule, forced small tiles ------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: Triton kernels run on a GPU, or on the CPU under the interpreter (set by conftest.py).
requires_triton = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or TRITON_INTERPRET=1 (set by conftest.py on a machine without a GPU)")

# Small tiles, so that multi-tile M/N/K, partial tiles and cross-tile statistics merges all run at
# the tests' tiny shapes (16 is tl.dot's smallest dimension).
SMALL_CONV = ConvConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)
SMALL_STATS = StatsConfig(block_m=16, block_c=16, block_p=2)
SMALL_BACKWARD = BackwardConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)
