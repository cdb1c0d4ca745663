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


class _FusedBlock:
    """What both fused blocks share: dtype handling, the op call, running statistics."""

    def _norms(self) -> list[nn.BatchNorm2d]:
        raise NotImplementedError

    def _conv_weights(self) -> list[Tensor]:
        raise NotImplementedError

    def _prepare(self, x: Tensor) -> tuple[Tensor, list[Tensor], Optional[Tensor]]:
        """Input and weights in the compute dtype (autocast's, or the module's own)."""
        weights = self._conv_weights()
        w_proj = self.downsample.conv.weight if self.downsample is not None else None
        cast = _autocast_dtype(x.device.type)
        if cast is not None and x.is_floating_point():
            x = x.to(cast)
            weights = [w.to(cast) for w in weights]
            w_proj = w_proj.to(cast) if w_proj is not None else None
        if weights[0].dtype != x.dtype:
            raise TypeError(
                f"{type(self).__name__}: input dtype {x.dtype} and weight dtype {weights[0].dtype} "
                "differ; convert the module with .to(dtype), or run it under torch.autocast")
        if weights[0].device != x.device:
            raise RuntimeError(
                f"{type(self).__name__}: input on {x.device} but parameters on {weights[0].device}; "
                "move the module or the input so they share a device")
        return x, weights, w_proj

    def _norm_args(self, x: Tensor, update: bool = False) -> dict:
        """The op's norm arguments. With ``update`` the op moves the running statistics of the
        norms in training mode: ``running_means`` then also carries the norms'
        ``num_batches_tracked`` counters after the means (see ops/blocks.py)."""
        norms = self._norms()
        training = [bool(n.training or n.running_mean is None) for n in norms]

        def empty(dtype=torch.float32):
            return x.new_empty((0,), dtype=dtype)

        means = [n.running_mean if n.running_mean is not None else empty() for n in norms]
        if update:
            means += [n.num_batches_tracked if n.num_batches_tracked is not None else empty(torch.long)
                      for n in norms]
        return dict(
            bn_weights=[n.weight for n in norms], bn_biases=[n.bias for n in norms],
            running_means=means,
            running_vars=[n.running_var if n.running_var is not None else empty() for n in norms],
            training=training, eps=[float(n.eps) for n in norms])

    def _update_args(self) -> dict:
        """momentum (< 0: None, the cumulative average) and whether the op updates statistics."""
        norms = self._norms()
        update = any(n.training and n.running_mean is not None for n in norms)
        return dict(momentum=[-1.0 if n.momentum is None else float(n.momentum) for n in norms],
                    update_stats=update)

    def _fused_backend(self, x: Tensor) -> Optional[str]:
        """The fused backend this block runs ``x`` on, or None (it runs the reference)."""
        backend = block_backend(self.backend, x, self._kind())
        return None if backend == "reference" else backend

    def _kind(self) -> str:
        raise NotImplementedError

    def _needs_input_stats(self) -> bool:
        """Whether bn1 normalises with batch statistics (then the input's partials are useful)."""
        return bool(self.norm1.training or self.norm1.running_mean is None)

    def _fold_eval(self, x: Tensor, training: Sequence[bool]) -> bool:
        """Eval-mode folding applies when no norm trains and nothing needs a gradient."""
        if any(training):
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))

    def _check_counts(self, training: Sequence[bool], counts: Sequence[int], shape) -> None:
        """Batch statistics need more than one value per channel (PyTorch's own rule and message)."""
        for trains, count in zip(training, counts):
            if trains and count == 1:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input size {list(shape)} "
                    f"({type(self).__name__}: a norm sees one value per channel)")

    @staticmethod
    def _output_format(x: Tensor, out: Tensor) -> Tensor:
        # The op computes channels_last; an NCHW-contiguous input gets an NCHW output back.
        if x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
            return out.contiguous()
        return out


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
        return [self.norm1, self.norm2, self.norm3]

    def _conv_weights(self):
        return [self.conv1.weight, self.conv2.weight, self.conv3.weight]

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
        self._check_input(x)
        if self._fused_backend(x) is None:
            return super().forward(x)
        out, _ = self._forward_stats(x)
        return self._output_format(x, out)

    def _forward_stats(self, x: Tensor, in_stats: Optional[Tensor] = None, emit_stats: bool = False
                       ) -> tuple[Tensor, Optional[Tensor]]:
        """(channels_last output, statistics partials of the output or None) through the fused op;
        ``in_stats``: partials of ``x`` (from the previous block), replacing the block's own pass."""
        backend = self._fused_backend(x)
        xc, (w1, w2, w3), w_proj = self._prepare(x)
        upd = self._update_args()
        norm_args = self._norm_args(xc, upd["update_stats"])
        n, _, h, w = x.shape
        s1 = self.stride if self.stride_on == "1x1" else 1
        h2, w2_ = -(-h // self.stride), -(-w // self.stride)
        counts = (n * h * w, n * -(-h // s1) * -(-w // s1), n * h2 * w2_)
        self._check_counts(norm_args["training"], counts, x.shape)
        outs = block_ops.bottleneck_forward(
            xc, w1, w2, w3, w_proj, **norm_args, stride=self.stride, groups=self.groups,
            shortcut=self.shortcut, stride_on=self.stride_on,
            fold_eval=self._fold_eval(xc, norm_args["training"]), backend=backend, **upd,
            in_stats=in_stats, emit_stats=emit_stats)
        return outs[0], (outs[-1] if emit_stats else None)


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
        return [self.norm1, self.norm2]

    def _conv_weights(self):
        return [self.conv1.weight, self.conv2.weight]

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
        self._check_input(x)
        if self._fused_backend(x) is None:
            return super().forward(x)
        out, _ = self._forward_stats(x)
        return self._output_format(x, out)

    def _forward_stats(self, x: Tensor, in_stats: Optional[Tensor] = None, emit_stats: bool = False
                       ) -> tuple[Tensor, Optional[Tensor]]:
        """As ``FusedBottleneck._forward_stats``."""
        backend = self._fused_backend(x)
        xc, (w1, w2), w_proj = self._prepare(x)
        upd = self._update_args()
        norm_args = self._norm_args(xc, upd["update_stats"])
        n, _, h, w = x.shape
        counts = (n * h * w, n * -(-h // self.stride) * -(-w // self.stride))
        self._check_counts(norm_args["training"], counts, x.shape)
        outs = block_ops.basic_block_forward(
            xc, w1, w2, w_proj, **norm_args, stride=self.stride, groups=self.groups,
            shortcut=self.shortcut, fold_eval=self._fold_eval(xc, norm_args["training"]),
            backend=backend, **upd, in_stats=in_stats, emit_stats=emit_stats)
        return outs[0], (outs[-1] if emit_stats else None)
