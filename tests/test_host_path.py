"""The pre-activation blocks' host path: the per-call plan cache and the eager dispatch.

A block builds its plan (checks, backend, flags, op configuration) once per call signature
(``_FusedBlock._plan_key``) and calls the op's implementation through an autograd.Function,
not the op's dispatcher, in eager mode. These tests pin both without a timer: which calls
build a plan, which path a call takes, and how many Python calls of the package a training
step of one block makes (a planning or dispatch regression shows up as more calls).
"""
from __future__ import annotations

import collections
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fused as rf
from helpers import requires_triton
from resnet_fused import modules
from resnet_fused.ops import blocks as block_ops
from resnet_fused.triton.launch import skip_kernels

pytestmark = requires_triton

PACKAGE = os.path.dirname(rf.__file__)

#: Python calls inside resnet_fused per training step (forward + backward) of one block at
#: the shapes below, kernels skipped, plan cached: measured 331 (bottleneck) and 248 (basic)
#: with torch 2.14 / triton 3.8, plus headroom for version differences in the kernel sets.
CALL_BOUNDS = {"bottleneck": 400, "basic": 300}


def _block(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "bottleneck":
        return rf.FusedBottleneck(16, 32, stride=2, bottle_ratio=0.5, backend="triton").train()
    return rf.FusedBasicBlock(16, 16, backend="triton").train()


@pytest.fixture
def builds(monkeypatch):
    """Counts plan builds (calls of ``_FusedBlock._build_plan``)."""
    count = collections.Counter()
    real = modules._FusedBlock._build_plan

    def counting(self, x, key):
        count["builds"] += 1
        return real(self, x, key)

    monkeypatch.setattr(modules._FusedBlock, "_build_plan", counting)
    return count


def _new_builds(count, run) -> int:
    before = count["builds"]
    with skip_kernels("count"):
        run()
    return count["builds"] - before


@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_plan_built_once_per_signature_and_rebuilt_when_it_changes(kind, builds, gen):
    block = _block(kind)
    x = torch.randn(2, 16, 6, 6, generator=gen)
    assert _new_builds(builds, lambda: block(x)) == 1
    assert _new_builds(builds, lambda: block(x)) == 0
    assert _new_builds(builds, lambda: block(torch.randn(2, 16, 6, 6, generator=gen))) == 0  # same signature
    assert _new_builds(builds, lambda: block(torch.randn(3, 16, 6, 6, generator=gen))) == 1  # shape
    cl = x.contiguous(memory_format=torch.channels_last)
    assert _new_builds(builds, lambda: block(cl)) == 1  # strides
    block.eval()
    assert _new_builds(builds, lambda: block(x)) == 1  # eval()
    with torch.no_grad():
        assert _new_builds(builds, lambda: block(x)) == 1  # grad mode
    block.train()
    assert _new_builds(builds, lambda: block(x)) == 0  # train() again: the first plan
    block.requires_grad_(False)
    assert _new_builds(builds, lambda: block(x)) == 1  # requires_grad of the parameters
    # The key holds whether a gradient is needed, so an input requiring grad finds the plan
    # of the parameters requiring it (the first one).
    xg = x.clone().requires_grad_()
    assert _new_builds(builds, lambda: block(xg)) == 0
    assert block._plan(xg, None, False).needs_grad and not block._plan(x, None, False).needs_grad
    block.requires_grad_(True)
    block.norm1.momentum = None
    assert _new_builds(builds, lambda: block(x)) == 1  # a norm's momentum
    block.to(torch.float64)
    assert _new_builds(builds, lambda: block(x.double())) == 1  # .to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block.to(torch.float32)
        assert _new_builds(builds, lambda: block(x)) == 1  # autocast


def test_plan_flags_follow_the_mode(gen):
    """What the cached plans decide: eval folding without grad only, the update of running
    statistics in train mode only, and a gradient exactly when one is needed."""
    block = _block("bottleneck")
    x = torch.randn(2, 16, 6, 6, generator=gen)
    with skip_kernels("count"):
        assert block(x).requires_grad
        plan = block._plan(x, None, False)
        assert plan.kw["update_stats"] and not plan.kw["fold_eval"] and plan.needs_grad
        block.eval()
        with torch.no_grad():
            assert not block(x).requires_grad
            plan = block._plan(x, None, False)
        assert plan.kw["fold_eval"] and not plan.kw["update_stats"] and not plan.needs_grad
        block.requires_grad_(False)
        assert not block(x).requires_grad
        assert block._plan(x, None, False).kw["fold_eval"]
        assert block(x.clone().requires_grad_()).requires_grad
        assert not block._plan(x.clone().requires_grad_(), None, False).kw["fold_eval"]


def test_bad_input_raises_on_a_cached_signature(gen):
    """The per-call checks that the plan cannot hold: module and input dtype or device."""
    block = _block("bottleneck")
    x = torch.randn(2, 16, 6, 6, generator=gen)
    with skip_kernels("count"):
        block(x)
        block.to(torch.float64)
        with pytest.raises(TypeError, match="input dtype torch.float32 and weight dtype torch.float64"):
            block(x)
    with pytest.raises(ValueError, match="input channels"):
        block(torch.randn(2, 8, 6, 6, dtype=torch.float64))


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_eager_path_skips_the_dispatcher_and_modes_see_the_op(kind, gen):
    block = _block(kind)
    # channels_last: the op's output is the block's (an NCHW input gets a copy back).
    x = torch.randn(2, 16, 6, 6, generator=gen).to(memory_format=torch.channels_last).requires_grad_()
    fn = "_BottleneckFunction" if kind == "bottleneck" else "_BasicFunction"
    op = "resnet_fused.bottleneck_forward" if kind == "bottleneck" else "resnet_fused.basic_block_forward"
    with skip_kernels("count"):
        out = block(x)
        assert type(out.grad_fn).__name__ == f"{fn}Backward"
        assert block_ops.direct_call_allowed(x)
        mode = _OpNames()
        with mode:
            assert not block_ops.direct_call_allowed(x)
            out = block(x)
        assert any(name.startswith(op) for name in mode.names), mode.names
        assert type(out.grad_fn).__name__ != f"{fn}Backward"  # the op's registered autograd


@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_training_step_python_calls(kind, builds, gen):
    """One training step of one block, plan cached: no plan build, no call into the custom
    op machinery (torch._library), and at most CALL_BOUNDS Python calls inside the package."""
    block = _block(kind)
    x = torch.randn(2, 16, 6, 6, generator=gen, requires_grad=True)

    def step():
        block(x).sum().backward()

    calls = collections.Counter()

    def profile(frame, event, arg):
        if event == "call":
            name = frame.f_code.co_filename
            if name.startswith(PACKAGE):
                calls["package"] += 1
            elif f"torch{os.sep}_library" in name:
                calls["custom_op"] += 1

    with skip_kernels("count"):
        step()
        step()
        before = builds["builds"]
        sys.setprofile(profile)
        try:
            step()
        finally:
            sys.setprofile(None)
    assert builds["builds"] == before
    assert calls["custom_op"] == 0, calls
    assert 0 < calls["package"] <= CALL_BOUNDS[kind], calls
