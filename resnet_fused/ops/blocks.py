"""Fused block ops: ``resnet_fused::bottleneck_forward`` and ``resnet_fused::basic_block_forward``.

One op per block type, one autograd registration per op, dispatching by backend inside:

* ``triton``: the fused kernels (``resnet_fused/triton``) for a CUDA tensor, or for a CPU tensor
  when TRITON_INTERPRET=1 (the interpreter); the reference for a CPU tensor otherwise.
* ``cuda``: the CUDA C++ kernels of ``resnet_fused._C`` (``resnet_fused/cuda``); for a CPU tensor
  their host implementation, which runs the same tile code (slow; it is how CPU-only CI checks
  them).
* ``reference``: eager PyTorch (the same computation; used by opcheck and as the fallback).

Both fused backends run one orchestration (``resnet_fused/fused``) over their kernel sets.

Outputs, in order: the block output (channels_last), the conv outputs the backward needs
(y1, y2 for the bottleneck, y1 for the basic block; empty when eval-mode BN is folded, which
needs no backward), and the (mean, biased var) each norm used. The ops are functional: they
never write the running statistics; the module updates those from the returned statistics
(a mutating op cannot carry an autograd formula).

Saved for backward, by name: the block input, y1 (, y2), parameters and per-channel statistics;
never an activation (those are recomputed), so a block saves half the activation bytes eager
does. The fused backward is ``fused/backward.py``; the CPU fallback re-runs the reference.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from .. import reference
from ..fused import backward as fused_backward
from ..fused import forward as fused_forward
from ..fused.kernel_set import KernelSet
from ._saved import load_saved, save_named

__all__ = ["bottleneck_forward", "basic_block_forward", "runs_fused", "runs_triton"]

_OP_BACKENDS = ("reference", "triton", "cuda")


def runs_triton(x: Tensor, backend: str) -> bool:
    """Whether the Triton kernels (compiled or interpreted) run for ``x`` under ``backend``."""
    if backend != "triton":
        return False
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def runs_fused(x: Tensor, backend: str) -> bool:
    """Whether a fused backend's kernels run for ``x``: Triton as ``runs_triton`` says; the CUDA
    extension always (its host implementation for a CPU tensor)."""
    return backend == "cuda" or runs_triton(x, backend)


def _kernel_set(backend: str) -> KernelSet:
    if backend == "cuda":
        from ..cuda.kernel_set import CUDA

        return CUDA
    from ..triton.kernel_set import TRITON

    return TRITON


def _check_backend(backend: str) -> None:
    if backend not in _OP_BACKENDS:
        raise ValueError(f"fused block ops run backends {_OP_BACKENDS}, got {backend!r}")


def _folds(fold_eval: bool, training: Sequence[bool]) -> bool:
    """Eval-mode folding (same rule as fused/forward.py): no conv output is materialised."""
    return fold_eval and not any(training)


def _norm_inputs(weights, biases, means, vars_, training, eps) -> list[fused_forward.NormInputs]:
    return [fused_forward.NormInputs(w, b, m, v, t, e)
            for w, b, m, v, t, e in zip(weights, biases, means, vars_, training, eps)]


def _modes(training: Sequence[bool]) -> tuple[str, ...]:
    # eval and frozen compute the same forward; "frozen" keeps the graph for the backward.
    return tuple("train" if t else "frozen" for t in training)


def _reference_bn(weights, biases, means, vars_, training, eps) -> list[reference.BNParams]:
    """Reference BN parameters that never update running statistics (the op is functional)."""
    return [reference.BNParams(w, b, None if t else m, None if t else v, None, e, None)
            for w, b, m, v, t, e in zip(weights, biases, means, vars_, training, eps)]


def _outputs(out: Tensor, convs: Sequence[Tensor], n_convs: int, stats) -> list[Tensor]:
    cl = torch.channels_last
    saved = [y.contiguous(memory_format=cl) for y in convs] if convs else \
        [out.new_empty((0,)) for _ in range(n_convs)]
    return [out.contiguous(memory_format=cl)] + saved + [t.clone() for pair in stats for t in pair]


def _fake_outputs(x: Tensor, c_out: int, stride: int, conv_shapes, widths, fold: bool) -> list[Tensor]:
    n, _, h, w = x.shape
    cl = torch.channels_last

    def empty(c: int, hh: int, ww: int) -> Tensor:
        return torch.empty((n, c, hh, ww), dtype=x.dtype, device=x.device, memory_format=cl)

    out = empty(c_out, (h - 1) // stride + 1, (w - 1) // stride + 1)
    convs = [x.new_empty((0,)) if fold else empty(*shape) for shape in conv_shapes]
    ct = reference.stats_dtype(x.dtype)
    return [out] + convs + [x.new_empty((c,), dtype=ct) for c in widths for _ in range(2)]


# ---------------------------------------------------------------------------------------
# Autograd, shared by both ops
# ---------------------------------------------------------------------------------------


def _setup_context(ctx, x: Tensor, weights: dict, bn_weights, bn_biases, training, eps, output,
                   n_convs: int, config: dict, backend: str) -> None:
    ctx.config, ctx.backend = config, backend
    ctx.training, ctx.eps = list(training), list(eps)
    ctx.n_norms = len(training)
    convs = output[1:1 + n_convs]
    stats = output[1 + n_convs:]
    save_named(ctx, x=x, **weights,
               **{f"y{i + 1}": y for i, y in enumerate(convs)},
               **{f"bn_weight{i}": t for i, t in enumerate(bn_weights)},
               **{f"bn_bias{i}": t for i, t in enumerate(bn_biases)},
               **{f"mean{i}": stats[2 * i] for i in range(len(training))},
               **{f"var{i}": stats[2 * i + 1] for i in range(len(training))})
    ctx.mark_non_differentiable(*output[1:])


def _saved_lists(ctx, saved: dict) -> tuple[list, list, list, list]:
    """bn_weights, bn_biases, means, vars as the backward op takes them."""
    n = range(ctx.n_norms)
    return ([saved[f"bn_weight{i}"] for i in n], [saved[f"bn_bias{i}"] for i in n],
            [saved[f"mean{i}"] for i in n], [saved[f"var{i}"] for i in n])


def _backward_norms(weights, biases, means, vars_, training, eps) -> list[fused_backward.SavedNorm]:
    return [fused_backward.SavedNorm(w, b, m, v, e, t)
            for w, b, m, v, t, e in zip(weights, biases, means, vars_, training, eps)]


def _grad_list(g: dict, tensor_names: Sequence[str], n_norms: int, like: Tensor) -> list[Tensor]:
    """The backward op's outputs in order; a missing gradient (no projection) is an empty tensor.

    The input gradient is channels_last; weight gradients are contiguous like the weights
    (ATen's conv backward returns them in its inputs' memory format), as the fake says.
    """
    out = [g["x"].contiguous(memory_format=torch.channels_last)]
    out += [g[k].contiguous() if g.get(k) is not None else like.new_empty((0,)) for k in tensor_names[1:]]
    return out + [g[f"bn_weight{i}"] for i in range(n_norms)] + [g[f"bn_bias{i}"] for i in range(n_norms)]


def _grad_dict(out: Sequence[Tensor], tensor_names: Sequence[str], n_norms: int) -> dict:
    g = dict(zip(tensor_names, out))
    g.update({f"bn_weight{i}": out[len(tensor_names) + i] for i in range(n_norms)})
    g.update({f"bn_bias{i}": out[len(tensor_names) + n_norms + i] for i in range(n_norms)})
    if g["w_proj"].numel() == 0:
        g["w_proj"] = None
    return g


def _fake_grads(tensors, bn_weights, bn_biases) -> list[Tensor]:
    """Gradients shaped like the inputs: activations channels_last, parameters as they are."""
    x, *weights = tensors
    out = [torch.empty_like(x, memory_format=torch.channels_last)]
    out += [torch.empty_like(w) if w is not None else x.new_empty((0,)) for w in weights]
    ct = reference.stats_dtype(x.dtype)
    return out + [torch.empty(t.shape, dtype=ct, device=t.device) for t in (*bn_weights, *bn_biases)]


def _reference_grads(ctx, saved: dict, run_block: Callable, weight_names: Sequence[str],
                     grad_out: Tensor) -> dict:
    """The CPU fallback: gradients by re-running the reference block on the saved input."""
    n = ctx.n_norms
    names = ["x", *weight_names] + [f"bn_weight{i}" for i in range(n)] + [f"bn_bias{i}" for i in range(n)]
    leaves = {k: saved[k].detach().requires_grad_() for k in names if k in saved}
    # Non-training norms use the statistics the forward returned (their running statistics).
    bn = [reference.BNParams(leaves[f"bn_weight{i}"], leaves[f"bn_bias{i}"],
                             None if ctx.training[i] else saved[f"mean{i}"],
                             None if ctx.training[i] else saved[f"var{i}"], None, ctx.eps[i], None)
          for i in range(n)]
    with torch.enable_grad():
        out = run_block(leaves, bn, _modes(ctx.training))
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype), allow_unused=True)
    return dict(zip(leaves, grads))


def _check_no_double_backward() -> None:
    # The backward's kernels are not differentiable: with create_graph=True a second derivative
    # would silently treat them as constants. Say so instead.
    if torch.is_grad_enabled():
        raise RuntimeError(
            "resnet_fused fused blocks do not support double backward (create_graph=True); "
            "use backend='reference' for higher-order gradients")


def _as_param_dtype(grads: dict, saved: dict) -> dict:
    return {k: (g.to(saved[k].dtype) if g is not None and k in saved else g) for k, g in grads.items()}


# ---------------------------------------------------------------------------------------
# Bottleneck
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("resnet_fused::bottleneck_forward", mutates_args=())
def bottleneck_forward(
    x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, w_proj: Optional[Tensor],
    bn_weights: List[Tensor], bn_biases: List[Tensor],
    running_means: List[Tensor], running_vars: List[Tensor],
    training: List[bool], eps: List[float],
    stride: int, groups: int, shortcut: str, stride_on: str, fold_eval: bool, backend: str,
) -> List[Tensor]:
    """[out, y1, y2, mean1, var1, mean2, var2, mean3, var3] of a pre-activation bottleneck."""
    _check_backend(backend)
    if runs_fused(x, backend):
        norms = _norm_inputs(bn_weights, bn_biases, running_means, running_vars, training, eps)
        out, convs, affines = fused_forward.bottleneck_forward(
            _kernel_set(backend), x, w1, w2, w3, w_proj, norms, stride=stride, groups=groups, shortcut=shortcut,
            stride_on=stride_on, fold_eval=fold_eval)
        return _outputs(out, convs, 2, [(a.mean, a.var) for a in affines])
    bn = _reference_bn(bn_weights, bn_biases, running_means, running_vars, training, eps)
    record: dict = {}
    out = reference.preact_bottleneck(x, bn[0], w1, bn[1], w2, bn[2], w3, w_proj, stride=stride,
                                      groups=groups, shortcut=shortcut, stride_on=stride_on,
                                      modes=_modes(training), record=record)
    convs = [] if _folds(fold_eval, training) else record["convs"]
    return _outputs(out, convs, 2, record["stats"])


@bottleneck_forward.register_fake
def _(x, w1, w2, w3, w_proj, bn_weights, bn_biases, running_means, running_vars, training, eps,
      stride, groups, shortcut, stride_on, fold_eval, backend):
    n, _, h, w = x.shape
    s1 = stride if stride_on == "1x1" else 1
    h1, w1_ = (h - 1) // s1 + 1, (w - 1) // s1 + 1
    h2, w2_ = (h - 1) // stride + 1, (w - 1) // stride + 1
    mid = w1.shape[0]
    return _fake_outputs(x, w3.shape[0], stride, [(mid, h1, w1_), (mid, h2, w2_)],
                         (x.shape[1], mid, w2.shape[0]), _folds(fold_eval, training))


def _bottleneck_setup_context(ctx, inputs, output):
    (x, w1, w2, w3, w_proj, bn_weights, bn_biases, running_means, running_vars, training, eps,
     stride, groups, shortcut, stride_on, fold_eval, backend) = inputs
    _setup_context(ctx, x, dict(w1=w1, w2=w2, w3=w3, w_proj=w_proj), bn_weights, bn_biases, training,
                   eps, output, 2, dict(stride=stride, groups=groups, shortcut=shortcut, stride_on=stride_on),
                   backend)


@torch.library.custom_op("resnet_fused::bottleneck_backward", mutates_args=())
def bottleneck_backward(
    grad_out: Tensor, x: Tensor, y1: Tensor, y2: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
    w_proj: Optional[Tensor], bn_weights: List[Tensor], bn_biases: List[Tensor],
    means: List[Tensor], vars: List[Tensor], training: List[bool], eps: List[float],
    stride: int, groups: int, shortcut: str, stride_on: str, backend: str,
) -> List[Tensor]:
    """[dx, dw1, dw2, dw3, dw_proj (empty without projection), dgamma x3, dbeta x3]."""
    g = fused_backward.bottleneck_backward(
        _kernel_set(backend), grad_out, x, y1, y2, w1, w2, w3, w_proj, _backward_norms(bn_weights, bn_biases, means, vars, training, eps),
        stride=stride, groups=groups, shortcut=shortcut, stride_on=stride_on)
    return _grad_list(g, ("x", "w1", "w2", "w3", "w_proj"), 3, x)


@bottleneck_backward.register_fake
def _(grad_out, x, y1, y2, w1, w2, w3, w_proj, bn_weights, bn_biases, means, vars, training, eps,
      stride, groups, shortcut, stride_on, backend):
    return _fake_grads((x, w1, w2, w3, w_proj), bn_weights, bn_biases)


def _bottleneck_backward(ctx, grads):
    _check_no_double_backward()
    saved = load_saved(ctx)
    if runs_fused(saved["x"], ctx.backend):
        out = torch.ops.resnet_fused.bottleneck_backward(
            grads[0], saved["x"], saved["y1"], saved["y2"], saved["w1"], saved["w2"], saved["w3"],
            saved.get("w_proj"), *_saved_lists(ctx, saved), ctx.training, ctx.eps, **ctx.config,
            backend=ctx.backend)
        g = _grad_dict(out, ("x", "w1", "w2", "w3", "w_proj"), 3)
    else:
        def run(t, bn, modes):
            return reference.preact_bottleneck(t["x"], bn[0], t["w1"], bn[1], t["w2"], bn[2], t["w3"],
                                               t.get("w_proj"), modes=modes, **ctx.config)

        g = _reference_grads(ctx, saved, run, ("w1", "w2", "w3", "w_proj"), grads[0])
    g = _as_param_dtype(g, saved)
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
    """[out, y1, mean1, var1, mean2, var2] of a pre-activation basic block."""
    _check_backend(backend)
    if runs_fused(x, backend):
        norms = _norm_inputs(bn_weights, bn_biases, running_means, running_vars, training, eps)
        out, convs, affines = fused_forward.basic_block_forward(
            _kernel_set(backend), x, w1, w2, w_proj, norms, stride=stride, groups=groups, shortcut=shortcut, fold_eval=fold_eval)
        return _outputs(out, convs, 1, [(a.mean, a.var) for a in affines])
    bn = _reference_bn(bn_weights, bn_biases, running_means, running_vars, training, eps)
    record: dict = {}
    out = reference.preact_basic_block(x, bn[0], w1, bn[1], w2, w_proj, stride=stride, groups=groups,
                                       shortcut=shortcut, modes=_modes(training), record=record)
    convs = [] if _folds(fold_eval, training) else record["convs"]
    return _outputs(out, convs, 1, record["stats"])


@basic_block_forward.register_fake
def _(x, w1, w2, w_proj, bn_weights, bn_biases, running_means, running_vars, training, eps,
      stride, groups, shortcut, fold_eval, backend):
    n, _, h, w = x.shape
    h1, w1_ = (h - 1) // stride + 1, (w - 1) // stride + 1
    return _fake_outputs(x, w2.shape[0], stride, [(w1.shape[0], h1, w1_)], (x.shape[1], w1.shape[0]),
                         _folds(fold_eval, training))


def _basic_setup_context(ctx, inputs, output):
    (x, w1, w2, w_proj, bn_weights, bn_biases, running_means, running_vars, training, eps,
     stride, groups, shortcut, fold_eval, backend) = inputs
    _setup_context(ctx, x, dict(w1=w1, w2=w2, w_proj=w_proj), bn_weights, bn_biases, training, eps,
                   output, 1, dict(stride=stride, groups=groups, shortcut=shortcut), backend)


@torch.library.custom_op("resnet_fused::basic_block_backward", mutates_args=())
def basic_block_backward(
    grad_out: Tensor, x: Tensor, y1: Tensor, w1: Tensor, w2: Tensor, w_proj: Optional[Tensor],
    bn_weights: List[Tensor], bn_biases: List[Tensor], means: List[Tensor], vars: List[Tensor],
    training: List[bool], eps: List[float], stride: int, groups: int, shortcut: str, backend: str,
) -> List[Tensor]:
    """[dx, dw1, dw2, dw_proj (empty without projection), dgamma x2, dbeta x2]."""
    g = fused_backward.basic_block_backward(
        _kernel_set(backend), grad_out, x, y1, w1, w2, w_proj, _backward_norms(bn_weights, bn_biases, means, vars, training, eps),
        stride=stride, groups=groups, shortcut=shortcut)
    return _grad_list(g, ("x", "w1", "w2", "w_proj"), 2, x)


@basic_block_backward.register_fake
def _(grad_out, x, y1, w1, w2, w_proj, bn_weights, bn_biases, means, vars, training, eps,
      stride, groups, shortcut, backend):
    return _fake_grads((x, w1, w2, w_proj), bn_weights, bn_biases)


def _basic_backward(ctx, grads):
    _check_no_double_backward()
    saved = load_saved(ctx)
    if runs_fused(saved["x"], ctx.backend):
        out = torch.ops.resnet_fused.basic_block_backward(
            grads[0], saved["x"], saved["y1"], saved["w1"], saved["w2"], saved.get("w_proj"),
            *_saved_lists(ctx, saved), ctx.training, ctx.eps, **ctx.config, backend=ctx.backend)
        g = _grad_dict(out, ("x", "w1", "w2", "w_proj"), 2)
    else:
        def run(t, bn, modes):
            return reference.preact_basic_block(t["x"], bn[0], t["w1"], bn[1], t["w2"], t.get("w_proj"),
                                                modes=modes, **ctx.config)

        g = _reference_grads(ctx, saved, run, ("w1", "w2", "w_proj"), grads[0])
    g = _as_param_dtype(g, saved)
    return (g["x"], g["w1"], g["w2"], g.get("w_proj"),
            [g[f"bn_weight{i}"] for i in range(2)], [g[f"bn_bias{i}"] for i in range(2)],
            [None] * 2, [None] * 2, None, None, None, None, None, None, None)


basic_block_forward.register_autograd(_basic_backward, setup_context=_basic_setup_context)
