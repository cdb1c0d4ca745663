"""Fused block ops: ``resnet_fused::bottleneck_forward`` and ``resnet_fused::basic_block_forward``.

One op per block type, one autograd registration per op, dispatching by backend inside:

* ``triton``: the fused kernels (``resnet_fused/triton``) for a CUDA tensor, or for a CPU tensor
  when TRITON_INTERPRET=1 (the interpreter); the reference for a CPU tensor otherwise.
* ``cuda``: the CUDA C++ kernels of ``resnet_fused._C`` (``resnet_fused/cuda``); for a CPU tensor
  their host implementation, which runs the same tile code (slow; it is how CPU-only CI checks
  them).
* ``reference``: eager PyTorch (the same computation; used by opcheck and as the fallback).

Both fused backends run one orchestration (``resnet_fused/fused``) over their kernel sets.

Outputs, a fixed tuple: the block output (channels_last), the conv outputs the backward needs
(y1, y2 for the bottleneck, y1 for the basic block; empty when eval-mode BN is folded, which
needs no backward), each norm's statistics [5, C] = (mean, biased var, invstd, scale, shift) as
its finalize wrote them (flat [5 * C]; empty when folded), and, with ``emit_stats``, the statistics partials
[3, P, C_out] of the output (the next block's bn1 input statistics, taken by the last conv's
epilogue; empty otherwise). ``in_stats`` gives the partials of x the same way, replacing the
block's own statistics pass (K0). Everything but the output is non-differentiable.

Running statistics: with ``update_stats`` the op moves each training norm's running mean and
variance and counts the batch, inside the finalize launch of that norm (one launch per norm,
no torch ops, no host sync; ``momentum=None``'s cumulative factor is computed there in fp32).
The op therefore mutates ``running_means`` / ``running_vars`` (declared in ``mutates_args``).
Its ``running_means`` list carries the norms' running means followed, with ``update_stats``, by
their ``num_batches_tracked`` counters: a custom op has no optional tensor-list argument, and a
separate required list would change the op's call signature. ``momentum`` entries < 0 mean
None (the cumulative average).

Autograd on a mutating op: ``register_autograd`` refuses non-functional schemas, but the
autograd kernel ``custom_op`` generates for every op (``torch._library.autograd``) reads the
op's ``_backward_fn`` / ``_setup_context_fn`` at call time; ``_register_autograd`` below sets
them directly. This is sound here because the mutated tensors (running statistics) never
require grad, are never saved for backward, and no output aliases them: autograd sees a
functional op of the differentiable inputs. opcheck (schema, fakes, autograd registration,
aot dispatch) and ``torch.compile(fullgraph=True)`` pass on torch 2.11 and 2.14 (checked), where
AOTAutograd functionalizes the mutation (``auto_functionalized``), which needs a fixed tuple of
outputs rather than a List[Tensor].

Eager calls from the modules take a cheaper path than the op (``bottleneck_call`` /
``basic_block_call``): a ``torch.autograd.Function`` whose forward and backward run the ops'
implementations directly (``_bottleneck_forward_impl``, ...), with the same saved tensors,
non-differentiable outputs and gradients as the registered autograd; without a gradient, the
implementation alone. The dispatcher's autograd wrapper, default filling and pytree passes cost
far more host time than the block's own orchestration. Under torch.compile / torch.export,
``torch.jit.trace``, a dispatch or torch-function mode, or for a tensor subclass, the call goes
through the op (``direct_call_allowed``), so tracers, fakes and counters see it; TorchScript's
forwards (graph_forward.py) call the ops themselves.

Saved for backward, by name: the block input, y1 (, y2), parameters and per-norm statistics;
never an activation (those are recomputed), so a block saves half the activation bytes eager
does. The fused backward is ``fused/backward.py``; the CPU fallback re-runs the reference.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import reference
from ..fused import backward as fused_backward
from ..fused import forward as fused_forward
from ..kernel_set import KernelSet, channels_last_weight
from ..macs import conv_macs, register_conv_macs
from ._saved import load_saved, save_named

__all__ = ["basic_block_call", "basic_block_forward", "bottleneck_call", "bottleneck_forward", "direct_call_allowed",
           "runs_fused", "runs_triton"]

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
    """The kernel set of ``backend``: the one place a backend name becomes kernels. Loaded on
    first use, deliberately: importing a backend imports triton (which reads TRITON_INTERPRET
    once, at its import) or the compiled extension's wrappers, and the package imports without
    either being touched."""
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


def _momentum(momentum: Optional[Sequence[float]], i: int) -> Optional[float]:
    if momentum is None:
        return 0.1
    return None if momentum[i] < 0 else float(momentum[i])


def _counters(running_means: Sequence[Tensor], n_norms: int, update: bool) -> list[Optional[Tensor]]:
    """The num_batches_tracked counters that follow the running means (see the module docstring)."""
    if update and len(running_means) == 2 * n_norms:
        return [t if t.numel() else None for t in running_means[n_norms:]]
    return [None] * n_norms


def _norm_inputs(weights, biases, means, vars_, training, eps, momentum, update) -> list[fused_forward.NormInputs]:
    n = len(training)
    counters = _counters(means, n, update)
    return [fused_forward.NormInputs(weights[i], biases[i], means[i], vars_[i], training[i], eps[i],
                                     counters[i], _momentum(momentum, i), update and training[i])
            for i in range(n)]


def _modes(training: Sequence[bool]) -> tuple[str, ...]:
    # eval and frozen compute the same forward; "frozen" keeps the graph for the backward.
    return tuple("train" if t else "frozen" for t in training)


def _reference_bn(weights, biases, means, vars_, training, eps, momentum, update) -> list[reference.BNParams]:
    """Reference BN parameters; a training norm moves its running statistics only with ``update``."""
    n = len(training)
    counters = _counters(means, n, update)
    out = []
    for i in range(n):
        if training[i]:
            tracked = update and means[i].numel() > 0
            out.append(reference.BNParams(weights[i], biases[i], means[i] if tracked else None,
                                          vars_[i] if tracked else None, counters[i], eps[i], _momentum(momentum, i)))
        else:
            out.append(reference.BNParams(weights[i], biases[i], means[i], vars_[i], None, eps[i], None))
    return out


def _stats_rows(mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """[5, C] (mean, var, invstd, scale, shift) with torch ops (the reference path)."""
    invstd = torch.rsqrt(var + eps)
    scale, shift = reference.bn_scale_shift(mean, var, weight, bias, eps)
    return torch.stack((mean, var, invstd, scale, shift))


def _reference_partials(out: Tensor) -> Tensor:
    """[3, 1, C] (count, mean, M2) of the output: one 'tile', for a block that ran the reference."""
    mean, var = reference.batch_stats(out)
    count = out.numel() // out.shape[1]
    return torch.stack((torch.full_like(mean, count), mean, var * count)).unsqueeze(1)


def _outputs(out: Tensor, convs: Sequence[Tensor], n_convs: int, stats: Sequence[Optional[Tensor]],
             part: Optional[Tensor]) -> tuple[Tensor, ...]:
    """The op's outputs: fresh tensors, none aliasing another or an input (no copies needed:
    each kernel writes its own output, each finalize its own [5, C])."""
    cl = torch.channels_last
    # Distinct empties when folded: outputs must not alias each other.
    saved = [y.contiguous(memory_format=cl) for y in convs] if convs else [out.new_empty((0,)) for _ in range(n_convs)]
    # Flat [5 * C]: per-channel vectors, not activations (saved-activation accounting).
    rows = [t.reshape(-1) if t is not None else out.new_empty((0,), dtype=reference.stats_dtype(out.dtype))
            for t in stats]
    part = part if part is not None else out.new_empty((0,), dtype=reference.stats_dtype(out.dtype))
    return tuple([out.contiguous(memory_format=cl)] + saved + rows + [part])


def _partials_tiles(x: Tensor, kind: str, last_in_shape, w_last: Tensor, groups: int, backend: str) -> int:
    """P of the emitted partials, as the real run makes them (the fake needs the shape)."""
    if not runs_fused(x, backend):
        return 1
    kernels = _kernel_set(backend)
    if fused_forward.last_conv_is_fused(kernels, kind, last_in_shape, w_last.shape, groups, x.dtype, x.device):
        return kernels.conv_stats_tiles(last_in_shape, w_last.shape, 1, groups if kind == "basic" else 1,
                                        x.dtype, x.device)
    n, _, h, w = last_in_shape
    return kernels.stats_tiles(n * h * w, x.device)


def _fake_outputs(x: Tensor, c_out: int, stride: int, conv_shapes, widths, fold: bool, emit_p: Optional[int]
                  ) -> tuple[Tensor, ...]:
    n, _, h, w = x.shape
    cl = torch.channels_last

    def empty(c: int, hh: int, ww: int) -> Tensor:
        return torch.empty((n, c, hh, ww), dtype=x.dtype, device=x.device, memory_format=cl)

    out = empty(c_out, (h - 1) // stride + 1, (w - 1) // stride + 1)
    convs = [x.new_empty((0,)) if fold else empty(*shape) for shape in conv_shapes]
    ct = reference.stats_dtype(x.dtype)
    rows = [x.new_empty((0,) if fold else (5 * c,), dtype=ct) for c in widths]
    part = x.new_empty((3, emit_p, c_out) if emit_p is not None else (0,), dtype=ct)
    return tuple([out] + convs + rows + [part])


# ---------------------------------------------------------------------------------------
# Autograd, shared by both ops
# ---------------------------------------------------------------------------------------


def _register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``op.register_autograd`` for an op that mutates its running-statistics arguments (see the
    module docstring): the generated autograd kernel reads these two attributes at call time."""
    if not (hasattr(op, "_backward_fn") and hasattr(op, "_setup_context_fn")):
        raise RuntimeError("resnet_fused: this torch version's custom_op has no _backward_fn / _setup_context_fn; "
                           "the block ops need them to carry an autograd formula while updating running statistics")
    op._backward_fn = backward
    op._setup_context_fn = setup_context


