"""Launchers of the C++ fused convolution GEMMs, with the Triton launchers' keyword signatures.

Each launcher casts the weights (and other data operands) to the activation's dtype, as the
Triton launchers do, calls one ``torch.ops.resnet_fused.*_cuda`` op and records the launch, so
tests can assert that the C++ kernels ran rather than a fallback. The ops check their inputs
(csrc/bindings.cpp), accept NCHW or channels_last tensors and return channels_last ones.

Layouts: ``partials`` of ``bn_relu_conv`` are [3, P, C_out] (count, mean, M2) per M tile, with
P = ``_extension.conv_fwd_tiles_m`` (ceil(M / 64) for a 1x1; one tile per 8x8 block of output
pixels of one image for a 3x3), and ``sums`` of ``conv_dgrad`` [2, P, C_in] (sum g', sum g' * xhat),
P = ceil(M / 64), in fp32 (fp64 for fp64 data): per-tile states with their own counts, as the
Triton kernels' are, so ``bn_finalize`` and ``bn_backward_coefficients`` merge either.

The 3x3 forward has two C++ kernels (csrc/cuda/conv_fwd.cu, conv_fwd_halo.cu): ``conv3x3_algo``
(or the environment variable RESNET_FUSED_CUDA_CONV3X3, read at each call) picks "auto" (the
halo-staged kernel for stride 1 and 2, the C++ launcher's rule), "per_tap" or "halo".
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter
from types import SimpleNamespace
from typing import Iterator, Optional

import torch
from torch import Tensor

from .. import _extension
from ..kernel_set import SHORTCUT_ADD, SHORTCUT_NONE, SHORTCUT_PROJECTION, BNBackward, GradPrologue, as_dtype

__all__ = ["SHORTCUT_NONE", "SHORTCUT_ADD", "SHORTCUT_PROJECTION", "GradPrologue", "bn_relu_conv", "conv_dgrad",
           "conv_wgrad", "bn_relu_apply", "relu_grad_sums", "bn_backward_apply", "channel_stats_partials",
           "finalize_stats", "bn_backward_coefficients", "postact_out", "postact_out_backward", "plain_conv_wgrad",
           "launch_counts", "reset_launch_counts", "skip_kernels"]


_LAUNCHES: Counter = Counter()


def launch_counts() -> Counter:
    """A copy of the per-op launch counts since the last reset (keys: the op names)."""
    return Counter(_LAUNCHES)


def reset_launch_counts() -> None:
    _LAUNCHES.clear()


#: Whether the innermost :func:`skip_kernels` is active.
_SKIP: list[bool] = [False]
_FAKE_OPS: Optional[SimpleNamespace] = None


def _ops():
    _extension.require("the CUDA backend (resnet_fused.cuda)")
    if _SKIP[-1]:
        return _FAKE_OPS
    return torch.ops.resnet_fused


@contextlib.contextmanager
def skip_kernels() -> Iterator[None]:
    """Call each C++ op's registered fake instead of the op: the outputs have the op's shapes,
    dtypes and layouts and stay uninitialised, and the launch is still counted. For host-overhead
    measurement (``benchmarks/host_overhead.py``): what remains is the package's host time for
    the CUDA backend (orchestration, casts, argument packing, allocation), without the op's own
    dispatch, input checks and ``cudaLaunchKernel`` (a few microseconds each on a GPU host)."""
    global _FAKE_OPS
    _extension.require("the CUDA backend (resnet_fused.cuda)")
    if _FAKE_OPS is None:
        _FAKE_OPS = SimpleNamespace(**_extension.FAKES)
    _SKIP.append(True)
    try:
        yield
    finally:
        _SKIP.pop()


# ConvFwdAlgo of csrc/cuda/conv_fused.h.
CONV3X3_ALGOS = {"auto": 0, "per_tap": 1, "halo": 2}
CONV3X3_ALGO_ENV = "RESNET_FUSED_CUDA_CONV3X3"


def _conv3x3_algo(name: Optional[str]) -> int:
    name = name if name is not None else (os.environ.get(CONV3X3_ALGO_ENV, "").strip() or "auto")
    if name not in CONV3X3_ALGOS:
        raise ValueError(f"3x3 forward algorithm must be one of {sorted(CONV3X3_ALGOS)} (argument conv3x3_algo or "
                         f"{CONV3X3_ALGO_ENV}), got {name!r}")
    return CONV3X3_ALGOS[name]


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else as_dtype(t, dtype)


def _vec(t: Optional[Tensor]) -> Optional[Tensor]:
    """A norm's per-channel buffer or parameter as the C++ ops take it (float32 or float64)."""
    return t if t is None or t.dtype in (torch.float32, torch.float64) else t.float()


