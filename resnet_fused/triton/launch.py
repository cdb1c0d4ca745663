"""Launch plumbing shared by every Triton launcher: device guard, launch record, fast lane.

Launches go to the current stream of the input's device (Triton's default), under a device
guard so a tensor on cuda:1 is not launched on cuda:0. Every launch is counted by kernel name,
so interpreted tests can assert that Triton kernels really ran (a parity test that silently
took the reference path would prove nothing).

The fast lane. ``kernel[grid](...)`` (``JITFunction.run``) spends most of its host time before
the launch: binding the arguments, specialising each one, building a string cache key, checking
the kernel's globals and building launch metadata for the (empty) launch hooks. :func:`launch`
keeps its own cache of compiled kernels, keyed by what Triton's specialisation depends on (see
:func:`signature_key`), and for a key it has seen calls the compiled kernel's launcher directly,
with the arguments in the order ``JITFunction.run`` passes them. The first call of every key
goes through ``kernel[grid](...)`` (which compiles, or loads from Triton's cache) and records
the compiled kernel; so does every call the lane does not cover: the interpreter, a Triton
version outside :data:`FAST_LANE_VERSIONS`, launch hooks installed (a profiler), pre-run hooks,
a kernel reading global variables, arguments of other kinds than tensors, ints, floats, bools
and None, or a callable grid. ``RESNET_FUSED_TRITON_FAST_LAUNCH=0`` turns the lane off.
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter
from typing import Any, Iterator, Optional

import torch
import triton
from triton import knobs
from triton.runtime.jit import JITFunction

__all__ = ["FAST_LANE_ENV", "FAST_LANE_VERSIONS", "device_guard", "fast_lane_enabled", "fast_lane_entries",
           "launch", "launch_counts", "reset_fast_lane", "reset_launch_counts", "signature_key", "skip_kernels"]

_LAUNCHES: Counter = Counter()
_SCOPE = "resnet_fused::triton_launch::"  # launch_count.TRITON_SCOPE
#: The innermost :func:`skip_kernels` level: None (run the kernels), "count" or "triton".
_SKIP: list[Optional[str]] = [None]

#: Set to "0" to send every launch through ``kernel[grid](...)``.
FAST_LANE_ENV = "RESNET_FUSED_TRITON_FAST_LAUNCH"
#: Triton (major, minor) versions whose ``JITFunction.run`` / ``CompiledKernel.run`` calling
#: convention the fast lane reproduces (read from their sources: 3.6.0, 3.7.0 and 3.8).
FAST_LANE_VERSIONS = frozenset({(3, 6), (3, 7), (3, 8)})
_TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())


# Launchers compute their grids with -(-a // b), not triton.cdiv: that is a constexpr function in
# triton 3.6-3.8 (it unwraps its arguments on every call), about 2 us a call on a CPU, and a
# ResNet-50 training step computes a few hundred grids.

_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _current_stream(device: int) -> int:
    """The raw current stream of CUDA device ``device`` (what Triton's driver queries for each
    launch)."""
    if _RAW_STREAM is not None:
        return _RAW_STREAM(device)
    return torch.cuda.current_stream(device).cuda_stream


def fast_lane_enabled() -> bool:
    """Whether launches of compiled kernels may skip ``JITFunction.run`` (read per call, so
    the environment variable can be flipped inside a process, e.g. by a test)."""
    return os.environ.get(FAST_LANE_ENV, "1") != "0" and _TRITON_VERSION in FAST_LANE_VERSIONS


class _Unsupported(Exception):
    """An argument the fast lane's key does not describe: the launch takes the normal path."""


_Tensor = torch.Tensor


def signature_key(kernel: Any, device: int, args: tuple, meta: dict) -> tuple:
    """The fast lane's cache key, one flat tuple: the kernel, the device index, the two knobs
    ``JITFunction.run`` adds to the options (debug, instrumentation mode), one record per
    positional argument, then the keyword arguments (constexprs and launch options such as
    ``num_warps``) by value.

    A record holds what Triton's specialisation of the argument depends on (triton 3.6-3.8):
    a tensor's dtype and whether its address is 16-byte aligned (two entries); an int's code:
    -1 for 1 (made a constant), else 16 if divisible by 16, plus 0 / 1 / 2 for i32 / i64 / u64
    by range; ``"f"`` for a float, ``"b"`` for a bool, None for None. Each record's first entry
    tells its kind, so equal keys mean equal records: the key may be finer than Triton's,
    never coarser. Raises ``_Unsupported`` for another kind of argument (a tuple, a dtype); an
    unhashable keyword value makes the key unhashable (TypeError at the lookup)."""
    key = [kernel, device, knobs.runtime.debug, knobs.compilation.instrumentation_mode]
    append = key.append
    for a in args:
        t = type(a)
        if t is _Tensor:
            append(a.dtype)
            append(a.data_ptr() & 15 == 0)
        elif t is int:
            if a == 1:
                append(-1)
            else:
                append((16 if a & 15 == 0 else 0)
                       + (0 if -0x80000000 <= a < 0x80000000 else 2 if a >= 0x8000000000000000 else 1))
        elif t is float:
            append("f")
        elif t is bool:
            append("b")
        elif a is None:
            append(None)
        elif isinstance(a, _Tensor):  # nn.Parameter: Triton takes any object with data_ptr alike
            append(a.dtype)
            append(a.data_ptr() & 15 == 0)
        else:
            raise _Unsupported(t.__name__)
    key += meta.items()
    return tuple(key)