def _trim(ctx, grads: tuple) -> tuple:
    """One gradient per input the op was actually called with: the dispatcher drops trailing
    arguments equal to their defaults, and torch 2.11's tensor-list autograd wrapper compares
    the structure exactly (2.14 trims itself)."""
    return grads[:len(ctx.needs_input_grad)]


def _setup_context(ctx, x: Tensor, weights: dict, bn_weights, bn_biases, training, eps, output,
                   n_convs: int, config: dict, backend: str) -> None:
    ctx.config, ctx.backend = config, backend
    ctx.training, ctx.eps = list(training), list(eps)
    ctx.n_norms = len(training)
    convs = output[1:1 + n_convs]
    stats = output[1 + n_convs:1 + n_convs + len(training)]
    save_named(ctx, x=x, **weights,
               **{f"y{i + 1}": y for i, y in enumerate(convs)},
               **{f"bn_weight{i}": t for i, t in enumerate(bn_weights)},
               **{f"bn_bias{i}": t for i, t in enumerate(bn_biases)},
               **{f"stats{i}": stats[i] for i in range(len(training))})
    ctx.mark_non_differentiable(*output[1:])
    # Only the block output carries a gradient: no zero tensors for the others.
    ctx.set_materialize_grads(False)


def _saved_lists(ctx, saved: dict) -> tuple[list, list, list]:
    """bn_weights, bn_biases, stats as the backward op takes them."""
    n = range(ctx.n_norms)
    return ([saved[f"bn_weight{i}"] for i in n], [saved[f"bn_bias{i}"] for i in n],
            [saved[f"stats{i}"] for i in n])


