"""convert() / unconvert() / describe(): swapping the blocks of existing models in place.

The fused path runs under the Triton interpreter on the CPU: every fused parity test asserts that
the kernels really launched and forces small tiles (as tests/test_triton_forward.py does), and
compares with eager PyTorch and a float64 copy by the 2x-eager rule of tests/helpers.py.
"""
from __future__ import annotations

import copy
import importlib
import math
import warnings
from functools import partial

import pytest
import torch
import torch.nn as nn

import resnet_fused as rf
from helpers import DEVICE, SMALL_CONV, SMALL_STATS, assert_parity, randomize_bn, requires_triton
from resnet_fused import reference as ref
from resnet_fused.convert_adapters import bottle_ratio
from resnet_fused.triton.configs import forced_configs
from resnet_fused.triton.launch import launch_counts, reset_launch_counts

timm = pytest.importorskip("timm", reason="timm is optional; the timm conversion tests need it")
from timm.layers import BatchNormAct2d, DropPath, GroupNormAct, create_conv2d  # noqa: E402
from timm.models import resnet as timm_resnet  # noqa: E402
from timm.models import resnetv2 as timm_resnetv2  # noqa: E402

interpreted = requires_triton

# The package exports the function ``convert``, which shadows the submodule of the same name as
# an attribute of ``resnet_fused``; import_module returns the module itself.
convert_module = importlib.import_module("resnet_fused.convert")


def tiny_timm(basic: bool = False, seed: int = 0, **kwargs) -> nn.Module:
    """A two-stage timm ResNetV2 with BatchNormAct2d and plain convs (the fusable kind).

    Bottleneck: 8 -> 16 (projection, mid 8: timm rounds 16 * 0.25 up to 8, so bottle_ratio
    0.5 must be derived) -> 32 (stride 2). Basic: 8 -> 8 (identity) -> 16 (stride 2).
    """
    torch.manual_seed(seed)
    channels = (8, 16) if basic else (16, 32)
    return timm_resnetv2.ResNetV2(layers=[1, 1], channels=channels, stem_chs=8, conv_layer=create_conv2d,
                                  norm_layer=BatchNormAct2d, num_classes=5, basic=basic, **kwargs)


def timm_block(out_chs: int = 16, in_chs: int = 16, stride: int = 1, norm=BatchNormAct2d,
               conv=create_conv2d, basic: bool = False, **kwargs) -> nn.Module:
    cls = timm_resnetv2.PreActBasic if basic else timm_resnetv2.PreActBottleneck
    return cls(in_chs, out_chs, stride=stride, conv_layer=conv, norm_layer=norm, **kwargs)


def snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert list(after) == list(before), "state_dict keys (or their order) changed"
    for key, value in before.items():
        assert after[key].dtype == value.dtype and after[key].device == value.device, key
        assert torch.equal(after[key], value), key


