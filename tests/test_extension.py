"""The compiled extension resnet_fused._C (csrc/): loading, op registration, and bn_stats.

On a CPU-only machine these tests run the host implementation of bn_stats, which follows the
same chunking plan and the same fixed merge order as the CUDA kernels (csrc/cuda/bn_stats.cu),
so the Welford/Chan math the GPU runs is checked here too. The CUDA kernels themselves are
tested at the end when a GPU is present.

RESNET_FUSED_REQUIRE_C=1 (set by `make test` where a CUDA toolkit exists) turns "not built"
from a skip into a failure, so CI proves the extension builds.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from resnet_fused import _extension

REQUIRE_C = os.environ.get("RESNET_FUSED_REQUIRE_C") == "1"
SCHEMA = "resnet_fused::bn_stats_cuda(Tensor x) -> (Tensor mean, Tensor var)"

# Error bounds against a float64 reference computed from the same input values (so input
# rounding is not error). Outputs are fp32: a half-ulp rounding, ~6e-8 relative, on each.
# Mean: |error| <= MEAN_TOL * (|mean| + std); measured <= 1e-7.
# Variance: Welford holds the running mean in fp32, and the rounding of each update (half an
# ulp of |mean|) leaks into the squared deviations, so the relative error of var grows like
# eps * (|mean| / std) / sqrt(rows) times a small constant, plus a few eps from the merges.
# Ordinary inputs (|mean| <~ std): measured <= 2.3e-7, bound VAR_RTOL. |mean|/std = 1e3 with
# 16384 rows: measured <= 4e-6, bound LARGE_MEAN_VAR_RTOL, while the naive fp32
# E[x^2] - E[x]^2 is off by 0.4 to 8 (relative) on the same data.
MEAN_TOL = 1e-6
VAR_RTOL = 2e-6
LARGE_MEAN_VAR_RTOL = 2e-5


@pytest.fixture(scope="module")
def bn_stats():
    """The op, or a skip (a failure under RESNET_FUSED_REQUIRE_C=1) without the extension."""
    if not _extension.is_available():
        message = f"resnet_fused._C is not available: {_extension.unavailable_reason()}"
        if REQUIRE_C:
            pytest.fail(f"RESNET_FUSED_REQUIRE_C=1 but {message}")
        pytest.skip(message)
    return torch.ops.resnet_fused.bn_stats_cuda


def _needs_gpu() -> None:
    # Checked inside the tests, not at collection: collecting must not touch CUDA.
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    return mean, var


def _assert_stats_close(mean, var, x, mean_tol=MEAN_TOL, var_rtol=VAR_RTOL):
    ref_mean, ref_var = _reference(x.cpu())
    mean, var = mean.cpu().double(), var.cpu().double()
    mean_err = ((mean - ref_mean).abs() / (ref_mean.abs() + ref_var.sqrt())).max().item()
    var_err = ((var - ref_var).abs() / ref_var).max().item()
    assert mean_err <= mean_tol, f"mean error {mean_err:.3g} > {mean_tol:.3g}"
    assert var_err <= var_rtol, f"var relative error {var_err:.3g} > {var_rtol:.3g}"


def _random_input(shape, dtype, memory_format, gen, mean=0.5, std=2.0, device="cpu"):
    # Per-channel offsets so a channel mix-up cannot pass.
    n, c, h, w = shape
    offsets = torch.linspace(-1.0, 1.0, c, dtype=torch.float64).view(1, c, 1, 1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean + offsets
    return x.to(dtype).contiguous(memory_format=memory_format).to(device)


# --- (a) loading --------------------------------------------------------------------------

def test_extension_loads_when_required():
    if _extension.is_available():
        assert _extension.unavailable_reason() is None
        assert _extension.require("test") is _extension.load()
        return
    reason = _extension.unavailable_reason()
    assert reason, "a failed load must record why"
    if REQUIRE_C:
        pytest.fail(f"RESNET_FUSED_REQUIRE_C=1 but resnet_fused._C is not available: {reason}")
    with pytest.raises(RuntimeError, match="no-build-isolation"):
        _extension.require("test feature")
    pytest.skip(f"resnet_fused._C is not available: {reason}")


def test_package_import_does_not_load_extension():
    # A fresh interpreter: importing the package must not dlopen _C (nor touch CUDA).
    code = ("import sys, resnet_fused; "
            "assert 'resnet_fused._C' not in sys.modules, 'package import loaded _C'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- (b) registration ---------------------------------------------------------------------

def test_op_schema_and_kernels(bn_stats):
    assert str(bn_stats.default._schema) == SCHEMA
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fused::bn_stats_cuda", key), key


def test_every_cpp_op_has_cpu_and_cuda_kernels_and_a_fake(bn_stats):
    # CPP_OPS lists what csrc/bindings.cpp defines; each needs both dispatch keys (the CPU one is
    # the host implementation CI tests) and a fake impl (meta tensors, torch.compile).
    from torch._library.simple_registry import singleton

    for name in _extension.CPP_OPS:
        qualname = f"resnet_fused::{name}"
        assert hasattr(torch.ops.resnet_fused, name), name
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key), (name, key)
        assert singleton.find(qualname).fake_impl.kernel is not None, f"{name} has no fake impl"


def test_emulator_and_test_fault_ops_are_registered(bn_stats):
    # The WMMA shim's counter op (no tensors: one kernel for every backend) and the test-only
    # fault op, which has a CPU kernel and no CUDA one: it never runs on a device.
    counts = torch.ops.resnet_fused.wmma_host_counts_cuda()
    assert isinstance(counts, list) and len(counts) == 4 and all(isinstance(c, int) and c >= 0 for c in counts)
    assert _extension.wmma_host_counts() == dict(
        zip(("mma_sync", "load_matrix_sync", "store_matrix_sync", "fill_fragment"), counts))
    for name in _extension.TEST_FAULT_OPS:
        qualname = f"resnet_fused::{name}"
        assert name.startswith("_test_fault_"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU"), name
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"), name
        assert name not in _extension.CPP_OPS


def test_python_ops_share_the_namespace(bn_stats):
    # The C++ side registers with TORCH_LIBRARY_FRAGMENT, so Python custom_ops can be added to
    # the same namespace (a second TORCH_LIBRARY would abort the process). Run in a subprocess
    # so the probe op does not leak into this one.
    code = """
