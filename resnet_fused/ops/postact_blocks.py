"""Fused post-activation block op: ``resnet_fused::postact_block_forward`` (+ its backward op).

One op for every post-activation unit (ResNet v1 / v1.5 bottleneck and basic block, ResNeXt):
a chain of convs ``weights`` (conv_i with ``strides[i]``, ``groups[i]``, padding k // 2), each
followed by a BatchNorm, ReLU after every norm but the last, and the closing
``out = relu(bn_last(y_last) + shortcut)``, shortcut = x or ``bn_d(conv1x1_s(x))`` when ``w_proj``
is given (s = the product of the strides). Norm lists hold one entry per conv, then the
projection's.

Dispatch by backend as ``ops/blocks.py``: ``triton`` (compiled, or interpreted on CPU tensors
under TRITON_INTERPRET=1), ``cuda`` (the C++ kernels; their host emulation on CPU tensors),
``reference`` (eager PyTorch, also the CPU fallback). The orchestration is
``fused/postact.py``.

Outputs, a fixed tuple of seven: (out (channels_last), y0, y1 (the conv outputs the backward
needs; y1 empty for a two-conv unit, both empty when eval-mode BN is folded), then per norm
[5, C] = (mean, biased var, invstd, scale, shift) for up to four norms (empty for a norm the unit
does not have, and for every norm when folded)). A fixed tuple, not a list: the op mutates its
running statistics, and ``torch.compile`` functionalizes a mutating op only with fixed outputs.

Running statistics: as the pre-activation ops (``ops/blocks.py``), with ``update_stats`` each
training norm's running mean and variance move and its batch is counted inside that norm's
finalize launch; ``running_means`` carries the running means followed by the
``num_batches_tracked`` counters, ``momentum`` entries < 0 mean None (the cumulative average).
The op therefore declares ``running_means`` / ``running_vars`` mutated and registers its
autograd formula with ``ops.blocks._register_autograd``.

Saved for backward by name: x, y0 .. y_{last-1}, the weights, BN parameters and the per-channel
statistics. Never an activation, never y_last, the projection output or the block output: the
backward recomputes y_last and yd with one forward conv each.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import reference
from ..fused import postact as fused_postact
from ..kernel_set import NormInputs, SavedNorm
from ..macs import conv_macs, register_conv_macs
from ._saved import load_saved, save_named
from .blocks import (_bump_versions, _check_backend, _check_no_double_backward, _counters, _kernel_set, _like_weight,
                     _momentum, _register_autograd, _trim, direct_call_allowed, runs_fused)

__all__ = ["postact_block_forward", "postact_block_backward", "postact_call"]


def _out_hw(h: int, w: int, stride: int) -> tuple[int, int]:
    return (h - 1) // stride + 1, (w - 1) // stride + 1


#: The op's fixed outputs: out, two conv outputs, four norms' statistics.
_N_CONVS_MAX, _N_NORMS_MAX = 3, 4
_MUTATES = ("running_means", "running_vars")


def _folds(fold_eval: bool, training: Sequence[bool]) -> bool:
    return fold_eval and not any(training)


def _check_chain(weights: Sequence[Tensor], w_proj: Optional[Tensor], bn_weights: Sequence[Tensor]) -> None:
    if len(weights) not in (2, 3):
        raise ValueError(f"postact_block_forward: a unit has 2 (basic) or 3 (bottleneck) convs, got {len(weights)}")
    want = len(weights) + (w_proj is not None)
    if len(bn_weights) != want:
        raise ValueError(f"postact_block_forward: {want} norms expected (one per conv, then the projection's), "
                         f"got {len(bn_weights)}")


def _outputs(out: Tensor, convs: Sequence[Tensor], stats: Sequence[Optional[Tensor]]) -> tuple[Tensor, ...]:
    """The fixed tuple: fresh tensors, none aliasing another or an input (distinct empties)."""
    cl = torch.channels_last
    ct = reference.stats_dtype(out.dtype)
    ys = [y.contiguous(memory_format=cl) for y in convs]
    ys += [out.new_empty((0,)) for _ in range(_N_CONVS_MAX - 1 - len(ys))]
    rows = [t if t is not None else out.new_empty((0,), dtype=ct) for t in stats]
    rows += [out.new_empty((0,), dtype=ct) for _ in range(_N_NORMS_MAX - len(rows))]
    return tuple([out.contiguous(memory_format=cl)] + ys + rows)


def _norm_inputs(bn_weights, bn_biases, running_means, running_vars, training, eps, momentum,
                 update) -> list[NormInputs]:
    n = len(training)
    counters = _counters(running_means, n, update)
    return [NormInputs(bn_weights[i], bn_biases[i], running_means[i], running_vars[i], training[i], eps[i],
                       counters[i], _momentum(momentum, i), update and training[i] and running_means[i].numel() > 0)
            for i in range(n)]


def _reference_update(norms: Sequence[NormInputs], stats: Sequence[tuple[Tensor, Tensor]],
                      counts: Sequence[int]) -> None:
    """The reference backend's running update (eager BatchNorm's formulas)."""
    for nm, (mean, var), count in zip(norms, stats, counts):
        if nm.update:
            reference.update_running_stats(nm.running_mean, nm.running_var, nm.num_batches_tracked, mean, var,
                                           count, nm.momentum)


def _counts(x: Tensor, strides: Sequence[int], with_proj: bool) -> list[int]:
    n, _, h, w = x.shape
    counts = []
    for s in strides:
        h, w = _out_hw(h, w, s)
        counts.append(n * h * w)
    return counts + ([counts[-1]] if with_proj else [])


def _postact_forward_impl(
    x: Tensor, weights: List[Tensor], w_proj: Optional[Tensor],
    bn_weights: List[Tensor], bn_biases: List[Tensor], running_means: List[Tensor], running_vars: List[Tensor],
    training: List[bool], eps: List[float], strides: List[int], groups: List[int], fold_eval: bool, backend: str,
    momentum: Optional[List[float]] = None, update_stats: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, y0, y1, stats0 .. stats3) of a post-activation unit: per norm (one per conv, then the
    projection's) ``stats`` [5, C] = (mean, biased var, invstd, scale, shift) as its finalize wrote
    them (batch statistics for a training norm, running ones otherwise)."""
    _check_backend(backend)
    _check_chain(weights, w_proj, bn_weights)
    norms = _norm_inputs(bn_weights, bn_biases, running_means, running_vars, training, eps, momentum, update_stats)
    if runs_fused(x, backend):
        out, convs, affines = fused_postact.postact_forward(
            _kernel_set(backend), x, weights, w_proj, norms, strides=strides, groups=groups, fold_eval=fold_eval)
        fold = _folds(fold_eval, training)
        return _outputs(out, convs, [None if fold else a.stats for a in affines])
    record: dict = {}
    out = reference.postact_block(x, weights, w_proj, bn_weights, bn_biases, running_means[:len(bn_weights)],
                                  running_vars, training, eps, strides, groups, record)
    _reference_update(norms, record["stats"], _counts(x, strides, w_proj is not None))
    if _folds(fold_eval, training):
        return _outputs(out, [], [])
    stats = [SavedNorm.from_mean_var(w, b, m, v, e, t).stats
             for w, b, (m, v), e, t in zip(bn_weights, bn_biases, record["stats"], eps, training)]
    return _outputs(out, record["convs"], stats)