def _backward_norms(weights, biases, stats, training, eps) -> list[fused_backward.SavedNorm]:
    return [fused_backward.SavedNorm(w, b, st, e, t)
            for w, b, st, t, e in zip(weights, biases, stats, training, eps)]


def _like_weight(grad: Tensor, weight: Tensor) -> Tensor:
    """A weight gradient in its weight's memory format, as ATen's conv backward returns it and
    the fake (``empty_like(weight)``) says: a channels_last model (``model.to(memory_format=
    torch.channels_last)``, the fast path) gets channels_last 3x3 gradients, so autograd's
    gradient accumulation needs no layout copy per weight and step."""
    if channels_last_weight(weight):
        return grad.contiguous(memory_format=torch.channels_last)
    return grad.contiguous()


def _grad_list(g: dict, tensor_names: Sequence[str], n_norms: int, like: Tensor,
               weights: Sequence[Optional[Tensor]]) -> list[Tensor]:
    """The backward op's outputs in order; a missing gradient (no projection) is an empty tensor.

    The input gradient is channels_last; weight gradients are laid out like their weights.
    """
    out = [g["x"].contiguous(memory_format=torch.channels_last)]
    out += [_like_weight(g[k], w) if g.get(k) is not None else like.new_empty((0,))
            for k, w in zip(tensor_names[1:], weights)]
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
    # Non-training norms use the statistics the forward used (their running statistics then).
    bn = [reference.BNParams(leaves[f"bn_weight{i}"], leaves[f"bn_bias{i}"],
                             None if ctx.training[i] else saved[f"stats{i}"][0],
                             None if ctx.training[i] else saved[f"stats{i}"][1], None, ctx.eps[i], None)
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
    return {k: (g.to(saved[k].dtype) if g is not None and k in saved and g.dtype != saved[k].dtype else g)
            for k, g in grads.items()}


_MUTATES = ("running_means", "running_vars")

# ---------------------------------------------------------------------------------------
# Bottleneck
# ---------------------------------------------------------------------------------------


def _bottleneck_forward_impl(
    x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, w_proj: Optional[Tensor],
    bn_weights: List[Tensor], bn_biases: List[Tensor],
    running_means: List[Tensor], running_vars: List[Tensor],
    training: List[bool], eps: List[float],
    stride: int, groups: int, shortcut: str, stride_on: str, fold_eval: bool, backend: str,
    momentum: Optional[List[float]] = None, update_stats: bool = False,
    in_stats: Optional[Tensor] = None, emit_stats: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, y1, y2, stats1, stats2, stats3, out_partials) of a pre-activation bottleneck."""
    _check_backend(backend)
    if runs_fused(x, backend):
        norms = _norm_inputs(bn_weights, bn_biases, running_means, running_vars, training, eps, momentum,
                             update_stats)
        out, convs, stats, part = fused_forward.bottleneck_forward(
            _kernel_set(backend), x, w1, w2, w3, w_proj, norms, stride=stride, groups=groups, shortcut=shortcut,
            stride_on=stride_on, fold_eval=fold_eval, in_stats=in_stats, emit_stats=emit_stats)
        return _outputs(out, convs, 2, stats, part)
    bn = _reference_bn(bn_weights, bn_biases, running_means, running_vars, training, eps, momentum, update_stats)
    record: dict = {}
    out = reference.preact_bottleneck(x, bn[0], w1, bn[1], w2, bn[2], w3, w_proj, stride=stride,
                                      groups=groups, shortcut=shortcut, stride_on=stride_on,
                                      modes=_modes(training), record=record)
    fold = _folds(fold_eval, training)
    stats = [None] * 3 if fold else [_stats_rows(m, v, w, b, e) for (m, v), w, b, e in
                                     zip(record["stats"], bn_weights, bn_biases, eps)]
    return _outputs(out, [] if fold else record["convs"], 2, stats,
                    _reference_partials(out) if emit_stats else None)


bottleneck_forward = torch.library.custom_op("resnet_fused::bottleneck_forward",
                                           mutates_args=_MUTATES)(_bottleneck_forward_impl)


@bottleneck_forward.register_fake
def _(x, w1, w2, w3, w_proj, bn_weights, bn_biases, running_means, running_vars, training, eps,
      stride, groups, shortcut, stride_on, fold_eval, backend, momentum=None, update_stats=False,
      in_stats=None, emit_stats=False):
    n, _, h, w = x.shape
    s1 = stride if stride_on == "1x1" else 1
    h1, w1_ = (h - 1) // s1 + 1, (w - 1) // s1 + 1
    h2, w2_ = (h - 1) // stride + 1, (w - 1) // stride + 1
    mid = w1.shape[0]
    p = _partials_tiles(x, "bottleneck", (n, mid, h2, w2_), w3, 1, backend) if emit_stats else None
    return _fake_outputs(x, w3.shape[0], stride, [(mid, h1, w1_), (mid, h2, w2_)],
                         (x.shape[1], mid, w2.shape[0]), _folds(fold_eval, training), p)


def _bottleneck_setup_context(ctx, inputs, output):
    (x, w1, w2, w3, w_proj, bn_weights, bn_biases, running_means, running_vars, training, eps,
     stride, groups, shortcut, stride_on, fold_eval, backend, *_) = inputs
    _setup_context(ctx, x, dict(w1=w1, w2=w2, w3=w3, w_proj=w_proj), bn_weights, bn_biases, training,
                   eps, output, 2, dict(stride=stride, groups=groups, shortcut=shortcut, stride_on=stride_on),
                   backend)


def _bottleneck_backward_impl(
    grad_out: Tensor, x: Tensor, y1: Tensor, y2: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
    w_proj: Optional[Tensor], bn_weights: List[Tensor], bn_biases: List[Tensor],
    stats: List[Tensor], training: List[bool], eps: List[float],
    stride: int, groups: int, shortcut: str, stride_on: str, backend: str,
) -> List[Tensor]:
    """[dx, dw1, dw2, dw3, dw_proj (empty without projection), dgamma x3, dbeta x3]."""
    g = fused_backward.bottleneck_backward(
        _kernel_set(backend), grad_out, x, y1, y2, w1, w2, w3, w_proj,
        _backward_norms(bn_weights, bn_biases, stats, training, eps),
        stride=stride, groups=groups, shortcut=shortcut, stride_on=stride_on)
    return _grad_list(g, ("x", "w1", "w2", "w3", "w_proj"), 3, x, (w1, w2, w3, w_proj))


bottleneck_backward = torch.library.custom_op("resnet_fused::bottleneck_backward",
                                            mutates_args=())(_bottleneck_backward_impl)


@bottleneck_backward.register_fake
def _(grad_out, x, y1, y2, w1, w2, w3, w_proj, bn_weights, bn_biases, stats, training, eps,
      stride, groups, shortcut, stride_on, backend):
    return _fake_grads((x, w1, w2, w3, w_proj), bn_weights, bn_biases)


def _bottleneck_grads(ctx, grad: Optional[Tensor], direct: bool) -> dict:
    """The bottleneck's gradients by name; ``direct`` calls the backward's implementation
    rather than its op (the eager autograd.Function's path, see :func:`bottleneck_call`)."""
    saved = load_saved(ctx)
    if grad is None:  # the block output took no part in the loss
        g = {}
    elif runs_fused(saved["x"], ctx.backend):
        backward = _bottleneck_backward_impl if direct else torch.ops.resnet_fused.bottleneck_backward
        out = backward(
            grad, saved["x"], saved["y1"], saved["y2"], saved["w1"], saved["w2"], saved["w3"],
            saved.get("w_proj"), *_saved_lists(ctx, saved), ctx.training, ctx.eps, **ctx.config,
            backend=ctx.backend)
        g = _grad_dict(out, ("x", "w1", "w2", "w3", "w_proj"), 3)
    else:
        def run(t, bn, modes):
            return reference.preact_bottleneck(t["x"], bn[0], t["w1"], bn[1], t["w2"], bn[2], t["w3"],
                                               t.get("w_proj"), modes=modes, **ctx.config)

        g = _reference_grads(ctx, saved, run, ("w1", "w2", "w3", "w_proj"), grad)
    return _as_param_dtype(g, saved)


def _bottleneck_backward(ctx, *grads):
    _check_no_double_backward()
    g = _bottleneck_grads(ctx, grads[0], direct=False)
    return _trim(ctx, (g.get("x"), g.get("w1"), g.get("w2"), g.get("w3"), g.get("w_proj"),
                       [g.get(f"bn_weight{i}") for i in range(3)], [g.get(f"bn_bias{i}") for i in range(3)],
                       [None] * ctx.running_lens[0], [None] * ctx.running_lens[1],
                       None, None, None, None, None, None, None, None, None, None, None, None))


def _bottleneck_setup(ctx, inputs, output):
    ctx.running_lens = (len(inputs[7]), len(inputs[8]))
    _bottleneck_setup_context(ctx, inputs, output)


_register_autograd(bottleneck_forward, _bottleneck_backward, _bottleneck_setup)


# ---------------------------------------------------------------------------------------
# Basic block
# ---------------------------------------------------------------------------------------


def _basic_block_forward_impl(
    x: Tensor, w1: Tensor, w2: Tensor, w_proj: Optional[Tensor],
    bn_weights: List[Tensor], bn_biases: List[Tensor],
    running_means: List[Tensor], running_vars: List[Tensor],
    training: List[bool], eps: List[float],
    stride: int, groups: int, shortcut: str, fold_eval: bool, backend: str,
    momentum: Optional[List[float]] = None, update_stats: bool = False,
    in_stats: Optional[Tensor] = None, emit_stats: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, y1, stats1, stats2, out_partials) of a pre-activation basic block."""
    _check_backend(backend)
    if runs_fused(x, backend):
        norms = _norm_inputs(bn_weights, bn_biases, running_means, running_vars, training, eps, momentum,
                             update_stats)
        out, convs, stats, part = fused_forward.basic_block_forward(
            _kernel_set(backend), x, w1, w2, w_proj, norms, stride=stride, groups=groups, shortcut=shortcut,
            fold_eval=fold_eval, in_stats=in_stats, emit_stats=emit_stats)
        return _outputs(out, convs, 1, stats, part)
    bn = _reference_bn(bn_weights, bn_biases, running_means, running_vars, training, eps, momentum, update_stats)
    record: dict = {}
    out = reference.preact_basic_block(x, bn[0], w1, bn[1], w2, w_proj, stride=stride, groups=groups,
                                       shortcut=shortcut, modes=_modes(training), record=record)
    fold = _folds(fold_eval, training)
    stats = [None] * 2 if fold else [_stats_rows(m, v, w, b, e) for (m, v), w, b, e in
                                     zip(record["stats"], bn_weights, bn_biases, eps)]
    return _outputs(out, [] if fold else record["convs"], 1, stats,
                    _reference_partials(out) if emit_stats else None)


basic_block_forward = torch.library.custom_op("resnet_fused::basic_block_forward",
                                            mutates_args=_MUTATES)(_basic_block_forward_impl)


@basic_block_forward.register_fake
def _(x, w1, w2, w_proj, bn_weights, bn_biases, running_means, running_vars, training, eps,
      stride, groups, shortcut, fold_eval, backend, momentum=None, update_stats=False, in_stats=None,
      emit_stats=False):
    n, _, h, w = x.shape
    h1, w1_ = (h - 1) // stride + 1, (w - 1) // stride + 1
    p = _partials_tiles(x, "basic", (n, w1.shape[0], h1, w1_), w2, groups, backend) if emit_stats else None
    return _fake_outputs(x, w2.shape[0], stride, [(w1.shape[0], h1, w1_)], (x.shape[1], w1.shape[0]),
                         _folds(fold_eval, training), p)


def _basic_setup_context(ctx, inputs, output):
    (x, w1, w2, w_proj, bn_weights, bn_biases, running_means, running_vars, training, eps,
     stride, groups, shortcut, fold_eval, backend, *_) = inputs
    ctx.running_lens = (len(running_means), len(running_vars))
    _setup_context(ctx, x, dict(w1=w1, w2=w2, w_proj=w_proj), bn_weights, bn_biases, training, eps,
                   output, 1, dict(stride=stride, groups=groups, shortcut=shortcut), backend)


def _basic_block_backward_impl(
    grad_out: Tensor, x: Tensor, y1: Tensor, w1: Tensor, w2: Tensor, w_proj: Optional[Tensor],
    bn_weights: List[Tensor], bn_biases: List[Tensor], stats: List[Tensor],
    training: List[bool], eps: List[float], stride: int, groups: int, shortcut: str, backend: str,
) -> List[Tensor]:
    """[dx, dw1, dw2, dw_proj (empty without projection), dgamma x2, dbeta x2]."""
    g = fused_backward.basic_block_backward(
        _kernel_set(backend), grad_out, x, y1, w1, w2, w_proj,
        _backward_norms(bn_weights, bn_biases, stats, training, eps),
        stride=stride, groups=groups, shortcut=shortcut)
    return _grad_list(g, ("x", "w1", "w2", "w_proj"), 2, x, (w1, w2, w_proj))


basic_block_backward = torch.library.custom_op("resnet_fused::basic_block_backward",
                                             mutates_args=())(_basic_block_backward_impl)


@basic_block_backward.register_fake
def _(grad_out, x, y1, w1, w2, w_proj, bn_weights, bn_biases, stats, training, eps,
      stride, groups, shortcut, backend):
    return _fake_grads((x, w1, w2, w_proj), bn_weights, bn_biases)


def _basic_grads(ctx, grad: Optional[Tensor], direct: bool) -> dict:
    """As :func:`_bottleneck_grads`, for the basic block."""
    saved = load_saved(ctx)
    if grad is None:  # the block output took no part in the loss
        g = {}
    elif runs_fused(saved["x"], ctx.backend):
        backward = _basic_block_backward_impl if direct else torch.ops.resnet_fused.basic_block_backward
        out = backward(
            grad, saved["x"], saved["y1"], saved["w1"], saved["w2"], saved.get("w_proj"),
            *_saved_lists(ctx, saved), ctx.training, ctx.eps, **ctx.config, backend=ctx.backend)
        g = _grad_dict(out, ("x", "w1", "w2", "w_proj"), 2)
    else:
        def run(t, bn, modes):
            return reference.preact_basic_block(t["x"], bn[0], t["w1"], bn[1], t["w2"], t.get("w_proj"),
                                                modes=modes, **ctx.config)

        g = _reference_grads(ctx, saved, run, ("w1", "w2", "w_proj"), grad)
    return _as_param_dtype(g, saved)


def _basic_backward(ctx, *grads):
    _check_no_double_backward()
    g = _basic_grads(ctx, grads[0], direct=False)
    return _trim(ctx, (g.get("x"), g.get("w1"), g.get("w2"), g.get("w_proj"),
                       [g.get(f"bn_weight{i}") for i in range(2)], [g.get(f"bn_bias{i}") for i in range(2)],
                       [None] * ctx.running_lens[0], [None] * ctx.running_lens[1],
                       None, None, None, None, None, None, None, None, None, None, None))


_register_autograd(basic_block_forward, _basic_backward, _basic_setup_context)


# ---------------------------------------------------------------------------------------
# The eager entry points: the cheapest dispatch for a call from a module
# ---------------------------------------------------------------------------------------


def direct_call_allowed(x: Tensor) -> bool:
    """Whether a block call on ``x`` may bypass the op dispatcher (checked per call, cheap).

    Only for a plain CPU or CUDA tensor, outside torch.compile / torch.export (dynamo traces
    the op, with its fake, never the kernels), outside ``torch.jit.trace`` (which records the
    op), and with no torch-function or dispatch mode active (fake tensors, FLOP / MAC counters,
    functionalization see the op, as before). Everywhere else the call goes through the op.
    """
    return (type(x) is Tensor and not torch.compiler.is_compiling() and torch._C._get_tracing_state() is None
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._is_torch_function_mode_enabled()
            and x.device.type in ("cpu", "cuda"))


def _bump_versions(kw: dict) -> None:
    """The op bumps the version counters of the tensors it mutates; the direct call does too."""
    if kw["update_stats"]:
        torch.autograd.graph.increment_version([t for t in (*kw["running_means"], *kw["running_vars"]) if t.numel()])


class _BottleneckFunction(torch.autograd.Function):
    """The bottleneck op's forward and backward without the dispatcher's autograd wrapper: the
    same implementation, saved tensors, non-differentiable outputs and gradients as the op's
    registered autograd (``_setup_context`` / ``_bottleneck_grads``)."""

    @staticmethod
    def forward(ctx, kw: dict, x, w1, w2, w3, w_proj, *bn):
        bn_weights, bn_biases = list(bn[:3]), list(bn[3:])
        out = _bottleneck_forward_impl(x, w1, w2, w3, w_proj, bn_weights, bn_biases, **kw)
        _bump_versions(kw)
        _setup_context(ctx, x, dict(w1=w1, w2=w2, w3=w3, w_proj=w_proj), bn_weights, bn_biases, kw["training"],
                       kw["eps"], out, 2, dict(stride=kw["stride"], groups=kw["groups"], shortcut=kw["shortcut"],
                                               stride_on=kw["stride_on"]), kw["backend"])
        return out

    @staticmethod
    def backward(ctx, *grads):
        _check_no_double_backward()
        g = _bottleneck_grads(ctx, grads[0], direct=True)
        return (None, g.get("x"), g.get("w1"), g.get("w2"), g.get("w3"), g.get("w_proj"),
                *(g.get(f"bn_weight{i}") for i in range(3)), *(g.get(f"bn_bias{i}") for i in range(3)))


class _BasicFunction(torch.autograd.Function):
    """As :class:`_BottleneckFunction`, for the basic block."""

    @staticmethod
    def forward(ctx, kw: dict, x, w1, w2, w_proj, *bn):
        bn_weights, bn_biases = list(bn[:2]), list(bn[2:])
        out = _basic_block_forward_impl(x, w1, w2, w_proj, bn_weights, bn_biases, **kw)
        _bump_versions(kw)
        _setup_context(ctx, x, dict(w1=w1, w2=w2, w_proj=w_proj), bn_weights, bn_biases, kw["training"], kw["eps"],
                       out, 1, dict(stride=kw["stride"], groups=kw["groups"], shortcut=kw["shortcut"]), kw["backend"])
        return out

    @staticmethod
    def backward(ctx, *grads):
        _check_no_double_backward()
        g = _basic_grads(ctx, grads[0], direct=True)
        return (None, g.get("x"), g.get("w1"), g.get("w2"), g.get("w_proj"),
                *(g.get(f"bn_weight{i}") for i in range(2)), *(g.get(f"bn_bias{i}") for i in range(2)))


def bottleneck_call(x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, w_proj: Optional[Tensor],
                    bn_weights: List[Tensor], bn_biases: List[Tensor], kw: dict, needs_grad: bool
                    ) -> tuple[Tensor, ...]:
    """The bottleneck op's outputs for a module call, through the cheapest dispatch that applies.

    ``kw``: the op's remaining arguments by name (running statistics, flags, configuration).
    Where :func:`direct_call_allowed`: with ``needs_grad`` (grad mode on and an input needing a
    gradient) an autograd.Function around the op's implementation, else the implementation
    itself; otherwise the op (``torch.ops.resnet_fused.bottleneck_forward``).
    """
    if not direct_call_allowed(x):
        return bottleneck_forward(x, w1, w2, w3, w_proj, bn_weights, bn_biases, **kw)
    if needs_grad:
        return _BottleneckFunction.apply(kw, x, w1, w2, w3, w_proj, *bn_weights, *bn_biases)
    out = _bottleneck_forward_impl(x, w1, w2, w3, w_proj, bn_weights, bn_biases, **kw)
    _bump_versions(kw)
    return out


def basic_block_call(x: Tensor, w1: Tensor, w2: Tensor, w_proj: Optional[Tensor], bn_weights: List[Tensor],
                     bn_biases: List[Tensor], kw: dict, needs_grad: bool) -> tuple[Tensor, ...]:
    """As :func:`bottleneck_call`, for the basic block."""
    if not direct_call_allowed(x):
        return basic_block_forward(x, w1, w2, w_proj, bn_weights, bn_biases, **kw)
    if needs_grad:
        return _BasicFunction.apply(kw, x, w1, w2, w_proj, *bn_weights, *bn_biases)
    out = _basic_block_forward_impl(x, w1, w2, w_proj, bn_weights, bn_biases, **kw)
    _bump_versions(kw)
    return out


# ---------------------------------------------------------------------------------------
# MACs (resnet_fused.macs): what eager's convolutions of the same block count
# ---------------------------------------------------------------------------------------


def _out(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def _bottleneck_macs(x, w1, w2, w3, w_proj, bn_weights, bn_biases, running_means, running_vars, training, eps,
                     stride, groups, shortcut, stride_on, *rest, out_shape=None, **kwargs) -> int:
    """conv1 + conv2 + conv3 (+ the projection), shapes in, MACs out."""
    n, _, h, w = x
    s1 = stride if stride_on == "1x1" else 1
    y1 = (n, w1[0], _out(h, s1), _out(w, s1))
    y2 = (n, w2[0], _out(h, stride), _out(w, stride))
    out = (n, w3[0], y2[2], y2[3])
    total = conv_macs(x, w1, y1) + conv_macs(y1, w2, y2) + conv_macs(y2, w3, out)
    return total + (conv_macs(x, w_proj, out) if w_proj is not None else 0)


def _basic_block_macs(x, w1, w2, w_proj, bn_weights, bn_biases, running_means, running_vars, training, eps,
                      stride, *rest, out_shape=None, **kwargs) -> int:
    n, _, h, w = x
    y1 = (n, w1[0], _out(h, stride), _out(w, stride))
    out = (n, w2[0], y1[2], y1[3])
    total = conv_macs(x, w1, y1) + conv_macs(y1, w2, out)
    return total + (conv_macs(x, w_proj, out) if w_proj is not None else 0)


def _register_macs() -> None:
    register_conv_macs(torch.ops.resnet_fused.bottleneck_forward, _bottleneck_macs)
    register_conv_macs(torch.ops.resnet_fused.basic_block_forward, _basic_block_macs)


_register_macs()
