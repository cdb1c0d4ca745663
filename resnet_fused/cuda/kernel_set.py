"""The CUDA C++ backend's kernel set (``resnet_fused.kernel_set.KernelSet``).

Every pass over activations is a C++ kernel of ``resnet_fused._C`` (``kernels.py``): the fused
convs (the 3x3 always fused: there is no hybrid here), dgrad, wgrad, the statistics and the
elementwise BN/ReLU passes, and the two per-channel reductions over partials, ``finalize`` ([3, P, C]
-> mean, var, invstd, scale, shift with the running update) and ``bn_backward_coefficients``
([2, P, C] -> dgamma, dbeta, A, B, C): one C++ op each, split over many blocks with a fixed merge
order (bitwise reproducible, no host synchronisation).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _extension
from ..kernel_set import BNBackward, GradPrologue, SavedNorm, channels_last_weight
from . import kernels

__all__ = ["CUDA", "CudaKernels"]


class CudaKernels:
    name = "cuda"
    #: Eval-mode affines are formed inside the C++ conv kernels from the norm's running statistics.
    affine_from_stats = True
    #: The closing conv of a post-activation block (eval) stores relu(bn(y) + shortcut) itself.
    postact_close = True

    def stats_partials(self, x: Tensor) -> Tensor:
        return kernels.channel_stats_partials(x)

    def stats_tiles(self, m: int, device: torch.device) -> int:
        return -(-m // 64)

    def conv_stats_tiles(self, x_shape, weight_shape, stride: int, groups: int, dtype: torch.dtype,
                         device: torch.device) -> int:
        n, _, h, w = x_shape
        k = weight_shape[-1]
        pad = k // 2
        return _extension.conv_fwd_tiles_m(n, (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1, k)

    def finalize_stats(self, part: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                       **kwargs) -> Tensor:
        """[5, C] (mean, var, invstd, scale, shift) and, with ``update``, the running update: one C++ op."""
        return kernels.finalize_stats(part, weight, bias, eps, **kwargs)

    def finalize(self, part: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, **kwargs):
        """(mean, var, scale, shift), separate tensors."""
        mean, var, _, scale, shift = kernels.finalize_stats(part, weight, bias, eps, **kwargs).unbind(0)
        return mean, var, scale, shift

    def conv(self, x: Tensor, weight: Tensor, **kwargs) -> tuple[Tensor, Optional[Tensor]]:
        return kernels.bn_relu_conv(x, weight, **kwargs)

    def fuse_3x3(self, m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> bool:
        return True

    def bn_relu_apply(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        return kernels.bn_relu_apply(x, scale, shift)

    def conv_dgrad(self, grad, weight, v, scale, shift, mean, invstd, **kwargs):
        return kernels.conv_dgrad(grad, weight, v, scale, shift, mean, invstd, **kwargs)

    def conv_wgrad(self, grad, v, scale, shift, channels_last: bool = False, **kwargs):
        return kernels.conv_wgrad(grad, v, scale, shift, channels_last=channels_last, **kwargs)

    def relu_grad_sums(self, grad, v, scale, shift, mean, invstd, extra=None):
        return kernels.relu_grad_sums(grad, v, scale, shift, mean, invstd, extra)

    def bn_backward_coefficients(self, part, weight, mean, invstd, count, training) -> BNBackward:
        return kernels.bn_backward_coefficients(part, weight, mean, invstd, count, training)

    def bn_backward_apply(self, g, v, coeff, shortcut_grad=None, shortcut_stride=1):
        return kernels.bn_backward_apply(g, v, coeff, shortcut_grad, shortcut_stride)

    def postact_out(self, y, scale, shift, sc, sc_scale=None, sc_shift=None):
        return kernels.postact_out(y, scale, shift, sc, sc_scale, sc_shift)

    def postact_out_backward(self, grad: Tensor, y: Tensor, norm: SavedNorm, sc: Tensor,
                             sc_norm: Optional[SavedNorm] = None):
        if sc_norm is None:
            return kernels.postact_out_backward(grad, y, norm.scale, norm.shift, norm.mean, norm.invstd, sc)
        return kernels.postact_out_backward(grad, y, norm.scale, norm.shift, norm.mean, norm.invstd, sc,
                                            sc_norm.scale, sc_norm.shift, sc_norm.mean, sc_norm.invstd)

    def plain_conv_wgrad(self, grad: Tensor, x: Tensor, weight: Tensor, *, stride: int,
                         prologue: Optional[GradPrologue]) -> Tensor:
        # A channels_last 3x3 weight gets its gradient in its own layout (no copy in the op).
        return kernels.plain_conv_wgrad(grad, x, ksize=weight.shape[-1], stride=stride, prologue=prologue,
                                        channels_last=channels_last_weight(weight))


CUDA = CudaKernels()
