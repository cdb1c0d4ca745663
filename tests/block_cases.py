"""The block parity matrix shared by the fused backends' tests: cases, twins, modes."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn

import resnet_fused as rf
from helpers import DEVICE, assert_parity, randomize_bn

try:  # the post-activation twins are torchvision's own blocks; their tests skip without it
    import torchvision.models.resnet as tvr
except ImportError:  # pragma: no cover - torchvision is a test dependency
    tvr = None


# (block, kwargs, input (N, H, W)): odd widths (12, 20), 7x7 and 5x9, batch 1, every shortcut.
CASES = {
    "bottleneck-identity": ("bottleneck", dict(in_chs=20, out_chs=20, bottle_ratio=0.6), (2, 7, 7)),
    "bottleneck-projection-s2": ("bottleneck", dict(in_chs=12, out_chs=20, bottle_ratio=0.6, stride=2), (2, 7, 7)),
    "bottleneck-subsample-b1": ("bottleneck", dict(in_chs=20, out_chs=20, bottle_ratio=0.6, stride=2,
                                                   shortcut="subsample"), (1, 5, 9)),
    "resnext-g2": ("bottleneck", dict(in_chs=16, out_chs=24, bottle_ratio=0.5, groups=2), (2, 5, 9)),
    "resnext-g4-s2": ("bottleneck", dict(in_chs=16, out_chs=32, bottle_ratio=0.5, stride=2, groups=4), (2, 6, 6)),
    "bottleneck-stride-on-1x1": ("bottleneck", dict(in_chs=12, out_chs=24, bottle_ratio=0.5, stride=2,
                                                    stride_on="1x1"), (2, 7, 7)),
    "basic-identity": ("basic", dict(in_chs=12, out_chs=12), (2, 7, 7)),
    "basic-projection-s2": ("basic", dict(in_chs=12, out_chs=20, stride=2), (1, 5, 9)),
    "basic-g2-subsample": ("basic", dict(in_chs=16, out_chs=16, stride=2, groups=2, shortcut="subsample"), (2, 7, 7)),
}
CONVS = {"bottleneck": 3, "basic": 2}
NORMS = {"bottleneck": 3, "basic": 2}


def make_pair(case: str, dtype: torch.dtype, gen: torch.Generator, backend: str = "triton"):
    """A fused block in ``dtype``, and its float64 and same-dtype eager twins, same weights.

    The twins get the fused block's parameters and buffers AFTER its conversion to ``dtype``:
    the float64 reference computes exactly what the 16-bit blocks are given (rounded weights
    included), so the errors compared are the computation's, not the parameters' rounding (which
    a ReLU mask near zero can amplify into differences no kernel is responsible for).
    """
    kind, kwargs, _ = CASES[case]
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    fused = rf.make_block(kind, backend=backend, **kwargs)
    randomize_bn(fused, gen)
    fused = fused.to(DEVICE, dtype)
    exact = rf.make_block(kind, backend="reference", **kwargs).to(DEVICE, torch.float64)
    exact.load_state_dict(fused.state_dict())
    eager = copy.deepcopy(exact).to(dtype)
    return fused, exact, eager


def make_input(case, dtype, gen, offset=0.0, spread=1.0, memory_format=torch.channels_last):
    _, kwargs, (n, h, w) = CASES[case]
    x = torch.randn(n, kwargs["in_chs"], h, w, generator=gen, dtype=torch.float64) * spread + offset
    return x.to(DEVICE, dtype).contiguous(memory_format=memory_format)


def set_mode(modules, mode):
    for m in modules:
        m.train(mode == "train")
        if mode == "frozen":  # eval-mode norms inside a training block
            m.train()
            for norm in m.modules():
                if isinstance(norm, torch.nn.BatchNorm2d):
                    norm.eval()


def check_running_stats(fused, exact, eager, dtype):
    for key, value in exact.state_dict().items():
        if "running" in key:
            assert_parity(fused.state_dict()[key], eager.state_dict()[key], value, dtype, key)
        elif key.endswith("num_batches_tracked"):
            assert int(fused.state_dict()[key]) == int(value), key


# ---- Parity checks shared by the backends' tests and the mutation suite ------------------
#
# Each check builds one problem, runs the fused block and its twins and asserts the 2x-eager
# rule (helpers.py) on every output, statistic and gradient; a failure is an AssertionError.
# test_triton_forward.py and test_cuda_blocks.py call them for their parity matrices, and
# test_mutations.py calls the very same functions with a fault injected into a kernel set and
# expects the AssertionError. They return the fused run's launch counts for the caller's guards.

def condition_bn(module: torch.nn.Module, gen: torch.Generator) -> None:
    """BN affine parameters that keep every pre-activation away from the ReLU's kink.

    |beta| / gamma in [3, 4] per channel (three in four channels mostly open, the rest mostly
    closed): a normalised value z = gamma * xhat + beta lies within the rounding error of a 16-bit
    input of zero for ~phi(beta / gamma) u ~ 0.004 u of positions instead of ~0.4 u, so a 16-bit
    rounding placed differently by two correct implementations seldom flips a mask. Masks still
    differ per position (0.003-0.1% of each channel on the far side), and every channel keeps
    mean/std ~ 3-4 after the ReLU, so the next conv's outputs have per-channel means of the order
    of their spread (which is what makes a statistics count error visible in 16 bits).
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                gamma = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
                sign = torch.where(torch.rand(c, generator=gen) < 0.75, 1.0, -1.0).double()
                sign[0] = 1.0  # the mutation suite's one-channel faults act on channel 0
                beta = sign * gamma * (torch.rand(c, generator=gen, dtype=torch.float64) + 3.0)
                m.weight.copy_(gamma)
                m.bias.copy_(beta)


