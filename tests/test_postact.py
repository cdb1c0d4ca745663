"""Post-activation blocks (ResNet v1 / v1.5, ResNeXt): the fused drop-ins against the REAL
torchvision and timm modules, through both fused backends on the CPU (Triton interpreted, the
CUDA C++ kernels' host emulation), and convert / unconvert / describe on whole models.

Every fused run asserts that the backend's kernels launched and the other backend's did not.
Tolerances: the 2x-eager rule of tests/helpers.py (fp64 copy of the real module as the exact
reference, twins built from the parameters already rounded to the tested dtype; eager's spread
over rounding-noise copies for 16-bit gradients).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import resnet_fused as rf
from helpers import (DEVICE, SMALL_BACKWARD, SMALL_CONV, SMALL_STATS, assert_parity, eager_error_spread,
                     randomize_bn, requires_triton)
from resnet_fused import _extension
from resnet_fused.convert_postact import (convert_postact, convert_postact_block, describe_postact,
                                          unconvert_postact)
from resnet_fused.cuda import launch_counts as cuda_counts
from resnet_fused.cuda import reset_launch_counts as reset_cuda
from resnet_fused.triton.configs import forced_configs
from resnet_fused.triton.launch import launch_counts as triton_counts
from resnet_fused.triton.launch import reset_launch_counts as reset_triton

tvr = pytest.importorskip("torchvision.models.resnet", reason="torchvision is needed for the real modules")
from torchvision.ops import FrozenBatchNorm2d  # noqa: E402

requires_c = pytest.mark.skipif(not _extension.is_available(),
                                reason=f"resnet_fused._C is not available: {_extension.unavailable_reason()}")
BACKENDS = [pytest.param("triton", marks=requires_triton), pytest.param("cuda", marks=requires_c)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

# (kind, torchvision constructor kwargs, downsample: None | "proj" | "proj-v1" (stride moved to
# conv1: ResNet v1), input (N, H, W)). Odd sizes, batch 1, every shortcut, groups, both strides.
CASES = {
    "bottleneck-identity": ("bottleneck", dict(inplanes=16, planes=4), None, (2, 5, 7)),
    "bottleneck-projection-s1": ("bottleneck", dict(inplanes=8, planes=4), "proj", (2, 6, 5)),
    "bottleneck-projection-s2": ("bottleneck", dict(inplanes=12, planes=5, stride=2), "proj", (2, 7, 7)),
    "bottleneck-v1-stride-on-1x1": ("bottleneck", dict(inplanes=12, planes=6, stride=2), "proj-v1", (2, 7, 6)),
    "resnext-g2-s2": ("bottleneck", dict(inplanes=16, planes=8, stride=2, groups=2, base_width=32), "proj", (2, 6, 6)),
    "basic-identity": ("basic", dict(inplanes=12, planes=12), None, (2, 7, 7)),
    "basic-projection-s2": ("basic", dict(inplanes=12, planes=20, stride=2), "proj", (1, 5, 9)),
}
CONVS = {"bottleneck": 3, "basic": 2}


def memory_format_of(case: str):
    """A deterministic layout per case (half the cases NCHW, half channels_last)."""
    return torch.channels_last if list(CASES).index(case) % 2 == 0 else torch.contiguous_format


def randomize_frozen(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, FrozenBatchNorm2d):
                c = m.weight.shape[0]
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def make_blocks(case: str, dtype: torch.dtype, gen: torch.Generator, backend: str, norm_layer=None):
    """(fused, exact, eager): the real torchvision block in ``dtype`` (eager), its float64 copy
    (exact) and the fused block converted from another copy (same rounded parameters)."""
    kind, kwargs, ds, _ = CASES[case]
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    cls = tvr.Bottleneck if kind == "bottleneck" else tvr.BasicBlock
    norm = norm_layer or nn.BatchNorm2d
    downsample = None
    if ds is not None:
        out = kwargs["planes"] * cls.expansion
        downsample = nn.Sequential(tvr.conv1x1(kwargs["inplanes"], out, kwargs.get("stride", 1)), norm(out))
    eager = cls(**kwargs, downsample=downsample, norm_layer=norm_layer)
    if ds == "proj-v1":
        s = kwargs["stride"]
        eager.conv1.stride, eager.conv2.stride = (s, s), (1, 1)
    randomize_bn(eager, gen)
    randomize_frozen(eager, gen)
    eager = eager.to(DEVICE, dtype)
    fused = convert_postact_block(copy.deepcopy(eager), backend)
    assert type(fused) is (rf.FusedPostActBottleneck if kind == "bottleneck" else rf.FusedPostActBasicBlock)
    return fused, copy.deepcopy(eager).double(), eager


def make_input(case, dtype, gen, offset=0.0, spread=1.0, memory_format=None):
    kind, kwargs, _, (n, h, w) = CASES[case]
    x = torch.randn(n, kwargs["inplanes"], h, w, generator=gen, dtype=torch.float64) * spread + offset
    return x.to(DEVICE, dtype).contiguous(memory_format=memory_format or memory_format_of(case))


def set_mode(modules, mode):
    for m in modules:
        m.train(mode == "train")
        if mode == "frozen":  # eval-mode norms inside a training block
            m.train()
            for norm in m.modules():
                if isinstance(norm, nn.BatchNorm2d):
                    norm.eval()


def run(module, x, backend, grad_out=None):
    """Forward (and backward) counting launches; asserts the other backend launched nothing."""
    reset_triton()
    reset_cuda()
    out = module(x)
    if grad_out is not None:
        out.backward(grad_out.to(out.dtype))
    if backend == "triton":
        assert not cuda_counts(), f"C++ kernels ran: {cuda_counts()}"
        return out, triton_counts()
    assert not triton_counts(), f"Triton kernels ran: {triton_counts()}"
    return out, cuda_counts()


def fwd_convs(counts, backend):
    return counts["_bn_relu_conv_kernel"] if backend == "triton" else counts["conv_fwd_cuda"]


def check_running_stats(fused, exact, eager, dtype):
    for key, value in exact.state_dict().items():
        if "running" in key:
            assert_parity(fused.state_dict()[key], eager.state_dict()[key], value, dtype, key)
        elif key.endswith("num_batches_tracked"):
            assert int(fused.state_dict()[key]) == int(value), key


def grads(module, x, grad_out, backend=None):
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    if backend is not None:
        out, counts = run(module, x, backend, grad_out)
    else:
        out = module(x)
        out.backward(grad_out.to(out.dtype))
        counts = None
    return {"out": out.detach(), "x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}, counts


# ---------------------------------------------------------------------------------------------
# Block parity
# ---------------------------------------------------------------------------------------------


def _matrix(modes_all_dtypes, modes_one_dtype):
    """(case, mode, dtype): every case in both dtypes for the first modes; one dtype per case,
    alternating deterministically, for the others (CI time)."""
    out = []
    for i, case in enumerate(CASES):
        out += [(case, mode, dtype) for mode in modes_all_dtypes for dtype in DTYPES]
        out += [(case, mode, list(DTYPES)[(i + j) % 2]) for j, mode in enumerate(modes_one_dtype)]
    return out


@pytest.mark.parametrize("case,mode,dtype", _matrix(["train"], ["eval"]))
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_parity(backend, case, mode, dtype, gen):
    """Output and running statistics; eval without grad takes the folded path (one kernel per
    conv: the last BN, shortcut add and ReLU in the last conv's epilogue). Frozen norms without
    grad are the same folded path; frozen with grad is in the backward test."""
    dtype = DTYPES[dtype]
    fused, exact, eager = make_blocks(case, dtype, gen, backend)
    set_mode((fused, exact, eager), mode)
    x = make_input(case, dtype, gen, offset=0.5, spread=1.5)
    with torch.no_grad():
        out, counts = run(fused, x, backend)
        expected, eager_out = exact(x.double()), eager(x)
    kind, _, ds, _ = CASES[case]
    n_convs = CONVS[kind]
    if mode == "train":
        assert fwd_convs(counts, backend) == n_convs + (ds is not None), counts
        if backend == "triton":
            assert counts["_postact_out_kernel"] == 1, counts
    else:
        assert fwd_convs(counts, backend) == n_convs, counts
        assert "_postact_out_kernel" not in counts and "bn_relu_apply_cuda" not in counts, counts
    assert out.is_contiguous(memory_format=memory_format_of(case))
    assert_parity(out, eager_out, expected, dtype, "output")
    check_running_stats(fused, exact, eager, dtype)


@pytest.mark.parametrize("case,mode,dtype", _matrix(["train"], ["frozen"]))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_parity(backend, case, mode, dtype, gen):
    """Output, input gradient and every parameter gradient (convs, BN weights and biases,
    the projection's conv and BN)."""
    dtype = DTYPES[dtype]
    fused, exact, eager = make_blocks(case, dtype, gen, backend)
    set_mode((fused, exact, eager), mode)
    x = make_input(case, dtype, gen)
    with torch.no_grad():
        out_shape = exact(x.double()).shape
    set_mode((fused, exact, eager), mode)  # exact's train-mode forward moved its statistics: reset
    fused.load_state_dict(eager.state_dict())
    exact.load_state_dict(eager.state_dict())
    grad_out = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(DEVICE)
    got, counts = grads(fused, x, grad_out, backend)
    want, _ = grads(exact, x.double(), grad_out)
    eager_grads, _ = grads(eager, x, grad_out)
    spread = eager_error_spread(lambda m, t: grads(m, t, grad_out)[0], eager, x, dtype, gen, want)
    kind, _, ds, _ = CASES[case]
    n_convs, proj = CONVS[kind], ds is not None
    if backend == "triton":
        assert counts["_conv_dgrad_kernel"] == n_convs, counts
        assert counts["_conv_wgrad_kernel"] == n_convs - 1, counts
        assert counts["_plain_wgrad_kernel"] == 1 + proj, counts
        assert counts["_postact_out_backward_kernel"] == 1, counts
        # forward convs, then y_last (and yd) recomputed in the backward
        assert counts["_bn_relu_conv_kernel"] == n_convs + proj + 1 + proj, counts
    else:
        assert counts["conv_dgrad_cuda"] == n_convs, counts
        # the raw-input weight gradients (first conv, projection) run the same C++ wgrad, its
        # input prologue off
        assert counts["conv_wgrad_cuda"] == n_convs - 1 + 1 + proj, counts
        assert counts["postact_out_backward_cuda"] == 1, counts
        assert counts["conv_fwd_cuda"] == n_convs + proj + 1 + proj, counts
    assert set(got) == set(want)
    for name in want:
        assert_parity(got[name], eager_grads[name], want[name], dtype, f"grad {name}", spread[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_batchnorm2d(backend, gen):
    """torchvision.ops.FrozenBatchNorm2d (detection backbones): constant affines, no BN gradients,
    conv and input gradients through the fused backward; eval without grad folds."""
    for case in ("bottleneck-projection-s2", "basic-identity"):
        fused, exact, eager = make_blocks(case, torch.float32, gen, backend, norm_layer=FrozenBatchNorm2d)
        x = make_input(case, torch.float32, gen)
        with torch.no_grad():
            grad_out = torch.randn(exact(x.double()).shape, generator=gen, dtype=torch.float64)
        got, counts = grads(fused.train(), x, grad_out, backend)
        want, _ = grads(exact.train(), x.double(), grad_out)
        eager_grads, _ = grads(eager.train(), x, grad_out)
        assert fwd_convs(counts, backend) > 0
        assert set(got) == set(want) and not any(".bn" in k or "downsample.1" in k for k in want)
        for name in want:
            assert_parity(got[name], eager_grads[name], want[name], torch.float32, f"{case} {name}")
        with torch.no_grad():
            out, counts = run(fused.eval(), x, backend)
        assert fwd_convs(counts, backend) == CONVS[CASES[case][0]]
        assert_parity(out, eager.eval()(x), exact.eval()(x.double()), torch.float32, f"{case} eval")


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_stats_over_steps(backend, gen):
    """Three SGD steps in train mode (momentum 0.1, and None = cumulative average on one norm):
    parameters and running statistics stay with the real module's. Eager's error after three
    steps is one sample of a trajectory, so the bound takes its spread over rounding-noise copies
    of the start (``eager_error_spread``), as every multi-step parity check here does."""
    case = "bottleneck-projection-s2"
    fused, exact, eager = make_blocks(case, torch.float32, gen, backend)
    for m in (fused, exact, eager):
        m.bn2.momentum = None
        m.train()
    xs = torch.stack([make_input(case, torch.float32, gen) for _ in range(3)])
    with torch.no_grad():
        out_shape = copy.deepcopy(exact)(xs[0].double()).shape
    grad_outs = [torch.randn(out_shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    start = copy.deepcopy(eager)

    def steps(m, inputs, backend=None):
        """The state_dict after three SGD steps of ``m`` on ``inputs`` [3, N, C, H, W] (and the
        fused conv launches, with ``backend``)."""
        launched = 0
        for x, grad_out in zip(inputs, grad_outs):
            _, counts = grads(m, x, grad_out, backend)
            launched += fwd_convs(counts, backend) if backend is not None else 0
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad
        return {k: v.detach().clone() for k, v in m.state_dict().items()}, launched

    want, _ = steps(exact, xs.double())
    got, launched = steps(fused, xs, backend)
    ref, _ = steps(eager, xs)
    assert launched == 3 * (3 + 1 + 2)
    floats = {k: v for k, v in want.items() if not k.endswith("num_batches_tracked")}
    spread = eager_error_spread(lambda m, t: steps(m, t)[0], start, xs, torch.float32, gen, floats)
    for key, value in want.items():
        if key.endswith("num_batches_tracked"):
            assert int(got[key]) == int(value) == 3, key
        else:
            assert_parity(got[key], ref[key], value, torch.float32, key, spread[key])


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_output_keeps_input_memory_format(backend, memory_format, gen):
    case = "basic-projection-s2"
    fused, exact, eager = make_blocks(case, torch.float32, gen, backend)
    x = make_input(case, torch.float32, gen, memory_format=memory_format)
    with torch.no_grad():
        out, _ = run(fused.train(), x, backend)
        assert_parity(out, eager.train()(x), exact.train()(x.double()), torch.float32, "output")
    assert out.is_contiguous(memory_format=memory_format)


@requires_triton
@pytest.mark.parametrize("case", ["resnext-g2-s2", "basic-projection-s2", "bottleneck-v1-stride-on-1x1"])
def test_small_tiles_multi_tile(case, gen):
    """Forced 16x16x16 tiles: several M, N and K tiles, partial tiles and cross-tile statistics
    merges in every conv, dgrad and wgrad (Triton), train forward + backward."""
    fused, exact, eager = make_blocks(case, torch.float32, gen, "triton")
    x = make_input(case, torch.float32, gen)
    with torch.no_grad():
        grad_out = torch.randn(exact(x.double()).shape, generator=gen, dtype=torch.float64)
    exact.load_state_dict(eager.state_dict())
    exact.double()
    with forced_configs(SMALL_CONV, SMALL_STATS, backward=SMALL_BACKWARD):
        got, counts = grads(fused.train(), x, grad_out, "triton")
    want, _ = grads(exact.train(), x.double(), grad_out)
    eager_grads, _ = grads(eager.train(), x, grad_out)
    assert counts["_conv_dgrad_kernel"] == CONVS[CASES[case][0]], counts
    for name in want:
        assert_parity(got[name], eager_grads[name], want[name], torch.float32, name)
    check_running_stats(fused, exact, eager, torch.float32)


@requires_triton
@pytest.mark.parametrize("case", ["bottleneck-projection-s2", "basic-identity"])
def test_hybrid_3x3_strategy(case, gen):
    """The GPU default for a 3x3 with a BN+ReLU prologue (BN+ReLU pass, ATen's conv, statistics
    pass; ATen's dgrad/wgrad in the backward) gives the same block."""
    fused, exact, eager = make_blocks(case, torch.float32, gen, "triton")
    x = make_input(case, torch.float32, gen)
    with torch.no_grad():
        grad_out = torch.randn(exact(x.double()).shape, generator=gen, dtype=torch.float64)
    exact.load_state_dict(eager.state_dict())
    exact.double()
    with forced_configs(strategy="hybrid"):
        got, counts = grads(fused.train(), x, grad_out, "triton")
    want, _ = grads(exact.train(), x.double(), grad_out)
    eager_grads, _ = grads(eager.train(), x, grad_out)
    # hybrid 3x3s: the BN+ReLU pass and the statistics pass run, ATen convolves (forward, then
    # the backward's dgrad/wgrad on the materialised activation)
    expected_applies = 2 if CASES[case][0] == "bottleneck" else 3  # basic: y_last recomputed by a hybrid 3x3 too
    assert counts["_bn_relu_apply_kernel"] == expected_applies, counts
    assert counts["_channel_stats_partial_kernel"] == 1, counts
    for name in want:
        assert_parity(got[name], eager_grads[name], want[name], torch.float32, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_activations_at_most_055x_eager(backend, gen):
    """Saved activation bytes (tensors of dim > 1 that are not parameters, by storage) at most
    0.55x the real torchvision block's, for each block kind."""
    def saved_bytes(module, x):
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

    for case in ("bottleneck-identity", "bottleneck-projection-s2", "basic-identity", "basic-projection-s2"):
        fused, _, eager = make_blocks(case, torch.float32, gen, backend)
        x = make_input(case, torch.float32, gen).requires_grad_()
        ratio = saved_bytes(fused, x) / saved_bytes(eager, x)
        assert 0 < ratio <= 0.55, (case, ratio)


# ---------------------------------------------------------------------------------------------
# Ops: fake tensors, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------


@requires_triton
def test_opcheck(gen):
    fused, _, _ = make_blocks("bottleneck-projection-s2", torch.float32, gen, "triton")
    x = make_input("bottleneck-projection-s2", torch.float32, gen).requires_grad_()
    norms = [fused.bn1, fused.bn2, fused.bn3, fused.downsample[1]]
    args = (x, [fused.conv1.weight, fused.conv2.weight, fused.conv3.weight], fused.downsample[0].weight,
            [n.weight for n in norms], [n.bias for n in norms],
            [n.running_mean for n in norms] + [n.num_batches_tracked for n in norms],
            [n.running_var for n in norms], [True] * 4, [1e-5] * 4, [1, 2, 1], [1, 1, 1], False, "triton",
            [0.1, -1.0, 0.1, 0.1], True)
    # The op moves the running statistics (declared mutated): the schema test checks exactly that.
    torch.library.opcheck(torch.ops.resnet_fused.postact_block_forward, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_block(backend, gen):
    case = "bottleneck-projection-s2"
    fused, exact, eager = make_blocks(case, torch.float32, gen, backend)
    x = make_input(case, torch.float32, gen)
    compiled = torch.compile(fused.train(), fullgraph=True)
    out, counts = run(compiled, x, backend)
    assert fwd_convs(counts, backend) == 4
    assert_parity(out.detach(), eager.train()(x), exact.train()(x.double()), torch.float32, "output")


# ---------------------------------------------------------------------------------------------
# convert / unconvert / describe on real models
# ---------------------------------------------------------------------------------------------


def _train_three_steps(fused, eager, backend, gen, x_shape, n_blocks):
    """Three SGD steps of the converted model, the original (same dtype) and a float64 copy of
    the original on the same batches: every step's loss, and at the end every parameter and
    running statistic, by the 2x-eager rule against the float64 copy."""
    exact = copy.deepcopy(eager).double()
    models = {"fused": fused.train(), "eager": eager.train(), "exact": exact.train()}
    losses = {k: [] for k in models}
    launched = 0
    for _ in range(3):
        x = torch.randn(x_shape, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 5, (x_shape[0],), generator=gen)
        for key, model in models.items():
            inp = x if key == "exact" else x.float()
            model.zero_grad(set_to_none=True)
            reset_triton()
            reset_cuda()
            loss = torch.nn.functional.cross_entropy(model(inp), target)
            loss.backward()
            if key == "fused":
                counts = triton_counts() if backend == "triton" else cuda_counts()
                launched += fwd_convs(counts, backend)
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
            losses[key].append(loss.detach())
    assert launched >= 3 * n_blocks * 2
    # One scalar per step: a single rounding sample, compared as the pre-activation model tests do.
    torch.testing.assert_close(torch.stack(losses["fused"]), torch.stack(losses["eager"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.stack(losses["fused"]).double(), torch.stack(losses["exact"]), rtol=1e-4,
                               atol=1e-5)
    for name, want in exact.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert int(fused.state_dict()[name]) == int(want) == 3, name
        else:
            assert_parity(fused.state_dict()[name], eager.state_dict()[name], want, torch.float32, name)


def _tiny_torchvision_model(block, seed: int = 0) -> nn.Module:
    """A small ResNet built from torchvision's own blocks (ResNet-50's structure at narrow widths:
    a projection at stride 1, a strided projection, identity blocks), for the Triton interpreter."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)]
    inplanes = 16
    for planes, stride in ((4, 1), (8, 2)):
        out = planes * block.expansion
        ds = nn.Sequential(tvr.conv1x1(inplanes, out, stride), nn.BatchNorm2d(out)) \
            if stride != 1 or inplanes != out else None
        layers += [block(inplanes, planes, stride, ds), block(out, planes)]
        inplanes = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, 5)]
    return nn.Sequential(*layers)


@requires_c
def test_convert_torchvision_resnet50_trains_like_the_original(gen):
    """torchvision resnet50 (v1.5) converted to backend='cuda' (the C++ kernels' host emulation
    here: ResNet-50's real widths, 64..2048 channels), 2x3x64x64 channels_last (64, not 32, so
    layer4's norms see 8 values each, not 2, where a BN's output is +-1 whatever its input):
    three SGD steps as the original's; state_dict keys, describe, unconvert."""
    from torchvision.models import resnet50

    torch.manual_seed(0)
    # zero_init_residual (as in the reference training recipes): batch-2 ResNet-50 steps are
    # chaotic otherwise (eager fp32 and fp64 losses part by 5-10% within three steps, measured),
    # with it they agree to 1e-7. The last norms' weights leave zero at the first step.
    eager = resnet50(num_classes=5, zero_init_residual=True)
    fused = copy.deepcopy(eager)
    converted, unfusable = convert_postact(fused, "cuda")
    assert len(converted) == 16 and not unfusable
    assert list(fused.state_dict()) == list(eager.state_dict())
    info = describe_postact(fused)
    assert len(info) == 16 and all(d["fused"] and d["runs"] == "cuda" for d in info.values())
    _train_three_steps(fused, eager, "cuda", gen, (2, 3, 64, 64), 16)
    assert unconvert_postact(fused) == converted
    assert type(fused.layer1[0]) is tvr.Bottleneck and list(fused.state_dict()) == list(eager.state_dict())


@requires_c
def test_convert_timm_resnet50_trains_like_the_original(gen):
    """timm resnet50 converted to backend='cuda': three SGD steps as timm's."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    eager = timm.create_model("resnet50", num_classes=5)  # zero_init_last by default (see above)
    fused = copy.deepcopy(eager)
    converted, unfusable = convert_postact(fused, "cuda")
    assert len(converted) == 16 and not unfusable
    assert type(fused.layer1[0]) is rf.FusedTimmBottleneck
    _train_three_steps(fused, eager, "cuda", gen, (2, 3, 64, 64), 16)
    unconvert_postact(fused)
    assert type(fused.layer1[0]) is timm.models.resnet.Bottleneck


@requires_triton
def test_convert_small_torchvision_model_triton(gen):
    """A small model of torchvision's own blocks, converted to the Triton kernels (interpreted):
    three SGD steps as the original (ResNet-50 itself is too slow for the interpreter in CI; its
    real widths run through the C++ kernels above and on a GPU)."""
    eager = _tiny_torchvision_model(tvr.Bottleneck)
    randomize_bn(eager, gen)
    fused = copy.deepcopy(eager)
    converted, unfusable = convert_postact(fused, "triton")
    assert converted == ["3", "4", "5", "6"] and not unfusable
    _train_three_steps(fused, eager, "triton", gen, (2, 3, 8, 8), 4)


@requires_c
def test_compiled_converted_resnet50_fullgraph(gen):
    """torch.compile(fullgraph=True) over converted torchvision and timm resnet50s: no graph
    break, forward and backward traced through the ops' fakes and autograd (aot_eager: the
    kernels themselves run as in eager; inductor over a block is tested above), same output and
    gradients as the uncompiled converted model."""
    timm = pytest.importorskip("timm")
    from torchvision.models import resnet50

    for original in (resnet50(num_classes=5), timm.create_model("resnet50", num_classes=5)):
        randomize_bn(original, gen)
        fused = copy.deepcopy(original)
        convert_postact(fused, "cuda")
        twin = copy.deepcopy(fused)
        compiled = torch.compile(fused.train(), fullgraph=True, backend="aot_eager")
        x = torch.randn(2, 3, 32, 32, generator=gen)  # compiled vs uncompiled, same kernels: no conditioning issue
        reset_cuda()
        out = compiled(x)
        out.square().sum().backward()
        assert cuda_counts()["conv_fwd_cuda"] == 16 * 3 + 4 + 16 + 4 and cuda_counts()["conv_dgrad_cuda"] == 48
        expected = twin.train()(x)
        expected.square().sum().backward()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        for (name, a), (_, b) in zip(fused.named_parameters(), twin.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_convert_lists_what_it_cannot_fuse():
    """Anti-aliased / attention variants, drop path > 0, avg-pool shortcuts (ResNet-D), dilation,
    SyncBatchNorm and hooks stay eager, each with its reason."""
    timm = pytest.importorskip("timm")
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet
    from torchvision.models import resnet18

    cases = {
        "resnet-d (avg_down)": (ResNet(Bottleneck, [1, 1], avg_down=True, num_classes=2), "average-pool"),
        "se attention": (ResNet(Bottleneck, [1, 1], block_args=dict(attn_layer="se"), num_classes=2), "attention"),
        "drop path": (ResNet(BasicBlock, [1, 1], drop_path_rate=0.2, num_classes=2), "drop path"),
        "anti-aliased": (ResNet(BasicBlock, [1, 1], aa_layer=nn.AvgPool2d, num_classes=2), "anti-aliasing"),
        "dilated": (timm.create_model("resnet18", output_stride=8, num_classes=2), "dilat"),
    }
    for what, (model, reason) in cases.items():
        converted, unfusable = convert_postact(model, "triton")
        assert unfusable and all(reason in r or "conv2" in r for r in unfusable.values()), (what, unfusable)
        assert any(reason in r for r in unfusable.values()), (what, unfusable)
        info = describe_postact(model)
        assert any(not d["fused"] and d["reason"] for d in info.values()), what
    tv = resnet18(num_classes=2)
    tv.layer1[0].register_forward_hook(lambda *a: None)
    tv.layer2[0].bn1 = nn.SyncBatchNorm(128)
    converted, unfusable = convert_postact(tv, "triton")
    assert set(unfusable) == {"layer1.0", "layer2.0"} and len(converted) == 6
    assert "hooks" in unfusable["layer1.0"] and "SyncBatchNorm" in unfusable["layer2.0"]


def test_convert_keeps_parameters_and_flags(gen):
    """zero_init_residual, frozen stem-style requires_grad=False, eval submodules, optimizer
    state: the same parameter objects move into the fused blocks."""
    from torchvision.models import resnext50_32x4d

    torch.manual_seed(0)
    model = resnext50_32x4d(num_classes=3, zero_init_residual=True)
    model.layer1[0].conv1.weight.requires_grad_(False)
    model.layer2.eval()
    before = {id(p) for p in model.parameters()}
    converted, unfusable = convert_postact(model, "cuda" if _extension.is_available() else "triton")
    assert len(converted) == 16 and not unfusable
    assert {id(p) for p in model.parameters()} == before
    assert model.layer1[0].conv2.groups == 32 and not model.layer1[0].conv1.weight.requires_grad
    assert not model.layer2.training and not model.layer2[0].bn1.training
    assert float(model.layer1[0].bn3.weight.detach().abs().sum()) == 0.0


def test_flops_count_converted_models_like_the_originals():
    """resnet_fused.count_macs (FlopCounterMode) counts a converted model's fused ops as the
    eager convs they replace: 4.089 GMACs for torchvision resnet50 at 224x224."""
    from torchvision.models import resnet18, resnet50, resnext50_32x4d

    gmacs = {}
    for ctor in (resnet50, resnext50_32x4d, resnet18):
        with torch.device("meta"):
            model = ctor()
        before = rf.count_macs(model, (1, 3, 224, 224)).total
        converted, _ = convert_postact(model, "triton")
        assert converted
        gmacs[ctor.__name__] = rf.count_macs(model, (1, 3, 224, 224)).gmacs
        assert rf.count_macs(model, (1, 3, 224, 224)).total == before, ctor.__name__
    assert round(gmacs["resnet50"], 3) == 4.089 and round(gmacs["resnet18"], 3) == 1.814


def test_postact_units_are_resnet50s():
    """postact_units() (the benchmark hook): the 8 distinct unit shapes of torchvision resnet50,
    each built block with the state_dict shapes of the real one at that position."""
    from torchvision.models import resnet50

    from resnet_fused.postact import build_postact_unit, postact_units

    with torch.device("meta"):
        model = resnet50()
        units = postact_units(batch=8)
        assert len(units) == 8 and all(u["batch"] == 8 for u in units)
        for unit, path in zip(units, ("layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1",
                                      "layer4.0", "layer4.1")):
            real = model.get_submodule(path)
            block = build_postact_unit(unit, backend="reference")
            assert {k: v.shape for k, v in block.state_dict().items()} == \
                {k: v.shape for k, v in real.state_dict().items()}, unit["name"]


def test_convert_detection_style_frozen_backbone():
    """A detection backbone's norms (torchvision.ops.FrozenBatchNorm2d): every block converts,
    describe says the norms are frozen, and unconvert gives torchvision's blocks back."""
    from torchvision.models import resnet18

    model = resnet18(norm_layer=FrozenBatchNorm2d)
    keys = list(model.state_dict())
    converted, unfusable = convert_postact(model, "triton")
    assert len(converted) == 8 and not unfusable and list(model.state_dict()) == keys
    info = describe_postact(model)
    assert all(d["norms"] == "frozen" and d["kind"] == "postact_basic" for d in info.values())
    unconvert_postact(model)
    assert type(model.layer2[0]) is tvr.BasicBlock and list(model.state_dict()) == keys


@requires_c
def test_autocast_bf16(gen):
    """Under torch.autocast the block runs its convs in the autocast dtype (bf16: the C++ kernels'
    host emulation stores real bf16) with BN parameters and statistics in fp32, as eager's
    autocast does; output by the 2x-eager rule."""
    case = "bottleneck-projection-s2"
    fused, exact, eager = make_blocks(case, torch.float32, gen, "cuda")
    x = make_input(case, torch.float32, gen)
    with torch.no_grad():
        expected = exact.train()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, counts = run(fused.train(), x, "cuda")
            eager_out = eager.train()(x)
    assert out.dtype == eager_out.dtype == torch.bfloat16 and counts["conv_fwd_cuda"] == 4
    assert_parity(out, eager_out, expected, torch.bfloat16, "output")


def test_public_convert_handles_postact_models():
    """rf.convert / unconvert / describe reach the post-activation blocks (convert_postact)."""
    import warnings

    import torchvision

    BasicBlock, Bottleneck = tvr.BasicBlock, tvr.Bottleneck
    model = torchvision.models.resnet18()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every block of resnet18 is fusable: no warning
        assert rf.convert(model, backend="triton") is model
    assert all(type(b) is rf.FusedPostActBasicBlock for layer in (model.layer1, model.layer4) for b in layer)
    assert list(model.state_dict()) == list(state)
    info = rf.describe(model, as_dict=True, statistics=True)
    assert len(info) == 8 and all(d["fused"] and d["runs"] == "triton" for d in info.values())
    assert "layer3.1: torchvision FusedPostActBasicBlock -> triton" in rf.describe(model)
    rf.unconvert(model)
    assert type(model.layer2[0]) is BasicBlock
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # a model that is itself a block comes back as the new block, both ways
    block = Bottleneck(64, 16)
    fused = rf.convert(block, backend="reference")
    assert type(fused) is rf.FusedPostActBottleneck and type(rf.unconvert(fused)) is Bottleneck


def test_public_convert_lists_unfusable_postact_blocks():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet26d")  # ResNet-D: average-pool shortcuts stay eager
    with pytest.warns(UserWarning, match=r"layer2\.0: downsample: average-pool shortcut"):
        rf.convert(model, backend="triton")
    info = rf.describe(model, as_dict=True)
    assert info["layer2.0"]["fused"] is False and info["layer2.1"]["fused"] is True


def test_reference_backend_block_takes_any_downsample(gen):
    """``backend="reference"`` is the eager block whatever it holds: an average-pool shortcut
    (ResNet-D), which the fused kernels do not compute, trains like torchvision's block with the
    same weights (no plan, no fusability check on the call)."""
    def downsample():
        return nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32))

    torch.manual_seed(0)
    eager = tvr.Bottleneck(16, 8, stride=2, downsample=downsample())
    block = rf.FusedPostActBottleneck(16, 8, stride=2, downsample=downsample(), backend="reference")
    block.load_state_dict(eager.state_dict())
    x = torch.randn(2, 16, 8, 8, generator=gen)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [m(t) for m, t in zip((eager, block), xs)]
    for o in outs:
        o.square().sum().backward()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=0, atol=0)
    torch.testing.assert_close(block.downsample[2].running_mean, eager.downsample[2].running_mean, rtol=0, atol=0)
