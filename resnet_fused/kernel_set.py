"""The kernel contract: what a fused backend provides, and the types its primitives exchange.

The block orchestration (``resnet_fused.fused``) launches these primitives on whichever kernel
set the op layer hands it (``resnet_fused.triton.kernel_set.TRITON``,
``resnet_fused.cuda.kernel_set.CUDA``). This module imports nothing of the package, so both
backends and the orchestration depend on it and not on each other.

Layouts and conventions every implementation follows (docs/design.md sections 3 and 4):

* activations NHWC (``channels_last``), any 4-D input accepted and made NHWC;
* per-channel vectors (scale, shift, mean, invstd, BN-backward coefficients) fp32, fp64 for
  fp64 data;
* statistics partials ``[3, P, C]`` = per-tile (count, mean, M2) of the value as stored,
  merged per channel by Chan's formula in a fixed order (``finalize``);
* BN-backward partial sums ``[2, P, C]`` = per-tile (sum g', sum g' * xhat);
* a gradient operand's prologue is a :class:`GradPrologue`, dy = a * g' + b * y + c.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import Tensor

__all__ = ["Affine", "BNBackward", "GradPrologue", "KernelSet", "NormInputs", "SavedNorm", "SHORTCUT_NONE",
           "SHORTCUT_ADD", "SHORTCUT_PROJECTION", "as_dtype", "channels_last_weight", "stats_dtype"]

#: The forward conv's shortcut kinds: none, add (identity, or TF-slim's subsample x[:, :, ::s, ::s])
#: into the accumulator, projection (a second K-loop over relu(bn1(x)) times the 1x1 weights).
SHORTCUT_NONE, SHORTCUT_ADD, SHORTCUT_PROJECTION = 0, 1, 2


def channels_last_weight(weight: Tensor) -> bool:
    """Whether a weight is stored channels_last (a model after ``.to(memory_format=
    torch.channels_last)``; a 1x1 is both layouts at once): its gradient is made that way, so
    autograd's accumulation needs no layout copy."""
    return weight.shape[-1] > 1 and weight.is_contiguous(memory_format=torch.channels_last) \
        and not weight.is_contiguous()


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, returning ``t`` itself without the call where it has that dtype already
    (``Tensor.to`` costs about 2 us of host time even when it returns its input, and the launchers
    cast every data operand to the activation dtype on each launch)."""
    return t if t.dtype == dtype else t.to(dtype)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-channel vectors for ``dtype`` data: fp64 for fp64, else fp32 (16-bit
    scale/shift loses a large-mean channel's variance)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class NormInputs:
    """One BatchNorm's tensors as the op receives them; ``update``: a training norm moves its
    running statistics (and ``num_batches_tracked``) inside its finalize launch."""

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor
    training: bool
    eps: float
    num_batches_tracked: Optional[Tensor] = None
    momentum: Optional[float] = 0.1
    update: bool = False


class Affine:
    """A norm's affine as the kernels take it.

    Either ``stats`` [5, C] = (mean, biased var, invstd, scale, shift) from a finalize launch
    (train mode, or a frozen norm whose statistics the backward needs), or, for an eval-mode
    norm on a kernel set that can (``affine_from_stats``), the norm itself: the conv kernel then
    computes scale and shift per tile from (weight, bias, running mean, running var, eps), and
    no launch is spent on it.
    """

    def __init__(self, stats: Optional[Tensor] = None, norm: Optional[NormInputs] = None):
        self.stats, self.norm = stats, norm

    @property
    def mean(self) -> Tensor:
        return self.stats[0]

    @property
    def var(self) -> Tensor:
        return self.stats[1]

    @property
    def scale(self) -> Tensor:
        return self.stats[3]

    @property
    def shift(self) -> Tensor:
        return self.stats[4]

    def args(self, scale: str = "scale", shift: str = "shift", stats: str = "scale_stats") -> dict:
        """The conv keywords of this affine: (scale, shift), or the norm's (weight, bias) with its
        running statistics for the kernel to fold."""
        if self.stats is not None:
            return {scale: self.stats[3], shift: self.stats[4]}
        n = self.norm
        return {scale: n.weight, shift: n.bias, stats: (n.running_mean, n.running_var, n.eps)}


@dataclass
class SavedNorm:
    """One BatchNorm as the backward needs it: parameters and the statistics the forward used,
    ``stats`` [5, C] (or flat [5 * C]) = (mean, biased var, invstd, scale, shift) as the forward's
    finalize wrote them (fp32, fp64 for fp64 data; batch statistics in train mode, running ones
    otherwise), so the backward launches nothing to rebuild them."""

    weight: Tensor
    bias: Tensor
    stats: Tensor
    eps: float
    training: bool

    def __post_init__(self) -> None:
        self.mean, self.var, self.invstd, self.scale, self.shift = self.stats.view(5, -1).unbind(0)

    @classmethod
    def from_mean_var(cls, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float,
                      training: bool) -> "SavedNorm":
        """From a saved (mean, biased var) pair: invstd, scale and shift rebuilt per channel."""
        invstd = torch.rsqrt(var + eps)
        scale = weight.to(var.dtype) * invstd
        return cls(weight, bias, torch.stack([mean, var, invstd, scale, bias.to(var.dtype) - mean * scale]),
                   eps, training)


class GradPrologue:
    """The BN-backward apply on a gradient operand: dy = a * g' + b * y + c (per channel)."""

    def __init__(self, y: Tensor, a: Tensor, b: Tensor, c: Tensor):
        self.y, self.a, self.b, self.c = y.contiguous(memory_format=torch.channels_last), a, b, c