def count_blocks(model: nn.Module, cls) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def run(model: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[dict, dict]:
    """(output, input gradient and every parameter gradient of one forward + backward; the
    kernel launches of the forward alone)."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    reset_launch_counts()
    with forced_configs(SMALL_CONV, SMALL_STATS):
        out = model(x)
        forward_launches = launch_counts()
        out.backward(grad_out.to(out.dtype))
    return {"out": out.detach(), "x.grad": x.grad,
            **{f"{n}.grad": p.grad for n, p in model.named_parameters()}}, forward_launches


def set_frozen(model: nn.Module) -> None:
    """Training model, eval-mode norms (fine-tuning with frozen BN statistics)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


# ---- Parity: converted models compute what the original computed -------------------------


@interpreted
@pytest.mark.parametrize("mode", ["train", "frozen"])
@pytest.mark.parametrize("basic", [False, True], ids=["bottleneck", "basic"])
def test_converted_timm_model_matches_eager(basic, mode, gen):
    """Output, input gradient, every parameter gradient and the running statistics of a converted
    timm model (fused Triton blocks) against the original timm model in fp32 and float64."""
    original = tiny_timm(basic=basic)
    randomize_bn(original, gen)
    set_frozen(original) if mode == "frozen" else original.train()
    exact, eager = copy.deepcopy(original).double(), copy.deepcopy(original)
    fused = rf.convert(copy.deepcopy(original), backend="triton")
    fused_cls = rf.FusedBasicBlock if basic else rf.FusedBottleneck
    assert count_blocks(fused, fused_cls) == 2
    x = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    exact, eager, fused = exact.to(DEVICE), eager.to(DEVICE), fused.to(DEVICE)
    x, grad_out = x.to(DEVICE), grad_out.to(DEVICE)

    got, counts = run(fused, x.float(), grad_out)
    assert counts["_bn_relu_conv_kernel"] == 2 * (2 if basic else 3), counts
    # One finalize per norm: batch statistics (train) or the running ones (frozen, for the backward).
    assert counts["_bn_finalize_kernel"] == 2 * (2 if basic else 3), counts
    (want, _), (eager_got, _) = run(exact, x, grad_out), run(eager, x.float(), grad_out)
    assert set(got) == set(want)
    for name in want:
        assert_parity(got[name], eager_got[name], want[name], torch.float32, name)
    exact_state, eager_state, fused_state = exact.state_dict(), eager.state_dict(), fused.state_dict()
    assert list(fused_state) == list(exact_state)
    for key, value in exact_state.items():
        if "running" in key:
            assert_parity(fused_state[key], eager_state[key], value, torch.float32, key)
        elif key.endswith("num_batches_tracked"):
            assert int(fused_state[key]) == int(value), key


def _identity_pool_block(kind: str, pool: bool) -> nn.Module:
    """A timm block whose projection average-pools (pool=True, stride 2) or carries an
    ``nn.Identity`` where the pool would be (pool=False, stride 1): a plain 1x1 projection."""
    stride = 2 if pool else 1
    if kind == "preact":  # resnetv2's DownsampleAvg: its pool is Identity at stride 1
        return timm_block(32, 16, stride=stride, proj_layer=timm_resnetv2.DownsampleAvg)
    # timm resnet's avg_down projection: Sequential(Identity | AvgPool2d, Conv2d 1x1, BatchNorm2d)
    downsample = timm_resnet.downsample_avg(16, 32, 1, stride=stride)
    return timm_resnet.Bottleneck(16, 8, stride=stride, downsample=downsample)


@interpreted
@pytest.mark.parametrize("kind", ["preact", "postact"])
def test_identity_pool_projections_fuse_and_match_eager(kind, gen):
    """A projection that average-pools only in form (an Identity pool) converts and computes what
    the original does (output, input and parameter gradients, running statistics, train mode,
    against float64); the same block with a real pool stays eager, and its reason says so."""
    original = nn.Sequential(_identity_pool_block(kind, pool=False))
    randomize_bn(original, gen)
    original.train()
    exact, eager = copy.deepcopy(original).double(), copy.deepcopy(original)
    fused = copy.deepcopy(original)
    keys = list(fused.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fusable: no warning
        rf.convert(fused, backend="triton")
    assert isinstance(fused[0], rf.FusedBottleneck if kind == "preact" else rf.FusedTimmBottleneck)
    assert list(fused.state_dict()) == keys
    assert rf.describe(fused, as_dict=True)["0"]["reason"] is None
    x = torch.randn(2, 16, 8, 8, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(2, 32, 8, 8, generator=gen, dtype=torch.float64)
    exact, eager, fused = exact.to(DEVICE), eager.to(DEVICE), fused.to(DEVICE)
    x, grad_out = x.to(DEVICE), grad_out.to(DEVICE)
    got, counts = run(fused, x.float(), grad_out)
    assert counts["_bn_relu_conv_kernel"] >= 3, counts  # every conv of the chain in the fused kernel
    (want, _), (eager_got, _) = run(exact, x, grad_out), run(eager, x.float(), grad_out)
    assert set(got) == set(want)
    for name in want:
        assert_parity(got[name], eager_got[name], want[name], torch.float32, name)
    exact_state, eager_state, fused_state = exact.state_dict(), eager.state_dict(), fused.state_dict()
    for key, value in exact_state.items():
        if "running" in key:
            assert_parity(fused_state[key], eager_state[key], value, torch.float32, key)
        elif key.endswith("num_batches_tracked"):
            assert int(fused_state[key]) == int(value), key
    back = rf.unconvert(fused)
    assert list(back.state_dict()) == keys  # a pre-activation block comes back as the reference block
    if kind == "postact":  # timm's block, the Identity the fused block did not need back in its place
        assert type(back[0]) is timm_resnet.Bottleneck and type(back[0].downsample[0]) is nn.Identity
        assert len(back[0].downsample) == 3

    pooled = nn.Sequential(_identity_pool_block(kind, pool=True))
    eager_cls = type(pooled[0])
    with pytest.warns(UserWarning, match=r"0: downsample: average-pool shortcut"):
        rf.convert(pooled, backend="triton")
    assert type(pooled[0]) is eager_cls
    assert "average-pool shortcut" in rf.describe(pooled, as_dict=True)["0"]["reason"]


def test_converted_package_model_is_eager_identical_on_cpu_with_auto(gen):
    """resnet_v2_18 (reference blocks) converted with backend="auto": on the CPU the fused blocks
    run eager PyTorch, so outputs and gradients are bitwise those of the original, and no
    Triton kernel launches."""
    original = rf.resnet_v2_18(num_classes=4)
    randomize_bn(original, gen)
    converted = rf.convert(copy.deepcopy(original), backend="auto")
    assert count_blocks(converted, rf.FusedBasicBlock) == 8 and converted.backend == "auto"
    x = torch.randn(2, 3, 32, 32, generator=gen)
    grad_out = torch.randn(2, 4, generator=gen)
    got, launches = run(converted.train(), x, grad_out)
    assert launches == {}
    want, _ = run(original.train(), x, grad_out)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert_same_state(converted, original.state_dict())


def test_converted_timm_resnetv2_50_matches_with_auto(gen):
    """timm's real resnetv2_50 (16 bottlenecks): same output and gradients after convert."""
    original = timm.create_model("resnetv2_50", num_classes=3)
    randomize_bn(original, gen)
    converted = rf.convert(copy.deepcopy(original), backend="auto")
    assert count_blocks(converted, rf.FusedBottleneck) == 16
    assert count_blocks(converted, timm_resnetv2.PreActBottleneck) == 0
    x = torch.randn(2, 3, 32, 32, generator=gen)
    grad_out = torch.randn(2, 3, generator=gen)
    got, launches = run(converted.train(), x, grad_out)
    assert launches == {}  # auto on the CPU: eager
    want, _ = run(original.train(), x, grad_out)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
    assert_same_state(converted, original.state_dict())


# ---- What a swap keeps --------------------------------------------------------------------


def test_convert_keeps_state_objects_modes_and_flags(gen):
    """Keys (in order) and values, the parameter/buffer objects themselves (an optimizer built
    before convert keeps working), dtype, requires_grad flags and per-module train/eval flags."""
    model = tiny_timm().double()
    randomize_bn(model, gen)
    frozen = model.stages[0].blocks[0]
    frozen.conv1.weight.requires_grad_(False)
    frozen.norm2.bias.requires_grad_(False)
    model.train()
    model.stages[1].blocks[0].norm3.eval()
    before = snapshot(model)
    objects = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules() if n.endswith(("norm1", "norm2", "norm3"))}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    assert rf.convert(model, backend="triton") is model
    assert count_blocks(model, rf.FusedBottleneck) == 2
    assert_same_state(model, before)
    assert {k: id(v) for k, v in model.state_dict(keep_vars=True).items()} == objects
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules() if n.endswith(("norm1", "norm2", "norm3"))} == modes
    assert all(t.dtype == torch.float64 for t in model.state_dict().values() if t.is_floating_point())
    assert not any(t.is_meta for t in model.state_dict().values())

    # One SGD step through the converted model moves the very tensors the optimizer holds
    # (backend "reference": fp64 on the Triton path is a known bug, see test_bad_input.py).
    rf.convert(model, backend="reference")
    x = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    model(x).square().mean().backward()
    optimizer.step()
    block = model.stages[1].blocks[0]
    assert not torch.equal(block.conv2.weight, before["stages.1.blocks.0.conv2.weight"])
    assert torch.equal(model.stages[0].blocks[0].conv1.weight, before["stages.0.blocks.0.conv1.weight"])
    assert model.stages[0].blocks[0].conv1.weight.grad is None


def test_convert_derives_block_arguments():
    """Constructor arguments read back from the modules: widths, stride, shortcut, per-norm
    eps/momentum, stride on the 1x1 (paper layout) and ResNeXt groups."""
    block = ref.PreActBottleneck(12, 24, bottle_ratio=0.5, stride=2, groups=2, stride_on="1x1", eps=1e-3,
                                 momentum=None)
    block.norm3.eps, block.norm2.momentum = 2e-4, 0.3
    fused = rf.convert(block, backend="triton")
    assert isinstance(fused, rf.FusedBottleneck)
    assert (fused.in_chs, fused.mid_chs, fused.out_chs, fused.stride, fused.groups, fused.stride_on,
            fused.shortcut) == (12, 12, 24, 2, 2, "1x1", "projection")
    assert [n.eps for n in (fused.norm1, fused.norm2, fused.norm3)] == [1e-3, 1e-3, 2e-4]
    assert [n.momentum for n in (fused.norm1, fused.norm2, fused.norm3)] == [None, 0.3, None]
    subsample = rf.convert(ref.PreActBasicBlock(8, 8, stride=2, shortcut="subsample"), backend="triton")
    assert subsample.shortcut == "subsample" and subsample.downsample is None


def test_bottle_ratio_survives_float_rounding():
    """mid/out * out can round below mid (15/22 * 22 = 14.999...): the ratio is nudged so the
    block's int(out * ratio) is exactly the middle width."""
    assert int(22 * (15 / 22)) == 14  # the trap the nudge avoids
    ratio = bottle_ratio(22, 15)
    assert int(22 * ratio) == 15
    ratio_of = bottle_ratio
    assert all(int(o * ratio_of(o, m)) == m for o in range(1, 300) for m in range(1, o + 1))
    block = ref.PreActBottleneck(10, 22, bottle_ratio=math.nextafter(15 / 22, 1.0))
    assert block.mid_chs == 15
    fused = rf.convert(block, backend="reference")
    assert fused.mid_chs == 15 and rf.unconvert(fused).mid_chs == 15


def test_unconvert_round_trip(gen):
    """convert then unconvert: eager reference blocks, same state, same output as the original."""
    original = tiny_timm()
    randomize_bn(original, gen)
    model = rf.convert(copy.deepcopy(original), backend="triton")
    back = rf.unconvert(model)
    assert back is model
    assert count_blocks(back, rf.FusedBottleneck) == 0
    assert count_blocks(back, ref.PreActBottleneck) == 2
    assert all(type(m) is not rf.FusedBottleneck for m in back.modules())
    assert_same_state(back, original.state_dict())
    x = torch.randn(2, 3, 16, 16, generator=gen)
    reset_launch_counts()
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), original.eval()(x), rtol=1e-6, atol=1e-7)
    assert launch_counts() == {}
    # and from this package's model: unconvert(convert(m)) has the reference classes back
    package = rf.resnet_v2_18(num_classes=3, backend="triton")
    rf.unconvert(package)
    assert count_blocks(package, ref.PreActBasicBlock) == 8 and package.backend == "reference"
    assert count_blocks(package, rf.FusedBasicBlock) == 0