class _Entry:
    """One compiled kernel as its launcher takes it; ``tail`` the parameters after the
    positional arguments (constexprs from the keywords or their defaults), in signature order."""

    __slots__ = ("run", "function", "packed_metadata", "tail")

    def __init__(self, compiled: Any, tail: tuple):
        self.run = compiled.run  # a property: initialises the module handles once
        self.function = compiled.function
        self.packed_metadata = compiled.packed_metadata
        self.tail = tail


_FAST: dict[tuple, _Entry] = {}


def fast_lane_entries() -> int:
    """How many compiled kernels the fast lane holds."""
    return len(_FAST)


def reset_fast_lane() -> None:
    _FAST.clear()


def _hooks_installed() -> bool:
    """Launch hooks (a profiler such as proton) or a pipeline-inspection hook: the normal path
    builds their launch metadata."""
    rt = knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return getattr(rt, "add_stages_inspection_hook", None) is not None


def _tail(kernel: JITFunction, n_args: int, meta: dict) -> Optional[tuple]:
    """The launcher's arguments after the positional ones, or None where the call does not fit
    the lane: a positional argument landing on a constexpr (its value would be in the key
    only by kind), a tensor passed by keyword (it would be frozen into the tail), a parameter
    missing, or more positional arguments than parameters."""
    params = kernel.params
    if n_args > len(params) or any(p.is_constexpr for p in params[:n_args]):
        return None
    tail = []
    for p in params[n_args:]:
        if p.name in meta:
            if not p.is_constexpr:
                return None
            tail.append(meta[p.name])
        elif p.has_default:
            tail.append(p.default)
        else:
            return None
    return tuple(tail)


def _launch_triton(kernel: Any, grid: tuple, guard: torch.Tensor, args: tuple, meta: dict) -> None:
    """One launch with ``guard``'s device current: the fast lane if it holds the call, else
    ``kernel[grid](...)``, recording the compiled kernel for the next call."""
    if not (isinstance(kernel, JITFunction) and type(grid) is tuple and guard.is_cuda and fast_lane_enabled()):
        kernel[grid](*args, **meta)
        return
    device = guard.get_device()
    try:
        key = signature_key(kernel, device, args, meta)
        entry = _FAST.get(key)
    except (_Unsupported, TypeError):
        kernel[grid](*args, **meta)
        return
    if entry is not None and not kernel.pre_run_hooks and not _hooks_installed():
        n = len(grid)
        entry.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                  _current_stream(device), entry.function, entry.packed_metadata,
                  None, None, None, *args, *entry.tail)
        return
    compiled = kernel[grid](*args, **meta)
    if entry is None and compiled is not None and not kernel.used_global_vals:
        tail = _tail(kernel, len(args), meta)
        if tail is not None:
            _FAST[key] = _Entry(compiled, tail)


@contextlib.contextmanager
def skip_kernels(level: str = "count") -> Iterator[None]:
    """Launch without running the kernels (their outputs stay uninitialised).

    ``level="count"``: record the launch and return before Triton is called. For counting
    (``resnet_fused.launch_count``): which kernels a fused block launches depends on shapes and
    modes, never on values (no data-dependent control flow, by design), so counting a ResNet-50
    step does not need the interpreter to run minutes of GEMMs.

    ``level="triton"``: the launch goes through Triton (the fast lane or ``kernel[grid]``) with
    an empty grid, so Triton's own launch path runs and no program does: host-overhead
    measurement. On a GPU the launcher returns before ``cuLaunchKernel`` for an empty grid;
    under the interpreter the call still binds the arguments, round-trips every tensor
    argument's storage and patches the language, which a GPU launch does not do.
    """
    if level not in ("count", "triton"):
        raise ValueError(f"skip_kernels level must be 'count' or 'triton', got {level!r}")
    _SKIP.append(level)
    try:
        yield
    finally:
        _SKIP.pop()


@contextlib.contextmanager
def device_guard(t: torch.Tensor) -> Iterator[None]:
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        with torch.cuda.device(t.device):
            yield
    else:
        yield


def launch(kernel: Any, grid: tuple, guard: torch.Tensor, *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)`` on ``guard``'s device, recorded in the launch counts
    (through the fast lane where it holds the compiled kernel)."""
    name = getattr(kernel, "__name__", None) or kernel.fn.__name__
    _LAUNCHES[name] += 1
    skip = _SKIP[-1]
    if skip == "count":
        return
    if skip == "triton":
        grid = (0,)
    if getattr(torch.autograd.profiler, "_is_profiler_enabled", False):
        # A scope for launch_count.py: what the interpreter runs inside is this one launch.
        with torch.profiler.record_function(_SCOPE + name), device_guard(guard):
            _launch_triton(kernel, grid, guard, args, meta)
        return
    if guard.is_cuda and guard.get_device() != torch.cuda.current_device():
        with torch.cuda.device(guard.device):
            _launch_triton(kernel, grid, guard, args, meta)
        return
    _launch_triton(kernel, grid, guard, args, meta)  # the device is current already (or CPU)


def launch_counts() -> Counter:
    """A copy of the per-kernel launch counts since the last reset."""
    return Counter(_LAUNCHES)


def reset_launch_counts() -> None:
    _LAUNCHES.clear()