postact_block_forward = torch.library.custom_op("resnet_fused::postact_block_forward",
                                                mutates_args=_MUTATES)(_postact_forward_impl)


@postact_block_forward.register_fake
def _(x, weights, w_proj, bn_weights, bn_biases, running_means, running_vars, training, eps, strides, groups,
      fold_eval, backend, momentum=None, update_stats=False):
    _check_chain(weights, w_proj, bn_weights)
    n, _, h, w = x.shape
    cl = torch.channels_last
    shapes = []
    for wt, s in zip(weights, strides):
        h, w = _out_hw(h, w, s)
        shapes.append((wt.shape[0], h, w))
    out = torch.empty((n, *shapes[-1]), dtype=x.dtype, device=x.device, memory_format=cl)
    fold = _folds(fold_eval, training)
    ct = reference.stats_dtype(x.dtype)
    convs = [] if fold else [torch.empty((n, *shape), dtype=x.dtype, device=x.device, memory_format=cl)
                             for shape in shapes[:-1]]
    stats = [] if fold else [x.new_empty((5, t.shape[0]), dtype=ct) for t in bn_weights]
    convs += [x.new_empty((0,)) for _ in range(_N_CONVS_MAX - 1 - len(convs))]
    stats += [x.new_empty((0,), dtype=ct) for _ in range(_N_NORMS_MAX - len(stats))]
    return tuple([out] + convs + stats)


def _setup_context(ctx, inputs, output):
    (x, weights, w_proj, bn_weights, bn_biases, running_means, running_vars, training, eps, strides, groups,
     fold_eval, backend, *_) = inputs
    n_convs, n_norms = len(weights), len(bn_weights)
    ctx.backend, ctx.training, ctx.eps = backend, list(training), list(eps)
    ctx.strides, ctx.groups, ctx.n_convs, ctx.n_norms = list(strides), list(groups), n_convs, n_norms
    ctx.running_lens = (len(running_means), len(running_vars))
    ys = output[1:n_convs]
    stats = output[_N_CONVS_MAX:_N_CONVS_MAX + n_norms]
    save_named(ctx, x=x, w_proj=w_proj,
               **{f"w{i}": w for i, w in enumerate(weights)},
               **{f"y{i}": y for i, y in enumerate(ys)},
               **{f"bn_weight{i}": t for i, t in enumerate(bn_weights)},
               **{f"bn_bias{i}": t for i, t in enumerate(bn_biases)},
               # flat [5 * C]: per-channel vectors, not activations
               **{f"stats{i}": stats[i].view(-1) for i in range(n_norms)})
    ctx.mark_non_differentiable(*output[1:])
    # Only the block output carries a gradient: no zero tensors for the others.
    ctx.set_materialize_grads(False)


