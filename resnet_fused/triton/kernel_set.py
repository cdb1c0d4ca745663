"""The Triton backend's kernel set (``resnet_fused.kernel_set.KernelSet``): the Triton
launchers with this backend's launch-configuration choice (``configs.py``) applied."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernel_set import BNBackward, GradPrologue, SavedNorm, stats_dtype
from . import configs
from .bn_backward import bn_backward_apply, bn_backward_coefficients, relu_grad_sums
from .conv import bn_relu_conv
from .conv_backward import conv_dgrad, conv_wgrad
from .elementwise import bn_relu_apply
from .postact_elementwise import postact_out, postact_out_backward
from .postact_wgrad import plain_conv_wgrad
from .stats import bn_finalize, bn_finalize_stats, channel_stats_partials

__all__ = ["TRITON", "TritonKernels"]


def _conv_m(x_shape, weight_shape, stride: int) -> int:
    n, _, h, w = x_shape
    k = weight_shape[-1]
    return n * ((h + 2 * (k // 2) - k) // stride + 1) * ((w + 2 * (k // 2) - k) // stride + 1)


class TritonKernels:
    name = "triton"
    #: The conv kernel computes an eval-mode norm's affine from its running statistics itself
    #: (``scale_stats`` / ``proj_stats`` / ``post_stats`` keywords of ``conv``).
    affine_from_stats = True
    #: The conv kernel stores the post-activation closing relu(bn(y) + shortcut) itself
    #: (``postact_close`` keyword of ``conv``; a projection's norm on its own accumulator).
    postact_close = True

    def stats_partials(self, x: Tensor) -> Tensor:
        cfg = configs.stats_config(x.device)
        return channel_stats_partials(x, cfg.block_m, cfg.block_c)

    def stats_tiles(self, m: int, device: torch.device) -> int:
        """P of ``stats_partials`` over m rows."""
        return -(-m // configs.stats_config(device).block_m)

    def conv_stats_tiles(self, x_shape, weight_shape, stride: int, groups: int, dtype: torch.dtype,
                         device: torch.device) -> int:
        """P of the partials ``conv(..., emit_stats=True)`` returns (the fakes need it)."""
        c_out, cin_pg, k, _ = weight_shape
        m = _conv_m(x_shape, weight_shape, stride)
        return -(-m // configs.conv_config(m, c_out // groups, cin_pg * k * k, k, dtype, device).block_m)

    def finalize(self, part: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, **kwargs):
        """(mean, var, scale, shift); keywords of ``stats.bn_finalize_stats`` (running update)."""
        cfg = configs.stats_config(part.device)
        return bn_finalize(part, weight, bias, eps, block_p=cfg.block_p, block_c=cfg.block_c, **kwargs)

    def finalize_stats(self, part: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                       **kwargs) -> Tensor:
        """[5, C] (mean, var, invstd, scale, shift), the running update in the same launch."""
        device = part.device if part is not None else kwargs["running_mean"].device
        cfg = configs.stats_config(device)
        return bn_finalize_stats(part, weight, bias, eps, block_p=cfg.block_p, block_c=cfg.block_c, **kwargs)

    def conv(self, x: Tensor, weight: Tensor, **kwargs) -> tuple[Tensor, Optional[Tensor]]:
        c_out, cin_pg, k, _ = weight.shape
        m = _conv_m(x.shape, weight.shape, kwargs.get("stride", 1))
        config = configs.conv_config(m, c_out // kwargs.get("groups", 1), cin_pg * k * k, k, x.dtype, x.device)
        return bn_relu_conv(x, weight, config=config, **kwargs)

    def fuse_3x3(self, m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> bool:
        return configs.conv3x3_strategy(m, n, k, dtype, device) == "fused"

    def bn_relu_apply(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        return bn_relu_apply(x, scale, shift)

    def _backward_meta(self, grad: Tensor, direction: str, ksize: int, c_in: int, groups: int
                       ) -> tuple[configs.BackwardConfig, dict]:
        """The backward tiles for the conv whose output gradient is ``grad``, keyed (for the tuned
        table) by the forward GEMM's shape: m = N * H_out * W_out, n = C_out / groups,
        k = C_in / groups * ksize^2, as ``scripts/gpu_tune.py`` records it."""
        n_img, c_out, h_out, w_out = grad.shape
        cfg = configs.backward_config(grad.dtype, grad.device, direction=direction, ksize=ksize,
                                      m=n_img * h_out * w_out, n=c_out // groups,
                                      k=c_in // groups * ksize * ksize)
        return cfg, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def conv_dgrad(self, grad, weight, v, scale, shift, mean, invstd, **kwargs):
        groups = kwargs.get("groups", 1)
        cfg, meta = self._backward_meta(grad, "dgrad", weight.shape[-1], weight.shape[1] * groups, groups)
        return conv_dgrad(grad, weight, v, scale, shift, mean, invstd, **kwargs, **cfg.dgrad_meta(), **meta)

    def conv_wgrad(self, grad, v, scale, shift, **kwargs):
        cfg, meta = self._backward_meta(grad, "wgrad", kwargs.get("ksize", 1), v.shape[1], kwargs.get("groups", 1))
        return conv_wgrad(grad, v, scale, shift, **kwargs, **cfg.wgrad_meta(), **meta)

    def relu_grad_sums(self, grad, v, scale, shift, mean, invstd, extra=None):
        return relu_grad_sums(grad, v, scale, shift, mean, invstd, extra)

    def bn_backward_coefficients(self, part, weight, mean, invstd, count, training) -> BNBackward:
        return bn_backward_coefficients(part, weight, mean, invstd, count, training)

    def bn_backward_apply(self, g, v, coeff, shortcut_grad=None, shortcut_stride=1):
        return bn_backward_apply(g, v, coeff, shortcut_grad, shortcut_stride)

    def postact_out(self, y, scale, shift, sc, sc_scale=None, sc_shift=None):
        return postact_out(y, scale, shift, sc, sc_scale, sc_shift)

    def postact_out_backward(self, grad: Tensor, y: Tensor, norm: SavedNorm, sc: Tensor,
                             sc_norm: Optional[SavedNorm] = None):
        if sc_norm is None:
            return postact_out_backward(grad, y, norm.scale, norm.shift, norm.mean, norm.invstd, sc)
        return postact_out_backward(grad, y, norm.scale, norm.shift, norm.mean, norm.invstd, sc,
                                    sc_norm.scale, sc_norm.shift, sc_norm.mean, sc_norm.invstd)

    def plain_conv_wgrad(self, grad: Tensor, x: Tensor, weight: Tensor, *, stride: int,
                         prologue: Optional[GradPrologue]) -> Tensor:
        cfg = configs.backward_config(grad.dtype, grad.device)
        return plain_conv_wgrad(grad, x, ksize=weight.shape[-1], stride=stride, prologue=prologue,
                                stats_dtype=stats_dtype(grad.dtype), **cfg.wgrad_meta(),
                                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


TRITON = TritonKernels()