def _stats(stats: Optional[tuple]):
    """(mean, var, eps) of an eval-mode norm read from its buffers, or (None, None, 0.0)."""
    if stats is None:
        return None, None, 0.0
    mean, var, eps = stats
    return _vec(mean), _vec(var), float(eps)


def _prologue(prologue, dtype: torch.dtype):
    if prologue is None:
        return None, None, None, None
    return as_dtype(prologue.y, dtype), prologue.a, prologue.b, prologue.c


def bn_relu_conv(
    x: Tensor,
    weight: Tensor,
    *,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    stride: int = 1,
    groups: int = 1,
    shortcut: Optional[Tensor] = None,
    shortcut_kind: int = SHORTCUT_NONE,
    shortcut_stride: int = 1,
    proj_weight: Optional[Tensor] = None,
    proj_scale: Optional[Tensor] = None,
    proj_shift: Optional[Tensor] = None,
    emit_stats: bool = False,
    post_scale: Optional[Tensor] = None,
    post_shift: Optional[Tensor] = None,
    conv3x3_algo: Optional[str] = None,
    scale_stats: Optional[tuple] = None,
    proj_stats: Optional[tuple] = None,
    post_stats: Optional[tuple] = None,
    postact_close: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """conv(relu(x * scale + shift), weight) with the fused shortcut and epilogues (C++ kernel).

    Same contract as ``resnet_fused.triton.conv.bn_relu_conv``: ``scale``/``shift`` None means no
    prologue; shortcut_kind 1 adds ``shortcut[:, :, ::s, ::s]``, 2 adds a second K-loop over
    relu(shortcut * proj_scale + proj_shift) times ``proj_weight``; ``emit_stats`` returns the
    statistics partials of the stored output; ``post_scale``/``post_shift`` store
    relu(out * post_scale + post_shift) instead (eval mode's folded next BN).
    ``conv3x3_algo``: "auto" | "per_tap" | "halo" (None: RESNET_FUSED_CUDA_CONV3X3, else "auto");
    it only matters for a 3x3, and "halo" needs stride 1 or 2.
    ``scale_stats`` / ``proj_stats`` / ``post_stats`` = (running_mean, running_var, eps): an
    eval-mode norm read from its buffers, whose weight and bias (or None) are then in the matching
    scale/shift slots; the kernel forms the affine itself (no finalize launch).
    ``postact_close``: a post-activation block's closing conv (eval), storing
    relu(post(acc) + shortcut); with a projection, ``proj_*`` is the projection output's norm and
    both norms' scales are applied to the weights as the kernel loads them (csrc/cuda/conv_fused.h).
    Returns (out in channels_last, partials [3, P, C_out] or None).
    """
    ops = _ops()
    dtype = x.dtype
    algo = _conv3x3_algo(conv3x3_algo) if weight.shape[-1] == 3 else 0
    pro_m, pro_v, pro_eps = _stats(scale_stats)
    proj_m, proj_v, proj_eps = _stats(proj_stats)
    post_m, post_v, post_eps = _stats(post_stats)
    if scale_stats is not None:
        scale, shift = _vec(scale), _vec(shift)
    if proj_stats is not None:
        proj_scale, proj_shift = _vec(proj_scale), _vec(proj_shift)
    if post_stats is not None:
        post_scale, post_shift = _vec(post_scale), _vec(post_shift)
    args = (x, as_dtype(weight, dtype), scale, shift, stride, groups,
            _cast(shortcut, dtype) if shortcut_kind != SHORTCUT_NONE else None, shortcut_kind, shortcut_stride,
            _cast(proj_weight, dtype), proj_scale, proj_shift, emit_stats, post_scale, post_shift, algo)
    if scale_stats is not None or proj_stats is not None or post_stats is not None or postact_close:
        args += (pro_m, pro_v, pro_eps, proj_m, proj_v, proj_eps, post_m, post_v, post_eps)
    if postact_close:
        args += (True,)
    _LAUNCHES["conv_fwd_cuda"] += 1
    out, partials = ops.conv_fwd_cuda(*args)
    return out, (partials if emit_stats else None)


def conv_dgrad(
    grad: Tensor, weight: Tensor, v: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, invstd: Tensor,
    *, stride: int = 1, groups: int = 1, prologue: Optional[GradPrologue] = None,
    second_grad: Optional[Tensor] = None, second_weight: Optional[Tensor] = None, second_stride: int = 1,
) -> tuple[Tensor, Tensor]:
    """(g' = masked input gradient, sums [2, P, C_in]) of a conv (1x1 or 3x3, stride, groups)
    whose input was relu(v * scale + shift) and whose output gradient is ``grad`` (with the
    BN-backward ``prologue`` applied first); ``second_grad``/``second_weight`` add a strided 1x1
    projection's input gradient into the same accumulator before the mask and the sums.
    Same contract as the Triton ``conv_dgrad``."""
    ops = _ops()
    dtype = grad.dtype
    y, a, b, c = _prologue(prologue, dtype)
    _LAUNCHES["conv_dgrad_cuda"] += 1
    return ops.conv_dgrad_cuda(
        grad, as_dtype(weight, dtype), as_dtype(v, dtype), scale, shift, mean, invstd, stride, groups, y, a, b, c,
        _cast(second_grad, dtype), _cast(second_weight, dtype), second_stride)


def conv_wgrad(
    grad: Tensor, v: Tensor, scale: Tensor, shift: Tensor, *, ksize: int = 1, stride: int = 1, groups: int = 1,
    prologue: Optional[GradPrologue] = None, splits: Optional[int] = None, channels_last: bool = False,
) -> Tensor:
    """dW (C_out, C_in/groups, ksize, ksize) of a conv with input relu(v * scale + shift) and
    output gradient ``grad`` (BN-backward ``prologue`` applied first), in grad's dtype, stored
    channels_last with ``channels_last`` (a channels_last weight's layout). Split-K over the
    output rows (``splits`` None: about 4096 rows a split, at most 64) with fp32 partials summed
    in a fixed order: bitwise reproducible."""
    ops = _ops()
    dtype = grad.dtype
    y, a, b, c = _prologue(prologue, dtype)
    _LAUNCHES["conv_wgrad_cuda"] += 1
    return ops.conv_wgrad_cuda(grad, as_dtype(v, dtype), scale, shift, ksize, stride, groups, y, a, b, c,
                               0 if splits is None else splits, channels_last)


# --- elementwise BN/ReLU passes (csrc/cuda/bn_elementwise.cu) ---------------------------------


def bn_relu_apply(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """relu(x * scale + shift) per channel of an (N, C, H, W) tensor, channels_last out."""
    ops = _ops()
    _LAUNCHES["bn_relu_apply_cuda"] += 1
    return ops.bn_relu_apply_cuda(x, scale, shift)


def relu_grad_sums(grad: Tensor, v: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, invstd: Tensor,
                   extra: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(g' = (grad + extra) * [v * scale + shift > 0], sums [2, P, C] of g' and g' * xhat)."""
    ops = _ops()
    dtype = grad.dtype
    _LAUNCHES["relu_grad_sums_cuda"] += 1
    return ops.relu_grad_sums_cuda(grad, _cast(extra, dtype), as_dtype(v, dtype), scale, shift, mean, invstd)


def bn_backward_apply(g: Tensor, v: Tensor, coeff, shortcut_grad: Optional[Tensor] = None,
                      shortcut_stride: int = 1) -> Tensor:
    """dv = A g + B v + C (+ the shortcut's gradient at the stride grid), channels_last, v's dtype.
    ``coeff`` is any object with per-channel ``a``, ``b``, ``c`` (e.g. the Triton ``BNBackward``)."""
    ops = _ops()
    dtype = v.dtype
    _LAUNCHES["bn_backward_apply_cuda"] += 1
    return ops.bn_backward_apply_cuda(as_dtype(g, dtype), v, coeff.a, coeff.b, coeff.c, _cast(shortcut_grad, dtype),
                                      shortcut_stride)


def channel_stats_partials(x: Tensor) -> Tensor:
    """Per-tile (count, mean, M2) partials [3, P, C] of an (N, C, H, W) tensor, P = ceil(N*H*W / 64)."""
    ops = _ops()
    _LAUNCHES["stats_partials_cuda"] += 1
    return ops.stats_partials_cuda(x)


# --- per-channel reductions (csrc/cuda/bn_reduce.cu) ------------------------------------------


def finalize_stats(
    part: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float, *,
    running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
    num_batches_tracked: Optional[Tensor] = None, momentum: Optional[float] = 0.1,
    update: bool = False, from_running: bool = False, dtype: Optional[torch.dtype] = None,
    count: Optional[int] = None,
) -> Tensor:
    """[5, C] = (mean, biased var, invstd, scale, shift) of one BatchNorm, one C++ op call
    (same contract as ``resnet_fused.triton.stats.bn_finalize_stats``).

    From the partials [3, P, C] (train), or from the running statistics (``from_running``: an
    eval or frozen norm; ``part`` may be None, ``dtype`` then gives the statistics dtype, default
    fp32, fp64 for fp64 buffers). With ``update`` the same op moves ``running_mean`` /
    ``running_var`` with nn.BatchNorm2d's formulas (unbiased variance; an empty batch moves
    nothing) and adds 1 to ``num_batches_tracked``; ``momentum=None`` is the cumulative average,
    its factor 1 / num_batches_tracked computed on the device (fp32, fp64 for fp64 buffers). No
    host synchronisation. ``count`` is accepted for the KernelSet interface; the kernel merges
    the partials' own counts.
    """
    ops = _ops()
    has_running = running_mean is not None and running_mean.numel() > 0
    update = update and not from_running and has_running
    if update and momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    keep_running = update or from_running
    _LAUNCHES["bn_finalize_cuda"] += 1
    return ops.bn_finalize_cuda(
        part, weight, bias, running_mean if keep_running else None, running_var if keep_running else None,
        num_batches_tracked if update else None, float(eps), None if momentum is None else float(momentum),
        update, from_running, dtype)


def bn_backward_coefficients(part: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor, count: int,
                             training: bool) -> BNBackward:
    """(dgamma, dbeta, A, B, C) of one BatchNorm's backward from the partial sums [2, P, C]
    (same contract as ``resnet_fused.triton.bn_backward.bn_backward_coefficients``); ``count`` is
    the values per channel, ``training`` False (a frozen norm) gives B = C = 0."""
    ops = _ops()
    _LAUNCHES["bn_backward_coefficients_cuda"] += 1
    return BNBackward(*ops.bn_backward_coefficients_cuda(part, weight, mean, invstd, float(count), bool(training)))


# --- post-activation closing pass and first-conv weight gradient ------------------------------


def postact_out(y: Tensor, scale: Tensor, shift: Tensor, sc: Tensor, sc_scale: Optional[Tensor] = None,
                sc_shift: Optional[Tensor] = None) -> Tensor:
    """relu(y * scale + shift + sc) (identity) or relu(y * scale + shift + sc * sc_scale + sc_shift)
    (projection), per channel, channels_last, in y's dtype (same contract as
    ``resnet_fused.triton.postact_elementwise.postact_out``)."""
    ops = _ops()
    dtype = y.dtype
    _LAUNCHES["postact_out_cuda"] += 1
    return ops.postact_out_cuda(y, scale, shift, as_dtype(sc, dtype), sc_scale, sc_shift)


def postact_out_backward(
    grad: Tensor, y: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, invstd: Tensor, sc: Tensor,
    sc_scale: Optional[Tensor] = None, sc_shift: Optional[Tensor] = None, sc_mean: Optional[Tensor] = None,
    sc_invstd: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(g' = grad * [z > 0], partial sums [2, P, C] over y, partial sums [2, P, C] over the
    projection's yd or None); same contract as the Triton ``postact_out_backward``. ``sc_*`` all
    given (a projection with its BN) or all None (identity)."""
    ops = _ops()
    dtype = grad.dtype
    _LAUNCHES["postact_out_backward_cuda"] += 1
    out, sums, sc_sums = ops.postact_out_backward_cuda(grad, as_dtype(y, dtype), scale, shift, mean, invstd,
                                                       as_dtype(sc, dtype), sc_scale, sc_shift, sc_mean, sc_invstd)
    return out, sums, (sc_sums if sc_scale is not None else None)


def plain_conv_wgrad(
    grad: Tensor, x: Tensor, *, ksize: int = 1, stride: int = 1, prologue: Optional[GradPrologue] = None,
    stats_dtype: torch.dtype = torch.float32, splits: Optional[int] = None, channels_last: bool = False,
) -> Tensor:
    """dW (C_out, C_in, k, k) of ``conv2d(x, W, stride, padding=k // 2)`` from its output gradient
    (BN-backward ``prologue`` applied first), no BN+ReLU on x; same contract as the Triton
    ``plain_conv_wgrad``; groups 1). The C++ wgrad with its input prologue off; it accumulates in
    fp32 (fp64 for fp64 data) whatever ``stats_dtype`` says, which only the Triton kernel reads."""
    ops = _ops()
    dtype = grad.dtype
    y, a, b, c = _prologue(prologue, dtype)
    _LAUNCHES["conv_wgrad_cuda"] += 1
    return ops.conv_wgrad_cuda(grad, as_dtype(x, dtype), None, None, ksize, stride, 1, y, a, b, c,
                               0 if splits is None else splits, channels_last)