class BNBackward:
    """dgamma, dbeta and the coefficients of dv = A g' + B v + C (fp32, per channel)."""

    def __init__(self, dgamma: Tensor, dbeta: Tensor, a: Tensor, b: Tensor, c: Tensor):
        self.dgamma, self.dbeta, self.a, self.b, self.c = dgamma, dbeta, a, b, c


class KernelSet(Protocol):
    """The primitives of one fused backend. See the module docstring for layouts."""

    name: str

    def stats_partials(self, x: Tensor) -> Tensor:
        """Statistics partials [3, P, C] of x."""

    #: Whether ``conv`` computes an eval-mode norm's affine itself (keywords ``scale_stats``,
    #: ``proj_stats``, ``post_stats`` = (running_mean, running_var, eps), with the norm's weight and
    #: bias in the matching scale/shift slots).
    affine_from_stats: bool

    #: True: ``conv(..., postact_close=True)`` stores the post-activation closing
    #: ``relu(y * post_scale + post_shift + sc)`` in its epilogue, sc the identity shortcut or the
    #: projection's second K-loop over the raw input under its own affine (``proj_scale`` /
    #: ``proj_shift`` / ``proj_stats``). Every kernel set has it (the eval forward of a
    #: post-activation block needs it).
    postact_close: bool

    def stats_tiles(self, m: int, device: torch.device) -> int:
        """P of ``stats_partials`` over m rows."""

    def conv_stats_tiles(self, x_shape, weight_shape, stride: int, groups: int, dtype: torch.dtype,
                         device: torch.device) -> int:
        """P of the partials ``conv(..., emit_stats=True)`` returns."""

    def finalize(self, part: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 eps: float, **kwargs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(mean, biased var, scale, shift) per channel from partials; optional keywords as
        ``finalize_stats`` (the running-statistics update)."""

    def finalize_stats(self, part: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                       eps: float, **kwargs) -> Tensor:
        """[5, C] = (mean, biased var, invstd, scale, shift). Keywords: running_mean, running_var,
        num_batches_tracked, momentum (None: cumulative), update (move the running statistics,
        count the batch), from_running (statistics from the running buffers; ``part`` None),
        dtype (with from_running)."""

    def conv(self, x: Tensor, weight: Tensor, **kwargs) -> tuple[Tensor, Optional[Tensor]]:
        """The fused forward conv (keywords of ``resnet_fused.triton.conv.bn_relu_conv``)."""

    def fuse_3x3(self, m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether a 3x3 with a BN+ReLU prologue runs the fused kernel (else BN+ReLU pass + ATen)."""

    def bn_relu_apply(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """relu(x * scale + shift), NHWC."""

    def conv_dgrad(self, grad: Tensor, weight: Tensor, v: Tensor, scale: Tensor, shift: Tensor,
                   mean: Tensor, invstd: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """(masked input gradient g', partial sums [2, P, C_in]); keywords stride, groups,
        prologue, second_grad, second_weight, second_stride."""

    def conv_wgrad(self, grad: Tensor, v: Tensor, scale: Tensor, shift: Tensor, **kwargs) -> Tensor:
        """dW; keywords ksize, stride, groups, prologue, channels_last (a request to return dW
        channels_last, as a channels_last weight is stored; an implementation may ignore it)."""

    def relu_grad_sums(self, grad: Tensor, v: Tensor, scale: Tensor, shift: Tensor, mean: Tensor,
                       invstd: Tensor, extra: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(g' = (grad + extra) * [v * scale + shift > 0], partial sums [2, P, C])."""

    def bn_backward_coefficients(self, part: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor,
                                 count: int, training: bool) -> BNBackward:
        """dgamma, dbeta and A, B, C from the partial sums."""

    def bn_backward_apply(self, g: Tensor, v: Tensor, coeff: BNBackward, shortcut_grad: Optional[Tensor] = None,
                          shortcut_stride: int = 1) -> Tensor:
        """dv = A g' + B v + C (+ the shortcut's gradient at the strided positions)."""

    # The post-activation unit's two ends: its closing pass relu(bn(y) + shortcut) and the
    # weight gradient of its first conv, whose input is the raw block input (no BN+ReLU).

    def postact_out(self, y: Tensor, scale: Tensor, shift: Tensor, sc: Tensor, sc_scale: Optional[Tensor] = None,
                    sc_shift: Optional[Tensor] = None) -> Tensor:
        """relu(y * scale + shift + sc) (identity shortcut), or with the projection's affine
        relu(y * scale + shift + sc * sc_scale + sc_shift); per channel, NHWC, y's dtype."""

    def postact_out_backward(self, grad: Tensor, y: Tensor, norm: SavedNorm, sc: Tensor,
                             sc_norm: Optional[SavedNorm] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(g' = grad * [z > 0], BN-backward partial sums [2, P, C] over y, the same over the
        projection's output ``sc`` when ``sc_norm`` is given, else None)."""

    def plain_conv_wgrad(self, grad: Tensor, x: Tensor, weight: Tensor, *, stride: int,
                         prologue: Optional[GradPrologue]) -> Tensor:
        """dW of ``conv2d(x, weight, stride, padding=k // 2)`` from its output gradient (the
        BN-backward ``prologue`` applied to it first), x taken as is (no BN+ReLU)."""
