"""Stage fusion (resnet_fused/stage.py): blocks hand bn1's input statistics to the next block.

Whole models against eager over training steps (outputs, every gradient, running statistics),
the chained statistics really used (no statistics pass inside a chain), where the chain must
break, state_dict both ways, convert/unconvert, torch.compile and the op's opcheck with the
statistics arguments. CPU: Triton interpreted, tiny shapes.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import resnet_fused as rf
from helpers import DEVICE, assert_parity, randomize_bn, requires_triton
from resnet_fused import reference as ref
from resnet_fused.configs import ModelConfig
from resnet_fused.stage import FusedStage, FusedStages
from resnet_fused.triton.configs import BackwardConfig, StatsConfig, forced_configs
from resnet_fused.triton.conv import ConvConfig
from resnet_fused.triton.launch import launch_counts, reset_launch_counts

pytestmark = requires_triton

TILES = dict(conv=ConvConfig(32, 16, 16, 4, 1), stats=StatsConfig(32, 16, 4),
             backward=BackwardConfig(32, 16, 16, 4, 1), strategy="fused")
STATS_KERNEL = "_channel_stats_partial_kernel"


def _timm_model(seed: int) -> nn.Module:
    timm_resnetv2 = pytest.importorskip("timm.models.resnetv2")
    from timm.layers import BatchNormAct2d, create_conv2d

    torch.manual_seed(seed)
    return timm_resnetv2.ResNetV2(layers=[2, 1], channels=(16, 32), stem_chs=8, conv_layer=create_conv2d,
                                  norm_layer=BatchNormAct2d, num_classes=5)


def _package_model(cfg: ModelConfig, seed: int, momentum=0.1) -> nn.Module:
    torch.manual_seed(seed)
    return rf.ResNetV2(cfg, num_classes=5, backend="reference", momentum=momentum)


# name -> (builder(seed), frozen stage index or None). Every model trains with stage fusion on.
MODELS = {
    "bottleneck-momentum-none": (lambda s: _package_model(ModelConfig("bottleneck", (2, 1), (24, 40), 0.5), s,
                                                          momentum=None), None),
    "basic": (lambda s: _package_model(ModelConfig("basic", (2, 1), (8, 16), 1.0), s), None),
    "resnext": (lambda s: _package_model(ModelConfig("bottleneck", (1, 1), (32, 32), 0.5, groups=4), s), None),
    "timm-resnetv2": (_timm_model, None),
    "frozen-first-stage": (lambda s: _package_model(ModelConfig("bottleneck", (1, 1), (24, 40), 0.5), s), 0),
}


def _freeze(model: nn.Module, stage: int) -> None:
    """Fine-tuning: the stage's norms in eval mode (running statistics as constants)."""
    for m in model.stages[stage].modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def _triple(name: str, gen):
    build, frozen = MODELS[name]
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    eager = build(seed).to(DEVICE)
    randomize_bn(eager, gen)
    fused = rf.convert(copy.deepcopy(eager), backend="triton")
    exact = copy.deepcopy(eager).double()
    models = (fused, eager, exact)
    for m in models:
        m.train()
        if frozen is not None:
            _freeze(m, frozen)
    return models


def _norms(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("name", list(MODELS))
def test_model_training_steps_match_eager(name, gen):
    """Two SGD steps: output, every gradient, then every running statistic, against eager (fp32)
    and the fp64 reference by the 2x-eager rule; inside the chain no block takes its own
    statistics: one statistics pass per forward (none when the first stage is frozen)."""
    fused, eager, exact = _triple(name, gen)
    assert isinstance(fused.stages, FusedStages) and all(isinstance(s.blocks, FusedStage) for s in fused.stages)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (fused, eager, exact)]
    frozen = MODELS[name][1]
    for step in range(2):
        x = torch.randn(2, 3, 16, 16, generator=gen).to(DEVICE)
        grad_out = torch.randn(2, 5, generator=gen, dtype=torch.float64).to(DEVICE)
        outs = []
        with forced_configs(**TILES):
            reset_launch_counts()
            for model, dtype in ((fused, torch.float32), (eager, torch.float32), (exact, torch.float64)):
                out = model(x.to(dtype))
                (out * grad_out.to(dtype)).sum().backward()
                outs.append(out)
            counts = launch_counts()
        assert counts["_bn_relu_conv_kernel"] == sum(3 if isinstance(b, rf.FusedBottleneck) else 2
                                                     for b in fused.modules()
                                                     if isinstance(b, (rf.FusedBottleneck, rf.FusedBasicBlock))), counts
        assert counts[STATS_KERNEL] == (0 if frozen == 0 else 1), counts
        assert_parity(outs[0], outs[1], outs[2], torch.float32, f"{name} step {step} output")
        for (pname, a), (_, b), (_, c) in zip(fused.named_parameters(), eager.named_parameters(),
                                              exact.named_parameters()):
            assert_parity(a.grad, b.grad, c.grad, torch.float32, f"{name} step {step} grad {pname}")
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (nname, a), (_, b), (_, c) in zip(_norms(fused), _norms(eager), _norms(exact)):
        assert torch.equal(a.num_batches_tracked, b.num_batches_tracked), nname
        assert_parity(a.running_mean, b.running_mean, c.running_mean, torch.float32, f"{nname}.running_mean")
        assert_parity(a.running_var, b.running_var, c.running_var, torch.float32, f"{nname}.running_var")


