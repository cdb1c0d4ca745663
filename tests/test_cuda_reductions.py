"""The C++ per-channel reductions (csrc/cuda/bn_reduce.cu): the BatchNorm finalize with its
running update, and the BN-backward coefficients, through their launchers.

On a CPU-only machine the ops run the host emulation of the same block phases (lane merges, the
fixed tree, the finish phase) over the same grid, so these tests check the chunking, the merge
order and the per-channel formulas of the device code. References are float64 reductions of the
same partials; the bound is the statistics' rule of the conv kernel tests (max |out - ref| /
max |ref|: fp32 accumulation 2e-5, fp64 1e-10).

Shapes are small (the emulator is slow) but cover several chunks per channel, a ragged last
chunk and ragged channel tiles; the grid at ResNet-50's batch-256 shapes is checked without a
launch.
"""
from __future__ import annotations

import pytest
import torch

from cuda_kernel_helpers import REQUIRE_C, _rel_err
from resnet_fused import _extension
from resnet_fused.kernel_set import BNBackward

# Error bound per accumulation dtype (max |out - ref| / max |ref|).
TOL = {torch.float32: 2e-5, torch.float64: 1e-10}
# (P, C): one chunk and one channel tile; several chunks with a ragged last one and two channel
# tiles (C = 37); many chunks of one channel.
SHAPES = [(5, 3), (300, 37), (1000, 1)]


@pytest.fixture(scope="module")
def kernels():
    if not _extension.is_available():
        message = f"resnet_fused._C is not available: {_extension.unavailable_reason()}"
        if REQUIRE_C:
            pytest.fail(f"RESNET_FUSED_REQUIRE_C=1 but {message}")
        pytest.skip(message)
    from resnet_fused.cuda import kernels as module

    return module


def _stats_partials(gen, p, c, dtype, empty_tiles=True):
    """[3, P, C] (count, mean, M2) as tiles of real data: counts 1..64 (some 0), mean 3 +- 2."""
    count = torch.randint(1, 65, (p, c), generator=gen).to(torch.float64)
    if empty_tiles and p > 2:
        count[1] = 0
    mean = torch.randn(p, c, generator=gen, dtype=torch.float64) * 2 + 3
    m2 = torch.rand(p, c, generator=gen, dtype=torch.float64) * count * 4
    mean = torch.where(count > 0, mean, 0.0)
    m2 = torch.where(count > 0, m2, 0.0)
    return torch.stack([count, mean, m2]).to(dtype)


def _merge64(part):
    count, mean, m2 = part.double().unbind(0)
    n = count.sum(0)
    mu = (count * mean).sum(0) / n.clamp(min=1)
    big_m2 = m2.sum(0) + (count * (mean - mu).square()).sum(0)
    return n, mu, big_m2


def _affine(gen, c):
    return torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)


def _finalize_ref(part, weight, bias, eps):
    n, mean, m2 = _merge64(part)
    var = m2 / n.clamp(min=1)
    invstd = (var + eps).rsqrt()
    scale = invstd * (weight.double() if weight is not None else 1.0)
    shift = -mean * scale + (bias.double() if bias is not None else 0.0)
    return torch.stack([mean, var, invstd, scale, shift]), n, m2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"P{s[0]}_C{s[1]}")
@pytest.mark.parametrize("affine", [True, False])
def test_finalize_matches_float64(kernels, shape, dtype, affine, gen):
    p, c = shape
    part = _stats_partials(gen, p, c, dtype)
    weight, bias = _affine(gen, c) if affine else (None, None)
    out = kernels.finalize_stats(part, weight, bias, 1e-5)
    ref, _, _ = _finalize_ref(part, weight, bias, 1e-5)
    assert out.shape == (5, c) and out.dtype == dtype
    for i, name in enumerate(["mean", "var", "invstd", "scale", "shift"]):
        assert _rel_err(out[i], ref[i]) <= TOL[dtype], (name, _rel_err(out[i], ref[i]))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentum_None"])
