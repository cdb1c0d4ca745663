"""Triton forward parity with the reference, run under the interpreter on the CPU.

Every test asserts that the fused Triton kernels really launched (a silent fallback to the
reference would pass any parity check), and forces small tiles (16x16x16, statistics merged two
partials at a time) so that multi-tile M/N/K, partial tiles and cross-tile statistics merges
run at these tiny shapes.
"""
from __future__ import annotations

import copy

import pytest
import torch

import resnet_fused as rf
from block_cases import (CASES, CONVS, NORMS, check_backward, check_running_stats, layout_of, shortcut_of, make_input,
                         make_pair, set_mode)
from helpers import DEVICE, SMALL_BACKWARD, SMALL_CONV, SMALL_STATS, assert_parity, randomize_bn, requires_triton
from resnet_fused.ops import blocks as block_ops
from resnet_fused.triton.configs import forced_configs
from resnet_fused.triton.launch import launch_counts, reset_launch_counts

pytestmark = requires_triton


def run_fused(fused, x, grad=False, strategy="fused"):
    """The fused block's forward with small tiles; the 3x3 strategy forced (on a GPU the default
    would be the hybrid, whose kernel counts differ)."""
    reset_launch_counts()
    with forced_configs(SMALL_CONV, SMALL_STATS, strategy=strategy, backward=SMALL_BACKWARD), \
            torch.set_grad_enabled(grad):
        return fused(x)


def assert_kernels_ran(kind, mode, folded):
    counts = launch_counts()
    assert counts["_bn_relu_conv_kernel"] == CONVS[kind], counts
    # A norm that is not folded finalizes once (batch statistics, or its running ones when frozen).
    expected_stats = NORMS[kind] if mode == "train" or not folded else 0
    assert counts["_bn_finalize_kernel"] == expected_stats, counts
    assert counts["_channel_stats_partial_kernel"] == (1 if mode == "train" else 0), counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["train", "eval", "frozen"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_parity(case, mode, dtype, gen):
    fused, exact, eager = make_pair(case, dtype, gen)
    layout = layout_of(case)
    x = make_input(case, dtype, gen, memory_format=layout)
    set_mode((fused, exact, eager), mode)
    grad = mode == "frozen"
    out = run_fused(fused, x, grad=grad)
    assert_kernels_ran(CASES[case][0], mode, folded=mode == "eval")
    with torch.set_grad_enabled(grad):
        expected = exact(x.double())
        eager_out = eager(x)
    assert out.dtype == dtype and out.device == x.device
    assert_parity(out, eager_out, expected, dtype, "output")
    check_running_stats(fused, exact, eager, dtype)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", ["bottleneck-projection-s2", "basic-projection-s2"])
def test_output_keeps_input_memory_format(case, memory_format, gen):
    fused, exact, _ = make_pair(case, torch.float32, gen)
    x = make_input(case, torch.float32, gen, memory_format=memory_format)
    out = run_fused(fused.train(), x)
    assert out.is_contiguous(memory_format=memory_format)
    assert_kernels_ran(CASES[case][0], "train", folded=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", ["bottleneck-identity", "bottleneck-projection-s2", "basic-projection-s2"])
def test_large_channel_offset(case, dtype, gen):
    """mean 100, std 0.1 per channel: sum/sum-of-squares statistics would lose every digit."""
    fused, exact, eager = make_pair(case, dtype, gen)
    x = make_input(case, dtype, gen, offset=100.0, spread=0.1)
    set_mode((fused, exact, eager), "train")
    out = run_fused(fused, x)
    assert_kernels_ran(CASES[case][0], "train", folded=False)
    with torch.no_grad():
        assert_parity(out, eager(x), exact(x.double()), dtype, "output")
    check_running_stats(fused, exact, eager, dtype)


@pytest.mark.parametrize("momentum", [0.3, None])
def test_running_stats_over_steps(momentum, gen):
    """Several training steps: unbiased running var, cumulative average with momentum=None."""
    kwargs = dict(in_chs=12, out_chs=20, bottle_ratio=0.6, stride=2, momentum=momentum)
    fused = rf.FusedBottleneck(**kwargs)
    exact = rf.PreActBottleneck(**kwargs)
    exact.load_state_dict(fused.state_dict())
    exact.double()
    for _ in range(3):
        x = torch.randn(2, 12, 7, 7, generator=gen)
        run_fused(fused.train(), x)
        assert_kernels_ran("bottleneck", "train", folded=False)
        with torch.no_grad():
            exact.train()(x.double())
    for key, value in exact.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key].to(value.dtype), value, rtol=1e-5, atol=1e-6, msg=key)
    assert int(fused.norm3.num_batches_tracked) == 3


