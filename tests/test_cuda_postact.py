"""The C++ kernels of the post-activation block's ends: the closing pass relu(bn3(y) + shortcut)
and its backward (csrc/cuda/bn_elementwise.cu), and the first conv's weight gradient over the
RAW input (the wgrad kernel with its BN+ReLU prologue off, csrc/cuda/conv_wgrad.cu), against
float64 references, through the launchers of resnet_fused.cuda.kernels.

Shared cases, references and fixtures, and how the host emulator runs the kernels on the CPU:
tests/cuda_kernel_helpers.py.
"""
from __future__ import annotations

import pytest
import torch

from cuda_kernel_helpers import STATS_TOL, TOL, TILE_M, _data, _rel_err, kernels, ops  # noqa: F401
from resnet_fused.kernel_set import GradPrologue

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# 2 M tiles with a ragged one and 2 channel tiles (C = 72); M = 3 rows.
SHAPES = [(2, 20, 7, 7), (1, 72, 5, 6), (3, 5, 1, 1)]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _vec(gen, c, dtype, lo=0.5, hi=1.5):
    return (torch.rand(c, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


def _norm_vectors(gen, c, dtype):
    acc = _acc(dtype)
    return {"scale": _vec(gen, c, acc), "shift": (torch.randn(c, generator=gen, dtype=torch.float64) * 0.5).to(acc),
            "mean": torch.randn(c, generator=gen, dtype=torch.float64).to(acc), "invstd": _vec(gen, c, acc)}


def _z64(y, sc, n, proj):
    def per(v):
        return v.double()[None, :, None, None]
    z = y.double() * per(n["scale"]) + per(n["shift"])
    return z + (sc.double() * per(proj["scale"]) + per(proj["shift"]) if proj is not None else sc.double())


def _tile_sums(values, m_rows):
    """[P, C] per-tile sums of an [M, C] tensor over tiles of TILE_M rows."""
    pad = (-m_rows) % TILE_M
    v = torch.cat([values, values.new_zeros(pad, values.shape[1])]) if pad else values
    return v.reshape(-1, TILE_M, values.shape[1]).sum(1)


@pytest.mark.parametrize("proj", [False, True], ids=["identity", "projection"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_postact_out_matches_float64(kernels, shape, dtype, proj, gen):
    c = shape[1]
    y, sc = _data(gen, shape, dtype), _data(gen, shape, dtype)
    n = _norm_vectors(gen, c, dtype)
    p = _norm_vectors(gen, c, dtype) if proj else None
    kernels.reset_launch_counts()
    out = kernels.postact_out(y, n["scale"], n["shift"], sc, p["scale"] if proj else None,
                              p["shift"] if proj else None)
    assert kernels.launch_counts() == {"postact_out_cuda": 1}
    assert out.dtype == dtype and out.shape == shape and out.is_contiguous(memory_format=torch.channels_last)
    ref = _z64(y, sc, n, p).clamp_min(0)
    assert _rel_err(out, ref) <= TOL[dtype], _rel_err(out, ref)


def test_postact_out_nan_propagates(kernels, gen):
    y, sc = _data(gen, (1, 3, 2, 2), torch.float32), _data(gen, (1, 3, 2, 2), torch.float32)
    y[0, 1, 0, 0] = float("nan")
    n = _norm_vectors(gen, 3, torch.float32)
    out = kernels.postact_out(y, n["scale"], n["shift"], sc)
    assert torch.isnan(out[0, 1, 0, 0]) and torch.isfinite(out).sum() == 11


@pytest.mark.parametrize("proj", [False, True], ids=["identity", "projection"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_postact_out_backward_matches_float64(kernels, shape, dtype, proj, gen):
    nb, c, h, w = shape
    y, sc, grad = _data(gen, shape, dtype), _data(gen, shape, dtype), _data(gen, shape, dtype)
    n = _norm_vectors(gen, c, dtype)
    p = _norm_vectors(gen, c, dtype) if proj else None
    kw = {"sc_scale": p["scale"], "sc_shift": p["shift"], "sc_mean": p["mean"], "sc_invstd": p["invstd"]} \
        if proj else {}
    kernels.reset_launch_counts()
    g, sums, sc_sums = kernels.postact_out_backward(grad, y, n["scale"], n["shift"], n["mean"], n["invstd"], sc, **kw)
    assert kernels.launch_counts() == {"postact_out_backward_cuda": 1}
    z = _z64(y, sc, n, p)
    ref_g = torch.where(z > 0, grad.double(), 0.0)
    assert g.dtype == dtype and torch.equal(g.double(), ref_g)
    m = nb * h * w
    tiles = -(-m // TILE_M)
    rows = lambda t: t.double().permute(0, 2, 3, 1).reshape(m, c)  # noqa: E731
    gs = rows(g)  # the sums are of g' as stored
    xhat = (rows(y) - n["mean"].double()) * n["invstd"].double()
    ref = torch.stack([_tile_sums(gs, m), _tile_sums(gs * xhat, m)])
    assert sums.shape == (2, tiles, c) and sums.dtype == _acc(dtype)
    assert _rel_err(sums, ref) <= STATS_TOL[dtype], _rel_err(sums, ref)
    if proj:
        xhat_d = (rows(sc) - p["mean"].double()) * p["invstd"].double()
        ref_d = torch.stack([_tile_sums(gs, m), _tile_sums(gs * xhat_d, m)])
        assert _rel_err(sc_sums, ref_d) <= STATS_TOL[dtype], _rel_err(sc_sums, ref_d)
    else:
        assert sc_sums is None


def _plain_wgrad_ref(x, grad, ksize, stride, pro):
    g = grad.double()
    if pro is not None:
        per = lambda v: v.double()[None, :, None, None]  # noqa: E731
        g = per(pro.a) * g + per(pro.b) * pro.y.double() + per(pro.c)
    return torch.nn.grad.conv2d_weight(x.double(), (g.shape[1], x.shape[1], ksize, ksize), g, stride=stride,
                                       padding=ksize // 2)


@pytest.mark.parametrize("with_prologue", [False, True], ids=["plain", "bn_backward_prologue"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ksize, stride", [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_plain_conv_wgrad_matches_float64(kernels, ksize, stride, dtype, with_prologue, gen):
    # Mean-3 input: a kernel that applied any ReLU or affine to x would be far off.
    x = _data(gen, (2, 5, 7, 6), dtype, mean=3.0)
    h_out, w_out = (7 + 2 * (ksize // 2) - ksize) // stride + 1, (6 + 2 * (ksize // 2) - ksize) // stride + 1
    grad = _data(gen, (2, 70, h_out, w_out), dtype)
    pro = None
    if with_prologue:
        acc = _acc(dtype)
        pro = GradPrologue(_data(gen, grad.shape, dtype), _vec(gen, 70, acc), _vec(gen, 70, acc, -0.1, 0.1),
                           _vec(gen, 70, acc, -0.1, 0.1))
    kernels.reset_launch_counts()
    dw = kernels.plain_conv_wgrad(grad, x, ksize=ksize, stride=stride, prologue=pro)
    assert kernels.launch_counts() == {"conv_wgrad_cuda": 1}
    assert dw.shape == (70, 5, ksize, ksize) and dw.dtype == dtype
    ref = _plain_wgrad_ref(x, grad, ksize, stride, pro)
    assert _rel_err(dw, ref) <= TOL[dtype], _rel_err(dw, ref)


def test_plain_conv_wgrad_empty_batch_and_deterministic(kernels, gen):
    x, grad = _data(gen, (0, 5, 6, 6), torch.float32), _data(gen, (0, 7, 6, 6), torch.float32)
    assert torch.equal(kernels.plain_conv_wgrad(grad, x, ksize=3), torch.zeros(7, 5, 3, 3))
    x, grad = _data(gen, (2, 5, 9, 9), torch.float32), _data(gen, (2, 7, 9, 9), torch.float32)
    one = kernels.plain_conv_wgrad(grad, x, ksize=3, splits=3)
    assert torch.equal(one, kernels.plain_conv_wgrad(grad, x, ksize=3, splits=3))
    assert _rel_err(one, kernels.plain_conv_wgrad(grad, x, ksize=3, splits=1)) <= TOL[torch.float32]


# --- registration, opcheck, input checks -------------------------------------------------------

SCHEMAS = {
    "postact_out_cuda": "resnet_fused::postact_out_cuda(Tensor y, Tensor scale, Tensor shift, Tensor sc, "
                        "Tensor? sc_scale, Tensor? sc_shift) -> Tensor",
    "postact_out_backward_cuda": "resnet_fused::postact_out_backward_cuda(Tensor grad, Tensor y, Tensor scale, "
                                 "Tensor shift, Tensor mean, Tensor invstd, Tensor sc, Tensor? sc_scale, "
                                 "Tensor? sc_shift, Tensor? sc_mean, Tensor? sc_invstd) -> (Tensor g_masked, "
                                 "Tensor sums, Tensor sc_sums)",
}


def _op_args(gen):
    shape = (2, 6, 5, 5)
    y, sc, g = (_data(gen, shape, torch.float32) for _ in range(3))
    n, p = _norm_vectors(gen, 6, torch.float32), _norm_vectors(gen, 6, torch.float32)
    x = _data(gen, (2, 4, 5, 5), torch.float32)
    return {
        "postact_out_cuda": [(y, n["scale"], n["shift"], sc, None, None),
                             (y, n["scale"], n["shift"], sc, p["scale"], p["shift"])],
        "postact_out_backward_cuda": [
            (g, y, n["scale"], n["shift"], n["mean"], n["invstd"], sc, None, None, None, None),
            (g, y, n["scale"], n["shift"], n["mean"], n["invstd"], sc, p["scale"], p["shift"], p["mean"], p["invstd"])],
        # The wgrad with its input prologue off (the raw-input conv of a post-activation block).
        "conv_wgrad_cuda": [(g, x, None, None, 3, 1, 1, None, None, None, None, 2)],
    }


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_op_registered_with_cpu_and_cuda_kernels(ops, name):
    assert str(getattr(ops, name).default._schema) == SCHEMAS[name]
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fused::{name}", key), key


@pytest.mark.parametrize("name", sorted(SCHEMAS) + ["conv_wgrad_cuda"])
def test_opcheck(ops, name, gen):
    for args in _op_args(gen)[name]:
        torch.library.opcheck(getattr(ops, name), args)


def test_bad_input_raises_clear_error(ops, gen):
    y, sc = _data(gen, (2, 6, 5, 5), torch.float32), _data(gen, (2, 6, 4, 5), torch.float32)
    n = _norm_vectors(gen, 6, torch.float32)
    with pytest.raises(RuntimeError, match="the conv output y .* and the shortcut sc .* must have one shape"):
        ops.postact_out_cuda(y, n["scale"], n["shift"], sc, None, None)
    with pytest.raises(RuntimeError, match="pass both sc_scale and sc_shift"):
        ops.postact_out_cuda(y, n["scale"], n["shift"], y, n["scale"], None)
    with pytest.raises(RuntimeError, match="needs all of sc_scale, sc_shift, sc_mean and sc_invstd"):
        ops.postact_out_backward_cuda(y, y, n["scale"], n["shift"], n["mean"], n["invstd"], y, n["scale"], n["shift"],
                                      None, None)
    with pytest.raises(RuntimeError, match="pass both scale and shift"):
        ops.conv_wgrad_cuda(y, y, n["scale"], None, 1, 1, 1, None, None, None, None, 0)


# ---------------------------------------------------------------------------------------
# The closing conv of the eval forward: relu(bn(conv(h)) + shortcut) in the conv's epilogue
# ---------------------------------------------------------------------------------------


def _eval_norm(gen, c, acc):
    """(weight, bias, running_mean, running_var) of an eval-mode norm."""
    return (_vec(gen, c, acc), (torch.randn(c, generator=gen, dtype=torch.float64) * 0.5).to(acc),
            torch.randn(c, generator=gen, dtype=torch.float64).to(acc), _vec(gen, c, acc))


def _bn64(t, norm, eps):
    w, b, m, v = (u.double()[None, :, None, None] for u in norm)
    return (t - m) / torch.sqrt(v + eps) * w + b


@pytest.mark.parametrize("from_stats", [True, False], ids=["from_running_stats", "given_affine"])
@pytest.mark.parametrize("proj", [False, True], ids=["identity", "projection"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ksize, stride, algo", [(1, 1, None), (1, 2, None), (3, 1, "halo"), (3, 2, "per_tap"),
                                                 (3, 2, "halo")])
def test_closing_conv_matches_float64(kernels, ksize, stride, algo, dtype, proj, from_stats, gen):
    """``bn_relu_conv(..., postact_close=True)``: out = relu(bn(conv(h)) + x) (identity) or
    relu(bn(conv(h)) + bn_d(conv1x1_s(x))) (projection), the norms' affines formed in the kernel
    from their running statistics or handed in, against float64."""
    acc, eps = _acc(dtype), 1e-5
    n, c_in, c_out, hw = 2, 20, 72, 9
    h = _data(gen, (n, c_in, hw, hw), dtype)
    w = (torch.randn(c_out, c_in, ksize, ksize, generator=gen, dtype=torch.float64) / (c_in * ksize) ** 0.5)
    ho = (hw - 1) // stride + 1
    last = _eval_norm(gen, c_out, acc)
    ref = _bn64(torch.nn.functional.conv2d(h.double(), w, stride=stride, padding=ksize // 2), last, eps)
    if proj:
        c_sc = 24
        x = _data(gen, (n, c_sc, hw, hw), dtype)
        w_p = torch.randn(c_out, c_sc, 1, 1, generator=gen, dtype=torch.float64) / c_sc ** 0.5
        pn = _eval_norm(gen, c_out, acc)
        ref = ref + _bn64(torch.nn.functional.conv2d(x.double(), w_p, stride=stride), pn, eps)
        sc = dict(shortcut=x, shortcut_kind=kernels.SHORTCUT_PROJECTION, shortcut_stride=stride,
                  proj_weight=w_p.to(dtype))
    else:
        x = _data(gen, (n, c_out, ho, ho), dtype)
        ref = ref + x.double()
        sc = dict(shortcut=x, shortcut_kind=kernels.SHORTCUT_ADD, shortcut_stride=1)
    ref = ref.clamp_min(0)

    def norm_args(prefix, norm):
        if from_stats:
            return {f"{prefix}_scale": norm[0], f"{prefix}_shift": norm[1], f"{prefix}_stats": (norm[2], norm[3], eps)}
        s = norm[0].double() / torch.sqrt(norm[3].double() + eps)
        return {f"{prefix}_scale": s.to(acc), f"{prefix}_shift": (norm[1].double() - norm[2].double() * s).to(acc)}

    extra = norm_args("post", last)
    if proj:
        extra.update(norm_args("proj", pn))
    kernels.reset_launch_counts()
    out, part = kernels.bn_relu_conv(h, w.to(dtype), stride=stride, postact_close=True, conv3x3_algo=algo, **sc,
                                     **extra)
    assert kernels.launch_counts()["conv_fwd_cuda"] == 1 and part is None
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    # bf16: the projection's scales are applied to the weights as they are loaded (rounded to bf16)
    assert _rel_err(out, ref) <= TOL[dtype], (_rel_err(out, ref), TOL[dtype])
    assert (out >= 0).all()


def test_closing_conv_bad_input_raises_clear_error(kernels, ops, gen):
    h, x = _data(gen, (2, 8, 5, 5), torch.float32), _data(gen, (2, 8, 5, 5), torch.float32)
    w = torch.randn(8, 8, 1, 1, generator=gen, dtype=torch.float64).float()
    one, zero = torch.ones(8), torch.zeros(8)
    with pytest.raises(RuntimeError, match="postact_close .* needs a shortcut"):
        kernels.bn_relu_conv(h, w, postact_close=True, post_scale=one, post_shift=zero)
    with pytest.raises(RuntimeError, match="postact_close needs the last norm"):
        kernels.bn_relu_conv(h, w, postact_close=True, shortcut=x, shortcut_kind=kernels.SHORTCUT_ADD)
    with pytest.raises(RuntimeError, match="postact_close with a projection needs the projection's norm"):
        kernels.bn_relu_conv(h, w, postact_close=True, shortcut=x, shortcut_kind=kernels.SHORTCUT_PROJECTION,
                             proj_weight=w, post_scale=one, post_shift=zero)
    with pytest.raises(RuntimeError, match="emit_stats must be False"):
        kernels.bn_relu_conv(h, w, postact_close=True, shortcut=x, shortcut_kind=kernels.SHORTCUT_ADD,
                             post_scale=one, post_shift=zero, emit_stats=True)
    with pytest.raises(RuntimeError, match="proj_scale .* 8"):  # the projection output's norm: C_out values
        kernels.bn_relu_conv(h, w, postact_close=True, shortcut=x[:, :4], shortcut_kind=kernels.SHORTCUT_PROJECTION,
                             proj_weight=w[:, :4], proj_scale=one[:4], proj_shift=zero[:4], post_scale=one,
                             post_shift=zero)


def test_opcheck_closing_conv_and_channels_last_wgrad(ops, gen):
    """opcheck (schema, fake, dispatch) of the two keywords the post-activation path adds:
    ``conv_fwd_cuda(..., postact_close=True)`` (identity and projection, norms from running
    statistics) and ``conv_wgrad_cuda(..., channels_last=True)``."""
    h = _data(gen, (2, 6, 5, 5), torch.float32)
    w = torch.randn(8, 6, 1, 1, generator=gen, dtype=torch.float64).float()
    x = _data(gen, (2, 8, 5, 5), torch.float32)
    xs = _data(gen, (2, 4, 9, 9), torch.float32)
    pw = torch.randn(8, 4, 1, 1, generator=gen, dtype=torch.float64).float()
    wt, b, m, v = _eval_norm(gen, 8, torch.float32)
    pwt, pb, pm, pv = _eval_norm(gen, 8, torch.float32)
    identity = (h, w, None, None, 1, 1, x, 1, 1, None, None, None, False, wt, b, 0,
                None, None, 0.0, None, None, 0.0, m, v, 1e-5, True)
    proj = (h, w, None, None, 1, 1, xs, 2, 2, pw, pwt, pb, False, wt, b, 0,
            None, None, 0.0, pm, pv, 1e-5, m, v, 1e-5, True)
    for args in (identity, proj):
        torch.library.opcheck(ops.conv_fwd_cuda, args)
    g = _data(gen, (2, 8, 5, 5), torch.float32)
    torch.library.opcheck(ops.conv_wgrad_cuda, (g, h, None, None, 3, 1, 1, None, None, None, None, 2, True))
