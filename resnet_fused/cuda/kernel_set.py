"""The CUDA C++ backend's kernel set (``resnet_fused.fused.kernel_set.KernelSet``).

Every pass over activations is a C++ kernel of ``resnet_fused._C`` (``kernels.py``): the fused
convs (the 3x3 always fused: there is no hybrid here), dgrad, wgrad, the statistics and the
elementwise BN/ReLU passes. The two per-channel reductions over partials, ``finalize`` ([3, P, C]
-> mean, var, scale, shift) and ``bn_backward_coefficients`` ([2, P, C] -> dgamma, dbeta, A, B,
C), touch P x C numbers (P = N*H*W / 64) and run as a few torch ops: fixed-order reductions,
deterministic, no host synchronisation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..fused.kernel_set import BNBackward
from . import kernels

__all__ = ["CUDA", "CudaKernels", "merge_partials"]


def merge_partials(part: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, biased var) per channel from per-tile (count, mean, M2) partials [3, P, C]:
    Chan's merge in closed form, M2 = sum M2_p + sum n_p (mean_p - mean)^2."""
    count, tile_mean, m2 = part.unbind(0)
    total = count.sum(0)
    mean = (count * tile_mean).sum(0) / total
    var = (m2.sum(0) + (count * (tile_mean - mean).square()).sum(0)) / total
    return mean, var


class CudaKernels:
    name = "cuda"

    def stats_partials(self, x: Tensor) -> Tensor:
        return kernels.channel_stats_partials(x)

    def finalize(self, part: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
        mean, var = merge_partials(part)
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = scale * weight.to(scale.dtype)
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.to(shift.dtype)
        return mean, var, scale, shift

    def conv(self, x: Tensor, weight: Tensor, **kwargs) -> tuple[Tensor, Optional[Tensor]]:
        return kernels.bn_relu_conv(x, weight, **kwargs)

    def fuse_3x3(self, m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> bool:
        return True

    def bn_relu_apply(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        return kernels.bn_relu_apply(x, scale, shift)

    def conv_dgrad(self, grad, weight, v, scale, shift, mean, invstd, **kwargs):
        return kernels.conv_dgrad(grad, weight, v, scale, shift, mean, invstd, **kwargs)

    def conv_wgrad(self, grad, v, scale, shift, **kwargs):
        return kernels.conv_wgrad(grad, v, scale, shift, **kwargs)

    def relu_grad_sums(self, grad, v, scale, shift, mean, invstd, extra=None):
        return kernels.relu_grad_sums(grad, v, scale, shift, mean, invstd, extra)

    def bn_backward_coefficients(self, part, weight, mean, invstd, count, training) -> BNBackward:
        dbeta, dgamma = part[0].sum(0), part[1].sum(0)
        a = invstd * weight.to(invstd.dtype) if weight is not None else invstd.clone()
        if training:
            b = -a * invstd * dgamma / count
            c = -a * dbeta / count - b * mean
        else:
            b, c = torch.zeros_like(a), torch.zeros_like(a)
        return BNBackward(dgamma, dbeta, a, b, c)

    def bn_backward_apply(self, g, v, coeff, shortcut_grad=None, shortcut_stride=1):
        return kernels.bn_backward_apply(g, v, coeff, shortcut_grad, shortcut_stride)


CUDA = CudaKernels()
