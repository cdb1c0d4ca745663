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

__all__ = ["device_guard", "launch", "launch_counts", "reset_launch_counts"]

_LAUNCHES: Counter = Counter()


@contextlib.contextmanager
def device_guard(t: torch.Tensor) -> Iterator[None]:
    if t.is_cuda:
        with torch.cuda.device(t.device):
            yield
    else:
        yield


def launch(kernel: Any, grid: tuple, guard: torch.Tensor, *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)`` on ``guard``'s device, recorded in the launch counts."""
    _LAUNCHES[getattr(kernel, "__name__", None) or kernel.fn.__name__] += 1
    with device_guard(guard):
        kernel[grid](*args, **meta)


def launch_counts() -> Counter:
    """A copy of the per-kernel launch counts since the last reset."""
    return Counter(_LAUNCHES)


def reset_launch_counts() -> None:
    _LAUNCHES.clear()
