"""Per-channel batch statistics (mean, biased variance) of an (N, C, H, W) tensor.

The statistics BN normalises with, in fp32 (fp64 for fp64 input) whatever the storage dtype.
The CUDA implementation (``resnet_fused::bn_stats_cuda`` in ``csrc/``) merges per-tile
Welford partials by Chan's formula in a fixed order: deterministic, and exact when
|mean| >> std, where a sum / sum-of-squares formula cancels catastrophically.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension, reference
from ..backends import check_backend

__all__ = ["batch_stats"]

_STATS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_stats_input(x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"batch_stats expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"batch_stats expects a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in _STATS_DTYPES:
        raise TypeError(f"batch_stats accepts dtypes {[str(d) for d in _STATS_DTYPES]}, got {x.dtype}")
    if x.shape[1] == 0 or x.numel() == 0:
        raise ValueError(
            f"batch_stats needs at least one channel and one value per channel, got shape {tuple(x.shape)}")
    return x


def batch_stats(x: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) of ``x``, each of shape (C,), fp32 (fp64 for fp64).

    ``backend="auto"`` runs the CUDA kernel for a CUDA tensor when ``resnet_fused._C`` is built
    and the reference otherwise; ``"cuda"`` insists on the kernel (CUDA tensor, built ``_C``);
    ``"reference"`` is eager PyTorch. Accepts NCHW-contiguous and channels_last inputs; other
    layouts are copied to channels_last first.
    """
    check_backend(backend)
    _check_stats_input(x)
    use_cuda = backend == "cuda" or (backend == "auto" and x.is_cuda and _extension.is_available())
    if backend == "triton":
        raise NotImplementedError("batch_stats: the Triton statistics kernel is not in this version; "
                                  "use backend='auto', 'cuda' or 'reference'")
    if not use_cuda:
        return reference.batch_stats(x)
    _extension.require("batch_stats(backend='cuda')")
    if not x.is_cuda:
        raise ValueError(f"batch_stats(backend='cuda') needs a CUDA tensor, got one on {x.device}")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = torch.ops.resnet_fused.bn_stats_cuda(x)
    return mean.to(reference.stats_dtype(x.dtype)), var.to(reference.stats_dtype(x.dtype))