import torch
from resnet_fused import _extension
assert _extension.load() is not None, _extension.unavailable_reason()

@torch.library.custom_op("resnet_fused::_namespace_probe", mutates_args=())
def probe(x: torch.Tensor) -> torch.Tensor:
    return x + 1

assert torch.equal(torch.ops.resnet_fused._namespace_probe(torch.zeros(2)), torch.ones(2))
assert hasattr(torch.ops.resnet_fused, "bn_stats_cuda")
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- (c) host implementation against a float64 reference ----------------------------------

SHAPES = [
    (1, 3, 7, 7),      # N = 1
    (2, 20, 5, 9),     # C = 20, odd H x W
    (3, 5, 1, 1),      # HW = 1: rows are batch items only
    (4, 3, 48, 48),    # NCHW: 2 row chunks (8192 rows each); channels_last: 36 chunks
    (5, 37, 6, 7),     # channels_last: a partial 32-channel tile
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
def test_cpu_matches_float64_reference(bn_stats, shape, dtype, memory_format, gen):
    x = _random_input(shape, dtype, memory_format, gen)
    mean, var = bn_stats(x)
    assert mean.shape == var.shape == (shape[1],)
    assert mean.dtype == var.dtype == torch.float32
    _assert_stats_close(mean, var, x)


def test_cpu_large_mean_beats_naive_sum_of_squares(bn_stats, gen):
    # mean 1000, std 1: E[x^2] - E[x]^2 subtracts two numbers near 1e6 to get ~1, so fp32
    # sum/sum-of-squares loses almost every digit; Welford/Chan keeps ~eps relative error.
    np = pytest.importorskip("numpy")
    shape = (16, 4, 32, 32)  # 16384 rows per channel, 2 NCHW chunks
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = _random_input(shape, torch.float32, memory_format, gen, mean=1000.0, std=1.0)
        mean, var = bn_stats(x)
        _assert_stats_close(mean, var, x, var_rtol=LARGE_MEAN_VAR_RTOL)

        ref_mean, ref_var = _reference(x)
        # The naive formula in fp32, one value at a time (numpy's cumsum accumulates
        # sequentially in the array's dtype).
        rows = x.permute(1, 0, 2, 3).reshape(shape[1], -1).numpy().astype(np.float32)
        count = np.float32(rows.shape[1])
        total = np.cumsum(rows, axis=1, dtype=np.float32)[:, -1]
        total_sq = np.cumsum(rows * rows, axis=1, dtype=np.float32)[:, -1]
        naive_var = torch.from_numpy(total_sq / count - (total / count) ** 2).double()
        naive_err = ((naive_var - ref_var).abs() / ref_var).max().item()
        ours_err = ((var.double() - ref_var).abs() / ref_var).max().item()
        assert naive_err > 0.1, f"the naive formula was unexpectedly accurate ({naive_err:.3g})"
        assert ours_err < naive_err / 1000, (ours_err, naive_err)


# --- (d) determinism ----------------------------------------------------------------------

@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
def test_cpu_bitwise_deterministic(bn_stats, memory_format, gen):
    x = _random_input((4, 6, 48, 48), torch.float32, memory_format, gen)
    first, second = bn_stats(x), bn_stats(x)
    for a, b in zip(first, second):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


# --- (e) fake implementation --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_meta_tensors_use_fake_impl(bn_stats, dtype):
    x = torch.empty(2, 5, 3, 3, dtype=dtype, device="meta")
    mean, var = bn_stats(x)
    for out in (mean, var):
        assert out.device.type == "meta" and out.shape == (5,) and out.dtype == torch.float32


def test_opcheck_on_cpu(bn_stats, gen):
    # Schema, fake impl vs real kernel, dispatch under FakeTensor/AOT tracing.
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = _random_input((2, 3, 5, 4), torch.float32, memory_format, gen)
        torch.library.opcheck(bn_stats, (x,))


# --- (f) input checks ---------------------------------------------------------------------

def _bad_inputs(gen):
    x = torch.randn(2, 3, 8, 8, generator=gen)
    return [
        (torch.randn(2, 3, 8, generator=gen), "must be 4-D"),
        (torch.randint(0, 5, (2, 3, 4, 4), generator=gen, dtype=torch.int32), "float32, float16, bfloat16 or float64"),
        (x[:, :, ::2], r"NCHW-contiguous or channels_last .* got strides \[192, 64, 16, 1\]"),
        (x.permute(0, 1, 3, 2), "NCHW-contiguous or channels_last"),
        (torch.randn(0, 3, 4, 4, generator=gen), "at least one channel"),
        (torch.randn(2, 0, 4, 4, generator=gen), "at least one channel"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_bad_input_raises_clear_error(bn_stats, case, gen):
    bad, match = _bad_inputs(gen)[case]
    with pytest.raises(RuntimeError, match=match):
        bn_stats(bad)


# --- (g) the CUDA kernels -----------------------------------------------------------------

GPU_SHAPES = [(1, 3, 7, 7), (2, 20, 5, 9), (3, 5, 1, 1), (5, 37, 6, 7), (32, 64, 28, 28), (8, 256, 14, 14)]


@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
def test_cuda_matches_reference_and_is_deterministic(bn_stats, shape, dtype, memory_format, gen):
    _needs_gpu()
    x = _random_input(shape, dtype, memory_format, gen, device="cuda")
    mean, var = bn_stats(x)
    assert mean.device == x.device and mean.dtype == var.dtype == torch.float32
    _assert_stats_close(mean, var, x)
    # Same plan and merge order as the host implementation: they agree to a few ulps
    # (not bitwise: the GPU contracts multiply-adds into FMAs).
    cpu_mean, cpu_var = bn_stats(x.cpu())
    torch.testing.assert_close(mean.cpu(), cpu_mean, rtol=1e-6, atol=1e-6 * cpu_var.sqrt().max().item())
    torch.testing.assert_close(var.cpu(), cpu_var, rtol=1e-5, atol=0)
    # Bitwise run to run, also on another stream (the op launches on the current stream).
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        again = bn_stats(x)
    stream.synchronize()
    for a, b in zip((mean, var), again):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_cuda_large_mean(bn_stats, gen):
    _needs_gpu()
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = _random_input((64, 32, 28, 28), torch.float32, memory_format, gen, mean=1000.0, std=1.0,
                          device="cuda")
        mean, var = bn_stats(x)
        _assert_stats_close(mean, var, x, var_rtol=LARGE_MEAN_VAR_RTOL)
