"""The C++ fused forward convs (1x1 and both 3x3 kernels: per-tap, halo-staged) against eager:
prologue, shortcut, statistics and post epilogues, 16-bit WMMA phases, NaN, determinism.

Shared cases, references and fixtures, and how the host emulator runs the kernels on the CPU:
tests/cuda_kernel_helpers.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cuda_kernel_helpers import (  # noqa: F401 (fixtures: kernels, ops)
    ALL_DTYPES,
    FWD_CASES,
    HALO_CASES,
    STATS_TOL,
    TOL,
    _act,
    _affine,
    _assert_close,
    _assert_wmma_ran,
    _chan_merge,
    _check_forward,
    _data,
    _default_3x3_algo,
    _expected_fwd_mma,
    _fwd_inputs,
    _fwd_reference,
    _weight,
    _wmma_mma_count,
    kernels,
    ops,
)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", FWD_CASES, ids=lambda c: c.name)
def test_forward_matches_eager(kernels, case, dtype, gen):
    # The default kernel choice (the halo-staged kernel for the 3x3 cases); fp16/bf16 through the
    # kernels' WMMA phases on the host WMMA shim (asserted in _check_forward).
    _check_forward(kernels, case, dtype, gen)

@pytest.mark.parametrize("algo", ["per_tap", "halo"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", HALO_CASES, ids=lambda c: c.name)
def test_forward_3x3_kernels_match_eager(kernels, case, dtype, algo, gen):
    _check_forward(kernels, case, dtype, gen, conv3x3_algo=algo)

@pytest.mark.parametrize("algo", ["per_tap", "halo"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["s2_17x18_g4_no_prologue", "s1_c40_to_72_chunks_post", "s2_projection"])
def test_forward_3x3_kernels_16bit(kernels, name, dtype, algo, gen):
    case = next(c for c in HALO_CASES if c.name == name)
    x, w, kw = _fwd_inputs(case, dtype, gen)
    wmma_before = _wmma_mma_count()
    out, _ = kernels.bn_relu_conv(x, w, **kw, conv3x3_algo=algo)
    _assert_wmma_ran(wmma_before, dtype, _expected_fwd_mma(case, algo), f"16-bit {algo} {name}")
    y = _fwd_reference(case, x, w, kw, dtype)
    if case.post:
        y = torch.relu(y * kw["post_scale"].double().view(1, -1, 1, 1) + kw["post_shift"].double().view(1, -1, 1, 1))
    _assert_close(out, y, TOL[dtype], f"16-bit {algo} output")

def test_forward_3x3_algo_choice(kernels, gen, monkeypatch):
    # auto runs the halo kernel for a 3x3 (bitwise the same result), the environment variable
    # forces a kernel when the argument is not given, and both kernels agree to rounding.
    case = next(c for c in HALO_CASES if c.name == "s2_projection")
    x, w, kw = _fwd_inputs(case, torch.float32, gen)
    monkeypatch.delenv("RESNET_FUSED_CUDA_CONV3X3", raising=False)
    runs = {algo: kernels.bn_relu_conv(x, w, **kw, conv3x3_algo=algo) for algo in ("auto", "per_tap", "halo")}
    default = kernels.bn_relu_conv(x, w, **kw)
    monkeypatch.setenv("RESNET_FUSED_CUDA_CONV3X3", "per_tap")
    from_env = kernels.bn_relu_conv(x, w, **kw)
    for a, b in zip(runs["auto"], runs["halo"]):
        assert torch.equal(a, b)
    for a, b in zip(default, runs["halo"]):
        assert torch.equal(a, b)
    for a, b in zip(from_env, runs["per_tap"]):
        assert torch.equal(a, b)
    torch.testing.assert_close(runs["per_tap"][0], runs["halo"][0], rtol=1e-5, atol=1e-5)
    assert runs["per_tap"][1].shape == runs["halo"][1].shape  # one partial layout for both
    monkeypatch.setenv("RESNET_FUSED_CUDA_CONV3X3", "winograd")
    with pytest.raises(ValueError, match="3x3 forward algorithm must be one of"):
        kernels.bn_relu_conv(x, w, **kw)

def test_forward_stats_with_post_are_of_the_stored_pre_post_value(kernels, gen):
    case = next(c for c in FWD_CASES if c.name == "big_tiles_post")
    x, w, kw = _fwd_inputs(case, torch.float64, gen)
    _, partials = kernels.bn_relu_conv(x, w, **kw)
    plain, _ = kernels.bn_relu_conv(x, w, **{**kw, "post_scale": None, "post_shift": None, "emit_stats": False})
    ref_var, ref_mean = torch.var_mean(plain, dim=(0, 2, 3), unbiased=False)
    mean, var, _ = _chan_merge(partials)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-10, atol=1e-12)

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["3x3_s2_projection", "big_tiles_post", "1x1_s2_subsample_add",
                                  "bn_like_mean100_std0.1"])
def test_forward_16bit(kernels, name, dtype, gen):
    # mean 100 / std 0.1 data in fp16: the prologue must run in fp32 (fp16 scale/shift would be
    # off by ~0.26 relative, docs/design.md section 3), then the activation is rounded once to fp16.
    case = next(c for c in FWD_CASES if c.name == name)
    x, w, kw = _fwd_inputs(case, dtype, gen)
    wmma_before = _wmma_mma_count()
    out, partials = kernels.bn_relu_conv(x, w, **kw)
    _assert_wmma_ran(wmma_before, dtype, _expected_fwd_mma(case, _default_3x3_algo()), f"16-bit {name}")
    y = _fwd_reference(case, x, w, kw, dtype)
    if case.post:
        y = torch.relu(y * kw["post_scale"].double().view(1, -1, 1, 1) + kw["post_shift"].double().view(1, -1, 1, 1))
    assert out.dtype == dtype
    _assert_close(out, y, TOL[dtype], "16-bit output")
    if case.emit_stats and not case.post:
        mean, var, _ = _chan_merge(partials)
        ref_var, ref_mean = torch.var_mean(out.double(), dim=(0, 2, 3), unbiased=False)
        assert ((mean - ref_mean).abs() / (ref_var.sqrt() + ref_mean.abs())).max() <= STATS_TOL[dtype]
        assert ((var - ref_var).abs() / ref_var).max() <= 10 * STATS_TOL[dtype]

def test_forward_nan_propagates(kernels, gen):
    # relu(NaN) is NaN in eager; a max(., 0) prologue would hide it as 0.
    x = _data(gen, (1, 5, 7, 7), torch.float32)
    x[0, 2, 3, 3] = float("nan")
    w = _weight(gen, (6, 5, 3, 3), torch.float32)
    scale, shift = _affine(gen, 5, torch.float32)
    out, _ = kernels.bn_relu_conv(x, w, scale=scale, shift=shift)
    ref = F.conv2d(_act(x, scale, shift), w.double(), padding=1)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out.isnan().sum() == 9 * 6  # the 3x3 neighbourhood, every output channel

def test_forward_is_deterministic(kernels, gen):
    case = FWD_CASES[0]
    x, w, kw = _fwd_inputs(case, torch.float32, gen)
    first = kernels.bn_relu_conv(x, w, **kw)
    second = kernels.bn_relu_conv(x, w, **kw)
    for a, b in zip(first, second):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def _eval_norm(gen, channels, affine=True):
    """An eval-mode BatchNorm's (weight, bias, running_mean, running_var), weight/bias None without affine."""
    mean = torch.randn(channels, generator=gen) * 0.5
    var = torch.rand(channels, generator=gen) + 0.25
    if not affine:
        return None, None, mean, var
    return torch.rand(channels, generator=gen) + 0.5, torch.randn(channels, generator=gen) * 0.3, mean, var


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("ksize, stride, algo", [(1, 1, "auto"), (3, 1, "halo"), (3, 2, "per_tap"), (3, 2, "halo")])
def test_forward_eval_affines_from_running_stats(kernels, ksize, stride, algo, affine, gen):
    # The kernel forms scale = weight / sqrt(var + eps), shift = bias - mean * scale itself for the
    # prologue, the projection's input and the post epilogue; the same conv with the affines
    # finalized from the running statistics first must give the same bits.
    x = _data(gen, (2, 6, 7, 7), torch.float32)
    w = _weight(gen, (8, 6, ksize, ksize), torch.float32)
    h_out = (7 + 2 * (ksize // 2) - ksize) // stride + 1
    sc = _data(gen, (2, 5, (h_out - 1) * stride + 1, (h_out - 1) * stride + 1), torch.float32)
    pw = _weight(gen, (8, 5, 1, 1), torch.float32)
    norms = {name: _eval_norm(gen, c, affine) for name, c in (("pro", 6), ("proj", 5), ("post", 8))}
    eps = {"pro": 1e-5, "proj": 1e-3, "post": 2e-5}

    def materialized(name):
        wt, b, m, v = norms[name]
        out = kernels.finalize_stats(None, wt, b, eps[name], running_mean=m, running_var=v, from_running=True)
        return out[3], out[4]

    (s, b), (ps, pb), (qs, qb) = materialized("pro"), materialized("proj"), materialized("post")
    common = dict(stride=stride, shortcut=sc, shortcut_kind=2, shortcut_stride=stride, proj_weight=pw,
                  emit_stats=True, conv3x3_algo=algo)
    ref, ref_part = kernels.bn_relu_conv(x, w, scale=s, shift=b, proj_scale=ps, proj_shift=pb, post_scale=qs,
                                         post_shift=qb, **common)
    kernels.reset_launch_counts()
    out, part = kernels.bn_relu_conv(
        x, w, scale=norms["pro"][0], shift=norms["pro"][1], proj_scale=norms["proj"][0],
        proj_shift=norms["proj"][1], post_scale=norms["post"][0], post_shift=norms["post"][1],
        scale_stats=(norms["pro"][2], norms["pro"][3], eps["pro"]),
        proj_stats=(norms["proj"][2], norms["proj"][3], eps["proj"]),
        post_stats=(norms["post"][2], norms["post"][3], eps["post"]), **common)
    assert kernels.launch_counts() == {"conv_fwd_cuda": 1}
    assert torch.equal(out, ref) and torch.equal(part, ref_part)
    # And the result is not the un-normalised conv: the affines did something.
    plain, _ = kernels.bn_relu_conv(x, w, **common)
    assert not torch.allclose(plain, out)


def test_forward_eval_stats_need_mean_and_var(ops, gen):
    x = _data(gen, (1, 3, 4, 4), torch.float32)
    w = _weight(gen, (4, 3, 1, 1), torch.float32)
    with pytest.raises(RuntimeError, match="pass both pro_mean and pro_var"):
        ops.conv_fwd_cuda(x, w, None, None, 1, 1, None, 0, 1, None, None, None, False, None, None, 0,
                          torch.zeros(3), None, 1e-5)
    with pytest.raises(RuntimeError, match="pro_mean must be a 1-D tensor of 3"):
        ops.conv_fwd_cuda(x, w, None, None, 1, 1, None, 0, 1, None, None, None, False, None, None, 0,
                          torch.zeros(4), torch.ones(4), 1e-5)


def test_forward_eval_stats_opcheck(ops, gen):
    x = _data(gen, (2, 6, 5, 5), torch.float32)
    w = _weight(gen, (8, 3, 3, 3), torch.float32)
    sc = _data(gen, (2, 4, 5, 5), torch.float32)
    pw = _weight(gen, (8, 4, 1, 1), torch.float32)
    wt, b, m, v = _eval_norm(gen, 6)
    pwt, pb, pm, pv = _eval_norm(gen, 4)
    qwt, qb, qm, qv = _eval_norm(gen, 8, affine=False)
    args = (x, w, wt, b, 2, 2, sc, 2, 2, pw, pwt, pb, True, qwt, qb, 0, m, v, 1e-5, pm, pv, 1e-3, qm, qv, 1e-5)
    torch.library.opcheck(ops.conv_fwd_cuda, args)
