"""The Triton launch path (resnet_fused.triton.launch): the fast lane's key and cache, its
fallbacks, and ``skip_kernels``.

The lane's logic runs on the CPU against a real ``JITFunction`` whose ``run`` (Triton's normal
path) is replaced by a recorder returning a stand-in compiled kernel, and a stand-in CUDA guard;
the GPU test compares the lane with the normal launch bit for bit.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys

import pytest
import torch
import triton.language as tl
from triton import knobs
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import JITFunction, native_specialize_impl

from helpers import requires_cuda, requires_triton
from resnet_fused.triton import launch as L
from resnet_fused.triton.stats import bn_finalize_stats, channel_stats_partials


def _toy(x_ptr, n, f, B: tl.constexpr, D: tl.constexpr = 3):
    pass


def _specialization(a):
    return native_specialize_impl(BaseBackend, a, False, True, True)


def _key(*args, **meta):
    return L.signature_key("k", 0, args, meta)


def test_key_is_at_least_as_fine_as_triton_specialization():
    """Two argument lists with one fast-lane key always get one Triton specialisation."""
    base = torch.empty(64, dtype=torch.float32)
    values = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 1, 2**31, 2**31 + 16, 2**40, 2**63, 2**63 + 1,
              0.0, 0.5, 1e30, True, False, None,
              base, base[1:], base[4:], base[8:], base.half(), base.half()[8:], base.double(), base.to(torch.int32)]
    pairs = list(itertools.product(values, repeat=2))
    for (a, b), (c, d) in itertools.combinations(pairs, 2):
        if _key(a, b) == _key(c, d):
            assert [_specialization(x) for x in (a, b)] == [_specialization(x) for x in (c, d)], (a, b, c, d)
    # and it tells apart what Triton tells apart
    for a, b in [(1, 2), (16, 17), (2**31 - 16, 2**31), (2**62, 2**63), (base, base[1:]),
                 (base, base.half()), (1, True), (0.5, 1), (2**31 + 1, 1)]:
        assert _key(a) != _key(b), (a, b)
        assert _specialization(a) != _specialization(b), (a, b)
    assert _key(base, B=4) != _key(base, B=8) and _key(base, B=4) != _key(base, B=4, num_warps=8)


def test_key_rejects_what_it_cannot_describe():
    for a in ((1, 2), torch.float32, "s", object()):
        with pytest.raises(L._Unsupported):
            _key(a)
    w = torch.nn.Parameter(torch.empty(8))
    assert _key(w) == _key(w.detach()) and _specialization(w) == _specialization(w.detach())
    with pytest.raises(TypeError):
        hash(_key(1, B=[1]))


def _jit():
    return JITFunction(_toy)


def test_tail_orders_constexprs_and_refuses_misfits():
    k = _jit()
    assert L._tail(k, 3, {"B": 4}) == (4, 3)
    assert L._tail(k, 3, {"B": 4, "D": 5, "num_warps": 8}) == (4, 5)
    assert L._tail(k, 3, {}) is None  # B missing
    assert L._tail(k, 4, {}) is None  # a constexpr passed positionally
    assert L._tail(k, 2, {"f": 1.0, "B": 4}) is None  # a runtime argument by keyword
    assert L._tail(k, 6, {}) is None


class _Compiled:
    """Stands in for a CompiledKernel: records launcher calls."""

    def __init__(self):
        self.calls = []
        self.function = object()
        self.packed_metadata = ("meta",)

    @property
    def run(self):
        return lambda *a: self.calls.append(a)


class _Guard:
    """Stands in for a CUDA tensor as the launch guard."""
    is_cuda = True
    device = torch.device("cuda", 0)

    def get_device(self):
        return 0


@pytest.fixture
def lane(monkeypatch):
    """A JITFunction whose normal path is recorded, a CUDA guard and stream, the lane empty."""
    k = _jit()
    compiled = _Compiled()
    normal = []

    def run(*args, grid, warmup, **kwargs):
        normal.append((grid, args, kwargs))
        return compiled

    monkeypatch.setattr(k, "run", run)
    monkeypatch.setattr(L, "_current_stream", lambda device: 1234)
    monkeypatch.setattr(L, "device_guard", lambda t: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # the guard's device is current
    monkeypatch.setattr(L, "_TRITON_VERSION", (3, 8))
    monkeypatch.delenv(L.FAST_LANE_ENV, raising=False)
    L.reset_fast_lane()
    yield k, compiled, normal
    L.reset_fast_lane()


def test_fast_lane_second_call_goes_to_the_launcher(lane):
    k, compiled, normal = lane
    x = torch.empty(32)
    L.launch(k, (3, 2), _Guard(), x, 7, 0.5, B=4, num_warps=8)
    assert len(normal) == 1 and not compiled.calls and L.fast_lane_entries() == 1
    L.launch(k, (5,), _Guard(), x, 9, 0.25, B=4, num_warps=8)
    assert len(normal) == 1
    assert compiled.calls == [(5, 1, 1, 1234, compiled.function, compiled.packed_metadata, None, None, None,
                               x, 9, 0.25, 4, 3)]


@pytest.mark.parametrize("change", ["dtype", "alignment", "int_one", "int_div16", "constexpr", "option"])
def test_fast_lane_new_specialisation_takes_the_normal_path(lane, change):
    k, compiled, normal = lane
    x = torch.empty(64)
    L.launch(k, (1,), _Guard(), x, 7, 0.5, B=4)
    args, meta = [x, 7, 0.5], {"B": 4}
    if change == "dtype":
        args[0] = x.half()
    elif change == "alignment":
        args[0] = x[1:]
    elif change == "int_one":
        args[1] = 1
    elif change == "int_div16":
        args[1] = 32
    elif change == "constexpr":
        meta["B"] = 8
    else:
        meta["num_warps"] = 2
    L.launch(k, (1,), _Guard(), *args, **meta)
    assert len(normal) == 2 and not compiled.calls
    assert L.fast_lane_entries() == 2


def test_fast_lane_off_switches(lane, monkeypatch):
    k, compiled, normal = lane
    x = torch.empty(32)
    L.launch(k, (1,), _Guard(), x, 7, 0.5, B=4)
    monkeypatch.setenv(L.FAST_LANE_ENV, "0")
    L.launch(k, (1,), _Guard(), x, 7, 0.5, B=4)
    monkeypatch.delenv(L.FAST_LANE_ENV)
    monkeypatch.setattr(L, "_TRITON_VERSION", (3, 5))  # a version it was not written against
    L.launch(k, (1,), _Guard(), x, 7, 0.5, B=4)
    monkeypatch.setattr(L, "_TRITON_VERSION", (3, 8))
    L.launch(k, (1,), _Guard(), x, (7,), 0.5, B=4)  # a tuple argument
    L.launch(k, lambda meta: (1,), _Guard(), x, 7, 0.5, B=4)  # a callable grid
    L.launch(k, (1,), _Guard(), x, 7, 0.5, B=[4])  # an unhashable keyword
    assert len(normal) == 6 and not compiled.calls
    L.launch(k, (1,), _Guard(), x, 7, 0.5, B=4)
    assert len(compiled.calls) == 1


def test_fast_lane_yields_to_launch_hooks(lane, monkeypatch):
    k, compiled, normal = lane
    x = torch.empty(32)
    L.launch(k, (1,), _Guard(), x, 7, 0.5, B=4)
    with monkeypatch.context() as m:
        m.setattr(knobs.runtime, "launch_enter_hook", lambda *a: None)
        L.launch(k, (1,), _Guard(), x, 7, 0.5, B=4)
    k.pre_run_hooks.append(lambda *a, **kw: None)
    L.launch(k, (1,), _Guard(), x, 7, 0.5, B=4)
    k.pre_run_hooks.clear()
    assert len(normal) == 3 and not compiled.calls
    L.launch(k, (1,), _Guard(), x, 7, 0.5, B=4)
    assert len(compiled.calls) == 1


def test_fast_lane_not_for_cpu_tensors_or_the_interpreter(lane):
    k, compiled, normal = lane
    x = torch.empty(32)
    L.launch(k, (1,), x, x, 7, 0.5, B=4)
    L.launch(k, (1,), x, x, 7, 0.5, B=4)
    assert len(normal) == 2 and L.fast_lane_entries() == 0


class _Recorder:
    """A kernel stand-in: records the grid of every launch Triton would get."""
    __name__ = "_recorded_kernel"

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **meta: None


def test_skip_kernels_levels():
    k, x = _Recorder(), torch.empty(4)
    L.reset_launch_counts()
    L.launch(k, (3, 4), x, x)
    with L.skip_kernels():
        L.launch(k, (3, 4), x, x)
    with L.skip_kernels("triton"):
        L.launch(k, (3, 4), x, x)
        with L.skip_kernels("count"):
            L.launch(k, (3, 4), x, x)
    assert k.grids == [(3, 4), (0,)]  # "count" never reaches Triton; "triton" with an empty grid
    assert L.launch_counts()["_recorded_kernel"] == 4
    with pytest.raises(ValueError, match="'count' or 'triton'"):
        with L.skip_kernels("gpu"):
            pass


@requires_triton
def test_skip_kernels_at_triton_level_runs_no_program(gen):
    """Under the interpreter an empty grid is accepted and runs no program."""
    x = torch.randn(2, 4, 3, 3, generator=gen)
    L.reset_launch_counts()
    with L.skip_kernels("triton"):
        part = channel_stats_partials(x, 16, 16)
        bn_finalize_stats(part, None, None, 1e-5, block_p=2, block_c=16)
    assert L.launch_counts() == {"_channel_stats_partial_kernel": 1, "_bn_finalize_kernel": 1}


def test_lane_kernels_read_no_globals():
    """A kernel reading module globals is left to the normal path (Triton re-checks them per
    call): the package's kernels must not, or the lane would never hold them. Checked on the
    compiled (non-interpreted) JITFunction in a fresh process."""
    code = (
        "import os; os.environ.pop('TRITON_INTERPRET', None)\n"
        "import resnet_fused.triton.stats as s, resnet_fused.triton.bn_backward as b\n"
        "import resnet_fused.triton.conv as c, resnet_fused.triton.conv_backward as cb\n"
        "import resnet_fused.triton.elementwise as e, resnet_fused.triton.postact_elementwise as pe\n"
        "import resnet_fused.triton.postact_wgrad as pw\n"
        "from triton.runtime.jit import JITFunction\n"
        "bad, n = [], 0\n"
        "for m in (s, b, c, cb, e, pe, pw):\n"
        "    for name in dir(m):\n"
        "        f = getattr(m, name)\n"
        "        if isinstance(f, JITFunction) and name.endswith('_kernel'):\n"
        "            f.cache_key\n"
        "            n += 1\n"
        "            bad += [name] if f.used_global_vals else []\n"
        "print('BAD', bad, 'OF', n)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "BAD [] OF" in out.stdout, out.stdout
    assert int(out.stdout.split("OF")[1]) >= 10, out.stdout  # every kernel module was read


@requires_cuda
def test_fast_lane_matches_normal_launch_bitwise():
    """GPU: the same launches through the lane and through ``kernel[grid](...)`` give the same
    bits, and the lane was taken."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 64, 28, 28, device="cuda", generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.rand(64, device="cuda", generator=gen) + 0.5
    b = torch.randn(64, device="cuda", generator=gen)

    def step():
        part = channel_stats_partials(x)
        rm, rv, nbt = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda"), torch.zeros((), dtype=torch.long,
                                                                                                  device="cuda")
        out = bn_finalize_stats(part, w, b, 1e-5, running_mean=rm, running_var=rv, num_batches_tracked=nbt,
                                momentum=None, update=True)
        return part, out, rm, rv, nbt

    saved = os.environ.get(L.FAST_LANE_ENV)
    os.environ[L.FAST_LANE_ENV] = "0"
    try:
        normal = step()
    finally:
        if saved is None:
            os.environ.pop(L.FAST_LANE_ENV)
        else:
            os.environ[L.FAST_LANE_ENV] = saved
    L.reset_fast_lane()
    step()  # fills the lane
    assert L.fast_lane_entries() >= 2
    fast = step()
    torch.cuda.synchronize()
    for a, b in zip(normal, fast):
        assert torch.equal(a, b)
