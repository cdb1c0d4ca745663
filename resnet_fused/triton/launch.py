"""Launch plumbing shared by every Triton launcher: device guard, launch record.

Launches go to the current stream of the input's device (Triton's default), under a device
guard so a tensor on cuda:1 is not launched on cuda:0. Every launch is counted by kernel name,
so interpreted tests can assert that Triton kernels really ran (a parity test that silently
took the reference path would prove nothing).
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Iterator

import torch

__all__ = ["device_guard", "launch", "launch_counts", "reset_launch_counts", "skip_kernels"]

_LAUNCHES: Counter = Counter()
_SCOPE = "resnet_fused::triton_launch::"  # launch_count.TRITON_SCOPE
_SKIP = [False]


@contextlib.contextmanager
def skip_kernels() -> Iterator[None]:
    """Count launches without running the kernels (their outputs stay uninitialised).

    For counting only (``resnet_fused.launch_count``): which kernels a fused block launches
    depends on shapes and modes, never on values (no data-dependent control flow, by design),
    so counting a ResNet-50 step does not need the interpreter to run minutes of GEMMs.
    """
    _SKIP.append(True)
    try:
        yield
    finally:
        _SKIP.pop()


@contextlib.contextmanager
def device_guard(t: torch.Tensor) -> Iterator[None]:
    if t.is_cuda:
        with torch.cuda.device(t.device):
            yield
    else:
        yield


def launch(kernel: Any, grid: tuple, guard: torch.Tensor, *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)`` on ``guard``'s device, recorded in the launch counts."""
    name = getattr(kernel, "__name__", None) or kernel.fn.__name__
    _LAUNCHES[name] += 1
    if _SKIP[-1]:
        return
    if getattr(torch.autograd.profiler, "_is_profiler_enabled", False):
        # A scope for launch_count.py: what the interpreter runs inside is this one launch.
        with torch.profiler.record_function(_SCOPE + name), device_guard(guard):
            kernel[grid](*args, **meta)
        return
    with device_guard(guard):
        kernel[grid](*args, **meta)


def launch_counts() -> Counter:
    """A copy of the per-kernel launch counts since the last reset."""
    return Counter(_LAUNCHES)


def reset_launch_counts() -> None:
    _LAUNCHES.clear()