@pytest.mark.parametrize("part_dtype, buffer_dtype", [
    (torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float32, torch.float64),
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16)], ids=str)
def test_running_update(kernels, part_dtype, buffer_dtype, momentum, gen):
    p, c = 300, 37
    part = _stats_partials(gen, p, c, part_dtype)
    weight, bias = _affine(gen, c)
    rm0 = torch.randn(c, generator=gen, dtype=torch.float64)
    rv0 = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    rm, rv = rm0.to(buffer_dtype, copy=True), rv0.to(buffer_dtype, copy=True)
    nbt = torch.tensor(6, dtype=torch.long)
    out = kernels.finalize_stats(part, weight, bias, 1e-5, running_mean=rm, running_var=rv,
                                 num_batches_tracked=nbt, momentum=momentum, update=True, count=None)
    ref, n, m2 = _finalize_ref(part, weight, bias, 1e-5)
    assert _rel_err(out[0], ref[0]) <= TOL[part_dtype]
    assert int(nbt) == 7
    factor = 1.0 / 7 if momentum is None else momentum
    ref_rm = (1 - factor) * rm0.to(buffer_dtype).double() + factor * ref[0]
    ref_rv = (1 - factor) * rv0.to(buffer_dtype).double() + factor * m2 / (n - 1)
    # fp64 buffers with fp64 statistics: the update runs in fp64, momentum included (an fp32
    # momentum would be off by float32(0.1)'s rounding, 1.5e-8 relative).
    tol = {torch.float64: 1e-13 if part_dtype == torch.float64 else TOL[part_dtype],
           torch.float32: TOL[torch.float32], torch.bfloat16: 8e-3, torch.float16: 1e-3}[buffer_dtype]
    assert rm.dtype == buffer_dtype and rv.dtype == buffer_dtype
    assert _rel_err(rm, ref_rm) <= tol, _rel_err(rm, ref_rm)
    assert _rel_err(rv, ref_rv) <= tol, _rel_err(rv, ref_rv)


def test_empty_batch_moves_nothing_and_counts(kernels, gen):
    c = 37
    rm, rv = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    nbt = torch.tensor(3, dtype=torch.long)
    for momentum in (0.1, None):
        out = kernels.finalize_stats(torch.empty(3, 0, c), None, None, 1e-5, running_mean=rm, running_var=rv,
                                     num_batches_tracked=nbt, momentum=momentum, update=True)
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
        assert torch.isfinite(out).all()
    assert int(nbt) == 5
    # All-empty tiles: the same.
    part = torch.zeros(3, 40, c)
    kernels.finalize_stats(part, None, None, 1e-5, running_mean=rm, running_var=rv, num_batches_tracked=nbt,
                           update=True)
    assert torch.equal(rm, rm0) and int(nbt) == 6


def test_no_update_touches_nothing(kernels, gen):
    part = _stats_partials(gen, 300, 37, torch.float32)
    rm, rv, nbt = torch.randn(37, generator=gen), torch.rand(37, generator=gen), torch.tensor(2)
    rm0, rv0 = rm.clone(), rv.clone()
    kernels.finalize_stats(part, None, None, 1e-5, running_mean=rm, running_var=rv, num_batches_tracked=nbt,
                           update=False)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0) and int(nbt) == 2


def test_cumulative_needs_the_counter(kernels, gen):
    part = _stats_partials(gen, 5, 3, torch.float32)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        kernels.finalize_stats(part, None, None, 1e-5, running_mean=torch.zeros(3), running_var=torch.ones(3),
                               momentum=None, update=True)


@pytest.mark.parametrize("buffer_dtype, dtype, expected", [
    (torch.float32, None, torch.float32), (torch.float64, None, torch.float64),
    (torch.float16, None, torch.float32), (torch.float64, torch.float32, torch.float32)], ids=str)