def test_state_dict_interchange(gen):
    """Load a fused block from a reference one and back, without key changes."""
    src = rf.PreActBottleneck(12, 20, bottle_ratio=0.6, stride=2)
    randomize_bn(src, gen)
    fused = rf.FusedBottleneck(12, 20, bottle_ratio=0.6, stride=2)
    fused.load_state_dict(src.state_dict())
    back = rf.PreActBottleneck(12, 20, bottle_ratio=0.6, stride=2)
    back.load_state_dict(fused.state_dict())
    for key, value in src.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_autocast_matches_eager_autocast(gen):
    """Under autocast: 16-bit activations, fp32 parameters and BN buffers, as eager."""
    fused, _, eager = make_pair("bottleneck-projection-s2", torch.float32, gen)
    x = make_input("bottleneck-projection-s2", torch.float32, gen)
    exact = copy.deepcopy(eager).double()
    set_mode((fused, eager, exact), "train")
    with torch.autocast(DEVICE, dtype=torch.float16):
        out = run_fused(fused, x)
        with torch.no_grad():
            eager_out = eager(x)
    assert_kernels_ran("bottleneck", "train", folded=False)
    assert out.dtype == eager_out.dtype == torch.float16
    assert fused.norm1.running_mean.dtype == torch.float32
    with torch.no_grad():
        assert_parity(out, eager_out, exact(x.double()), torch.float16, "output")


def test_dtype_mismatch_is_a_clear_error(gen):
    fused = rf.FusedBottleneck(12, 20, bottle_ratio=0.6)
    with pytest.raises(TypeError, match="dtype .* differ"):
        fused(torch.randn(2, 12, 5, 5, generator=gen).half())


def test_no_grad_saves_nothing(gen):
    fused = rf.FusedBottleneck(12, 20, bottle_ratio=0.6, stride=2).train()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        run_fused(fused, torch.randn(2, 12, 7, 7, generator=gen))
    assert_kernels_ran("bottleneck", "train", folded=False)
    assert packed == []


def test_eval_without_grad_folds_bn_into_epilogues(gen):
    """Eval + no_grad: exactly one kernel per conv, no statistics pass (bn2/bn3 folded)."""
    fused, exact, eager = make_pair("bottleneck-identity", torch.float32, gen)
    x = make_input("bottleneck-identity", torch.float32, gen)
    set_mode((fused, exact, eager), "eval")
    out = run_fused(fused, x)
    assert launch_counts() == {"_bn_relu_conv_kernel": 3}
    with torch.no_grad():
        assert_parity(out, eager(x), exact(x.double()), torch.float32, "output")


@pytest.mark.parametrize("case", ["bottleneck-projection-s2", "basic-g2-subsample"])
def test_opcheck(case, gen):
    """torch.library.opcheck: schema, fake tensors, autograd registration, aot dispatch."""
    kind, kwargs, _ = CASES[case]
    block = rf.make_block(kind, backend="triton", **kwargs).train()
    randomize_bn(block, gen)
    x = make_input(case, torch.float32, gen).requires_grad_()
    args = block._norm_args(x)
    w_proj = block.downsample.conv.weight if block.downsample is not None else None
    common = dict(stride=block.stride, groups=block.groups, shortcut=block.shortcut,
                  fold_eval=False, backend="triton")
    with forced_configs(SMALL_CONV, SMALL_STATS):
        if kind == "bottleneck":
            op = torch.ops.resnet_fused.bottleneck_forward.default
            inputs = (x, block.conv1.weight, block.conv2.weight, block.conv3.weight, w_proj)
            common["stride_on"] = block.stride_on
        else:
            op = torch.ops.resnet_fused.basic_block_forward.default
            inputs = (x, block.conv1.weight, block.conv2.weight, w_proj)
        names = ("bn_weights", "bn_biases", "running_means", "running_vars", "training", "eps")
        torch.library.opcheck(op, inputs + tuple(args[n] for n in names), common)
    assert launch_counts()["_bn_relu_conv_kernel"] > 0


