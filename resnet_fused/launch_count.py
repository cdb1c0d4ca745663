"""Kernel launches of a model step, counted on the CPU: Triton launches + top-level ATen ops.

``count_launches(model, x, mode)`` runs one step under ``torch.profiler`` and counts

* ``triton``: Triton kernel launches (``resnet_fused.triton.launch``'s counter; under the CPU
  interpreter they run as Python, so the profiler's view of their insides is ignored);
* ``cuda``: the CUDA C++ backend's op calls (``resnet_fused.cuda.kernels``' counter), one device
  kernel each on a GPU;
* ``aten``: the outermost ATen ops that launch a device kernel on a GPU. An ATen op called by
  another ATen op is part of its parent (``aten::clone`` -> ``aten::copy_`` is one launch), and
  view / metadata / allocation ops launch nothing (``_NO_KERNEL``: they are skipped, their
  children looked at). Ops inside a Triton launch or a ``resnet_fused::*_cuda`` op are not
  counted (those are the launches above).

Modes: ``"train_fwd"`` (train mode, forward), ``"train_step"`` (train mode, forward + ``sum()``
+ backward), ``"eval_fwd"`` (eval mode under ``torch.no_grad``). The model's mode is restored.
Counting needs the Triton interpreter for CPU tensors (``TRITON_INTERPRET=1`` before triton is
imported), or a GPU.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any

import torch
from torch import nn

from .cuda import kernels as cuda_kernels
from .triton import launch as triton_launch

__all__ = ["count_launches", "MODES", "TRITON_SCOPE"]

MODES = ("train_fwd", "train_step", "eval_fwd")

#: The profiler scope a Triton launch runs in (``triton/launch.py`` opens it while profiling).
TRITON_SCOPE = "resnet_fused::triton_launch::"

# ATen ops that launch no device kernel: views, metadata, allocation, dispatch wrappers whose
# work (if any) is a child op that is counted instead.
_NO_KERNEL = frozenset(f"aten::{n}" for n in (
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view", "reshape", "_reshape_alias",
    "as_strided", "permute", "transpose", "t", "expand", "expand_as", "squeeze", "unsqueeze",
    "slice", "select", "unbind", "split", "split_with_sizes", "chunk", "narrow", "alias", "detach",
    "detach_", "lift_fresh", "contiguous", "to", "type_as", "flatten", "unflatten",
    "resolve_conj", "resolve_neg", "set_", "resize_", "view_as", "numpy_T", "is_nonzero",
    "result_type", "size", "stride", "dim", "item", "_local_scalar_dense", "is_same_size",
    "requires_grad_", "retain_grad", "_has_compatible_shallow_copy_type", "record_stream",
    "conv2d", "convolution", "_convolution", "batch_norm", "_batch_norm_impl_index",
    "linear", "matmul", "dropout", "feature_dropout", "_to_copy_alias", "ones_like_meta",
))


def _counted(name: str) -> bool:
    return name.startswith("aten::") and name not in _NO_KERNEL


def _walk(events) -> Counter:
    """Outermost kernel-launching ATen ops among ``events`` (a profiler's function events)."""
    children: dict[int, list] = {}
    roots = []
    for e in events:
        parent = e.cpu_parent
        if parent is None:
            roots.append(e)
        else:
            children.setdefault(id(parent), []).append(e)
    found: Counter = Counter()
    stack = list(roots)
    while stack:
        e = stack.pop()
        name = e.name
        if name.startswith(TRITON_SCOPE) or (name.startswith("resnet_fused::") and name.endswith("_cuda")):
            continue  # a kernel launch counted by its own counter
        if _counted(name):
            found[name] += 1
            continue
        stack.extend(children.get(id(e), ()))
    return found


def _step(model: nn.Module, x: torch.Tensor, mode: str) -> None:
    if mode == "eval_fwd":
        with torch.no_grad():
            model(x)
    elif mode == "train_fwd":
        model(x)
    else:
        model(x).sum().backward()


def count_launches(model: nn.Module, x: torch.Tensor, mode: str, run_kernels: bool = False) -> dict[str, Any]:
    """``dict(triton=int, cuda=int, aten=int, aten_by_op=dict, triton_by_kernel=dict,
    cuda_by_op=dict, total=int)`` for one step of
    ``model`` on ``x`` in ``mode`` (see the module docstring). A warm-up step runs first (its
    running-statistics update happens, as any step's would), so one-time work is not counted.

    ``run_kernels=False`` (default) counts the Triton launches without running them
    (``triton.launch.skip_kernels``): the interpreter would take minutes per ResNet-50 step, and
    which kernels launch never depends on the values. The model's buffers then hold garbage
    afterwards: count on a throw-away model. The CUDA backend's ops always run.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    was_training = model.training
    model.train(mode != "eval_fwd")
    try:
        with contextlib.nullcontext() if run_kernels else triton_launch.skip_kernels():
            _step(model, x, mode)  # warm-up: lazy initialisation, compilation caches
            model.zero_grad(set_to_none=True)
            triton_launch.reset_launch_counts()
            cuda_kernels.reset_launch_counts()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                _step(model, x, mode)
            model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    aten = _walk(prof.events())
    triton = sum(triton_launch.launch_counts().values())
    cuda = sum(cuda_kernels.launch_counts().values())
    n_aten = sum(aten.values())
    return dict(triton=triton, cuda=cuda, aten=n_aten, aten_by_op=dict(aten.most_common()),
                triton_by_kernel=dict(triton_launch.launch_counts().most_common()),
                cuda_by_op=dict(cuda_kernels.launch_counts().most_common()), total=triton + cuda + n_aten)
