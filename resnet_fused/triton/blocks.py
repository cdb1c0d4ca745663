"""Forward of whole pre-activation blocks from the fused Triton kernels (launcher level).

Bottleneck, train mode (DESIGN section 3), one kernel per convolution:

    K0  partials of x                -> bn1 (mean, var, scale, shift)
    K1  y1 = conv1x1(relu(bn1(x)))    epilogue: partials of y1 -> bn2
    K2  y2 = conv3x3(relu(bn2(y1)))   epilogue: partials of y2 -> bn3
    K3  out = conv1x1(relu(bn3(y2))) + shortcut   (projection: a second K-loop over relu(bn1(x)))

Eval mode folds bn2 into K1's epilogue and bn3 into K2's (each stores the next conv's activated
input); bn1 stays in K1's prologue because the raw x feeds the identity shortcut. A norm that is
not training (eval or frozen) uses its running statistics as constants.

No autograd here: ``ops/blocks.py`` registers the op, its fake and its backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from . import configs
from .conv import SHORTCUT_ADD, SHORTCUT_PROJECTION, bn_relu_conv
from .elementwise import bn_relu_apply
from .stats import bn_finalize, channel_stats_partials, stats_dtype

__all__ = ["NormInputs", "bottleneck_forward", "basic_block_forward"]

_SHORTCUT_CODES = {"identity": SHORTCUT_ADD, "subsample": SHORTCUT_ADD, "projection": SHORTCUT_PROJECTION}


@dataclass
class NormInputs:
    """One BatchNorm's tensors as the op receives them."""

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor
    training: bool
    eps: float


@dataclass
class _Affine:
    """The statistics a norm used (fp32) and its affine form."""

    mean: Tensor
    var: Tensor
    scale: Tensor
    shift: Tensor


def _affine_from_partials(part: Tensor, norm: NormInputs) -> _Affine:
    cfg = configs.stats_config(part.device)
    mean, var, scale, shift = bn_finalize(part, norm.weight, norm.bias, norm.eps,
                                          block_p=cfg.block_p, block_c=cfg.block_c)
    return _Affine(mean, var, scale, shift)


def _affine_from_running(norm: NormInputs, data_dtype: torch.dtype) -> _Affine:
    ct = stats_dtype(data_dtype)
    mean = norm.running_mean.to(ct)
    var = norm.running_var.to(ct)
    scale, shift = reference.bn_scale_shift(mean, var, norm.weight.to(ct), norm.bias.to(ct), norm.eps)
    return _Affine(mean.clone(), var.clone(), scale, shift)


def _input_affine(x: Tensor, norm: NormInputs) -> _Affine:
    if not norm.training:
        return _affine_from_running(norm, x.dtype)
    cfg = configs.stats_config(x.device)
    return _affine_from_partials(channel_stats_partials(x, cfg.block_m, cfg.block_c), norm)