def test_finalize_from_running(kernels, buffer_dtype, dtype, expected, gen):
    c = 37
    rm = torch.randn(c, generator=gen, dtype=torch.float64).to(buffer_dtype)
    rv = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(buffer_dtype)
    weight, bias = _affine(gen, c)
    out = kernels.finalize_stats(None, weight, bias, 1e-5, running_mean=rm, running_var=rv, from_running=True,
                                 dtype=dtype)
    assert out.dtype == expected
    mean, var = rm.to(expected).double(), rv.to(expected).double()
    invstd = (var + 1e-5).rsqrt()
    scale = invstd * weight.double()
    ref = torch.stack([mean, var, invstd, scale, bias.double() - mean * scale])
    assert _rel_err(out, ref) <= TOL[expected]


def test_finalize_is_bitwise_reproducible(kernels, gen):
    part = _stats_partials(gen, 1000, 37, torch.float32)
    weight, bias = _affine(gen, 37)
    runs = []
    for _ in range(2):
        rm, rv, nbt = torch.zeros(37), torch.ones(37), torch.tensor(0)
        out = kernels.finalize_stats(part, weight, bias, 1e-5, running_mean=rm, running_var=rv,
                                     num_batches_tracked=nbt, momentum=None, update=True)
        runs.append((out, rm, rv))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _sums_partials(gen, p, c, dtype):
    return (torch.randn(2, p, c, generator=gen, dtype=torch.float64) * 3).to(dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"P{s[0]}_C{s[1]}")
@pytest.mark.parametrize("has_weight", [True, False])
def test_bn_backward_coefficients_match_float64(kernels, shape, dtype, training, has_weight, gen):
    p, c = shape
    part = _sums_partials(gen, p, c, dtype)
    weight = torch.rand(c, generator=gen) + 0.5 if has_weight else None
    mean = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    invstd = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    count = 64 * p
    coeff = kernels.bn_backward_coefficients(part, weight, mean, invstd, count, training)
    assert isinstance(coeff, BNBackward)
    dbeta, dgamma = part.double()[0].sum(0), part.double()[1].sum(0)
    a = invstd.double() * (weight.double() if has_weight else 1.0)
    if training:
        b = -a * invstd.double() * dgamma / count
        cc = -a * dbeta / count - b * mean.double()
    else:
        b, cc = torch.zeros_like(a), torch.zeros_like(a)
    for name, out, ref in [("dgamma", coeff.dgamma, dgamma), ("dbeta", coeff.dbeta, dbeta), ("a", coeff.a, a),
                           ("b", coeff.b, b), ("c", coeff.c, cc)]:
        assert out.dtype == dtype and out.shape == (c,)
        if not training and name in ("b", "c"):
            assert torch.equal(out, torch.zeros_like(out)), name
        else:
            assert _rel_err(out, ref) <= TOL[dtype], (name, _rel_err(out, ref))
    # Gradients are returned as separate tensors, never views of one buffer.
    ptrs = {t.untyped_storage().data_ptr() for t in (coeff.dgamma, coeff.dbeta, coeff.a, coeff.b, coeff.c)}
    assert len(ptrs) == 5


def test_bn_backward_coefficients_reproducible_and_empty(kernels, gen):
    part = _sums_partials(gen, 1000, 37, torch.float32)
    mean, invstd = torch.randn(37, generator=gen), torch.rand(37, generator=gen) + 0.5
    one = kernels.bn_backward_coefficients(part, None, mean, invstd, 64000, True)
    two = kernels.bn_backward_coefficients(part, None, mean, invstd, 64000, True)
    for name in ("dgamma", "dbeta", "a", "b", "c"):
        assert torch.equal(getattr(one, name), getattr(two, name)), name
    empty = kernels.bn_backward_coefficients(torch.empty(2, 0, 37), None, mean, invstd, 0, False)
    assert torch.equal(empty.dgamma, torch.zeros(37)) and torch.equal(empty.dbeta, torch.zeros(37))