def test_cpu_without_interpreter_runs_reference(monkeypatch, gen):
    """A CPU tensor without TRITON_INTERPRET takes the reference inside the op."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 12, 5, 5, generator=gen)
    assert not block_ops.runs_triton(x, "triton")
    fused, exact, _ = make_pair("basic-identity", torch.float32, gen)
    fused, exact = fused.cpu().train(), exact.cpu().train()
    out = run_fused(fused, x)
    assert launch_counts() == {}
    with torch.no_grad():
        torch.testing.assert_close(out.double(), exact(x.double()), rtol=1e-5, atol=1e-5)


def test_auto_backend_runs_eager_on_cpu(gen):
    block = rf.FusedBottleneck(12, 20, bottle_ratio=0.6, backend="auto")
    run_fused(block.train(), torch.randn(2, 12, 5, 5, generator=gen).to(DEVICE))
    expected = {"_bn_relu_conv_kernel": 3} if DEVICE == "cuda" else {}
    assert (launch_counts()["_bn_relu_conv_kernel"] == 3) == bool(expected)


# ---- Backward: the fused dgrad/wgrad GEMMs and BN-backward kernels -----------------------


def _grads(module, x, grad_out, strategy="fused"):
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    fused = isinstance(module, (rf.FusedBottleneck, rf.FusedBasicBlock))
    out = run_fused(module, x, grad=True, strategy=strategy) if fused else module(x)
    with forced_configs(SMALL_CONV, SMALL_STATS, strategy=strategy, backward=SMALL_BACKWARD):
        out.backward(grad_out.to(out.dtype))
    return {"x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["train", "frozen"])
@pytest.mark.parametrize("case", ["bottleneck-projection-s2", "resnext-g4-s2", "basic-projection-s2",
                                  "bottleneck-subsample-b1"])
def test_backward_parity(case, mode, dtype, gen):
    """Output, input gradient and every parameter gradient (convs, BN weight and bias):
    ``block_cases.check_backward``, the check the mutation suite (test_mutations.py) proves."""
    counts = check_backward(case, "triton", mode, dtype, gen)
    kind = CASES[case][0]
    assert counts["_bn_relu_conv_kernel"] == CONVS[kind]
    # backward kernels: one fused dgrad and wgrad per conv (the 3x3 too: the strategy is forced to
    # "fused"), one more wgrad for a projection, BN coefficients per norm
    projection = shortcut_of(case) == "projection"
    assert counts["_conv_dgrad_kernel"] == CONVS[kind], counts
    assert counts["_conv_wgrad_kernel"] == CONVS[kind] + projection, counts
    assert counts["_bn_backward_coefficients_kernel"] == NORMS[kind], counts


def _saved_activation_bytes(module, x, fused: bool) -> tuple[int, list]:
    """Bytes of activations saved for backward: each storage once, no parameters, no
    per-channel vectors (what saved_tensors_hooks sees, so ctx attributes would escape it)."""
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        reset_launch_counts()
        out = module(x)  # default (large) tiles: this test is about what is saved, not tiling
    assert (launch_counts()["_bn_relu_conv_kernel"] > 0) == fused
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen, total, kept = set(), 0, []
    for t in packed:
        storage = t.untyped_storage()
        if t.dim() <= 1 or storage.data_ptr() in params or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
        kept.append(t)
    del out
    return total, kept


@pytest.mark.parametrize("case", ["bottleneck-identity", "bottleneck-projection-s2", "resnext-g4-s2",
                                  "basic-identity", "basic-projection-s2"])
def test_saved_activations_at_most_055x_eager(case, gen):
    """x, y1 (, y2) and statistics only: half of what eager saves (x, a1, y1, a2, y2, a3)."""
    kind, kwargs, _ = CASES[case]
    fused = rf.make_block(kind, backend="triton", **kwargs).to(DEVICE).train()
    eager = rf.make_block(kind, backend="reference", **kwargs).to(DEVICE).train()
    x = torch.randn(8, kwargs["in_chs"], 16, 16, generator=gen).to(DEVICE).requires_grad_()
    fused_bytes, fused_saved = _saved_activation_bytes(fused, x, fused=True)
    eager_bytes, _ = _saved_activation_bytes(eager, x, fused=False)
    assert fused_bytes <= 0.55 * eager_bytes, (fused_bytes, eager_bytes)
    assert any(t.data_ptr() == x.data_ptr() for t in fused_saved)
    assert len(fused_saved) == 1 + CONVS[kind] - 1  # x and the outputs of all but the last conv


def test_double_backward_is_a_clear_error(gen):
    fused = rf.FusedBottleneck(12, 20, bottle_ratio=0.6, stride=2).train()
    x = torch.randn(2, 12, 7, 7, generator=gen).to(DEVICE).requires_grad_()
    out = run_fused(fused, x, grad=True)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=False)
    assert gx.shape == x.shape
    assert launch_counts()["_conv_dgrad_kernel"] == 3, launch_counts()  # the fused backward ran
    out = run_fused(fused, x, grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


def test_torch_compile_fullgraph(gen):
    """torch.compile(fullgraph=True) over a fused block: no graph break, same result."""
    fused, exact, _ = make_pair("bottleneck-projection-s2", torch.float32, gen)
    x = make_input("bottleneck-projection-s2", torch.float32, gen)
    compiled = torch.compile(fused, fullgraph=True)
    fused.train()
    with forced_configs(SMALL_CONV, SMALL_STATS, strategy="fused"):
        reset_launch_counts()
        out = compiled(x)
    assert launch_counts()["_bn_relu_conv_kernel"] == 3
    with torch.no_grad():
        torch.testing.assert_close(out.double(), exact.train()(x.double()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.norm2.running_var.double(), exact.norm2.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", ["bottleneck-projection-s2", "resnext-g4-s2", "basic-g2-subsample"])
def test_hybrid_3x3_strategy(case, mode, gen):
    """The hybrid 3x3 (BN+ReLU pass, cuDNN/ATen conv, statistics pass) matches the reference."""
    fused, exact, eager = make_pair(case, torch.float32, gen)
    x = make_input(case, torch.float32, gen)
    set_mode((fused, exact, eager), mode)
    reset_launch_counts()
    with forced_configs(SMALL_CONV, SMALL_STATS, strategy="hybrid"), torch.no_grad():
        out = fused(x)
        expected, eager_out = exact(x.double()), eager(x)
    counts = launch_counts()
    # One 3x3 leaves the fused kernel: one conv kernel fewer, and a BN+ReLU pass unless its
    # input is already activated (the bottleneck's conv2 in eval, after bn2 folded into K1).
    kind = CASES[case][0]
    if kind == "basic":  # both 3x3s follow the selector; a projection stays a fused 1x1 kernel
        assert counts["_bn_relu_conv_kernel"] == (1 if fused.shortcut == "projection" else 0), counts
        assert counts["_bn_relu_apply_kernel"] == 2, counts
    else:
        assert counts["_bn_relu_conv_kernel"] == CONVS[kind] - 1, counts
        assert counts["_bn_relu_apply_kernel"] == (0 if mode == "eval" else 1), counts
    assert_parity(out, eager_out, expected, torch.float32, "output")
    check_running_stats(fused, exact, eager, torch.float32)


@pytest.mark.parametrize("case", ["bottleneck-projection-s2", "resnext-g4-s2", "basic-projection-s2"])
def test_hybrid_3x3_backward(case, gen):
    """Under the hybrid strategy the 3x3's dgrad/wgrad run through ATen on the materialised
    activation and dy; every gradient still matches (the 1x1s stay fused Triton GEMMs)."""
    fused, exact, eager = make_pair(case, torch.float32, gen)
    set_mode((fused, exact, eager), "train")
    x = make_input(case, torch.float32, gen)
    with torch.no_grad():
        out_shape = exact(x.double()).shape
    set_mode((fused, exact, eager), "train")
    grad_out = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(DEVICE)
    got = _grads(fused, x, grad_out, strategy="hybrid")
    counts = launch_counts()
    want, eager_grads = _grads(exact, x.double(), grad_out), _grads(eager, x, grad_out)
    kind = CASES[case][0]
    one_by_one = 2 if kind == "bottleneck" else 0  # the basic block has no 1x1 conv
    assert counts["_conv_dgrad_kernel"] == one_by_one, counts
    assert counts["_relu_grad_sums_kernel"] == CONVS[kind] - one_by_one, counts
    for name in want:
        assert_parity(got[name], eager_grads[name], want[name], torch.float32, f"grad {name}")


# The smallest shapes of each block type and shortcut: gradcheck perturbs every input element.
GRADCHECK_CASES = {
    "bottleneck-projection-s2": ("bottleneck", dict(in_chs=4, out_chs=8, bottle_ratio=0.5, stride=2), (2, 5, 5)),
    "bottleneck-subsample": ("bottleneck", dict(in_chs=6, out_chs=6, bottle_ratio=0.5, stride=2,
                                                shortcut="subsample"), (1, 5, 3)),
    "resnext-g2": ("bottleneck", dict(in_chs=8, out_chs=8, bottle_ratio=0.5, groups=2), (2, 3, 3)),
    "basic-projection-s2": ("basic", dict(in_chs=4, out_chs=6, stride=2), (2, 5, 5)),
    "basic-identity": ("basic", dict(in_chs=4, out_chs=4), (2, 3, 3)),
}


@pytest.mark.parametrize("case,mode", [(c, "train") for c in GRADCHECK_CASES] + [("bottleneck-projection-s2", "frozen"),
                                                                                 ("basic-projection-s2", "frozen")])
def test_gradcheck_float64_through_triton(case, mode, gen):
    """float64 gradcheck of the whole block through the Triton kernels (the slow fp64 path)."""
    kind, kwargs, (n, h, w) = GRADCHECK_CASES[case]
    block = rf.make_block(kind, backend="triton", **kwargs).to(DEVICE, torch.float64)
    randomize_bn(block, gen)
    set_mode((block,), mode)
    x = torch.randn(n, kwargs["in_chs"], h, w, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    names = [n for n, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in block.parameters()]
    buffers = {n: b for n, b in block.named_buffers()}

    def run(x, *flat):
        state = {**{n: b.clone() for n, b in buffers.items()}, **dict(zip(names, flat))}
        return torch.func.functional_call(block, state, (x,))

    reset_launch_counts()
    assert torch.autograd.gradcheck(run, (x, *params), fast_mode=True)
    counts = launch_counts()
    assert counts["_bn_relu_conv_kernel"] > 0 and counts["_bn_backward_coefficients_kernel"] > 0, counts


@pytest.mark.parametrize("case", ["bottleneck-projection-s2", "basic-projection-s2"])
def test_ctx_holds_no_tensor_attributes(case, gen):
    """Every tensor the backward needs goes through save_for_backward (where autograd checks
    versions and saved-tensor hooks apply); the autograd node's other attributes hold none."""
    kind, kwargs, _ = CASES[case]
    block = rf.make_block(kind, backend="triton", **kwargs).to(DEVICE).train()
    x = make_input(case, torch.float32, gen).requires_grad_()
    out = run_fused(block, x, grad=True)
    assert_kernels_ran(kind, "train", folded=False)
    node = out.grad_fn
    # eager calls run the op's implementation inside an autograd.Function; direct op callers get
    # the custom op's own node
    fused_nodes = ("_BottleneckFunctionBackward", "_BasicFunctionBackward")
    while node is not None and "resnet_fused" not in type(node).__name__ and type(node).__name__ not in fused_nodes:
        node = node.next_functions[0][0] if node.next_functions else None
    assert node is not None, "the fused op's autograd node was not found"

    def holds_tensor(value) -> bool:
        if isinstance(value, torch.Tensor):
            return True
        if isinstance(value, (list, tuple)):
            return any(holds_tensor(v) for v in value)
        if isinstance(value, dict):
            return any(holds_tensor(v) for v in value.values())
        return False

    attributes = {k: v for k, v in vars(node).items() if k != "saved_tensors"}
    assert "saved_names" in attributes and "training" in attributes  # the ctx we set is this node
    assert not [k for k, v in attributes.items() if holds_tensor(v)]
    assert len(node.saved_tensors) == len(node.saved_names)