def _postact_backward_impl(
    grad_out: Tensor, x: Tensor, ys: List[Tensor], weights: List[Tensor], w_proj: Optional[Tensor],
    bn_weights: List[Tensor], bn_biases: List[Tensor], stats: List[Tensor],
    training: List[bool], eps: List[float], strides: List[int], groups: List[int], backend: str,
) -> List[Tensor]:
    """[dx, dW0 .. dW_last, dw_proj (empty without projection), dgamma per norm, dbeta per norm]."""
    norms = [SavedNorm(w, b, st, e, t) for w, b, st, t, e in zip(bn_weights, bn_biases, stats, training, eps)]
    g = fused_postact.postact_backward(_kernel_set(backend), grad_out, x, ys, weights, w_proj, norms,
                                       strides=strides, groups=groups)
    out = [g["x"].contiguous(memory_format=torch.channels_last)]
    out += [_like_weight(d, w) for d, w in zip(g["weights"], weights)]
    out.append(_like_weight(g["w_proj"], w_proj) if g["w_proj"] is not None else x.new_empty((0,)))
    return out + list(g["bn_weight"]) + list(g["bn_bias"])


postact_block_backward = torch.library.custom_op("resnet_fused::postact_block_backward",
                                                 mutates_args=())(_postact_backward_impl)


@postact_block_backward.register_fake
def _(grad_out, x, ys, weights, w_proj, bn_weights, bn_biases, stats, training, eps, strides, groups,
      backend):
    out = [torch.empty_like(x, memory_format=torch.channels_last)]
    out += [torch.empty_like(w) for w in weights]
    out.append(torch.empty_like(w_proj) if w_proj is not None else x.new_empty((0,)))
    ct = reference.stats_dtype(x.dtype)
    return out + [torch.empty(t.shape, dtype=ct, device=t.device) for t in (*bn_weights, *bn_biases)]


def _reference_grads(ctx, saved: dict, grad_out: Tensor) -> tuple:
    """The CPU fallback: gradients by re-running the reference block on the saved input."""
    n_convs, n_norms = ctx.n_convs, ctx.n_norms
    leaf = {k: v.detach().requires_grad_() for k, v in saved.items()
            if k == "x" or k == "w_proj" or k.startswith(("w", "bn_"))}
    with torch.enable_grad():
        out = reference.postact_block(
            leaf["x"], [leaf[f"w{i}"] for i in range(n_convs)], leaf.get("w_proj"),
            [leaf[f"bn_weight{i}"] for i in range(n_norms)], [leaf[f"bn_bias{i}"] for i in range(n_norms)],
            [saved[f"stats{i}"].view(5, -1)[0] for i in range(n_norms)],
            [saved[f"stats{i}"].view(5, -1)[1] for i in range(n_norms)],
            ctx.training, ctx.eps, ctx.strides, ctx.groups)
        grads = torch.autograd.grad(out, list(leaf.values()), grad_out.to(out.dtype), allow_unused=True)
    return dict(zip(leaf, grads))


def _postact_grads(ctx, grad: Optional[Tensor], direct: bool) -> dict:
    """The unit's gradients by name (x, w{i}, w_proj, bn_weight{i}, bn_bias{i}); ``direct`` calls
    the backward's implementation rather than its op (the eager autograd.Function's path)."""
    saved = load_saved(ctx)
    n_convs, n_norms = ctx.n_convs, ctx.n_norms
    if grad is None:  # the block output took no part in the loss
        g = {}
    elif runs_fused(saved["x"], ctx.backend):
        backward = _postact_backward_impl if direct else torch.ops.resnet_fused.postact_block_backward
        out = backward(
            grad, saved["x"], [saved[f"y{i}"] for i in range(n_convs - 1)],
            [saved[f"w{i}"] for i in range(n_convs)], saved.get("w_proj"),
            [saved[f"bn_weight{i}"] for i in range(n_norms)], [saved[f"bn_bias{i}"] for i in range(n_norms)],
            [saved[f"stats{i}"] for i in range(n_norms)],
            ctx.training, ctx.eps, ctx.strides, ctx.groups, ctx.backend)
        g = {"x": out[0], **{f"w{i}": out[1 + i] for i in range(n_convs)},
             "w_proj": out[1 + n_convs] if "w_proj" in saved else None}
        g.update({f"bn_weight{i}": out[2 + n_convs + i] for i in range(n_norms)})
        g.update({f"bn_bias{i}": out[2 + n_convs + n_norms + i] for i in range(n_norms)})
    else:
        g = _reference_grads(ctx, saved, grad)
    return {k: (v.to(saved[k].dtype) if v is not None and k in saved else v) for k, v in g.items()}


