"""The fused backward GEMMs (``resnet_fused/triton/conv_backward.py``) one at a time, against
ATen's ``convolution_backward`` on explicitly computed activations and gradients.

1x1 and 3x3, stride 1 and 2, groups 1 / 2 / 4, odd sizes, with and without the BN-backward
prologue on the gradient operand and the projection's second K-loop; small tiles so there are
several M, N and K tiles, partial tiles and several split-K partials. Run under the interpreter
on the CPU (conftest) or compiled on a GPU; every test checks that its kernel launched.
"""
from __future__ import annotations

import pytest
import torch

from helpers import DEVICE, requires_triton
from resnet_fused.triton.conv_backward import GradPrologue, conv_dgrad, conv_wgrad
from resnet_fused.triton.launch import launch_counts, reset_launch_counts

pytestmark = requires_triton

TILES = dict(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)
WGRAD_TILES = dict(block_m=16, block_k=16, block_c=16, num_warps=4, num_stages=1)

# (N, C_in, C_out, H, W, ksize, stride, groups): odd channel counts and spatial sizes.
SHAPES = {
    "3x3-s1": (2, 20, 18, 7, 7, 3, 1, 1),
    "3x3-s2-odd": (1, 12, 20, 7, 5, 3, 2, 1),
    "3x3-s2-g2": (2, 20, 36, 6, 7, 3, 2, 2),
    "3x3-g4": (2, 16, 16, 5, 5, 3, 1, 4),
    "1x1-s2": (2, 12, 20, 7, 7, 1, 2, 1),
}
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _vec(c, gen, dtype, lo=0.5, hi=1.5):
    return (torch.rand(c, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(DEVICE, dtype)


def _case(name, dtype, gen, prologue: bool):
    n, c_in, c_out, h, w, k, s, groups = SHAPES[name]
    st = torch.float64 if dtype == torch.float64 else torch.float32

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype).contiguous(
            memory_format=torch.channels_last if len(shape) == 4 else torch.contiguous_format)

    v = rand(n, c_in, h, w)
    scale, shift = _vec(c_in, gen, st), (torch.randn(c_in, generator=gen, dtype=torch.float64) * 0.5).to(DEVICE, st)
    mean, invstd = (torch.randn(c_in, generator=gen, dtype=torch.float64) * 0.3).to(DEVICE, st), _vec(c_in, gen, st)
    weight = rand(c_out, c_in // groups, k, k)
    ho, wo = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
    g = rand(n, c_out, ho, wo)
    pro = None
    dy = g
    if prologue:
        y = rand(n, c_out, ho, wo)
        a, b, c = _vec(c_out, gen, st), (torch.randn(c_out, generator=gen, dtype=torch.float64) * 0.1).to(DEVICE, st), \
            (torch.randn(c_out, generator=gen, dtype=torch.float64) * 0.1).to(DEVICE, st)
        pro = GradPrologue(y, a, b, c)
        dy = (a.view(1, -1, 1, 1) * g.to(st) + b.view(1, -1, 1, 1) * y.to(st) + c.view(1, -1, 1, 1)).to(dtype)
    act = torch.relu(v.to(st) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(dtype)
    return dict(v=v, scale=scale, shift=shift, mean=mean, invstd=invstd, weight=weight, g=g, pro=pro, dy=dy,
                act=act, stride=s, groups=groups)


def _aten_backward(grad, act, weight, stride, groups):
    pad = weight.shape[-1] // 2
    d_in, d_w, _ = torch.ops.aten.convolution_backward(
        grad, act, weight, None, [stride, stride], [pad, pad], [1, 1], False, [0, 0], groups, [True, True, False])
    return d_in, d_w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_dgrad_mask_and_sums(name, prologue, dtype, gen):
    t = _case(name, dtype, gen, prologue)
    reset_launch_counts()
    got, part = conv_dgrad(t["g"], t["weight"], t["v"], t["scale"], t["shift"], t["mean"], t["invstd"],
                           stride=t["stride"], groups=t["groups"], prologue=t["pro"], **TILES)
    assert launch_counts()["_conv_dgrad_kernel"] == 1
    assert part.shape[1] > 1  # several M tiles: the partial sums really merge
    d_act, _ = _aten_backward(t["dy"], t["act"], t["weight"], t["stride"], t["groups"])
    z = t["v"].to(t["scale"].dtype) * t["scale"].view(1, -1, 1, 1) + t["shift"].view(1, -1, 1, 1)
    want = torch.where(z > 0, d_act.to(z.dtype), 0.0)
    torch.testing.assert_close(got.to(z.dtype), want, **TOL[dtype])
    assert got.is_contiguous(memory_format=torch.channels_last)
    xhat = (t["v"].to(z.dtype) - t["mean"].view(1, -1, 1, 1)) * t["invstd"].view(1, -1, 1, 1)
    torch.testing.assert_close(part[0].sum(0), want.sum((0, 2, 3)), **TOL[dtype])
    torch.testing.assert_close(part[1].sum(0), (want * xhat).sum((0, 2, 3)), **TOL[dtype])


@pytest.mark.parametrize("name", ["3x3-s2-odd", "3x3-s2-g2"])
def test_dgrad_projection_second_k_loop(name, gen):
    """The 1x1 projection's dgrad joins the 3x3's accumulator before the ReLU mask."""
    dtype = torch.float32
    t = _case(name, dtype, gen, prologue=True)
    n, c_in, c_out, h, w, _, s, _ = SHAPES[name]
    w_proj = torch.randn(c_out + 3, c_in, 1, 1, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    g_out = torch.randn(n, c_out + 3, (h - 1) // s + 1, (w - 1) // s + 1, generator=gen,
                        dtype=torch.float64).to(DEVICE, dtype)
    got, _ = conv_dgrad(t["g"], t["weight"], t["v"], t["scale"], t["shift"], t["mean"], t["invstd"],
                        stride=s, groups=t["groups"], prologue=t["pro"], second_grad=g_out,
                        second_weight=w_proj, second_stride=s, **TILES)
    d_act, _ = _aten_backward(t["dy"], t["act"], t["weight"], s, t["groups"])
    d_proj, _ = _aten_backward(g_out, t["act"], w_proj, s, 1)
    z = t["v"] * t["scale"].view(1, -1, 1, 1) + t["shift"].view(1, -1, 1, 1)
    torch.testing.assert_close(got, torch.where(z > 0, d_act + d_proj, 0.0), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_wgrad_split_k(name, prologue, dtype, gen):
    t = _case(name, dtype, gen, prologue)
    k = t["weight"].shape[-1]
    reset_launch_counts()
    got = conv_wgrad(t["g"], t["v"], t["scale"], t["shift"], ksize=k, stride=t["stride"], groups=t["groups"],
                     prologue=t["pro"], splits=3, **WGRAD_TILES)
    assert launch_counts()["_conv_wgrad_kernel"] == 1
    _, want = _aten_backward(t["dy"], t["act"], t["weight"], t["stride"], t["groups"])
    assert got.shape == t["weight"].shape and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_wgrad_is_deterministic(gen):
    t = _case("3x3-s2-g2", torch.float32, gen, prologue=True)
    runs = [conv_wgrad(t["g"], t["v"], t["scale"], t["shift"], ksize=3, stride=2, groups=2, prologue=t["pro"],
                       splits=4, **WGRAD_TILES) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_dgrad_rejects_mismatched_shapes(gen):
    t = _case("3x3-s2-odd", torch.float32, gen, prologue=False)
    with pytest.raises(ValueError, match="do not fit"):
        conv_dgrad(t["g"], t["weight"], t["v"], t["scale"], t["shift"], t["mean"], t["invstd"], stride=1, **TILES)


@pytest.mark.parametrize("splits", [1, 3])
def test_wgrad_channels_last_output_is_the_same_gradient(gen, splits):
    """conv_wgrad(channels_last=True) stores dW in a channels_last weight's layout: the same
    values to the bit (same tiles, same fixed-order sum), no layout copy afterwards."""
    from resnet_fused.triton.conv_backward import conv_wgrad
    from resnet_fused.triton.launch import launch_counts, reset_launch_counts

    v = torch.randn(2, 12, 7, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 20, 4, 4, generator=gen).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(12, generator=gen) + 0.5, torch.randn(12, generator=gen)
    kw = dict(ksize=3, stride=2, groups=2, splits=splits, block_m=16, block_k=16, block_c=16)
    reset_launch_counts()
    plain = conv_wgrad(grad, v, scale, shift, **kw)
    cl = conv_wgrad(grad, v, scale, shift, channels_last=True, **kw)
    assert launch_counts()["_conv_wgrad_kernel"] == 2
    assert plain.is_contiguous() and not plain.is_contiguous(memory_format=torch.channels_last)
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    assert torch.equal(cl, plain)


@pytest.mark.parametrize("channels_last", [False, True])
def test_wgrad_of_an_empty_batch_is_zero_in_the_asked_layout(channels_last):
    from resnet_fused.triton.conv_backward import conv_wgrad

    v, grad = torch.empty(0, 8, 5, 5), torch.empty(0, 12, 5, 5)
    scale = shift = torch.ones(8)
    d_w = conv_wgrad(grad, v, scale, shift, ksize=3, channels_last=channels_last)
    assert d_w.shape == (12, 8, 3, 3) and not d_w.any()
    assert d_w.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
