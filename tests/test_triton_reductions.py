"""The per-channel reductions (BN finalize, BN-backward coefficients): split across programs,
merged in a fixed order.

Grids are checked at ResNet-50's batch-256 shapes with plain Python (``stats.split_grid``);
results against a float64 reduction with the 2x-eager rule (``helpers.assert_parity``) and bit
for bit across two runs, on the interpreter at small shapes that take the chunk pass (several
chunks, a short last chunk, ragged channel counts).
"""
from __future__ import annotations

import pytest
import torch

from helpers import assert_parity, requires_cuda, requires_triton
from resnet_fused.triton import configs
from resnet_fused.triton.bn_backward import bn_backward_coefficients
from resnet_fused.triton.launch import launch_counts, reset_launch_counts
from resnet_fused.triton.stats import (SPLIT_MIN_CHUNK, bn_finalize_stats, channel_stats_partials,
                                       split_grid)

H200_SMS = 132
BATCH = 256


def _resnet50_norm_shapes() -> set[tuple[int, int]]:
    """(channels, H = W) of every BatchNorm input of ResNet-50 at 224x224, pre-activation
    (bn1 of the block input, bn2 of y1, bn3 of y2, the final norm) and torchvision's
    post-activation (the stem's norm, bn1..bn3 of y1..y3, the downsample's norm)."""
    shapes = {(64, 112), (2048, 7)}  # the stem's norm; the network's final norm
    c_in, h = 64, 56
    for mid, out, units, stride in ((64, 256, 3, 1), (128, 512, 4, 2), (256, 1024, 6, 2), (512, 2048, 3, 2)):
        for unit in range(units):
            s = stride if unit == 0 else 1
            h_out = h // s
            shapes |= {(c_in, h), (mid, h), (mid, h_out), (out, h_out)}
            c_in, h = out, h_out
    return shapes


def _producer_block_ms() -> set[int]:
    """Every BLOCK_M a producer of partials can tile rows with on a GPU: the conv epilogues
    (every forward config the selector or a tuned table can name), the statistics pass, the
    fused 1x1 dgrad epilogue (every backward config) and the standalone ReLU-mask pass."""
    forward = {c.block_m for _, _, c in configs.all_conv_configs()}
    backward = {c.block_m for _, c in configs.all_backward_configs()}
    return forward | backward | {configs.stats_config(torch.device("cuda")).block_m, 64}


