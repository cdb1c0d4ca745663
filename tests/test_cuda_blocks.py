"""The CUDA C++ backend's whole blocks (``backend="cuda"``) against the reference.

On this CPU machine the ``_cuda`` ops run their host implementation, which executes the same
tile code as the GPU kernels (phase by phase, thread by thread; csrc/cuda/conv_tile.cuh), so the
block orchestration, every prologue/epilogue, the statistics and every gradient are checked
here; the device-only parts (tensor-core fragments, shared-memory races) need the GPU suite
(scripts/gpu_check.sh). Every test asserts that the C++ kernels ran and no Triton kernel did.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import resnet_fused as rf
from block_cases import CASES, CONVS, check_backward, check_running_stats, make_input, make_pair, set_mode, shortcut_of
from helpers import DEVICE, assert_parity, randomize_bn
from resnet_fused import _extension
from resnet_fused.cuda import launch_counts, reset_launch_counts
from resnet_fused.triton import launch as triton_launch

if not _extension.is_available():
    # A silent module skip would hide a broken build where the build is required (make test
    # with a CUDA toolkit sets RESNET_FUSED_REQUIRE_C=1): fail the collection there instead.
    if os.environ.get("RESNET_FUSED_REQUIRE_C") == "1":
        raise RuntimeError(f"RESNET_FUSED_REQUIRE_C=1 but resnet_fused._C is not available: "
                           f"{_extension.unavailable_reason()}")
    pytest.skip(f"resnet_fused._C is not available: {_extension.unavailable_reason()}", allow_module_level=True)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run(module, x, grad_out=None):
    """Forward (and backward of ``grad_out``) counting C++ and Triton launches."""
    reset_launch_counts()
    triton_launch.reset_launch_counts()
    out = module(x)
    if grad_out is not None:
        out.backward(grad_out.to(out.dtype))
    assert not triton_launch.launch_counts(), f"Triton kernels ran: {triton_launch.launch_counts()}"
    return out, launch_counts()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", ["train", "eval", "frozen"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_parity(case, mode, dtype, gen):
    """Output and running statistics, every block shape, train / eval / frozen, 32- and 16-bit."""
    dtype = DTYPES[dtype]
    fused, exact, eager = make_pair(case, dtype, gen, backend="cuda")
    set_mode((fused, exact, eager), mode)
    x = make_input(case, dtype, gen, offset=0.5, spread=1.5)
    with torch.no_grad():
        out, counts = run(fused, x)
        expected, eager_out = exact(x.double()), eager(x)
    kind = CASES[case][0]
    assert counts["conv_fwd_cuda"] == CONVS[kind], counts
    assert counts["stats_partials_cuda"] == (1 if mode == "train" else 0), counts
    assert_parity(out, eager_out, expected, dtype, "output")
    check_running_stats(fused, exact, eager, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", ["train", "frozen"])
@pytest.mark.parametrize("case", list(CASES))
def test_backward_parity(case, mode, dtype, gen):
    """Output, input gradient and every parameter gradient (conv weights, BN weight and bias):
    ``block_cases.check_backward``, the check the mutation suite (test_mutations.py) proves."""
    counts = check_backward(case, "cuda", mode, DTYPES[dtype], gen)
    kind = CASES[case][0]
    projection = shortcut_of(case) == "projection"
    assert counts["conv_fwd_cuda"] == CONVS[kind], counts
    assert counts["conv_dgrad_cuda"] == CONVS[kind], counts
    assert counts["conv_wgrad_cuda"] == CONVS[kind] + projection, counts


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_output_keeps_input_memory_format(memory_format, gen):
    fused, exact, _ = make_pair("bottleneck-projection-s2", torch.float32, gen, backend="cuda")
    x = make_input("bottleneck-projection-s2", torch.float32, gen, memory_format=memory_format)
    with torch.no_grad():
        out, counts = run(fused.train(), x)
        torch.testing.assert_close(out.double(), exact.train()(x.double()), rtol=1e-5, atol=1e-5)
    assert counts["conv_fwd_cuda"] == 3, counts
    assert out.is_contiguous(memory_format=memory_format)


GRADCHECK_CASES = {
    "bottleneck-projection-s2": ("bottleneck", dict(in_chs=4, out_chs=8, bottle_ratio=0.5, stride=2), (2, 5, 5)),
    "resnext-g2": ("bottleneck", dict(in_chs=8, out_chs=8, bottle_ratio=0.5, groups=2), (2, 3, 3)),
    "basic-projection-s2": ("basic", dict(in_chs=4, out_chs=6, stride=2), (2, 5, 5)),
}


@pytest.mark.parametrize("mode", ["train", "frozen"])
@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck_float64(case, mode, gen):
    """float64 gradcheck of the whole block through the C++ kernels."""
    kind, kwargs, (n, h, w) = GRADCHECK_CASES[case]
    block = rf.make_block(kind, backend="cuda", **kwargs).to(DEVICE, torch.float64)
    randomize_bn(block, gen)
    set_mode((block,), mode)
    x = torch.randn(n, kwargs["in_chs"], h, w, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    names = [name for name, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in block.parameters()]
    buffers = {name: b for name, b in block.named_buffers()}

    def fn(x, *flat):
        state = {**{k: b.clone() for k, b in buffers.items()}, **dict(zip(names, flat))}
        return torch.func.functional_call(block, state, (x,))

    reset_launch_counts()
    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)
    assert launch_counts()["conv_dgrad_cuda"] > 0


def test_opcheck_forward_op(gen):
    """torch.library.opcheck of the block op with backend='cuda': schema, fakes, autograd."""
    kind, kwargs, _ = CASES["bottleneck-projection-s2"]
    block = rf.make_block(kind, backend="cuda", **kwargs).train()
    randomize_bn(block, gen)
    x = make_input("bottleneck-projection-s2", torch.float32, gen).requires_grad_()
    args = block._norm_args(x)
    names = ("bn_weights", "bn_biases", "running_means", "running_vars", "training", "eps")
    inputs = (x, block.conv1.weight, block.conv2.weight, block.conv3.weight, block.downsample.conv.weight)
    common = dict(stride=block.stride, groups=block.groups, shortcut=block.shortcut, stride_on=block.stride_on,
                  fold_eval=False, backend="cuda")
    reset_launch_counts()
    torch.library.opcheck(torch.ops.resnet_fused.bottleneck_forward.default,
                          inputs + tuple(args[n] for n in names), common)
    assert launch_counts()["conv_fwd_cuda"] > 0


def test_torch_compile_fullgraph(gen):
    fused, exact, _ = make_pair("basic-projection-s2", torch.float32, gen, backend="cuda")
    x = make_input("basic-projection-s2", torch.float32, gen)
    compiled = torch.compile(fused.train(), fullgraph=True)
    out, counts = run(compiled, x)
    assert counts["conv_fwd_cuda"] == 2
    with torch.no_grad():
        torch.testing.assert_close(out.double(), exact.train()(x.double()), rtol=1e-5, atol=1e-5)


def test_training_steps_of_a_converted_model(gen):
    """convert(model, backend='cuda') on a tiny ResNet-v2: describe says cuda, three SGD steps
    track the eager model's losses and parameters."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    cfg = rf.configs.ModelConfig("bottleneck", (1, 1), (16, 24), 0.5)
    eager = rf.ResNetV2(cfg, num_classes=4, backend="reference").to(DEVICE)
    randomize_bn(eager, gen)
    fused = rf.convert(rf.ResNetV2(cfg, num_classes=4, backend="reference").to(DEVICE), backend="cuda")
    fused.load_state_dict(eager.state_dict())
    assert all(d["backend"] == "cuda" for d in rf.describe(fused, as_dict=True).values())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (fused, eager)]
    losses = {"fused": [], "eager": []}
    reset_launch_counts()
    for _ in range(3):
        x = torch.randn(2, 3, 24, 24, generator=gen).to(DEVICE)
        target = torch.randint(0, 4, (2,), generator=gen).to(DEVICE)
        for key, model, opt in (("fused", fused, opts[0]), ("eager", eager, opts[1])):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            losses[key].append(loss.item())
    assert launch_counts()["conv_dgrad_cuda"] == 3 * 2 * 3, launch_counts()
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["eager"]), rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(fused.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_saved_activations_at_most_055x_eager(gen):
    """The same ops layer as Triton: y1, y2 and x saved, never an activation."""
    fused, _, eager = make_pair("bottleneck-identity", torch.float32, gen, backend="cuda")
    x = make_input("bottleneck-identity", torch.float32, gen).requires_grad_()

    def saved_bytes(module):
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            module.train()(x)
        params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        seen = {}
        for t in packed:
            ptr = t.untyped_storage().data_ptr()
            if t.dim() > 1 and ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
        return sum(seen.values())

    reset_launch_counts()
    fused_bytes = saved_bytes(fused)
    assert launch_counts()["conv_fwd_cuda"] == 3, launch_counts()
    assert fused_bytes <= 0.55 * saved_bytes(eager)


def test_auto_routes_by_the_measured_table(monkeypatch, gen):
    """auto: eager on the CPU whatever the table says; on a GPU cuda exactly where the table has
    an entry (empty until measured), else Triton."""
    block = rf.FusedBottleneck(12, 20, bottle_ratio=0.6, backend="auto")
    x = torch.randn(2, 12, 5, 5, generator=gen)
    assert rf.backends.auto_backend(x, "bottleneck") == "reference"
    monkeypatch.setitem(rf.backends.AUTO_CUDA_TABLE, ("9.0", "float32", "bottleneck"), True)
    assert rf.backends.auto_backend(x, "bottleneck") == "reference"
    assert "AUTO_CUDA_TABLE" in rf.describe(block)
    if torch.cuda.is_available():
        xc = x.cuda()
        cap = rf.backends._capability(torch.cuda.current_device())
        monkeypatch.setitem(rf.backends.AUTO_CUDA_TABLE, (cap, "float32", "bottleneck"), True)
        assert rf.backends.auto_backend(xc, "bottleneck") == "cuda"
        assert rf.backends.auto_backend(xc, "basic") == "triton"


def test_converted_timm_resnetv2_50_through_the_cpp_kernels(gen):
    """timm's real resnetv2_50 converted to backend='cuda', stage fusion on (convert builds
    FusedStages: one statistics pass per forward, the first block's): the ResNet-50 widths
    (64..2048 channels: many N, K and M tiles, the projection K-loop at 256..2048) through the C++
    tile code over two SGD steps; output, every gradient and (after both steps) every running
    statistic against the unconverted timm model in fp32, with a float64 copy as the exact
    reference (2x-eager rule)."""
    timm = pytest.importorskip("timm", reason="timm is optional; this test needs it")
    from resnet_fused.stage import FusedStage, FusedStages

    original = timm.create_model("resnetv2_50", num_classes=5).to(DEVICE)
    randomize_bn(original, gen)
    exact = copy.deepcopy(original).double()
    converted = rf.convert(copy.deepcopy(original), backend="cuda")
    assert sum(isinstance(m, rf.FusedBottleneck) for m in converted.modules()) == 16
    assert isinstance(converted.stages, FusedStages) and all(isinstance(s.blocks, FusedStage) for s in converted.stages)
    models = {"fused": converted, "eager": original, "exact": exact}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.02) for k, m in models.items()}
    for step in range(2):
        x = torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float64).to(DEVICE)
        grad_out = torch.randn(2, 5, generator=gen, dtype=torch.float64).to(DEVICE)
        results = {}
        for key, model in models.items():
            leaf = (x if key == "exact" else x.float()).clone().requires_grad_()
            model.train()
            if key == "fused":
                out, counts = run(model, leaf, grad_out)
                assert counts["conv_fwd_cuda"] == 16 * 3 and counts["conv_dgrad_cuda"] == 16 * 3, counts
                assert counts["stats_partials_cuda"] == 1, counts  # statistics chained through the stages
            else:
                out = model(leaf)
                out.backward(grad_out.to(out.dtype))
            results[key] = {"out": out.detach(), "x": leaf.grad,
                            **{n: p.grad for n, p in model.named_parameters()}}
        for name, want in results["exact"].items():
            assert_parity(results["fused"][name], results["eager"][name], want, torch.float32, f"step {step} {name}")
        for opt in opts.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
    buffers = {k: dict(m.named_buffers()) for k, m in models.items()}
    for name, want in buffers["exact"].items():
        if "running" in name:
            assert_parity(buffers["fused"][name], buffers["eager"][name], want, torch.float32, name)
        elif name.endswith("num_batches_tracked"):
            assert int(buffers["fused"][name]) == int(want) == 2, name
