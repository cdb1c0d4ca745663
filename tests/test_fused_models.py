"""Whole fused models: training steps track the reference, torch.compile without graph breaks,
the backward ops pass opcheck, and (GPU) a training step captures in a CUDA graph."""
from __future__ import annotations

import copy

import pytest
import torch

import resnet_fused as rf
from helpers import DEVICE, randomize_bn, requires_cuda, requires_triton
from resnet_fused.configs import ModelConfig
from resnet_fused.ops import blocks as block_ops
from resnet_fused.triton.configs import BackwardConfig, StatsConfig, forced_configs
from resnet_fused.triton.conv import ConvConfig
from resnet_fused.triton.launch import launch_counts, reset_launch_counts

pytestmark = requires_triton

# A tiny ResNet-v2: two bottleneck stages (projection, stride 2, identity units) and widths that
# are not multiples of 16; the 7x7 stem stays eager.
TINY = ModelConfig("bottleneck", (2, 1), (24, 40), 0.5)
TILES = dict(conv=ConvConfig(32, 16, 16, 4, 1), stats=StatsConfig(32, 16, 4),
             backward=BackwardConfig(32, 16, 16, 4, 1), strategy="fused")  # GPU default: hybrid


def tiny_models(gen, backend="triton"):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    fused = rf.ResNetV2(TINY, num_classes=5, backend=backend).to(DEVICE)
    randomize_bn(fused, gen)
    eager = rf.ResNetV2(TINY, num_classes=5, backend="reference").to(DEVICE)
    eager.load_state_dict(fused.state_dict())
    return fused, eager


def test_training_steps_track_the_reference(gen):
    """Three SGD steps: losses, every parameter and running statistic follow the eager model."""
    fused, eager = tiny_models(gen)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (fused, eager)]
    losses = {"fused": [], "eager": []}
    reset_launch_counts()
    with forced_configs(**TILES):
        for _ in range(3):
            x = torch.randn(4, 3, 20, 20, generator=gen).to(DEVICE)
            target = torch.randint(0, 5, (4,), generator=gen).to(DEVICE)
            for key, model, opt in (("fused", fused, opts[0]), ("eager", eager, opts[1])):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(x), target)
                loss.backward()
                opt.step()
                losses[key].append(loss.item())
    counts = launch_counts()
    assert counts["_bn_relu_conv_kernel"] == 3 * 3 * 3 and counts["_conv_dgrad_kernel"] == 3 * 3 * 3, counts
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["eager"]), rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(fused.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_compiled_model_fullgraph(gen):
    """torch.compile(model, fullgraph=True): no graph break through the fused ops, forward and
    backward, same outputs and gradients as eager."""
    fused, eager = tiny_models(gen)
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 3, 20, 20, generator=gen).to(DEVICE)
    with forced_configs(**TILES):
        reset_launch_counts()
        out = compiled(x)
        out.square().sum().backward()
    assert launch_counts()["_bn_relu_conv_kernel"] == 9
    expected = eager(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(fused.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_backward_ops_opcheck(kind, gen):
    """The backward ops themselves (schema, fake tensors) pass torch.library.opcheck."""
    kwargs = dict(in_chs=8, out_chs=12, stride=2) | (dict(bottle_ratio=0.5) if kind == "bottleneck" else {})
    block = rf.make_block(kind, backend="triton", **kwargs).to(DEVICE).train()
    randomize_bn(block, gen)
    x = torch.randn(2, 8, 5, 5, generator=gen).to(DEVICE)
    name = "bottleneck_backward" if kind == "bottleneck" else "basic_block_backward"
    packet = getattr(torch.ops.resnet_fused, name)
    real = packet.default
    impl_name = f"_{name}_impl"
    impl = getattr(block_ops, impl_name)
    calls = []
    with forced_configs(**TILES):
        out = block(x.requires_grad_())

        class Recorder:
            def __init__(self, target):
                self.target = target

            def __call__(self, *args, **kwargs):
                calls.append((args, kwargs))
                return self.target(*args, **kwargs)

        # Record the arguments the backward passes to the backward op: the op's registered
        # autograd calls the op, the eager block's autograd.Function its implementation
        # directly (same arguments).
        try:
            setattr(torch.ops.resnet_fused, name, Recorder(real))
            setattr(block_ops, impl_name, Recorder(impl))
            out.sum().backward()
        finally:
            setattr(torch.ops.resnet_fused, name, packet)
            setattr(block_ops, impl_name, impl)
        assert calls, "the backward op did not run"
        args, kwargs = calls[0]
        torch.library.opcheck(real, args, kwargs,
                              test_utils=("test_schema", "test_faketensor"))  # no double backward by design


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_training_step_captures_in_a_cuda_graph(backend, gen):
    """A whole training step (forward, backward, SGD) of a fused model captures and replays (no
    host synchronisation inside the ops), and the replay equals, to the bit, the same step run
    without a graph from the same state: loss, logits, every gradient, the updated parameters and
    running statistics (the same kernels run on the same data)."""
    if backend == "cuda" and not rf._extension.is_available():
        pytest.skip(f"resnet_fused._C is not available: {rf._extension.unavailable_reason()}")
    from resnet_fused.cuda import launch_counts as cuda_counts, reset_launch_counts as reset_cuda
    from resnet_fused.triton.launch import launch_counts as triton_counts, reset_launch_counts as reset_triton
    fused, _ = tiny_models(gen, backend)
    fused = fused.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(fused.parameters(), lr=0.01, capturable=True) if "capturable" in \
        torch.optim.SGD.__init__.__code__.co_varnames else torch.optim.SGD(fused.parameters(), lr=0.01)
    x = torch.randn(8, 3, 32, 32, generator=gen).cuda()
    target = torch.randint(0, 5, (8,), generator=gen).cuda()

    def step():
        opt.zero_grad(set_to_none=False)
        logits = fused(x)
        loss = torch.nn.functional.cross_entropy(logits, target)
        loss.backward()
        opt.step()
        return loss, logits

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: kernels compiled, allocator pools settled
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_logits = step()
    start = {k: v.clone() for k, v in fused.state_dict().items()}

    def snapshot(loss, logits):
        torch.cuda.synchronize()
        return {"loss": loss.detach().clone(), "logits": logits.detach().clone(),
                **{f"grad {n}": p.grad.clone() for n, p in fused.named_parameters()},
                **{k: v.clone() for k, v in fused.state_dict().items()}}

    graph.replay()
    replayed = snapshot(static_loss, static_logits)
    with torch.no_grad():  # back to the same state, in place (the graph holds these tensors)
        for k, v in fused.state_dict().items():
            v.copy_(start[k])
    reset_cuda()
    reset_triton()
    eager_loss, eager_logits = step()
    ran = cuda_counts()["conv_fwd_cuda"] if backend == "cuda" else triton_counts()["_bn_relu_conv_kernel"]
    assert ran > 0, "the fused kernels did not run in the step without a graph"
    direct = snapshot(eager_loss, eager_logits)
    assert torch.isfinite(replayed["loss"])
    assert any(not torch.equal(replayed[k], start[k]) for k in start if "running_mean" in k)
    different = [k for k in direct if not torch.equal(replayed[k], direct[k])]
    assert not different, f"graph replay and the direct step differ in {different}"
