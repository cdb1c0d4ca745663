"""Shared test utilities (imported by the test modules; pytest puts tests/ on sys.path)."""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Callable, Optional

import pytest
import torch

from resnet_fused.parity import MAX_SPREAD_FACTOR, UNIT_ROUNDOFF, rel_err, tolerance  # noqa: F401 (the rule)
from resnet_fused.triton.configs import BackwardConfig, StatsConfig
from resnet_fused.triton.conv import ConvConfig

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
# The rule: the fused result's error against a float64 reference may be at most 2x the error
# eager PyTorch makes in the same dtype, plus a floor of two units of roundoff of the storage dtype.
# The floor covers rounding the fused kernels do in a different place than eager (the residual
# added to the fp32 accumulator before the one final rounding, where eager rounds the conv
# output first; statistics taken in fp32 tiles instead of one reduction), each at most about
# one ulp in relative norm; it matters only where eager itself happens to be nearly exact.
#
# The ceiling: no bound exceeds 8x eager's own error on the same problem plus the floor. An
# ``eager_spread`` (eager's error over rounding-noise copies, below) can widen the 2x rule where
# one eager sample is a noisy measure, but it is capped at 4x eager's error, so a bound never
# widens with noise past 2 * 4 * eager_err + 2u. The 16-bit gradient checks pass no spread at
# all: they run well-conditioned problems (tests/block_cases.py: condition_bn, stored_as),
# where the plain 2x rule holds; tests/test_mutations.py proves that those bounds are tight
# enough to catch a 1.05x weight gradient, a dropped 3x3 tap, a wrong ReLU mask on one channel,
# a statistics count off by one and a shortcut gradient added twice, case by case.
#
# TF32 (GPU only; on the CPU the Triton interpreter and the CUDA host emulator compute in full
# fp32): the Triton kernels pick TF32 dots for fp32 whenever torch.backends.cudnn.allow_tf32
# says so, and eager's cuDNN convolutions follow the same flag. Both would then round their
# operands to 10-bit mantissas, differently, and the 2x rule would compare two TF32 roundings.
# fp32 parity on a GPU therefore runs with TF32 off in both implementations: importing this
# module turns both flags off for the test process (every parity test imports it), and
# ``assert_parity`` refuses an fp32 comparison of CUDA tensors made while either flag allows
# TF32, so a test that turns TF32 on must do its comparisons under ``tf32_off()``.

#: When a list, every ``assert_parity`` call appends (what, dtype, fused err, eager err, bound):
#: how the suite's worst fused/eager ratio is measured (scripts outside pytest set it).
PARITY_LOG: Optional[list] = None



def tf32_allowed() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


@contextlib.contextmanager
def tf32_off():
    """TF32 off for cuDNN and cuBLAS (eager) and therefore for the Triton dots, whose
    ``dot_precision`` follows cuDNN's flag; restored on exit."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# fp32 parity with full-fp32 dots in both implementations (see above); a no-op on the CPU.
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def assert_parity(fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
                  what: str = "", eager_spread: float = 0.0, scale: float = 0.0) -> None:
    """The 2x-eager rule: rel_err(fused, exact) <= 2 max(rel_err(eager, exact), spread) + 2u,
    spread = min(``eager_spread``, 4 rel_err(eager, exact)) (from :func:`eager_error_spread`
    where one eager sample is not a fair measure of eager's accuracy), so the bound never
    exceeds 8x eager's error + 2u. Both errors are relative to max(||exact||, ``scale``) (see
    :func:`rel_err`). An fp32 comparison on a GPU requires TF32 off."""
    assert fused.shape == exact.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(exact.shape)}"
    if dtype == torch.float32 and fused.is_cuda:
        assert not tf32_allowed(), f"{what}: fp32 parity on a GPU with TF32 allowed (run it under tf32_off())"
    err, eager_err = rel_err(fused, exact, scale), rel_err(eager, exact, scale)
    spread = min(eager_spread, MAX_SPREAD_FACTOR * eager_err)
    bound = tolerance(dtype, max(eager_err, spread))
    if PARITY_LOG is not None:
        PARITY_LOG.append((what, dtype, err, eager_err, bound))
    assert err <= bound, (f"{what}: fused error {err:.3e} > bound {bound:.3e} (eager {eager_err:.3e}, "
                          f"eager over perturbed inputs up to {eager_spread:.3e}, {dtype})")


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
