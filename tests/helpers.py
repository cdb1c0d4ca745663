"""Shared test utilities (imported by the test modules; pytest puts tests/ on sys.path)."""
from __future__ import annotations

import copy
import os
from typing import Callable

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
                  what: str = "", eager_spread: float = 0.0) -> None:
    """The 2x-eager rule: rel_err(fused, exact) <= 2 max(rel_err(eager, exact), eager_spread)
    + floor(dtype); ``eager_spread`` from :func:`eager_error_spread` where one eager sample is
    not a fair measure of eager's accuracy."""
    assert fused.shape == exact.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(exact.shape)}"
    err, eager_err = rel_err(fused, exact), rel_err(eager, exact)
    bound = tolerance(dtype, max(eager_err, eager_spread))
    assert err <= bound, (f"{what}: fused error {err:.3e} > bound {bound:.3e} (eager {eager_err:.3e}, "
                          f"eager over perturbed inputs up to {eager_spread:.3e}, {dtype})")


# Some block gradients are ill-conditioned by construction: in train mode a BN's backward output
# sums to zero per channel, so the dbeta of the norm before that conv (a sum of the masked dgrad)
# is the small remainder of a zero sum, and a ReLU mask recomputed next to zero can flip. One
# 16-bit rounding placed differently by two correct implementations then moves such a gradient
# by far more than an ulp, and whether eager or the fused kernels lands closer on one input is
# chance (measured over 6 rounding-noise copies of one such problem: fused and eager errors
# spread alike, 0.06-0.13 relative, while single runs differed up to 40x). One eager run is then a noisy
# estimate of eager's accuracy on the problem. The fair estimate: eager's error over a few
# copies of the same problem whose inputs and parameters differ by rounding noise (a relative
# N(0, u) perturbation, u the dtype's unit roundoff, rounded back to the dtype), and the 2x rule
# against the largest. Where the problem is well conditioned that spread is eager's own error
# and nothing changes.
def eager_error_spread(grads_of: Callable, eager: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype,
                       gen: torch.Generator, exact: dict, samples: int = 6) -> dict:
    """Per gradient, the largest rel_err against ``exact`` of ``grads_of(module, x)`` over
    ``samples`` rounding-noise perturbations of the eager module and input (all in ``dtype``)."""
    spread = {k: 0.0 for k in exact}
    if dtype == torch.float64:
        return spread
    u = UNIT_ROUNDOFF[dtype]

    def perturbed(t: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device)
        return (t.double() * (1 + u * noise)).to(t.dtype)

    for _ in range(samples):
        twin = copy.deepcopy(eager)
        with torch.no_grad():
            for p in twin.parameters():
                p.copy_(perturbed(p))
        got = grads_of(twin, perturbed(x))
        spread = {k: max(spread[k], rel_err(got[k], exact[k])) for k in exact}
    return spread


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