def test_grids_fill_an_h200_at_resnet50_batch_256():
    """Every norm's chunk pass has >= 132 programs at every producer tiling; the largest
    BLOCK_M gives the fewest partials, so the real P is covered whatever config ran."""
    worst = {}
    for c, h in sorted(_resnet50_norm_shapes()):
        for block_m in sorted(_producer_block_ms()):
            p = -(-BATCH * h * h // block_m)
            n_cb, n_chunks, chunk = split_grid(p, c)
            assert n_chunks > 1, (c, h, block_m, p)  # the chunk pass runs
            assert (n_chunks - 1) * chunk < p <= n_chunks * chunk, (c, h, block_m, p, n_chunks, chunk)
            worst[(c, h, block_m)] = n_cb * n_chunks
            assert n_cb * n_chunks >= H200_SMS, (c, h, block_m, p, n_cb, n_chunks)
    # conv2_x's 64-channel norm (P 6,272 at BLOCK_M 128): was one program.
    assert worst[(64, 56, 128)] >= H200_SMS
    assert min(worst.values()) >= H200_SMS


@pytest.mark.parametrize("p,c", [(0, 5), (1, 64), (2 * SPLIT_MIN_CHUNK - 1, 64), (3, 2048)])
def test_few_partials_take_one_launch(p, c):
    """Fewer than 2 * SPLIT_MIN_CHUNK partials keep the single launch of a small model's norms."""
    assert split_grid(p, c)[1] == 1


def test_split_grid_covers_every_partial_once():
    for p in range(0, 400, 7):
        for c in (1, 31, 32, 33, 2048):
            n_cb, n_chunks, chunk = split_grid(p, c)
            assert n_cb == max(1, -(-c // 32))
            assert n_chunks * chunk >= p and (n_chunks - 1) * chunk < max(p, 1)


# ---- results (interpreter) -------------------------------------------------------------------


def _data(gen, n, c, h, w, dtype=torch.float32):
    """Off-centre data (|mean| >> std for some channels) in channels_last."""
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64) * (torch.rand(c, 1, 1, generator=gen,
                                                                                  dtype=torch.float64) + 0.5)
    x = x + torch.randn(c, 1, 1, generator=gen, dtype=torch.float64) * 4
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def _finalize(part, weight, bias, *, running=None, momentum=0.1):
    kw = {}
    if running is not None:
        rm, rv, nbt = (t.clone() for t in running)
        kw = dict(running_mean=rm, running_var=rv, num_batches_tracked=nbt, momentum=momentum, update=True)
    out = bn_finalize_stats(part, weight, bias, 1e-5, block_p=2, block_c=16, **kw)
    return out, (kw["running_mean"], kw["running_var"], kw["num_batches_tracked"]) if kw else None


@requires_triton
@pytest.mark.parametrize("c", [37, 16])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_finalize_split_matches_float64_and_is_reproducible(gen, c, momentum):
    x = _data(gen, 3, c, 9, 10)  # M = 270: 17 partials of 16 rows (a short last tile)
    part = channel_stats_partials(x, block_m=16, block_c=16)
    p = part.shape[1]
    assert split_grid(p, c)[1] >= 4 and p % split_grid(p, c)[2]  # several chunks, the last short
    weight = torch.rand(c, generator=gen) + 0.5
    bias = torch.randn(c, generator=gen)
    running = (torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5, torch.tensor(3))
    reset_launch_counts()
    out, (rm, rv, nbt) = _finalize(part, weight, bias, running=running, momentum=momentum)
    counts = launch_counts()
    assert counts["_bn_partials_chunk_kernel"] == 1 and counts["_bn_finalize_kernel"] == 1, counts
    out2, (rm2, rv2, nbt2) = _finalize(part, weight, bias, running=running, momentum=momentum)
    for a, b in ((out, out2), (rm, rm2), (rv, rv2), (nbt, nbt2)):
        assert torch.equal(a, b)

    x64 = x.double()
    var, mean = torch.var_mean(x64, dim=(0, 2, 3), unbiased=False)
    var32, mean32 = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)  # eager's fp32
    invstd = (var + 1e-5).rsqrt()
    scale = invstd * weight.double()
    shift = bias.double() - mean * scale
    invstd32 = (var32 + 1e-5).rsqrt()
    eager = (mean32, var32, invstd32, invstd32 * weight, bias - mean32 * invstd32 * weight)
    for name, got, ref, eag in zip(("mean", "var", "invstd", "scale", "shift"), out, (mean, var, invstd, scale, shift),
                                   eager):
        assert_parity(got, eag, ref, torch.float32, what=name)

    m = x.numel() // c
    f = 1.0 / 4 if momentum is None else momentum
    exp_m = (1 - f) * running[0].double() + f * mean
    exp_v = (1 - f) * running[1].double() + f * var * m / (m - 1)
    eag_m = (1 - f) * running[0] + f * mean32
    eag_v = (1 - f) * running[1] + f * var32 * m / (m - 1)
    assert_parity(rm, eag_m, exp_m, torch.float32, what="running_mean")
    assert_parity(rv, eag_v, exp_v, torch.float32, what="running_var")
    assert nbt.item() == 4


@requires_triton
def test_finalize_split_without_affine_from_running_and_no_update(gen):
    c = 20
    x = _data(gen, 2, c, 10, 10)
    part = channel_stats_partials(x, block_m=16, block_c=16)
    assert split_grid(part.shape[1], c)[1] > 1
    out, _ = _finalize(part, None, None)
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    var32, mean32 = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
    assert_parity(out[0], mean32, mean, torch.float32, what="mean")
    assert_parity(out[1], var32, var, torch.float32, what="var")
    assert_parity(out[4], -mean32 * (var32 + 1e-5).rsqrt(), -mean * (var + 1e-5).rsqrt(), torch.float32, what="shift")


@requires_triton
@pytest.mark.parametrize("p", [0, 25])
def test_finalize_empty_batch(gen, p):
    """No values (P = 0, or partials that all count 0): statistics 0, nothing moves but the
    batch count, as nn.BatchNorm2d's Triton counterpart has always done."""
    c = 19
    part = torch.zeros(3, p, c)
    running = (torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5, torch.tensor(0))
    out, (rm, rv, nbt) = _finalize(part, None, None, running=running, momentum=None)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(c)) and torch.equal(out[1], torch.zeros(c))
    assert torch.equal(rm, running[0]) and torch.equal(rv, running[1]) and nbt.item() == 1


