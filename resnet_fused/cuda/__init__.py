"""The CUDA C++ backend's launchers (kernels in csrc/cuda/, ops ``torch.ops.resnet_fused.*_cuda``).

Importing this package does not load the compiled extension; the first launcher call does, and
raises a RuntimeError saying how to build it when it is missing. On CPU tensors the same ops run
the host emulation of the CUDA thread blocks (see csrc/cuda/conv_tile.cuh).
"""
from .kernels import (
    SHORTCUT_ADD,
    SHORTCUT_NONE,
    SHORTCUT_PROJECTION,
    GradPrologue,
    bn_backward_apply,
    bn_backward_coefficients,
    bn_relu_apply,
    bn_relu_conv,
    channel_stats_partials,
    conv_dgrad,
    conv_wgrad,
    finalize_stats,
    launch_counts,
    plain_conv_wgrad,
    postact_out,
    postact_out_backward,
    relu_grad_sums,
    reset_launch_counts,
)

__all__ = [
    "SHORTCUT_NONE", "SHORTCUT_ADD", "SHORTCUT_PROJECTION", "GradPrologue",
    "bn_relu_conv", "conv_dgrad", "conv_wgrad", "bn_relu_apply", "relu_grad_sums", "bn_backward_apply",
    "channel_stats_partials", "finalize_stats", "bn_backward_coefficients", "postact_out", "postact_out_backward",
    "plain_conv_wgrad", "launch_counts", "reset_launch_counts",
]