def test_convert_is_idempotent(gen):
    model = tiny_timm()
    randomize_bn(model, gen)
    rf.convert(model, backend="triton")
    blocks = [m for m in model.modules() if isinstance(m, rf.FusedBottleneck)]
    before, text = snapshot(model), rf.describe(model)
    rf.convert(model, backend="triton")
    assert [m for m in model.modules() if isinstance(m, rf.FusedBottleneck)] == blocks  # same objects
    assert_same_state(model, before)
    assert rf.describe(model) == text
    rf.convert(model, backend="auto")  # an already fused block only gets its backend set
    assert [b.backend for b in blocks] == ["auto", "auto"]


@interpreted
def test_backend_auto_runs_eager_on_cpu_and_triton_runs_kernels(gen):
    model = tiny_timm()
    randomize_bn(model, gen)
    x = torch.randn(2, 3, 16, 16, generator=gen).to(DEVICE)
    rf.convert(model, backend="auto").to(DEVICE).eval()
    reset_launch_counts()
    with torch.no_grad():
        auto_out = model(x)
    assert (launch_counts()["_bn_relu_conv_kernel"] > 0) == (DEVICE == "cuda")
    rf.convert(model, backend="triton")
    reset_launch_counts()
    with torch.no_grad(), forced_configs(SMALL_CONV, SMALL_STATS):
        triton_out = model(x)
    assert launch_counts()["_bn_relu_conv_kernel"] == 6
    torch.testing.assert_close(triton_out, auto_out, rtol=1e-5, atol=1e-5)


