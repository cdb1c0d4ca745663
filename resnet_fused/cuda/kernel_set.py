"""The CUDA C++ backend's kernel set (``resnet_fused.kernel_set.KernelSet``).

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

from .. import _extension, reference
from ..kernel_set import BNBackward, GradPrologue, SavedNorm
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


def _update(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor], mean: Tensor,
            var: Tensor, count: int, momentum: Optional[float]) -> None:
    """nn.BatchNorm2d's running update as few torch ops (``count`` = values per channel, a host
    number from the shapes; no host sync): an empty batch moves nothing and still counts."""
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if count == 0:
            return
        ct = torch.float64 if running_mean.dtype == torch.float64 else torch.float32
        # The cumulative factor in fp32 from the device counter (issue 12), else the momentum.
        factor = 1.0 / num_batches_tracked.to(ct) if momentum is None else momentum
        for buf, new in ((running_mean, mean), (running_var, var * (count / max(count - 1, 1)))):
            if buf.dtype == ct:
                buf.lerp_(new.to(ct), factor)
            else:
                buf.copy_(buf.to(ct).lerp_(new.to(ct), factor))


class CudaKernels:
    name = "cuda"
    #: Eval-mode affines are torch ops here (the C++ conv takes scale/shift only).
    affine_from_stats = False

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

    def _finalize(self, part, weight, bias, eps, *, running_mean=None, running_var=None, num_batches_tracked=None,
                  momentum=0.1, update=False, from_running=False, dtype=None, count=None) -> tuple[Tensor, ...]:
        if from_running:
            ct = dtype if dtype is not None else reference.stats_dtype(running_mean.dtype)
            mean, var = running_mean.to(ct), running_var.to(ct)
        else:
            mean, var = merge_partials(part)
            if update and running_mean is not None and running_mean.numel() > 0:
                if count is None:
                    raise ValueError("the CUDA kernel set's running update needs count (values per channel)")
                _update(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)
        invstd = torch.rsqrt(var + eps)
        scale = invstd * weight.to(invstd.dtype) if weight is not None else invstd
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.to(shift.dtype)
        return mean, var, invstd, scale, shift

    def finalize_stats(self, part: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                       **kwargs) -> Tensor:
        """[5, C] (mean, var, invstd, scale, shift); the running update (``update``) as torch ops."""
        return torch.stack(self._finalize(part, weight, bias, eps, **kwargs))

    def finalize(self, part: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, **kwargs):
        """(mean, var, scale, shift), separate tensors."""
        mean, var, _, scale, shift = self._finalize(part, weight, bias, eps, **kwargs)
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
        # The C++ wgrad writes PyTorch's contiguous layout; the op converts a channels_last
        # weight's gradient (ops/blocks.py: _like_weight).
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

    # The post-activation methods are composed from the C++ kernels above (and ATen for one
    # weight gradient) until ``kernels.py`` has one C++ kernel for each:
    # * closing pass: ``bn_backward_apply`` computes z = A y + B sc + C (both affines at once),
    #   then ``bn_relu_apply`` the ReLU: two launches and one extra write + read of z;
    # * its backward: z again, ``relu_grad_sums`` for the mask, then ``relu_grad_sums`` with an
    #   always-true mask once per norm for the sums over y (and the projection's output);
    # * the weight gradient over the raw input: dy materialised by ``bn_backward_apply``, then
    #   ATen's convolution backward.

    def _postact_z(self, y, scale, shift, sc, sc_scale, sc_shift):
        b = sc_scale if sc_scale is not None else torch.ones_like(scale)
        c = shift + sc_shift if sc_shift is not None else shift
        return self.bn_backward_apply(y, sc, BNBackward(None, None, scale, b, c))

    def postact_out(self, y, scale, shift, sc, sc_scale=None, sc_shift=None):
        z = self._postact_z(y, scale, shift, sc, sc_scale, sc_shift)
        return self.bn_relu_apply(z, torch.ones_like(scale), torch.zeros_like(shift))

    def postact_out_backward(self, grad: Tensor, y: Tensor, norm: SavedNorm, sc: Tensor,
                             sc_norm: Optional[SavedNorm] = None):
        z = self._postact_z(y, norm.scale, norm.shift, sc, sc_norm.scale if sc_norm else None,
                            sc_norm.shift if sc_norm else None)
        one, zero = torch.ones_like(norm.scale), torch.zeros_like(norm.scale)
        g, _ = self.relu_grad_sums(grad, z, one, zero, zero, zero)
        del z
        _, part = self.relu_grad_sums(g, y, zero, one, norm.mean, norm.invstd)  # mask always true
        sc_part = None
        if sc_norm is not None:
            _, sc_part = self.relu_grad_sums(g, sc, zero, one, sc_norm.mean, sc_norm.invstd)
        return g, part, sc_part

    def plain_conv_wgrad(self, grad: Tensor, x: Tensor, weight: Tensor, *, stride: int,
                         prologue: Optional[GradPrologue]) -> Tensor:
        dy = self.bn_backward_apply(grad, prologue.y, prologue) if prologue is not None else grad
        pad = weight.shape[-1] // 2
        return torch.ops.aten.convolution_backward(
            dy, x, weight.to(dy.dtype), None, [stride, stride], [pad, pad], [1, 1], False, [0, 0], 1,
            [False, True, False])[1]


CUDA = CudaKernels()
