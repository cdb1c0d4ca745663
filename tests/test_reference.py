"""The eager reference: its functional ops agree with its modules and with PyTorch/timm.

The reference is the oracle of every later parity test, so it is itself checked against
independent ground truth: nn.BatchNorm2d's running-statistics formulas, F.conv2d on a
hand-padded activation, timm's PreActBottleneck/PreActBasic, and float64 gradcheck.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import randomize_bn, rel_err
from resnet_fused import reference as ref

# Odd shapes on purpose: channels not multiples of 16, 7x7 and 5x9 spatial, batch 1.
BOTTLENECK_CASES = [
    # in, out, ratio, stride, groups, shortcut, stride_on, (N, H, W)
    (12, 12, 0.5, 1, 1, None, "3x3", (2, 7, 7)),            # identity
    (12, 20, 0.5, 2, 1, None, "3x3", (2, 7, 7)),            # projection, stride 2, odd size
    (20, 20, 0.5, 2, 1, "subsample", "3x3", (1, 5, 9)),     # TF-slim subsample, batch 1
    (16, 32, 0.5, 2, 4, None, "3x3", (2, 6, 6)),            # ResNeXt groups 4
    (12, 24, 0.25, 2, 2, None, "1x1", (2, 7, 7)),           # stride on the 1x1, groups 2
    (20, 20, 0.5, 2, 1, "projection", "3x3", (2, 5, 9)),    # strided, same width, projection
]
BASIC_CASES = [
    (12, 12, 1.0, 1, 1, None, "3x3", (2, 7, 7)),
    (12, 20, 1.0, 2, 1, None, "3x3", (1, 5, 9)),
    (16, 16, 1.0, 2, 1, "subsample", "3x3", (2, 7, 7)),
    (16, 32, 1.0, 2, 4, None, "3x3", (2, 6, 6)),
]


def _block(cls, case, gen):
    in_chs, out_chs, ratio, stride, groups, shortcut, stride_on, _ = case
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    block = cls(in_chs, out_chs, bottle_ratio=ratio, stride=stride, groups=groups,
                shortcut=shortcut, stride_on=stride_on).double()
    randomize_bn(block, gen)
    return block


def _input(case, gen, dtype=torch.float64):
    n, h, w = case[-1]
    return torch.randn(n, case[0], h, w, generator=gen, dtype=dtype) * 2 + 0.3


def _functional(block, x, modes):
    norms = [ref.BNParams.of(getattr(block, f"norm{i}")) for i in (1, 2, 3) if hasattr(block, f"norm{i}")]
    w_proj = block.downsample.conv.weight if block.downsample is not None else None
    if isinstance(block, ref.PreActBottleneck):
        return ref.preact_bottleneck(
            x, norms[0], block.conv1.weight, norms[1], block.conv2.weight, norms[2], block.conv3.weight,
            w_proj, stride=block.stride, groups=block.groups, shortcut=block.shortcut,
            stride_on=block.stride_on, modes=modes)
    return ref.preact_basic_block(
        x, norms[0], block.conv1.weight, norms[1], block.conv2.weight, w_proj,
        stride=block.stride, groups=block.groups, shortcut=block.shortcut, modes=modes)


@pytest.mark.parametrize("cls,case", [(ref.PreActBottleneck, c) for c in BOTTLENECK_CASES]
                         + [(ref.PreActBasicBlock, c) for c in BASIC_CASES])
@pytest.mark.parametrize("mode", ["train", "eval", "frozen"])
def test_functional_block_matches_module(cls, case, mode, gen):
    """The functional reference equals the module (outputs AND running statistics)."""
    block = _block(cls, case, gen)
    twin = copy.deepcopy(block)
    x = _input(case, gen)
    n_norms = 3 if cls is ref.PreActBottleneck else 2
    running_before = block.norm2.running_mean.clone()
    if mode == "train":
        block.train()
    else:
        block.eval()
    with torch.set_grad_enabled(mode != "eval"):
        expected = block(x)
        actual = _functional(twin, x, (mode,) * n_norms)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    for key, value in block.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[key], value, rtol=1e-12, atol=1e-12, msg=key)
    # The state comparison above must be able to fail: in train mode the statistics moved.
    assert torch.equal(block.norm2.running_mean, running_before) == (mode != "train")


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_update_running_stats_matches_batchnorm(momentum, gen):
    """Unbiased running variance, momentum=None as cumulative average: nn.BatchNorm2d's formulas."""
    c = 5
    bn = nn.BatchNorm2d(c, momentum=momentum).double()
    randomize_bn(bn, gen)
    rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    for _ in range(3):
        x = torch.randn(3, c, 4, 5, generator=gen, dtype=torch.float64) * 3 + 1
        bn.train()(x)
        mean, var = ref.batch_stats(x)
        ref.update_running_stats(rm, rv, nbt, mean, var, x.numel() // c, momentum)
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-13, atol=1e-13)
    assert int(nbt) == int(bn.num_batches_tracked) == 3


