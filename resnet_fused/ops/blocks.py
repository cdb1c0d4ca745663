"""Fused block ops: ``resnet_fused::bottleneck_forward`` and ``resnet_fused::basic_block_forward``.

One op per block type, one autograd registration per op, dispatching by backend inside:

* ``triton``: the fused kernels (``resnet_fused/triton``) for a CUDA tensor, or for a CPU tensor
  when TRITON_INTERPRET=1 (the interpreter); the reference for a CPU tensor otherwise.
* ``reference``: eager PyTorch (the same computation; used by opcheck and as the fallback).

The ops are functional: they return the block output (channels_last) and the (mean, biased
var) each norm used, and never write the running statistics; the module updates those after
the call (a mutating op cannot carry an autograd formula). Gradients: the backward recomputes
the block with the reference from the saved input (only x, the parameters and the statistics
are saved, never an activation); fused backward kernels replace it in a later version.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .. import reference
from ..triton import blocks as triton_blocks
from ._saved import load_saved, save_named

__all__ = ["bottleneck_forward", "basic_block_forward", "runs_triton"]

_OP_BACKENDS = ("reference", "triton")


def runs_triton(x: Tensor, backend: str) -> bool:
    """Whether the Triton kernels (compiled or interpreted) run for ``x`` under ``backend``."""
    if backend != "triton":
        return False
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _norm_inputs(weights, biases, means, vars_, training, eps) -> list[triton_blocks.NormInputs]:
    return [triton_blocks.NormInputs(w, b, m, v, t, e)
            for w, b, m, v, t, e in zip(weights, biases, means, vars_, training, eps)]


def _bn_params(weights, biases, means, vars_, training, eps) -> list[reference.BNParams]:
    """Reference BN parameters that never update running statistics (the op is functional)."""
    return [reference.BNParams(w, b, None if t else m, None if t else v, None, e, None)
            for w, b, m, v, t, e in zip(weights, biases, means, vars_, training, eps)]


def _modes(training: Sequence[bool]) -> tuple[str, ...]:
    # eval and frozen compute the same forward; "frozen" keeps the graph for the backward.
    return tuple("train" if t else "frozen" for t in training)


def _flatten_stats(stats) -> list[Tensor]:
    return [t.float().clone() for pair in stats for t in pair]


def _check_backend(backend: str) -> None:
    if backend not in _OP_BACKENDS:
        raise ValueError(f"fused block ops run backends {_OP_BACKENDS}, got {backend!r}")


# ---------------------------------------------------------------------------------------
# Bottleneck
# ---------------------------------------------------------------------------------------


def _bottleneck_reference(x, w1, w2, w3, w_proj, bn_params, modes, stride, groups, shortcut, stride_on):
    stats: list = []
    out = reference.preact_bottleneck(
        x, bn_params[0], w1, bn_params[1], w2, bn_params[2], w3, w_proj,
        stride=stride, groups=groups, shortcut=shortcut, stride_on=stride_on, modes=modes, stats=stats)
    return out, stats


@torch.library.custom_op("resnet_fused::bottleneck_forward", mutates_args=())
def bottleneck_forward(
    x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, w_proj: Optional[Tensor],
    bn_weights: List[Tensor], bn_biases: List[Tensor],
    running_means: List[Tensor], running_vars: List[Tensor],
    training: List[bool], eps: List[float],
    stride: int, groups: int, shortcut: str, stride_on: str, fold_eval: bool, backend: str,
) -> List[Tensor]:
    """[out, mean1, var1, mean2, var2, mean3, var3] of a pre-activation bottleneck."""
    _check_backend(backend)
    if runs_triton(x, backend):
        norms = _norm_inputs(bn_weights, bn_biases, running_means, running_vars, training, eps)
        out, affines = triton_blocks.bottleneck_forward(
            x, w1, w2, w3, w_proj, norms, stride=stride, groups=groups, shortcut=shortcut,
            stride_on=stride_on, fold_eval=fold_eval)
        return [out] + _flatten_stats((a.mean, a.var) for a in affines)
    bn = _bn_params(bn_weights, bn_biases, running_means, running_vars, training, eps)
    out, stats = _bottleneck_reference(x, w1, w2, w3, w_proj, bn, _modes(training), stride, groups,
                                       shortcut, stride_on)
    return [out.contiguous(memory_format=torch.channels_last)] + _flatten_stats(stats)


def _conv_out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1  # 1x1 with no padding and 3x3 with padding 1 agree


@bottleneck_forward.register_fake
def _(x, w1, w2, w3, w_proj, bn_weights, bn_biases, running_means, running_vars, training, eps,
      stride, groups, shortcut, stride_on, fold_eval, backend):
    n, _, h, w = x.shape
    out = torch.empty((n, w3.shape[0], _conv_out_size(h, stride), _conv_out_size(w, stride)),
                      dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    widths = (x.shape[1], w1.shape[0], w2.shape[0])
    return [out] + [x.new_empty((c,), dtype=torch.float32) for c in widths for _ in range(2)]


def _bottleneck_setup_context(ctx, inputs, output):
    (x, w1, w2, w3, w_proj, bn_weights, bn_biases, running_means, running_vars, training, eps,
     stride, groups, shortcut, stride_on, fold_eval, backend) = inputs
    ctx.config = dict(stride=stride, groups=groups, shortcut=shortcut, stride_on=stride_on)
    ctx.training, ctx.eps = list(training), list(eps)
    ctx.has_proj = w_proj is not None
    # Running statistics are saved only for non-training norms: those of a training norm are
    # updated in place after the op, and its backward uses batch statistics anyway.
    frozen_stats = {f"running_{k}{i}": t for i, (tr, m, v) in enumerate(zip(training, running_means, running_vars))
                    for k, t in (("mean", m), ("var", v)) if not tr}
    save_named(ctx, x=x, w1=w1, w2=w2, w3=w3, w_proj=w_proj,
               **{f"bn_weight{i}": t for i, t in enumerate(bn_weights)},
               **{f"bn_bias{i}": t for i, t in enumerate(bn_biases)}, **frozen_stats)
    ctx.mark_non_differentiable(*output[1:])


def _recompute_grads(ctx, saved, n_norms: int, run_block, weight_names: Sequence[str], grad_out: Tensor):
    """Gradients by re-running the reference block on the saved input (no activation saved)."""
    names = ["x", *weight_names] + [f"bn_weight{i}" for i in range(n_norms)] + [f"bn_bias{i}" for i in range(n_norms)]
    leaves = {k: saved[k].detach().requires_grad_() for k in names if saved.get(k) is not None}
    bn = [reference.BNParams(leaves[f"bn_weight{i}"], leaves[f"bn_bias{i}"],
                             saved.get(f"running_mean{i}"), saved.get(f"running_var{i}"), None,
                             ctx.eps[i], None) for i in range(n_norms)]
    with torch.enable_grad():
        out = run_block(leaves, bn, _modes(ctx.training))
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out, allow_unused=True)
    by_name = dict(zip(leaves, grads))
    return by_name


def _bottleneck_backward(ctx, grads):
    saved = load_saved(ctx)
    cfg = ctx.config

    def run(t, bn, modes):
        return reference.preact_bottleneck(
            t["x"], bn[0], t["w1"], bn[1], t["w2"], bn[2], t["w3"], t.get("w_proj"), modes=modes, **cfg)

    g = _recompute_grads(ctx, saved, 3, run, ("w1", "w2", "w3", "w_proj"), grads[0])
    return (g["x"], g["w1"], g["w2"], g["w3"], g.get("w_proj"),
            [g[f"bn_weight{i}"] for i in range(3)], [g[f"bn_bias{i}"] for i in range(3)],
            [None] * 3, [None] * 3, None, None, None, None, None, None, None, None)


bottleneck_forward.register_autograd(_bottleneck_backward, setup_context=_bottleneck_setup_context)


# ---------------------------------------------------------------------------------------
# Basic block
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("resnet_fused::basic_block_forward", mutates_args=())
def basic_block_forward(
    x: Tensor, w1: Tensor, w2: Tensor, w_proj: Optional[Tensor],
    bn_weights: List[Tensor], bn_biases: List[Tensor],
    running_means: List[Tensor], running_vars: List[Tensor],
    training: List[bool], eps: List[float],
    stride: int, groups: int, shortcut: str, fold_eval: bool, backend: str,
) -> List[Tensor]:
    """[out, mean1, var1, mean2, var2] of a pre-activation basic block."""
    _check_backend(backend)
    if runs_triton(x, backend):
        norms = _norm_inputs(bn_weights, bn_biases, running_means, running_vars, training, eps)
        out, affines = triton_blocks.basic_block_forward(
            x, w1, w2, w_proj, norms, stride=stride, groups=groups, shortcut=shortcut, fold_eval=fold_eval)
        return [out] + _flatten_stats((a.mean, a.var) for a in affines)
    bn = _bn_params(bn_weights, bn_biases, running_means, running_vars, training, eps)
    stats: list = []
    out = reference.preact_basic_block(x, bn[0], w1, bn[1], w2, w_proj, stride=stride, groups=groups,
                                       shortcut=shortcut, modes=_modes(training), stats=stats)
    return [out.contiguous(memory_format=torch.channels_last)] + _flatten_stats(stats)


@basic_block_forward.register_fake
def _(x, w1, w2, w_proj, bn_weights, bn_biases, running_means, running_vars, training, eps,
      stride, groups, shortcut, fold_eval, backend):
    n, _, h, w = x.shape
    out = torch.empty((n, w2.shape[0], _conv_out_size(h, stride), _conv_out_size(w, stride)),
                      dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    widths = (x.shape[1], w1.shape[0])
    return [out] + [x.new_empty((c,), dtype=torch.float32) for c in widths for _ in range(2)]


def _basic_setup_context(ctx, inputs, output):
    (x, w1, w2, w_proj, bn_weights, bn_biases, running_means, running_vars, training, eps,
     stride, groups, shortcut, fold_eval, backend) = inputs
    ctx.config = dict(stride=stride, groups=groups, shortcut=shortcut)
    ctx.training, ctx.eps = list(training), list(eps)
    frozen_stats = {f"running_{k}{i}": t for i, (tr, m, v) in enumerate(zip(training, running_means, running_vars))
                    for k, t in (("mean", m), ("var", v)) if not tr}
    save_named(ctx, x=x, w1=w1, w2=w2, w_proj=w_proj,
               **{f"bn_weight{i}": t for i, t in enumerate(bn_weights)},
               **{f"bn_bias{i}": t for i, t in enumerate(bn_biases)}, **frozen_stats)
    ctx.mark_non_differentiable(*output[1:])


def _basic_backward(ctx, grads):
    saved = load_saved(ctx)
    cfg = ctx.config

    def run(t, bn, modes):
        return reference.preact_basic_block(t["x"], bn[0], t["w1"], bn[1], t["w2"], t.get("w_proj"),
                                            modes=modes, **cfg)

    g = _recompute_grads(ctx, saved, 2, run, ("w1", "w2", "w_proj"), grads[0])
    return (g["x"], g["w1"], g["w2"], g.get("w_proj"),
            [g[f"bn_weight{i}"] for i in range(2)], [g[f"bn_bias{i}"] for i in range(2)],
            [None] * 2, [None] * 2, None, None, None, None, None, None, None)


basic_block_forward.register_autograd(_basic_backward, setup_context=_basic_setup_context)
