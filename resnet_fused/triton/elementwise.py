"""BN-apply + ReLU as a standalone pass: the activation the hybrid 3x3 path feeds to cuDNN.

docs/design.md section 7 measured a naive implicit-GEMM 3x3 with the BN+ReLU prologue at 1.4-2.2x
cuDNN's conv time (every input element is transformed nine times on the operand's critical
path). The hybrid path writes relu(bn(y)) once (one read and one write of y), runs cuDNN's
convolution on it, and takes the output statistics in a separate pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import launch

__all__ = ["bn_relu_apply"]


@triton.jit
def _bn_relu_apply_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, M, C,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    scale = tl.load(scale_ptr + cols, mask=cols < C, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=cols < C, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(scale.dtype)
    y = tl.maximum(x * scale[None, :] + shift[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def bn_relu_apply(x: Tensor, scale: Tensor, shift: Tensor, block_m: int = 64, block_c: int = 64) -> Tensor:
    """relu(x * scale + shift) per channel of an (N, C, H, W) tensor, channels_last out."""
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    out = torch.empty_like(x, memory_format=torch.channels_last)
    m = n * h * w
    launch(_bn_relu_apply_kernel, (-(-m // block_m), -(-c // block_c)), x,
           x, scale, shift, out, m, c, BLOCK_M=block_m, BLOCK_C=block_c)
    return out
