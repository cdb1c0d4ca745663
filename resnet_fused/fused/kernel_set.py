"""What a fused backend provides: the kernel primitives the block orchestration launches.

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

from typing import Optional, Protocol

import torch
from torch import Tensor

__all__ = ["BNBackward", "GradPrologue", "KernelSet", "SHORTCUT_NONE", "SHORTCUT_ADD", "SHORTCUT_PROJECTION"]

#: The forward conv's shortcut kinds: none, add (identity, or TF-slim's subsample x[:, :, ::s, ::s])
#: into the accumulator, projection (a second K-loop over relu(bn1(x)) times the 1x1 weights).
SHORTCUT_NONE, SHORTCUT_ADD, SHORTCUT_PROJECTION = 0, 1, 2


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