def calibrate_running_stats(module: torch.nn.Module, x: torch.Tensor) -> None:
    """Running statistics = the batch statistics of ``x`` (float64, unbiased var): eval and
    frozen norms then see standardised inputs, as a trained network's do, and
    :func:`condition_bn` keeps them away from the kink there too."""
    twin = copy.deepcopy(module).double().train()
    norms = [m for m in twin.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.momentum = 1.0
    with torch.no_grad():
        twin(x.double())
    own = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for mine, theirs in zip(own, norms):
            mine.running_mean.copy_(theirs.running_mean)
            mine.running_var.copy_(theirs.running_var)


def shortcut_of(case: str) -> str:
    """The shortcut kind a case's block resolves to."""
    kw = CASES[case][1]
    return rf.reference.resolve_shortcut(kw["in_chs"], kw["out_chs"], kw.get("stride", 1), kw.get("shortcut"))


def layout_of(case: str):
    """The input layout of a case, deterministic: NCHW for every other case in CASES order."""
    return torch.contiguous_format if list(CASES).index(case) % 2 else torch.channels_last


class Problem:
    """One parity problem: the fused block, its float64 and same-dtype eager twins, the input
    and (for gradients) the upstream gradient, already rounded to ``dtype`` so that the float64
    reference differentiates exactly what the 16-bit blocks are given."""

    def __init__(self, case, dtype, gen, backend, mode, *, well_conditioned: bool = False,
                 shape=None, offset: float = 0.0, spread: float = 1.0, memory_format=torch.channels_last):
        kind, kwargs, default_shape = CASES[case]
        shape = shape or default_shape
        self.case, self.kind, self.dtype, self.mode = case, kind, dtype, mode
        self.fused, self.exact, self.eager = make_pair(case, dtype, gen, backend=backend)
        n, h, w = shape
        x = torch.randn(n, kwargs["in_chs"], h, w, generator=gen, dtype=torch.float64) * spread + offset
        self.x = x.to(DEVICE, dtype).contiguous(memory_format=memory_format)
        if well_conditioned:
            condition_bn(self.fused, gen)
            self.exact.load_state_dict(self.fused.state_dict())
            calibrate_running_stats(self.exact, self.x)  # the reference twin: no fused kernel runs
            self.fused.load_state_dict(self.exact.state_dict())  # rounded to dtype
            self.exact.load_state_dict(self.fused.state_dict())
            self.eager.load_state_dict(self.fused.state_dict())
        set_mode((self.fused, self.exact, self.eager), mode)

    def out_shape(self):
        with torch.no_grad():
            return self.exact.eval()(self.x.double()).shape


def fused_context(backend: str, strategy: str = "fused"):
    """Triton: the small tiles and the strategy forced (helpers.py); cuda: nothing to force."""
    if backend == "triton":
        from resnet_fused.triton.configs import forced_configs
        from helpers import SMALL_BACKWARD, SMALL_CONV, SMALL_STATS
        return forced_configs(SMALL_CONV, SMALL_STATS, strategy=strategy, backward=SMALL_BACKWARD)
    return contextlib.nullcontext()


def reset_launches() -> None:
    from resnet_fused.cuda import reset_launch_counts as reset_cuda
    from resnet_fused.triton.launch import reset_launch_counts as reset_triton
    reset_cuda()
    reset_triton()


def launches(backend: str):
    """The fused run's launch counts of ``backend``; a cuda run asserts no Triton kernel ran."""
    from resnet_fused.cuda import launch_counts as cuda_counts
    from resnet_fused.triton.launch import launch_counts as triton_counts
    if backend == "cuda":
        assert not triton_counts(), f"Triton kernels ran: {triton_counts()}"
        return cuda_counts()
    return triton_counts()


def block_grads(module, x, grad_out) -> dict:
    """Input gradient and every parameter gradient of ``module`` at ``x`` for ``grad_out``."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(x)
    out.backward(grad_out.to(out.dtype))
    return {"out": out.detach(), "x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}


@contextlib.contextmanager
def stored_as(exact: torch.nn.Module, kind: str, dtype: torch.dtype):
    """The float64 reference with its stored conv outputs (y1, and y2 for a bottleneck: what
    both implementations save for the backward and feed to the next norm) rounded to ``dtype``;
    their gradients pass unchanged (the implementations differentiate as if y were exact).

    Without it, a one-ulp storage rounding that both implementations make alike can flip a
    ReLU mask against the float64 reference and move a train-mode BN gradient (a near-cancelling
    sum) by percents in both: a shared error that would widen eager's and hide a kernel's.
    """
    def round_to_storage(_module, _inputs, out):
        return out + (out.to(dtype).to(out.dtype) - out).detach()

    names = ("conv1", "conv2") if kind == "bottleneck" else ("conv1",)
    handles = [getattr(exact, n).register_forward_hook(round_to_storage) for n in names]
    try:
        yield exact
    finally:
        for h in handles:
            h.remove()


def check_forward(case, backend, mode, dtype, gen, strategy="fused", grad=None, **problem):
    """Output and running statistics of one case against the float64 twin (2x-eager rule)."""
    p = Problem(case, dtype, gen, backend, mode, **problem)
    grad = (mode == "frozen") if grad is None else grad
    reset_launches()
    with fused_context(backend, strategy), torch.set_grad_enabled(grad):
        out = p.fused(p.x)
    counts = launches(backend)
    with torch.set_grad_enabled(grad):
        expected, eager_out = p.exact(p.x.double()), p.eager(p.x)
    assert out.dtype == dtype and out.device == p.x.device and out.shape == expected.shape
    layout = torch.channels_last if p.x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout)
    assert_parity(out, eager_out, expected, dtype, f"{case} {mode} output")
    check_running_stats(p.fused, p.exact, p.eager, dtype)
    return counts


def check_backward(case, backend, mode, dtype, gen, strategy="fused", **problem):
    """Input gradient and every parameter gradient of one case (2x-eager rule).

    16-bit cases are well conditioned (:func:`condition_bn`, running statistics calibrated, the
    float64 twin's stored conv outputs rounded as the implementations store them:
    :func:`stored_as`), so the plain 2x rule holds without widening; fp32 cases keep
    ``randomize_bn`` (masks evenly split, as many kinks as possible: fp32 rounding is far below
    what a mask flip would need)."""
    if dtype in (torch.float16, torch.bfloat16):
        problem = dict(dict(well_conditioned=True), **problem)
    p = Problem(case, dtype, gen, backend, mode, **problem)
    shape = p.out_shape()
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64)
    if dtype in (torch.float16, torch.bfloat16):
        # A per-channel mean in the upstream gradient, as a loss's gradient has: a train-mode
        # BN backward removes it (dv = A g' + B v + C), so a fault in those mean-removal terms
        # (a count off by one) moves the result by ~1/n of that mean, not of the noise around it.
        grad_out += torch.randn(1, shape[1], 1, 1, generator=gen, dtype=torch.float64)
    grad_out = grad_out.to(DEVICE, dtype)
    set_mode((p.fused, p.exact, p.eager), mode)  # the shape probe must not count as a step
    reset_launches()
    with fused_context(backend, strategy):
        got = block_grads(p.fused, p.x, grad_out)
    counts = launches(backend)
    with stored_as(p.exact, p.kind, dtype):
        want = block_grads(p.exact, p.x.double(), grad_out.double())
    eager = block_grads(p.eager, p.x, grad_out)
    assert set(got) == set(want)
    for key in ("out",):  # the forward of the same step (what a forward fault changes first)
        assert_parity(got[key], eager[key], want[key], dtype, f"{case} {mode} output")
    del got["out"], want["out"], eager["out"]
    for name in want:
        assert_parity(got[name], eager[name], want[name], dtype, f"{case} {mode} grad {name}",
                      scale=_cancelling_scale(name, want))
    return counts


def _cancelling_scale(name: str, grads: dict) -> float:
    """The scale a BN bias gradient is measured against: ||dgamma|| of the same norm.

    dbeta = sum g' over a channel. When the conv after the norm is a 1x1 whose output feeds a
    train-mode BN, sum dA = W^T sum dy = 0, so with a ReLU mask that is open on the whole
    channel dbeta is exactly zero up to rounding (well-conditioned problems keep masks nearly
    constant), and its relative error is rounding noise over zero: a bound of 1e13 that proves
    nothing. dgamma = sum g' xhat, the other moment of the same g', does not cancel and gives
    the size of the sums both are made of; where dbeta is not small it is its own scale.
    """
    if name.startswith("norm") and name.endswith(".bias"):
        return float(grads[name[:-len(".bias")] + ".weight"].double().norm())
    return 0.0


# ---- Post-activation blocks (ResNet v1 / v1.5, ResNeXt) -----------------------------------
#
# The fused drop-ins built through their constructors (rf.FusedPostActBottleneck /
# rf.FusedPostActBasicBlock) and compared with torchvision's Bottleneck / BasicBlock holding the
# same parameters (the eager twin in ``dtype``, its float64 copy the exact reference).
# (kind, torchvision kwargs, downsample None | "proj" | "proj-v1" (stride on conv1: ResNet v1),
# input (N, H, W), layout). Odd widths (5, 6, 20), 7x7, batch 1, both layouts.
POSTACT_CASES = {
    "postact-bottleneck-identity": ("bottleneck", dict(inplanes=20, planes=5), None, (2, 7, 7),
                                    torch.channels_last),
    "postact-bottleneck-projection-s1": ("bottleneck", dict(inplanes=12, planes=5), "proj", (2, 5, 9),
                                         torch.contiguous_format),
    "postact-bottleneck-projection-s2": ("bottleneck", dict(inplanes=12, planes=5, stride=2), "proj", (2, 7, 7),
                                         torch.channels_last),
    "postact-bottleneck-v1-stride-on-1x1": ("bottleneck", dict(inplanes=12, planes=6, stride=2), "proj-v1",
                                            (2, 7, 6), torch.contiguous_format),
    "postact-resnext-g2": ("bottleneck", dict(inplanes=16, planes=6, groups=2, base_width=32), "proj", (2, 5, 7),
                           torch.channels_last),
    "postact-basic-identity": ("basic", dict(inplanes=12, planes=12), None, (2, 7, 7), torch.contiguous_format),
    "postact-basic-projection-s2": ("basic", dict(inplanes=12, planes=20, stride=2), "proj", (1, 5, 9),
                                    torch.channels_last),
}
#: Triton / C++ kernel names of the forward conv and the dgrad (the launch assertions).
FWD_CONV = {"triton": "_bn_relu_conv_kernel", "cuda": "conv_fwd_cuda"}
DGRAD = {"triton": "_conv_dgrad_kernel", "cuda": "conv_dgrad_cuda"}


def postact_projection(case: str) -> bool:
    return POSTACT_CASES[case][2] is not None


def make_postact(case: str, dtype: torch.dtype, gen: torch.Generator, backend: str = "triton"):
    """(fused, exact, eager): the fused drop-in from its constructor, torchvision's block with
    the same state in ``dtype`` (eager) and in float64 (exact), all from the rounded parameters."""
    if tvr is None:
        pytest.skip("torchvision is needed for the post-activation twins")
    kind, kwargs, ds, _, _ = POSTACT_CASES[case]
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    tv_cls, fused_cls = ((tvr.Bottleneck, rf.FusedPostActBottleneck) if kind == "bottleneck"
                         else (tvr.BasicBlock, rf.FusedPostActBasicBlock))

    def downsample():
        if ds is None:
            return None
        out = kwargs["planes"] * tv_cls.expansion
        return nn.Sequential(nn.Conv2d(kwargs["inplanes"], out, 1, stride=kwargs.get("stride", 1), bias=False),
                             nn.BatchNorm2d(out))

    extra = dict(stride_on="1x1") if ds == "proj-v1" else {}
    fused = fused_cls(**kwargs, downsample=downsample(), backend=backend, **extra)
    randomize_bn(fused, gen)
    fused = fused.to(DEVICE, dtype)
    eager = tv_cls(**kwargs, downsample=downsample())
    if ds == "proj-v1":
        s = kwargs["stride"]
        eager.conv1.stride, eager.conv2.stride = (s, s), (1, 1)
    eager.load_state_dict(fused.state_dict())
    eager = eager.to(DEVICE, dtype)
    exact = copy.deepcopy(eager).double()
    return fused, exact, eager


def make_postact_input(case, dtype, gen, offset=0.0, spread=1.0, memory_format=None, shape=None):
    _, kwargs, _, default_shape, layout = POSTACT_CASES[case]
    n, h, w = shape or default_shape
    x = torch.randn(n, kwargs["inplanes"], h, w, generator=gen, dtype=torch.float64) * spread + offset
    return x.to(DEVICE, dtype).contiguous(memory_format=memory_format or layout)


def _postact_convs(case: str) -> int:
    return CONVS[POSTACT_CASES[case][0]]


def check_postact_forward(case, backend, mode, dtype, gen, grad=None, memory_format=None, shape=None):
    """Output and running statistics of one post-activation case (2x-eager rule), with the
    launch assertions: a training (or grad-carrying) forward runs every conv and the projection
    as fused convs; an eval forward without grad folds to one fused conv per chain conv."""
    fused, exact, eager = make_postact(case, dtype, gen, backend)
    set_mode((fused, exact, eager), mode)
    x = make_postact_input(case, dtype, gen, offset=0.5, spread=1.5, memory_format=memory_format, shape=shape)
    grad = (mode == "frozen") if grad is None else grad
    reset_launches()
    with fused_context(backend), torch.set_grad_enabled(grad):
        out = fused(x)
    counts = launches(backend)
    with torch.set_grad_enabled(grad):
        expected, eager_out = exact(x.double()), eager(x)
    n_convs, proj = _postact_convs(case), postact_projection(case)
    folded = mode == "eval" and not grad
    assert counts.get(FWD_CONV[backend], 0) == (n_convs if folded else n_convs + proj), counts
    if backend == "triton":
        assert counts.get("_postact_out_kernel", 0) == (0 if folded else 1), counts
    assert out.dtype == dtype and out.shape == expected.shape
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout)
    assert_parity(out, eager_out, expected, dtype, f"{case} {mode} output")
    check_running_stats(fused, exact, eager, dtype)
    return counts


@contextlib.contextmanager
def convs_stored_as(exact: torch.nn.Module, dtype: torch.dtype):
    """:func:`stored_as` for any block: every conv output of the float64 twin rounded to
    ``dtype`` (each is stored in ``dtype`` by both implementations and feeds a norm), gradients
    passed unchanged."""
    def round_to_storage(_module, _inputs, out):
        return out + (out.to(dtype).to(out.dtype) - out).detach()

    handles = [m.register_forward_hook(round_to_storage) for m in exact.modules() if isinstance(m, nn.Conv2d)]
    try:
        yield exact
    finally:
        for h in handles:
            h.remove()


def check_postact_backward(case, backend, mode, dtype, gen, memory_format=None):
    """Output of the step, input gradient and every parameter gradient of one post-activation
    case (2x-eager rule), and the running statistics the step moved; launch assertions on the
    backward's kernels. 16-bit cases are well conditioned as :func:`check_backward`'s are
    (:func:`condition_bn`, calibrated running statistics, the twin's conv outputs rounded as
    stored in train mode: :func:`convs_stored_as`), so the plain 2x rule holds without widening."""
    fused, exact, eager = make_postact(case, dtype, gen, backend)
    x = make_postact_input(case, dtype, gen, memory_format=memory_format)
    low = dtype in (torch.float16, torch.bfloat16)
    if low:
        condition_bn(fused, gen)
        if fused.downsample is not None:
            # z = bn_last(y) + bn_proj(yd): both terms' per-channel signs alike, so their sum keeps
            # away from the closing ReLU's kink as each term does (opposite signs would cancel)
            with torch.no_grad():
                last, proj = fused._chain()[-1][1], fused.downsample[1]
                proj.bias.copy_(proj.bias.abs() * torch.sign(last.bias))
        exact.load_state_dict(fused.state_dict())
        calibrate_running_stats(exact, x)  # the reference twin: no fused kernel runs
        fused.load_state_dict(exact.state_dict())  # rounded to dtype
        exact.load_state_dict(fused.state_dict())
        eager.load_state_dict(fused.state_dict())
    set_mode((fused, exact, eager), mode)
    with torch.no_grad():
        shape = copy.deepcopy(exact)(x.double()).shape  # a copy: the probe must not move statistics
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64)
    if low:  # a per-channel mean in the upstream gradient, as check_backward's (count faults)
        grad_out += torch.randn(1, shape[1], 1, 1, generator=gen, dtype=torch.float64)
    grad_out = grad_out.to(DEVICE, dtype)
    reset_launches()
    with fused_context(backend):
        got = block_grads(fused, x, grad_out)
    counts = launches(backend)
    # The stored-output rounding is for the train-mode norms' near-cancelling batch sums; with
    # frozen norms the unrounded float64 twin is the closer reference (measured: both fused and
    # eager 3-5% off a rounded twin on a frozen fp16 ResNeXt weight gradient, 5e-4 off this one).
    with convs_stored_as(exact, dtype) if low and mode == "train" else contextlib.nullcontext():
        want = block_grads(exact, x.double(), grad_out.double())
    eager_got = block_grads(eager, x, grad_out)
    n_convs, proj = _postact_convs(case), postact_projection(case)
    assert counts.get(DGRAD[backend], 0) == n_convs, counts
    # forward convs, then the last conv's output (and the projection's) recomputed in the backward
    assert counts.get(FWD_CONV[backend], 0) == n_convs + proj + 1 + proj, counts
    if backend == "triton":
        assert counts.get("_postact_out_backward_kernel", 0) == 1, counts
    assert set(got) == set(want)
    assert_parity(got.pop("out"), eager_got.pop("out"), want.pop("out"), dtype, f"{case} {mode} output")
    for name in want:
        assert_parity(got[name], eager_got[name], want[name], dtype, f"{case} {mode} grad {name}",
                      scale=_cancelling_scale(_preact_name(name), {_preact_name(k): v for k, v in want.items()}))
    check_running_stats(fused, exact, eager, dtype)
    return counts


def _preact_name(name: str) -> str:
    """A post-activation parameter name in :func:`_cancelling_scale`'s terms (norms are bn1..,
    downsample.1 there; it keys on ``norm*``)."""
    if name.startswith("bn"):
        return "norm" + name[2:]
    return name.replace("downsample.1.", "normd.")