def test_convert_a_block_itself_returns_the_new_block(gen):
    block = timm_block(32, 16, stride=2, proj_layer=timm_resnetv2.DownsampleConv)
    fused = rf.convert(block, backend="triton")
    assert isinstance(fused, rf.FusedBottleneck) and fused.shortcut == "projection" and fused.stride == 2
    assert rf.describe(fused) == "(root): FusedBottleneck -> triton"


def test_shared_block_is_swapped_everywhere():
    block = ref.PreActBasicBlock(8, 8)
    model = nn.Sequential(block, nn.Sequential(block))
    rf.convert(model, backend="triton")
    assert isinstance(model[0], rf.FusedBasicBlock) and model[1][0] is model[0]


# ---- describe ---------------------------------------------------------------------------


def test_describe_lines_and_dict():
    model = tiny_timm()
    assert rf.describe(model).splitlines() == [
        "stages.0.blocks.0: timm PreActBottleneck -> not fused: eager timm block, convert() can fuse it",
        "stages.1.blocks.0: timm PreActBottleneck -> not fused: eager timm block, convert() can fuse it",
    ]
    rf.convert(model, backend="auto")
    assert rf.describe(model).splitlines() == [
        "stages.0.blocks.0: FusedBottleneck -> auto (triton on CUDA, eager on CPU)",
        "stages.1.blocks.0: FusedBottleneck -> auto (triton on CUDA, eager on CPU)",
    ]
    rf.convert(model, backend="triton")
    info = rf.describe(model, as_dict=True)
    assert list(info) == ["stages.0.blocks.0", "stages.1.blocks.0"]
    assert info["stages.1.blocks.0"] == dict(type="FusedBottleneck", origin="fused", kind="bottleneck",
                                             backend="triton", fused=True, runs="triton", reason=None)
    rf.unconvert(model)
    assert rf.describe(model).splitlines()[0] == "stages.0.blocks.0: PreActBottleneck -> reference"
    assert rf.describe(nn.Linear(2, 2)) == ""