@requires_triton
@pytest.mark.parametrize("split", [False, True])
def test_finalize_fp64_running_update_uses_fp64_momentum(gen, split):
    """fp64 buffers: the update multiplies by the Python float momentum itself, not by its fp32
    rounding (which would put the running mean 1.5e-8 relative off)."""
    c = 24
    x = _data(gen, 2, c, 4 if not split else 10, 5 if not split else 10, dtype=torch.float64)
    part = channel_stats_partials(x, block_m=16, block_c=16)
    assert (split_grid(part.shape[1], c)[1] > 1) == split
    running = (torch.randn(c, generator=gen, dtype=torch.float64) + 3.0,
               torch.rand(c, generator=gen, dtype=torch.float64) + 0.5, torch.tensor(2))
    for momentum in (0.1, 0.3, None):
        out, (rm, rv, nbt) = _finalize(part, None, None, running=running, momentum=momentum)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        m = x.numel() // c
        f = 1.0 / 3 if momentum is None else momentum
        exp_m = (1 - f) * running[0] + f * mean
        exp_v = (1 - f) * running[1] + f * var * m / (m - 1)
        assert ((rm - exp_m).abs() / exp_m.abs()).max().item() < 1e-14, momentum
        assert ((rv - exp_v).abs() / exp_v.abs()).max().item() < 1e-14, momentum


# ---- backward coefficients -------------------------------------------------------------------


def _coefficients(part, weight, mean, invstd, count, training):
    co = bn_backward_coefficients(part, weight, mean, invstd, count, training)
    return torch.stack([co.dgamma, co.dbeta, co.a, co.b, co.c])


@requires_triton
@pytest.mark.parametrize("c", [37, 64])
@pytest.mark.parametrize("training", [True, False])
def test_coefficients_split_matches_float64_and_is_reproducible(gen, c, training):
    p = 61  # 16 chunks of 4, the last one short
    part = torch.randn(2, p, c, generator=gen) + 0.3
    weight = torch.rand(c, generator=gen) + 0.5
    mean = torch.randn(c, generator=gen)
    invstd = torch.rand(c, generator=gen) + 0.5
    count = 61 * 16
    assert split_grid(p, c)[1] > 4 and p % split_grid(p, c)[2]
    reset_launch_counts()
    got = _coefficients(part, weight, mean, invstd, count, training)
    counts = launch_counts()
    assert counts["_bn_sums_chunk_kernel"] == 1 and counts["_bn_backward_coefficients_kernel"] == 1, counts
    assert torch.equal(got, _coefficients(part, weight, mean, invstd, count, training))

    def coeffs(sums, w, mu, istd):
        dbeta, dgamma = sums
        a = istd * w
        if not training:
            return dgamma, dbeta, a, torch.zeros_like(a), torch.zeros_like(a)
        b = -a * istd * dgamma / count
        return dgamma, dbeta, a, b, -a * dbeta / count - b * mu

    exact = coeffs(part.double().sum(1), weight.double(), mean.double(), invstd.double())
    eager = coeffs(part.sum(1), weight, mean, invstd)
    for name, g, e, ex in zip(("dgamma", "dbeta", "a", "b", "c"), got, eager, exact):
        if not training and name in ("b", "c"):
            assert torch.equal(g, torch.zeros(c))
            continue
        assert_parity(g, e, ex, torch.float32, what=name)


@requires_triton
def test_coefficients_few_partials_one_launch(gen):
    part = torch.randn(2, 3, 10, generator=gen)
    vec = torch.rand(10, generator=gen) + 0.5
    reset_launch_counts()
    got = _coefficients(part, None, vec, vec, 30, True)
    assert "_bn_sums_chunk_kernel" not in launch_counts()
    torch.testing.assert_close(got[1].double(), part[0].double().sum(0), rtol=1e-6, atol=1e-6)


@requires_cuda
def test_real_shape_reductions_on_gpu_reproducible_and_exact():
    """GPU, conv2_x's 64-channel norm at batch 256 (P = 6,272 partials of 128 rows): the split
    finalize and coefficients, bit for bit across two runs, against float64."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    c, h = 64, 56
    x = (torch.randn(256, c, h, h, device="cuda", generator=gen) * 2 + 3).contiguous(memory_format=torch.channels_last)
    part = channel_stats_partials(x)
    assert part.shape[1] == 6272 and split_grid(6272, c)[0] * split_grid(6272, c)[1] >= H200_SMS
    runs = [bn_finalize_stats(part, None, None, 1e-5) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    var32, mean32 = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    assert_parity(runs[0][0], mean32, mean, torch.float32, what="mean")
    assert_parity(runs[0][1], var32, var, torch.float32, what="var")
    sums = torch.randn(2, 12544, c, device="cuda", generator=gen)
    vec = torch.rand(c, device="cuda", generator=gen) + 0.5
    co = [_coefficients(sums, vec, vec, vec, 256 * h * h, True) for _ in range(2)]
    assert torch.equal(co[0], co[1])
    assert_parity(co[0][1], sums.sum(1)[0], sums.double().sum(1)[0], torch.float32, what="dbeta")
