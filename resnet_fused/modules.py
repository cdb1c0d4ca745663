"""Drop-in fused blocks: the reference blocks' constructor, state_dict and semantics, fused ops.

``FusedBottleneck`` / ``FusedBasicBlock`` subclass the reference ``PreActBottleneck`` /
``PreActBasicBlock``: same arguments (plus ``backend``), same parameters and buffers under the
same keys, so weights load both ways without renaming. The forward calls one fused op per
block; the op also updates the running statistics with nn.BatchNorm2d's formulas (unbiased
running variance, momentum=None as a cumulative average computed on the device in fp32: no
host sync), inside each norm's finalize launch.

Inside a ``FusedStage`` (``stage.py``) the blocks run through ``_forward_stats``: a block takes
the statistics partials of its input from the previous block's last conv and returns those of
its output, so it skips its own statistics pass over the input.

Per call, a block looks up its plan (``_Plan``: checks done, backend, compute dtype, norm flags
and scalars, eval folding, the op's configuration) under a key of the input's shape, strides,
dtype and device, the autocast dtype, whether a gradient is needed, each norm's training flag,
momentum, eps and buffers present, the backend and the partials in / out; a new key builds and
checks once. Parameters and buffers are read on every call (``.to()`` replaces them), and the
input/weight dtype and device check runs on every call. The op is then called through
``ops/blocks.py``'s eager entry points (an autograd.Function around its implementation).

Dtypes as eager: after ``.to(dtype)`` everything runs in that dtype (statistics still in fp32);
under ``torch.autocast`` the block casts the input and conv weights to the autocast dtype, as
eager's autocast does for a conv, and keeps BN parameters and buffers in fp32.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from . import graph_forward, reference
from .backends import block_backend, resolve_backend
from .kernel_set import as_dtype
from .ops import blocks as block_ops

__all__ = ["FusedBottleneck", "FusedBasicBlock"]


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """torch.autocast's dtype for ``device_type``, or None when off there; the meta device (MAC
    counting, shape tracing) has no autocast and asking torch raises."""
    if device_type == "meta":
        return None
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


#: Plans kept per block; past this many distinct call signatures the cache starts over.
_MAX_PLANS = 32


class _Plan:
    """What a block call does, fixed by its key (``_FusedBlock._plan_key``):

    the input's shape, strides, dtype and device; the autocast dtype on that device; whether a
    gradient is needed (grad mode on and the input or a parameter requiring grad); per norm:
    training, running statistics absent, counter absent, momentum, eps; the block's ``backend``;
    whether partials of the input are given and whether the output's are emitted.

    ``backend``: the fused backend, or None (the reference runs); ``cast``: the autocast dtype
    the input and conv weights are cast to, or None; ``kw``: the op's non-tensor arguments
    (norm flags and scalars, configuration, eval folding); ``needs_grad``; ``nchw_out``: an
    NCHW-contiguous input, whose output is made NCHW too; ``missing``: norms without running
    statistics (placeholders made per call). The tensors (parameters, buffers) are read on
    every call, never cached: ``.to()`` and ``load_state_dict`` replace or refill them.
    """

    __slots__ = ("backend", "cast", "kw", "needs_grad", "nchw_out", "missing")

    def __init__(self, backend, cast, kw, needs_grad, nchw_out, missing):
        self.backend, self.cast, self.kw = backend, cast, kw
        self.needs_grad, self.nchw_out, self.missing = needs_grad, nchw_out, missing


def reference_forward(block: nn.Module, x: Tensor) -> Tensor:
    """The reference block's forward of ``block`` (the eager oracle, same parameters)."""
    return super(_FusedBlock, block).forward(x)


_NO_DEFAULT = object()


def member(module: nn.Module, name: str, default=_NO_DEFAULT):
    """``module.<name>`` for a parameter, buffer or submodule, read from nn.Module's own dicts
    where ``nn.Module.__getattr__`` would find it: the same object, without the failed instance
    and class lookup that precedes ``__getattr__`` (about 1.5 us against 0.1 on a CI-class CPU,
    and a block call reads a few dozen). Anything else (a plain attribute, a property such as a
    parametrization's ``weight``) by ``getattr``, with ``default`` where given."""
    d = module.__dict__
    for table in (d["_parameters"], d["_buffers"], d["_modules"]):
        if name in table:
            return table[name]
    if default is _NO_DEFAULT:
        return getattr(module, name)
    return getattr(module, name, default)


def _counter(norm: nn.Module) -> Optional[Tensor]:
    """A norm's ``num_batches_tracked`` (None: untracked, or a FrozenBatchNorm2d, which has none)."""
    return member(norm, "num_batches_tracked", None)