def test_batch_stats_is_biased_and_fp32_for_16bit(gen):
    x = torch.randn(4, 3, 5, 5, generator=gen) * 2 + 1
    mean, var = ref.batch_stats(x.half())
    assert mean.dtype == var.dtype == torch.float32
    xd = x.half().double()
    torch.testing.assert_close(var.double(), xd.var(dim=(0, 2, 3), unbiased=False), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean.double(), xd.mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-6)


def test_bn_scale_shift_matches_batchnorm_eval(gen):
    bn = nn.BatchNorm2d(6).double().eval()
    randomize_bn(bn, gen)
    x = torch.randn(2, 6, 3, 3, generator=gen, dtype=torch.float64)
    scale, shift = ref.bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    torch.testing.assert_close(ref.bn_relu(x, scale, shift), torch.relu(bn(x)), rtol=1e-13, atol=1e-13)


def test_bn_relu_conv_pads_after_activation(gen):
    """Padding is zero in the activated domain, not relu(shift) (docs/design.md section 3)."""
    c = 4
    x = torch.randn(2, c, 5, 6, generator=gen, dtype=torch.float64)
    scale = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    shift = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5   # relu(shift) > 0
    w = torch.randn(3, c, 3, 3, generator=gen, dtype=torch.float64)
    activated = torch.relu(x * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1))
    expected = F.conv2d(F.pad(activated, (1, 1, 1, 1)), w)
    torch.testing.assert_close(ref.bn_relu_conv(x, scale, shift, w), expected, rtol=1e-13, atol=1e-13)
    # The wrong order (pad raw x with zeros, then activate) must give a different answer here,
    # or this test could not catch the bug it is about.
    wrong = F.conv2d(torch.relu(F.pad(x, (1, 1, 1, 1)) * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)), w)
    assert rel_err(wrong, expected) > 1e-2


def test_projection_reads_preactivated_input(gen):
    """The projection shortcut convolves relu(bn1(x)), not x."""
    block = _block(ref.PreActBottleneck, BOTTLENECK_CASES[1], gen).eval()
    x = _input(BOTTLENECK_CASES[1], gen)
    with torch.no_grad():
        a1 = block.norm1(x)
        branch = block.conv3(block.norm3(block.conv2(block.norm2(block.conv1(a1)))))
        expected = branch + F.conv2d(a1, block.downsample.conv.weight, stride=2)
        torch.testing.assert_close(block(x), expected, rtol=1e-13, atol=1e-13)
        wrong = branch + F.conv2d(x, block.downsample.conv.weight, stride=2)
        assert rel_err(wrong, expected) > 1e-2


def test_subsample_shortcut_is_strided_raw_input(gen):
    case = BOTTLENECK_CASES[2]
    block = _block(ref.PreActBottleneck, case, gen).eval()
    x = _input(case, gen)
    with torch.no_grad():
        out = block(x)
        branch = block.conv3(block.norm3(block.conv2(block.norm2(block.conv1(block.norm1(x))))))
    torch.testing.assert_close(out - branch, x[:, :, ::2, ::2], rtol=1e-12, atol=1e-12)


def test_frozen_bn_keeps_running_stats_and_passes_gradients(gen):
    case = BOTTLENECK_CASES[1]
    block = _block(ref.PreActBottleneck, case, gen).train()
    for norm in (block.norm1, block.norm2, block.norm3):
        norm.eval()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    x = _input(case, gen).requires_grad_()
    block(x).square().sum().backward()
    for key, value in block.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert x.grad is not None and block.norm2.weight.grad is not None
    assert x.grad.abs().sum() > 0


def test_bn_mode_rule():
    bn = nn.BatchNorm2d(3)
    assert ref.bn_mode(bn.train()) == "train"
    bn.eval()
    assert ref.bn_mode(bn) == "frozen"
    with torch.no_grad():
        assert ref.bn_mode(bn) == "eval"
    assert ref.bn_mode(nn.BatchNorm2d(3, track_running_stats=False).eval()) == "train"


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_blocks_accept_both_layouts(memory_format, gen):
    case = BOTTLENECK_CASES[1]
    block = _block(ref.PreActBottleneck, case, gen).eval()
    x = _input(case, gen)
    with torch.no_grad():
        out = block(x.contiguous(memory_format=memory_format))
        torch.testing.assert_close(out, block(x), rtol=1e-12, atol=1e-12)
    assert out.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("cls,case", [(ref.PreActBottleneck, BOTTLENECK_CASES[1]),
                                      (ref.PreActBottleneck, BOTTLENECK_CASES[3]),
                                      (ref.PreActBottleneck, BOTTLENECK_CASES[2]),
                                      (ref.PreActBasicBlock, BASIC_CASES[1])])