def _stage(gen, n_blocks: int = 3) -> tuple[FusedStage, nn.Sequential]:
    blocks = [ref.PreActBottleneck(16, 16, bottle_ratio=0.5) for _ in range(n_blocks)]
    plain = nn.Sequential(*blocks).to(DEVICE)
    randomize_bn(plain, gen)
    fused = rf.convert(copy.deepcopy(plain), backend="triton")
    assert type(fused) is FusedStage
    return fused.train(), plain.train()


def _stats_passes(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    with forced_configs(**TILES), torch.no_grad():
        reset_launch_counts()
        out = module(x)
        counts = launch_counts()
    assert counts["_bn_relu_conv_kernel"] > 0
    return out, counts[STATS_KERNEL]


def test_chain_breaks_where_it_must(gen):
    """One statistics pass for a chained stage; a hook on an inner block makes it run (and its
    hook fire) as a normal call, so it and its successor take their own; a block called alone
    takes its own; eval norms need none."""
    fused, plain = _stage(gen)
    x = torch.randn(2, 16, 6, 6, generator=gen).to(DEVICE)
    out, passes = _stats_passes(fused, x)
    assert passes == 1
    with torch.no_grad():
        expected = plain(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert out.is_contiguous()  # an NCHW input gets an NCHW output, as from the nn.Sequential

    fired = []
    handle = fused[1].register_forward_hook(lambda *args: fired.append(1))
    out_hooked, passes = _stats_passes(fused, x)
    handle.remove()
    assert passes == 3 and fired == [1]
    torch.testing.assert_close(out_hooked, expected, rtol=1e-4, atol=1e-5)

    _, passes = _stats_passes(fused[0], x)
    assert passes == 1
    _, passes = _stats_passes(fused.eval(), x)
    assert passes == 0


def test_chained_statistics_equal_a_statistics_pass(gen):
    """The partials a block's last conv emits describe the stored output as a K0 pass would:
    the same mean and variance (fp32 merges in another tile order)."""
    from resnet_fused.fused import forward as fused_forward
    from resnet_fused.triton.kernel_set import TRITON

    fused, _ = _stage(gen, 1)
    block = fused[0]
    x = torch.randn(2, 16, 6, 6, generator=gen).to(DEVICE)
    with forced_configs(**TILES), torch.no_grad():
        out, part = block._forward_stats(x, None, True)
        from_epilogue = TRITON.finalize(part, None, None, 0.0)
        from_pass = TRITON.finalize(TRITON.stats_partials(out), None, None, 0.0)
    assert part.shape[0] == 3 and part.shape[2] == out.shape[1] and fused_forward is not None
    torch.testing.assert_close(from_epilogue[0], from_pass[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(from_epilogue[1], from_pass[1], rtol=1e-5, atol=1e-6)


def test_state_dict_loads_both_ways_and_unconvert_restores(gen):
    model = _timm_model(0)
    randomize_bn(model, gen)
    plain_state = copy.deepcopy(model.state_dict())
    fused = rf.convert(model, backend="triton")
    assert type(fused.stages) is FusedStages and type(fused.stages[0].blocks) is FusedStage
    assert list(fused.state_dict()) == list(plain_state)
    fused.load_state_dict(plain_state)  # plain -> fused
    other = _timm_model(1)
    other.load_state_dict(fused.state_dict())  # fused -> plain
    for key, value in other.state_dict().items():
        assert torch.equal(value, plain_state[key]), key
    rf.unconvert(fused)
    assert type(fused.stages) is nn.Sequential and type(fused.stages[0].blocks) is nn.Sequential
    assert not any(isinstance(m, (FusedStage, FusedStages)) for m in fused.modules())
    # The package's own model: FusedStage / FusedStages by construction, plain after unconvert.
    own = rf.resnet_v2_18(num_classes=3)
    assert type(own.stages) is FusedStages and type(own.stages[0].blocks) is FusedStage
    keys = list(own.state_dict())
    lines = rf.describe(rf.convert(own, backend="triton"), statistics=True).splitlines()
    assert lines[0].endswith("[input statistics: own statistics pass]")
    assert all(line.endswith("[input statistics: chained from the previous block's last conv]") for line in lines[1:])
    rf.unconvert(own)
    assert type(own.stages[0].blocks) is nn.Sequential and list(own.state_dict()) == keys


def test_compiled_model_with_stage_fusion(gen):
    """torch.compile(fullgraph=True) over a stage-fused model: one statistics pass, outputs,
    gradients and running statistics as eager."""
    # momentum 0.1: the model's last norm is eager nn.BatchNorm2d, whose momentum=None path
    # reads num_batches_tracked on the host (a graph break of its own).
    fused, eager, _ = _triple("frozen-first-stage", gen)
    fused.train(), eager.train()
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 3, 16, 16, generator=gen).to(DEVICE)
    with forced_configs(**TILES):
        reset_launch_counts()
        out = compiled(x)
        out.square().sum().backward()
        counts = launch_counts()
    assert counts[STATS_KERNEL] == 1 and counts["_conv_dgrad_kernel"] > 0, counts
    expected = eager(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(fused.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4, msg=name)
    for (name, a), (_, b) in zip(_norms(fused), _norms(eager)):
        assert int(a.num_batches_tracked) == 1, name
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_opcheck_with_statistics_arguments(kind, gen):
    """opcheck of the block op updating running statistics, taking and emitting partials."""
    kwargs = dict(in_chs=16, out_chs=16) | (dict(bottle_ratio=0.5) if kind == "bottleneck" else {})
    block = rf.make_block(kind, backend="triton", momentum=None, **kwargs).to(DEVICE).train()
    randomize_bn(block, gen)
    x = torch.randn(2, 16, 5, 5, generator=gen).to(DEVICE)
    with forced_configs(**TILES):
        in_stats = block._forward_stats(x, None, True)[1]
        xg = x.clone().requires_grad_()
        args = block._norm_args(xg, update=True)
        names = ("bn_weights", "bn_biases", "running_means", "running_vars", "training", "eps")
        common = dict(stride=block.stride, groups=block.groups, shortcut=block.shortcut, fold_eval=False,
                      backend="triton", momentum=[-1.0] * len(block._norms()), update_stats=True,
                      in_stats=in_stats, emit_stats=True)
        if kind == "bottleneck":
            op = torch.ops.resnet_fused.bottleneck_forward.default
            inputs = (xg, block.conv1.weight, block.conv2.weight, block.conv3.weight, None)
            common["stride_on"] = block.stride_on
        else:
            op = torch.ops.resnet_fused.basic_block_forward.default
            inputs = (xg, block.conv1.weight, block.conv2.weight, None)
        reset_launch_counts()
        torch.library.opcheck(op, inputs + tuple(args[n] for n in names), common)
    counts = launch_counts()
    assert counts["_bn_relu_conv_kernel"] > 0 and counts[STATS_KERNEL] == 0, counts


def test_momentum_none_factor_in_fp32():
    """The cumulative average's factor 1 / batches in fp32 whatever the buffer dtype (in bf16,
    1/301 is off by 0.4%): the bf16 buffer gets the fp32 blend, rounded once."""
    rm = torch.full((4,), 2.0, dtype=torch.bfloat16)
    rv = torch.full((4,), 3.0, dtype=torch.bfloat16)
    nbt = torch.tensor(300)
    mean, var = torch.full((4,), 5.0), torch.full((4,), 7.0)
    ref.update_running_stats(rm, rv, nbt, mean, var, 10, None)
    f = 1.0 / torch.tensor(301.0)
    assert int(nbt) == 301
    assert torch.equal(rm, torch.lerp(torch.full((4,), 2.0), mean, f).to(torch.bfloat16))
    assert torch.equal(rv, torch.lerp(torch.full((4,), 3.0), var * 10 / 9, f).to(torch.bfloat16))


def test_fused_finalize_updates_running_statistics_cumulatively(gen):
    """The finalize kernel's in-launch update over 3 batches, momentum=None and 0.3, against
    nn.BatchNorm2d (fp32 buffers), num_batches_tracked included."""
    from resnet_fused.triton.kernel_set import TRITON

    for momentum in (None, 0.3):
        bn = nn.BatchNorm2d(20, momentum=momentum).train()
        rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
        for _ in range(3):
            x = torch.randn(3, 20, 5, 5, generator=gen) * 3 + 1
            with forced_configs(**TILES):
                reset_launch_counts()
                TRITON.finalize_stats(TRITON.stats_partials(x), bn.weight, bn.bias, bn.eps, running_mean=rm,
                                      running_var=rv, num_batches_tracked=nbt, momentum=momentum, update=True)
                assert launch_counts()["_bn_finalize_kernel"] == 1
            bn(x)
        assert torch.equal(nbt, bn.num_batches_tracked)
        torch.testing.assert_close(rm, bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rv, bn.running_var, rtol=1e-5, atol=1e-6)