def _conv(x: Tensor, weight: Tensor, **kwargs) -> tuple[Tensor, Optional[Tensor]]:
    """bn_relu_conv with the selector's config for this GEMM shape."""
    n, _, h, w = x.shape
    c_out, cin_pg, k, _ = weight.shape
    stride = kwargs.get("stride", 1)
    m = n * ((h + 2 * (k // 2) - k) // stride + 1) * ((w + 2 * (k // 2) - k) // stride + 1)
    config = configs.conv_config(m, c_out // kwargs.get("groups", 1), cin_pg * k * k, k, x.dtype, x.device)
    return bn_relu_conv(x, weight, config=config, **kwargs)


def _conv3x3(x: Tensor, weight: Tensor, affine: Optional[_Affine], *, stride: int, groups: int,
             emit_stats: bool, post: Optional[_Affine] = None) -> tuple[Tensor, Optional[Tensor], bool]:
    """A 3x3 conv without shortcut: the fused kernel or the hybrid, as the selector says.

    Returns (output, statistics partials, whether ``post`` (the next BN + ReLU, eval mode) was
    folded into the output). The fused kernel folds it into its epilogue; the hybrid's cuDNN
    conv has no epilogue, so the caller applies ``post`` in the next conv's prologue instead.
    """
    n, _, h, w = x.shape
    c_out, cin_pg = weight.shape[:2]
    m = n * ((h - 1) // stride + 1) * ((w - 1) // stride + 1)
    strategy = configs.conv3x3_strategy(m, c_out // groups, cin_pg * 9, x.dtype, x.device)
    if strategy == "fused":
        out, part = _conv(x, weight, scale=affine.scale if affine else None,
                          shift=affine.shift if affine else None, stride=stride, groups=groups,
                          emit_stats=emit_stats, post_scale=post.scale if post else None,
                          post_shift=post.shift if post else None)
        return out, part, post is not None
    act = bn_relu_apply(x, affine.scale, affine.shift) if affine is not None else x
    y = F.conv2d(act, weight.to(act.dtype), stride=stride, padding=1, groups=groups)
    y = y.contiguous(memory_format=torch.channels_last)
    part = None
    if emit_stats:
        cfg = configs.stats_config(y.device)
        part = channel_stats_partials(y, cfg.block_m, cfg.block_c)
    return y, part, False


def _next_affine(part: Optional[Tensor], norm: NormInputs, data_dtype: torch.dtype) -> _Affine:
    return _affine_from_partials(part, norm) if norm.training else _affine_from_running(norm, data_dtype)


def _shortcut_args(x: Tensor, a1: _Affine, kind: str, stride: int, w_proj: Optional[Tensor]) -> dict:
    if kind == "projection":
        return dict(shortcut=x, shortcut_kind=SHORTCUT_PROJECTION, shortcut_stride=stride,
                    proj_weight=w_proj, proj_scale=a1.scale, proj_shift=a1.shift)
    return dict(shortcut=x, shortcut_kind=_SHORTCUT_CODES[kind], shortcut_stride=stride)


def _prologue(affine: Optional[_Affine]) -> dict:
    return dict(scale=affine.scale, shift=affine.shift) if affine is not None else {}


def _post(affine: Optional[_Affine]) -> dict:
    return dict(post_scale=affine.scale, post_shift=affine.shift) if affine is not None else {}


def bottleneck_forward(
    x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, w_proj: Optional[Tensor],
    norms: Sequence[NormInputs], *, stride: int, groups: int, shortcut: str, stride_on: str,
    fold_eval: bool,
) -> tuple[Tensor, list[Tensor], list[_Affine]]:
    """The bottleneck forward: (output, [y1, y2] for the backward (none when folded), affines).

    With ``fold`` (eval, nothing training), bn2 and bn3 are constants applied in the producing
    conv's epilogue, so K1 stores relu(bn2(y1)) and K2 relu(bn3(y2)) (when K2 has an epilogue:
    the hybrid 3x3 leaves bn3 to K3's prologue).
    """
    x = x.contiguous(memory_format=torch.channels_last)  # read once per kernel, NHWC
    s1, s2 = (stride, 1) if stride_on == "1x1" else (1, stride)
    bn1, bn2, bn3 = norms
    fold = fold_eval and not (bn1.training or bn2.training or bn3.training)
    a1 = _input_affine(x, bn1)

    const2 = _affine_from_running(bn2, x.dtype) if fold else None
    y1, part1 = _conv(x, w1, **_prologue(a1), stride=s1, emit_stats=bn2.training, **_post(const2))
    a2 = const2 or _next_affine(part1, bn2, x.dtype)

    const3 = _affine_from_running(bn3, x.dtype) if fold else None
    y2, part2, folded3 = _conv3x3(y1, w2, None if fold else a2, stride=s2, groups=groups,
                                  emit_stats=bn3.training, post=const3)
    a3 = const3 or _next_affine(part2, bn3, x.dtype)

    out, _ = _conv(y2, w3, **_prologue(None if folded3 else a3),
                   **_shortcut_args(x, a1, shortcut, stride, w_proj))
    return out, ([] if fold else [y1, y2]), [a1, a2, a3]


def basic_block_forward(
    x: Tensor, w1: Tensor, w2: Tensor, w_proj: Optional[Tensor],
    norms: Sequence[NormInputs], *, stride: int, groups: int, shortcut: str, fold_eval: bool,
) -> tuple[Tensor, list[Tensor], list[_Affine]]:
    """The basic block forward: two 3x3 convs, the second with the fused shortcut; returns
    (output, [y1] (none when folded), affines)."""
    x = x.contiguous(memory_format=torch.channels_last)
    bn1, bn2 = norms
    fold = fold_eval and not (bn1.training or bn2.training)
    a1 = _input_affine(x, bn1)

    const2 = _affine_from_running(bn2, x.dtype) if fold else None
    y1, part1, folded2 = _conv3x3(x, w1, a1, stride=stride, groups=groups, emit_stats=bn2.training,
                                  post=const2)
    a2 = const2 or _next_affine(part1, bn2, x.dtype)

    out, _ = _conv(y1, w2, **_prologue(None if folded2 else a2), groups=groups,
                   **_shortcut_args(x, a1, shortcut, stride, w_proj))
    return out, ([] if fold else [y1]), [a1, a2]