def _backward(ctx, *grads):
    _check_no_double_backward()
    g = _postact_grads(ctx, grads[0], direct=False)
    n_convs, n_norms = ctx.n_convs, ctx.n_norms
    return _trim(ctx, (g.get("x"), [g.get(f"w{i}") for i in range(n_convs)], g.get("w_proj"),
                       [g.get(f"bn_weight{i}") for i in range(n_norms)], [g.get(f"bn_bias{i}") for i in range(n_norms)],
                       [None] * ctx.running_lens[0], [None] * ctx.running_lens[1],
                       None, None, None, None, None, None, None, None))


_register_autograd(postact_block_forward, _backward, _setup_context)


class _PostActFunction(torch.autograd.Function):
    """The post-activation op's forward and backward without the dispatcher's autograd wrapper:
    the same implementation, saved tensors, non-differentiable outputs and gradients as the op's
    registered autograd (``_setup_context`` / ``_postact_grads``), as ops/blocks.py's
    ``_BottleneckFunction`` is for the pre-activation bottleneck."""

    @staticmethod
    def forward(ctx, kw: dict, n_convs: int, x, w_proj, *tensors):
        n_norms = (len(tensors) - n_convs) // 2
        weights = list(tensors[:n_convs])
        bn_weights, bn_biases = list(tensors[n_convs:n_convs + n_norms]), list(tensors[n_convs + n_norms:])
        out = _postact_forward_impl(x, weights, w_proj, bn_weights, bn_biases, **kw)
        _bump_versions(kw)
        _setup_context(ctx, (x, weights, w_proj, bn_weights, bn_biases, kw["running_means"], kw["running_vars"],
                             kw["training"], kw["eps"], kw["strides"], kw["groups"], kw["fold_eval"], kw["backend"]),
                       out)
        return out

    @staticmethod
    def backward(ctx, *grads):
        _check_no_double_backward()
        g = _postact_grads(ctx, grads[0], direct=True)
        return (None, None, g.get("x"), g.get("w_proj"), *(g.get(f"w{i}") for i in range(ctx.n_convs)),
                *(g.get(f"bn_weight{i}") for i in range(ctx.n_norms)),
                *(g.get(f"bn_bias{i}") for i in range(ctx.n_norms)))


def postact_call(x: Tensor, weights: List[Tensor], w_proj: Optional[Tensor], bn_weights: List[Tensor],
                 bn_biases: List[Tensor], kw: dict, needs_grad: bool) -> tuple[Tensor, ...]:
    """The post-activation op's outputs for a module call, through the cheapest dispatch that
    applies (as ops/blocks.py's ``bottleneck_call``): where ``direct_call_allowed``, an
    autograd.Function around the op's implementation (``needs_grad``) or the implementation
    itself; otherwise the op (``torch.ops.resnet_fused.postact_block_forward``)."""
    if not direct_call_allowed(x):
        return postact_block_forward(x, weights, w_proj, bn_weights, bn_biases, **kw)
    if needs_grad:
        return _PostActFunction.apply(kw, len(weights), x, w_proj, *weights, *bn_weights, *bn_biases)
    out = _postact_forward_impl(x, weights, w_proj, bn_weights, bn_biases, **kw)
    _bump_versions(kw)
    return out


def _postact_macs(x_shape, weights, w_proj, *args, out_shape=None, **kwargs) -> int:
    """MACs of one post-activation unit: its convs and the projection, as eager counts them
    (the closing pass and the BN/ReLU work are not MACs). ``strides`` is the 10th argument (args[6] after x, weights, w_proj)."""
    strides = args[6] if len(args) > 6 else kwargs["strides"]
    n, _, h, w = x_shape
    shape, total, stride_total = tuple(x_shape), 0, 1
    for w_shape, s in zip(weights, strides):
        h, w = _out_hw(h, w, s)
        out = (n, w_shape[0], h, w)
        total += conv_macs(shape, w_shape, out)
        shape, stride_total = out, stride_total * s
    if w_proj is not None:
        total += conv_macs(x_shape, w_proj, shape)
    return total


def _register_macs() -> None:
    register_conv_macs(torch.ops.resnet_fused.postact_block_forward, _postact_macs)


_register_macs()