class _FusedBlock:
    """The one base of every fused block, pre- and post-activation: the forward template (plan
    lookup, eager fallback, casts and checks, fold decision, norm arguments, op call, output
    format) and the running statistics. A block declares its chain: ``_norms``,
    ``_conv_weights``, ``_proj_weight``, ``_kind``, ``_op_config``, ``_counts``, ``_call_op``,
    ``_check_input`` and ``_reference_forward``."""

    #: Whether the block's op takes and emits statistics partials (stage fusion: pre-activation).
    _takes_stats = True

    def _norms(self) -> list[nn.Module]:
        raise NotImplementedError

    def _conv_weights(self) -> list[Tensor]:
        raise NotImplementedError

    def _proj_weight(self) -> Optional[Tensor]:
        ds = member(self, "downsample", None)
        return member(member(ds, "conv"), "weight") if ds is not None else None

    @staticmethod
    def _trains(norm: nn.Module) -> bool:
        """Whether a norm normalises with batch statistics (training, or no running statistics)."""
        return bool(norm.training or member(norm, "running_mean", None) is None)

    def _reference_forward(self, x: Tensor) -> Tensor:
        """The eager computation of the block (the fallback where no fused backend runs)."""
        return reference_forward(self, x)

    def _norm_args(self, x: Tensor, update: bool = False) -> dict:
        """The op's norm arguments. With ``update`` the op moves the running statistics of the
        norms in training mode: ``running_means`` then also carries the norms'
        ``num_batches_tracked`` counters after the means (see ops/blocks.py)."""
        norms = self._norms()
        training = [self._trains(n) for n in norms]

        def empty(dtype=torch.float32):
            return x.new_empty((0,), dtype=dtype)

        means = [n.running_mean if n.running_mean is not None else empty() for n in norms]
        if update:
            means += [_counter(n) if _counter(n) is not None else empty(torch.long) for n in norms]
        return dict(
            bn_weights=[n.weight for n in norms], bn_biases=[n.bias for n in norms],
            running_means=means,
            running_vars=[n.running_var if n.running_var is not None else empty() for n in norms],
            training=training, eps=[float(n.eps) for n in norms])

    def _update_args(self) -> dict:
        """momentum (< 0: None, the cumulative average) and whether the op updates statistics."""
        norms = self._norms()
        update = any(self._trains(n) and n.running_mean is not None for n in norms)
        momentum = [getattr(n, "momentum", 0.1) for n in norms]
        return dict(momentum=[-1.0 if m is None else float(m) for m in momentum], update_stats=update)

    def _fused_backend(self, x: Tensor) -> Optional[str]:
        """The fused backend this block runs ``x`` on, or None (it runs the reference)."""
        backend = block_backend(self.backend, x, self._kind())
        return None if backend == "reference" else backend

    def _kind(self) -> str:
        raise NotImplementedError

    def _needs_input_stats(self) -> bool:
        """Whether bn1 normalises with batch statistics (then the input's partials are useful)."""
        return bool(self.norm1.training or self.norm1.running_mean is None)

    # -- the per-call plan ------------------------------------------------------------------

    def _grad_tensors(self, norms: Sequence[nn.Module]) -> list[Tensor]:
        """Every tensor a gradient can flow to besides the input: the block's parameters."""
        out = self._conv_weights() + [member(n, "weight") for n in norms] + [member(n, "bias") for n in norms]
        w_proj = self._proj_weight()
        return out + [w_proj] if w_proj is not None else out

    def _plan_key(self, x: Tensor, in_stats: Optional[Tensor], emit_stats: bool,
                  norms: Optional[Sequence[nn.Module]] = None) -> tuple:
        """What a call's plan depends on (see :class:`_Plan`); ``norms``: ``_norms()``, when the
        caller has it."""
        norms = self._norms() if norms is None else norms
        grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in self._grad_tensors(norms)))
        return (x.shape, x.stride(), x.dtype, x.device, _autocast_dtype(x.device.type), grad,
                tuple((n.training, member(n, "running_mean", None) is None, _counter(n) is None,
                       getattr(n, "momentum", None), n.eps) for n in norms),
                self.backend, in_stats is None, emit_stats)

    def _plan(self, x: Tensor, in_stats: Optional[Tensor], emit_stats: bool,
              norms: Optional[Sequence[nn.Module]] = None) -> "_Plan":
        """The cached plan of a call on ``x`` (built, and its checks run, on a new key)."""
        if not isinstance(x, Tensor):
            self._check_input(x)  # raises, saying what is accepted
        key = self._plan_key(x, in_stats, emit_stats, norms)
        plans = self.__dict__.get("_plans")
        if plans is None:
            plans = self.__dict__["_plans"] = {}
        plan = plans.get(key)
        if plan is None:
            plan = self._build_plan(x, key)
            if len(plans) >= _MAX_PLANS:
                plans.clear()
            plans[key] = plan
        return plan

    def _build_plan(self, x: Tensor, key: tuple) -> "_Plan":
        """Everything about a call that only depends on ``key``: input checks, backend,
        compute dtype, norm flags and scalars, eval folding, the op's configuration."""
        self._check_input(x)
        backend = self._fused_backend(x)
        if backend is None:
            return _Plan(None, None, {}, False, False, ())
        cast = _autocast_dtype(x.device.type) if x.is_floating_point() else None
        norms = self._norms()
        training = [self._trains(n) for n in norms]
        upd = self._update_args()
        self._check_counts(training, self._counts(x.shape), x.shape)
        needs_grad = key[5]
        fold = not any(training) and not needs_grad
        kw = dict(training=training, eps=[float(n.eps) for n in norms], **self._op_config(), fold_eval=fold,
                  backend=backend, **upd)
        if self._takes_stats:
            kw["emit_stats"] = key[-1]
        missing = tuple(i for i, n in enumerate(norms) if n.running_mean is None or n.running_var is None
                        or (upd["update_stats"] and _counter(n) is None))
        nchw = x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        return _Plan(backend, cast, kw, needs_grad, nchw, missing)

    def _running_args(self, x: Tensor, plan: "_Plan", norms: Sequence[nn.Module]
                      ) -> tuple[list[Tensor], list[Tensor]]:
        """running_means (with the counters after them when the op updates) and running_vars,
        as :meth:`_norm_args` gives them."""
        if plan.missing:
            args = self._norm_args(x, plan.kw["update_stats"])
            return args["running_means"], args["running_vars"]
        means = [member(n, "running_mean") for n in norms]
        if plan.kw["update_stats"]:
            means += [_counter(n) for n in norms]
        return means, [member(n, "running_var") for n in norms]

    def _cast(self, x: Tensor, plan: "_Plan") -> tuple[Tensor, list[Tensor], Optional[Tensor]]:
        """Input and conv weights in the plan's compute dtype; the per-call dtype/device check."""
        weights = self._conv_weights()
        w_proj = self._proj_weight()
        cast = plan.cast
        if cast is not None:
            x = as_dtype(x, cast)
            weights = [as_dtype(w, cast) for w in weights]
            w_proj = as_dtype(w_proj, cast) if w_proj is not None else None
        w0 = weights[0]
        if w0.dtype != x.dtype:
            raise TypeError(
                f"{type(self).__name__}: input dtype {x.dtype} and weight dtype {w0.dtype} "
                "differ; convert the module with .to(dtype), or run it under torch.autocast")
        if w0.device != x.device:
            raise RuntimeError(
                f"{type(self).__name__}: input on {x.device} but parameters on {w0.device}; "
                "move the module or the input so they share a device")
        return x, weights, w_proj

    def _eager_call(self, x: Tensor) -> Tensor:
        """The module forward outside TorchScript and FX."""
        if self.backend == "reference":  # never fused; its chain need not be fusable (no plan)
            return self._reference_forward(x)
        norms = self._norms()
        plan = self._plan(x, None, False, norms)
        if plan.backend is None:
            return self._reference_forward(x)
        out, _ = self._run(x, plan, None, norms)
        return out.contiguous() if plan.nchw_out else out

    def _forward_stats(self, x: Tensor, in_stats: Optional[Tensor] = None, emit_stats: bool = False
                       ) -> tuple[Tensor, Optional[Tensor]]:
        """(channels_last output, statistics partials of the output or None) through the fused op;
        ``in_stats``: partials of ``x`` (from the previous block), replacing the block's own pass."""
        norms = self._norms()
        plan = self._plan(x, in_stats, emit_stats, norms)
        if plan.backend is None:
            raise RuntimeError(f"{type(self).__name__}: _forward_stats needs a fused backend for this input")
        return self._run(x, plan, in_stats, norms)

    def _run(self, x: Tensor, plan: "_Plan", in_stats: Optional[Tensor], norms: Sequence[nn.Module]
             ) -> tuple[Tensor, Optional[Tensor]]:
        xc, weights, w_proj = self._cast(x, plan)
        means, vars_ = self._running_args(xc, plan, norms)
        kw = dict(plan.kw, running_means=means, running_vars=vars_)
        if self._takes_stats:
            kw["in_stats"] = in_stats
        outs = self._call_op(xc, weights, w_proj, [member(n, "weight") for n in norms],
                             [member(n, "bias") for n in norms], kw, plan.needs_grad)
        return outs[0], (outs[-1] if kw.get("emit_stats") else None)

    def _op_config(self) -> dict:
        raise NotImplementedError

    def _counts(self, shape) -> tuple[int, ...]:
        raise NotImplementedError

    def _call_op(self, x, weights, w_proj, bn_weights, bn_biases, kw, needs_grad) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _check_counts(self, training: Sequence[bool], counts: Sequence[int], shape) -> None:
        """Batch statistics need more than one value per channel (PyTorch's own rule and message)."""
        for trains, count in zip(training, counts):
            if trains and count == 1:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input size {list(shape)} "
                    f"({type(self).__name__}: a norm sees one value per channel)")