def test_gradcheck_functional_blocks(cls, case, gen):
    """float64 gradcheck through batch statistics, every conv, and the shortcut."""
    block = _block(cls, case, gen)
    n_norms = 3 if cls is ref.PreActBottleneck else 2
    small = case[:-1] + ((2, 5, 5),)
    x = _input(small, gen).requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in block.parameters()]
    names = [n for n, _ in block.named_parameters()]

    def run(x, *flat):
        state = dict(zip(names, flat))
        for key in ("running_mean", "running_var"):
            for i in range(1, n_norms + 1):
                state[f"norm{i}.{key}"] = getattr(block, f"norm{i}").__getattr__(key).clone()
        return torch.func.functional_call(block, state, (x,))

    assert torch.autograd.gradcheck(run, (x, *params), fast_mode=True)


def test_gradcheck_bn_relu_conv_strided_grouped(gen):
    c, g = 6, 3
    x = torch.randn(2, c, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    shift = torch.randn(c, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.randn(9, c // g, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: ref.bn_relu_conv(*a, stride=2, groups=g), (x, scale, shift, w), fast_mode=True)


def test_zero_init_last_makes_unit_its_shortcut(gen):
    for cls, case in ((ref.PreActBottleneck, BOTTLENECK_CASES[0]), (ref.PreActBasicBlock, BASIC_CASES[0])):
        block = _block(cls, case, gen).eval()
        block.zero_init_last()
        x = _input(case, gen)
        with torch.no_grad():
            torch.testing.assert_close(block(x), x, rtol=0, atol=0)


@pytest.mark.parametrize("cls,kwargs,match", [
    (ref.PreActBottleneck, dict(in_chs=8, out_chs=16, shortcut="identity"), "identity shortcut"),
    (ref.PreActBottleneck, dict(in_chs=8, out_chs=16, stride=2, shortcut="subsample"), "subsample"),
    (ref.PreActBottleneck, dict(in_chs=8, shortcut="bogus"), "shortcut must be one of"),
    (ref.PreActBottleneck, dict(in_chs=8, groups=3, bottle_ratio=1.0), "groups=3 must divide"),
    (ref.PreActBottleneck, dict(in_chs=8, stride_on="5x5"), "stride_on"),
    (ref.PreActBottleneck, dict(in_chs=0), "positive int"),
    (ref.PreActBottleneck, dict(in_chs=8, stride=0), "positive int"),
    (ref.PreActBottleneck, dict(in_chs=4, bottle_ratio=0.1), "middle width"),
    (ref.PreActBasicBlock, dict(in_chs=6, out_chs=8, groups=4), "groups=4 must divide"),
])
def test_block_constructor_errors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("bad,exc,match", [
    (torch.randn(8, 5, 5), ValueError, "4-D"),
    (torch.randn(1, 7, 5, 5), ValueError, "8 input channels"),
    (torch.ones(1, 8, 5, 5, dtype=torch.int64), TypeError, "floating-point"),
    ([1.0, 2.0], TypeError, "torch.Tensor"),
])
def test_block_forward_errors(bad, exc, match):
    with pytest.raises(exc, match=match):
        ref.PreActBottleneck(8)(bad)


# ---- timm parity: the reference IS timm's block semantics, keys and numbers --------------

timm = pytest.importorskip("timm", reason="timm is optional; installed by requirements-dev.txt")


@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
@pytest.mark.parametrize("stride,in_chs,out_chs", [(1, 16, 16), (2, 12, 32)])
def test_block_matches_timm(kind, stride, in_chs, out_chs, gen):
    from functools import partial

    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models.resnetv2 import DownsampleConv, PreActBasic
    from timm.models.resnetv2 import PreActBottleneck as TimmBottleneck

    timm_cls, ours_cls, ratio = ((TimmBottleneck, ref.PreActBottleneck, 0.5) if kind == "bottleneck"
                                 else (PreActBasic, ref.PreActBasicBlock, 1.0))
    proj = DownsampleConv if (stride != 1 or in_chs != out_chs) else None
    theirs = timm_cls(in_chs, out_chs, bottle_ratio=ratio, stride=stride, conv_layer=create_conv2d,
                      norm_layer=partial(BatchNormAct2d), proj_layer=proj).double()
    ours = ours_cls(in_chs, out_chs, bottle_ratio=ratio, stride=stride).double()
    randomize_bn(theirs, gen)
    assert set(theirs.state_dict()) == set(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, in_chs, 7, 7, generator=gen, dtype=torch.float64)
    for train in (True, False):
        theirs.train(train)
        ours.train(train)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-12, atol=1e-12, msg=key)