# ---- Blocks that cannot be fused stay, listed in one warning ----------------------------


def unfusable_model() -> tuple[nn.Module, dict[str, str]]:
    """A model mixing fusable blocks with every kind convert() must leave alone: path -> a
    phrase its reason must contain."""
    torch.manual_seed(0)
    gelu_bn = partial(BatchNormAct2d, act_layer=nn.GELU)
    sync_timm = timm.layers.convert_sync_batchnorm(timm_block())
    sync_package = nn.SyncBatchNorm.convert_sync_batchnorm(ref.PreActBasicBlock(16, 16))
    blocks = {
        "fusable": timm_block(),
        "groupnorm": timm_block(norm=partial(GroupNormAct, num_groups=4)),
        "stdconv": timm_block(conv=timm.layers.StdConv2d),
        "drop_path": timm_block(drop_path_rate=0.1),
        "avg_down": timm_block(32, stride=2, proj_layer=timm_resnetv2.DownsampleAvg),
        "dilated": timm_block(dilation=2),
        "gelu": timm_block(norm=gelu_bn),
        "sync_timm": sync_timm,
        "sync_package": sync_package,
        "basic_fusable": timm_block(basic=True),
        "package_fusable": ref.PreActBottleneck(16, 16),
    }
    model = nn.Sequential()
    for name, block in blocks.items():
        model.add_module(name, block)
    model.add_module("zero_drop_path", timm_block(drop_path_rate=0.0))
    model.zero_drop_path.drop_path = DropPath(0.0)  # a DropPath that drops nothing is fusable
    reasons = {
        "groupnorm": "GroupNormAct", "stdconv": "weight standardization", "drop_path": "drop_prob=0.1",
        "avg_down": "DownsampleAvg", "dilated": "dilation 2", "gelu": "GELU",
        "sync_timm": convert_module.SYNC_BATCHNORM_REASON,
        "sync_package": convert_module.SYNC_BATCHNORM_REASON,
    }
    return model, reasons