# ResNet-50 at batch 256: (P, C) of every finalize and coefficient reduction. 1x1 partials have
# ceil(M / 64) rows, a 3x3's forward one per 8x8 output block of one image, dgrad/elementwise
# sums ceil(M / 64); plus the (P, C) pairs 6272 / 12544 x 64..2048.
def _resnet50_shapes():
    shapes = set()
    for c_mid, hw, c_out in [(64, 56, 256), (128, 28, 512), (256, 14, 1024), (512, 7, 2048)]:
        m = 256 * hw * hw
        tiles_1x1 = -(-m // 64)
        tiles_3x3 = 256 * (-(-hw // 8)) ** 2
        for c in (c_mid, c_out, c_out // 2 if c_out > 256 else 64):
            shapes.add((tiles_1x1, c))
        shapes.add((tiles_3x3, c_mid))
    shapes.add((-(-256 * 112 * 112 // 64), 64))  # the stem's norm
    for p in (6272, 12544):
        for c in (64, 128, 256, 512, 1024, 2048):
            shapes.add((p, c))
    return sorted(shapes)


@pytest.mark.parametrize("shape", _resnet50_shapes(), ids=lambda s: f"P{s[0]}_C{s[1]}")
def test_reduction_grid_fills_an_h200(kernels, shape):
    p, c = shape
    tiles, chunks, size = _extension.bn_reduce_grid(p, c)
    assert tiles == -(-c // 32)
    assert tiles * chunks >= 132, (tiles, chunks)
    assert chunks <= 65535
    # The chunks cover the partials exactly once, none empty.
    assert (chunks - 1) * size < p <= chunks * size


def test_reduction_grid_small_and_empty(kernels):
    assert _extension.bn_reduce_grid(5, 3) == (1, 1, 16)
    assert _extension.bn_reduce_grid(0, 3) == (1, 1, 16)
    # Several chunks (a ragged last one) and two channel tiles: what the emulated tests run.
    assert _extension.bn_reduce_grid(300, 37) == (2, 19, 16)
    assert _extension.bn_reduce_grid(1000, 1) == (1, 63, 16)
    with pytest.raises(RuntimeError, match="P and C must be >= 0"):
        _extension.bn_reduce_grid(-1, 3)


def test_kernel_set_routes_through_the_cpp_ops(kernels, gen):
    from resnet_fused.cuda.kernel_set import CUDA

    part = _stats_partials(gen, 5, 3, torch.float32)
    kernels.reset_launch_counts()
    out = CUDA.finalize_stats(part, None, None, 1e-5)
    mean, var, scale, shift = CUDA.finalize(part, None, None, 1e-5)
    coeff = CUDA.bn_backward_coefficients(_sums_partials(gen, 5, 3, torch.float32), None, mean, out[2], 320, True)
    assert kernels.launch_counts() == {"bn_finalize_cuda": 2, "bn_backward_coefficients_cuda": 1}
    assert torch.equal(out[0], mean) and torch.equal(out[3], scale) and coeff.a.shape == (3,)


# --- registration, fakes, opcheck, input checks ----------------------------------------------

SCHEMAS = {
    "bn_finalize_cuda": "resnet_fused::bn_finalize_cuda(Tensor? part, Tensor? weight, Tensor? bias, "
                        "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
                        "float eps, float? momentum, bool update, bool from_running, ScalarType? dtype=None) "
                        "-> Tensor",
    "bn_backward_coefficients_cuda": "resnet_fused::bn_backward_coefficients_cuda(Tensor part, Tensor? weight, "
                                     "Tensor mean, Tensor invstd, float count, bool training) -> (Tensor dgamma, "
                                     "Tensor dbeta, Tensor a, Tensor b, Tensor c)",
}


def _op_args(gen):
    part = _stats_partials(gen, 40, 5, torch.float32)
    weight, bias = _affine(gen, 5)
    rm, rv, nbt = torch.randn(5, generator=gen), torch.rand(5, generator=gen) + 0.5, torch.tensor(4)
    return {
        "bn_finalize_cuda": [(part, weight, bias, rm, rv, nbt, 1e-5, 0.1, True, False, None),
                             (part, None, None, rm, rv, nbt, 1e-5, None, True, False, None),
                             (None, weight, bias, rm, rv, None, 1e-5, 0.1, False, True, torch.float64)],
        "bn_backward_coefficients_cuda": [(_sums_partials(gen, 40, 5, torch.float32), weight, rm, rv, 2560.0, True)],
    }


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_op_registered_with_cpu_and_cuda_kernels(kernels, name):
    op = getattr(torch.ops.resnet_fused, name)
    assert str(op.default._schema) == SCHEMAS[name]
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fused::{name}", key), key


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_opcheck(kernels, name, gen):
    for args in _op_args(gen)[name]:
        torch.library.opcheck(getattr(torch.ops.resnet_fused, name), args)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_fake_impl_matches_real(kernels, name, gen):
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = getattr(torch.ops.resnet_fused, name)
    for args in _op_args(gen)[name]:
        real = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        real = real if isinstance(real, tuple) else (real,)
        fake = fake if isinstance(fake, tuple) else (fake,)
        for r, f in zip(real, fake):
            assert r.shape == f.shape and r.dtype == f.dtype and r.stride() == f.stride()


def _bad_calls(gen):
    ops = torch.ops.resnet_fused
    part = _stats_partials(gen, 5, 3, torch.float32)
    z, o = torch.zeros(3), torch.ones(3)
    return {
        "part_2d": (lambda: ops.bn_finalize_cuda(part[0], None, None, None, None, None, 1e-5, 0.1, False, False),
                    r"part must be \[3, P, C\]"),
        "part_int": (lambda: ops.bn_finalize_cuda(part.long(), None, None, None, None, None, 1e-5, 0.1, False, False),
                     "float32 or float64"),
        "no_part": (lambda: ops.bn_finalize_cuda(None, o, None, None, None, None, 1e-5, 0.1, False, False),
                    "part .* is required unless from_running"),
        "weight_len": (lambda: ops.bn_finalize_cuda(part, torch.ones(4), None, None, None, None, 1e-5, 0.1, False,
                                                    False), "weight must be a 1-D tensor of 3"),
        "update_no_buffers": (lambda: ops.bn_finalize_cuda(part, None, None, None, None, None, 1e-5, 0.1, True,
                                                           False), "update=True needs running_mean"),
        "one_buffer": (lambda: ops.bn_finalize_cuda(part, None, None, z, None, None, 1e-5, 0.1, True, False),
                       "both running_mean and running_var"),
        "cumulative_no_counter": (lambda: ops.bn_finalize_cuda(part, None, None, z, o, None, 1e-5, None, True,
                                                               False), "momentum=None .* needs num_batches_tracked"),
        "counter_dtype": (lambda: ops.bn_finalize_cuda(part, None, None, z, o, torch.tensor(1.0), 1e-5, 0.1, True,
                                                       False), "num_batches_tracked must be an int64"),
        "buffer_strided": (lambda: ops.bn_finalize_cuda(part, None, None, torch.zeros(6)[::2], o, None, 1e-5, 0.1,
                                                        True, False), "must be contiguous"),
        "running_and_update": (lambda: ops.bn_finalize_cuda(None, None, None, z, o, None, 1e-5, 0.1, True, True),
                               "cannot be combined with from_running"),
        "coef_planes": (lambda: ops.bn_backward_coefficients_cuda(part, None, z, o, 10.0, True),
                        r"part must be \[2, P, C\]"),
        "coef_mean_len": (lambda: ops.bn_backward_coefficients_cuda(part[:2], None, torch.zeros(4), o, 10.0, True),
                          "mean must be a 1-D tensor of 3"),
    }


@pytest.mark.parametrize("name", ["part_2d", "part_int", "no_part", "weight_len", "update_no_buffers", "one_buffer",
                                  "cumulative_no_counter", "counter_dtype", "buffer_strided", "running_and_update",
                                  "coef_planes", "coef_mean_len"])
def test_bad_input_raises_clear_error(kernels, name, gen):
    call, message = _bad_calls(gen)[name]
    with pytest.raises(RuntimeError, match=message):
        call()