def chains_statistics(module: nn.Module) -> bool:
    """Whether ``module`` is a fused block that takes its input's statistics partials from the
    previous block and emits its output's (``_forward_stats``): what stage fusion chains. The
    pre-activation blocks do; a post-activation block's first conv reads the raw input, so it
    has nothing to chain."""
    return isinstance(module, _FusedBlock) and module._takes_stats


class FusedBottleneck(_FusedBlock, reference.PreActBottleneck):
    """A pre-activation bottleneck running fused kernels; arguments as ``PreActBottleneck``
    (see its docstring), plus ``backend``: ``"triton"`` (default), ``"cuda"``, ``"auto"`` or
    ``"reference"`` (eager), see ``backends.py``.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: Optional[int] = None,
        bottle_ratio: float = 0.25,
        stride: int = 1,
        groups: int = 1,
        shortcut: Optional[str] = None,
        stride_on: str = "3x3",
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        *,
        backend: str = "triton",
    ):
        super().__init__(in_chs, out_chs, bottle_ratio, stride, groups, shortcut, stride_on, eps, momentum)
        self.backend = resolve_backend(backend)

    def _norms(self):
        m = self._modules
        return [m["norm1"], m["norm2"], m["norm3"]]

    def _conv_weights(self):
        m = self._modules
        return [member(m["conv1"], "weight"), member(m["conv2"], "weight"), member(m["conv3"], "weight")]

    def _kind(self) -> str:
        return "resnext" if self.groups > 1 else "bottleneck"

    _script_forward = graph_forward.PreActBottleneckScript._script_forward

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._script_forward(x)
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: Tensor) -> Tensor:
        if graph_forward.is_fx_proxy(x):
            return graph_forward.fx_leaf_call(self, x)
        return self._eager_call(x)

    def _op_config(self) -> dict:
        return dict(stride=self.stride, groups=self.groups, shortcut=self.shortcut, stride_on=self.stride_on)

    def _counts(self, shape) -> tuple[int, ...]:
        n, _, h, w = shape
        s1 = self.stride if self.stride_on == "1x1" else 1
        h2, w2_ = -(-h // self.stride), -(-w // self.stride)
        return (n * h * w, n * -(-h // s1) * -(-w // s1), n * h2 * w2_)

    def _call_op(self, x, weights, w_proj, bn_weights, bn_biases, kw, needs_grad):
        w1, w2, w3 = weights
        return block_ops.bottleneck_call(x, w1, w2, w3, w_proj, bn_weights, bn_biases, kw, needs_grad)


class FusedBasicBlock(_FusedBlock, reference.PreActBasicBlock):
    """A pre-activation basic block running fused kernels; arguments as ``PreActBasicBlock``
    (see its docstring), plus ``backend`` as :class:`FusedBottleneck`'s."""

    def __init__(
        self,
        in_chs: int,
        out_chs: Optional[int] = None,
        bottle_ratio: float = 1.0,
        stride: int = 1,
        groups: int = 1,
        shortcut: Optional[str] = None,
        stride_on: str = "3x3",
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        *,
        backend: str = "triton",
    ):
        super().__init__(in_chs, out_chs, bottle_ratio, stride, groups, shortcut, stride_on, eps, momentum)
        self.backend = resolve_backend(backend)

    def _norms(self):
        m = self._modules
        return [m["norm1"], m["norm2"]]

    def _conv_weights(self):
        m = self._modules
        return [member(m["conv1"], "weight"), member(m["conv2"], "weight")]

    def _kind(self) -> str:
        return "basic"

    _script_forward = graph_forward.PreActBasicScript._script_forward

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._script_forward(x)
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: Tensor) -> Tensor:
        if graph_forward.is_fx_proxy(x):
            return graph_forward.fx_leaf_call(self, x)
        return self._eager_call(x)

    def _op_config(self) -> dict:
        return dict(stride=self.stride, groups=self.groups, shortcut=self.shortcut)

    def _counts(self, shape) -> tuple[int, ...]:
        n, _, h, w = shape
        return (n * h * w, n * -(-h // self.stride) * -(-w // self.stride))

    def _call_op(self, x, weights, w_proj, bn_weights, bn_biases, kw, needs_grad):
        w1, w2 = weights
        return block_ops.basic_block_call(x, w1, w2, w_proj, bn_weights, bn_biases, kw, needs_grad)