def test_unfusable_blocks_stay_and_are_listed_in_one_warning(gen):
    model, reasons = unfusable_model()
    originals = {name: getattr(model, name) for name in reasons}
    before = snapshot(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rf.convert(model, backend="triton")
    ours = [w for w in caught if "resnet_fused.convert" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, UserWarning)
    message = str(ours[0].message)
    listed = [line.strip().split(":")[0] for line in message.splitlines()[1:]]
    assert listed == list(reasons), message
    for name, phrase in reasons.items():
        line = next(li for li in message.splitlines() if li.strip().startswith(name + ":"))
        assert phrase in line, (name, line)
        assert getattr(model, name) is originals[name]  # left exactly as it was
    for name in ("fusable", "package_fusable", "zero_drop_path"):
        assert isinstance(getattr(model, name), rf.FusedBottleneck), name
    assert isinstance(model.basic_fusable, rf.FusedBasicBlock)
    assert_same_state(model, before)
    info = rf.describe(model, as_dict=True)
    assert info["sync_timm"]["runs"] == "not fused: " + convert_module.SYNC_BATCHNORM_REASON
    assert info["groupnorm"]["fused"] is False and "GroupNormAct" in info["groupnorm"]["reason"]
    assert info["fusable"]["runs"] == "triton"


def test_fused_block_with_sync_batchnorm_is_reported_and_left_alone():
    """torch's convert_sync_batchnorm swaps the fused block's norms for SyncBatchNorm, which the
    fused kernels cannot honour: convert leaves the block (and its backend) alone and says so."""
    block = nn.SyncBatchNorm.convert_sync_batchnorm(rf.FusedBasicBlock(8, 8, backend="reference"))
    model = nn.Sequential(block)
    with pytest.warns(UserWarning, match=r"0: SyncBatchNorm \(cross-process statistics\) is not fused"):
        rf.convert(model, backend="triton")
    assert model[0] is block and block.backend == "reference"
    assert rf.describe(model) == ("0: FusedBasicBlock -> reference, but: "
                                  + convert_module.SYNC_BATCHNORM_REASON)


def test_no_warning_when_everything_fuses():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rf.convert(tiny_timm(), backend="triton")


def test_block_with_hooks_is_not_converted():
    model = nn.Sequential(ref.PreActBasicBlock(8, 8))
    model[0].norm2.register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match=r"0: norm2: hooks registered here"):
        rf.convert(model, backend="triton")
    assert type(model[0]) is ref.PreActBasicBlock


# ---- Argument validation ----------------------------------------------------------------


def test_bad_arguments_are_clear_errors_and_change_nothing():
    model = rf.resnet_v2_18(num_classes=3)
    before = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match="nn.Module"):
        rf.convert("resnet")
    with pytest.raises(TypeError, match="nn.Module"):
        rf.unconvert(None)
    with pytest.raises(TypeError, match="nn.Module"):
        rf.describe(42)
    with pytest.raises(TypeError, match="as_dict"):
        rf.describe(model, as_dict="yes")
    with pytest.raises(ValueError, match="backend must be one of"):
        rf.convert(model, backend="gpu")
    with pytest.raises(TypeError, match="backend must be a str"):
        rf.convert(model, backend=None)
    if not rf._extension.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            rf.convert(model, backend="cuda")  # the CUDA C++ blocks need resnet_fused._C
    assert [type(m) for m in model.modules()] == before
