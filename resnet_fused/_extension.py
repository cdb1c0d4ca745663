"""Lazy access to the compiled extension ``resnet_fused._C`` (csrc/, built by setup.py).

Importing the package never loads ``_C``: a missing or broken build must not stop the
pure-PyTorch and Triton paths, and loading it costs a dlopen plus op registration. Code that
wants the C++ ops calls :func:`load` (or :func:`require`) when it first needs them; the outcome,
success or the reason for failure, is cached for the life of the process.

Loading ``_C`` registers its ops (``torch.ops.resnet_fused.*_cuda``) with the dispatcher; this
module then registers their fake (meta) implementations so torch.compile and meta tensors work.
So load the extension only through :func:`load`: a bare ``import resnet_fused._C`` gives ops
without fake impls.
"""
from __future__ import annotations

import importlib
import threading
from types import ModuleType

__all__ = ["load", "is_available", "unavailable_reason", "require", "wmma_host_counts", "bn_reduce_grid", "FAKES"]

_BUILD_HINT = (
    "Build it with a CUDA toolkit installed (no GPU needed): "
    "`pip install --no-build-isolation -e .` from the repository root, with "
    "RESNET_FUSED_BUILD_CUDA=1 to make the build fail loudly instead of skipping the extension "
    "(CUDA_HOME must point at the toolkit if it is not in /usr/local/cuda)."
)

# Every op resnet_fused._C defines (csrc/bindings.cpp); each has a fake impl below.
CPP_OPS = ("bn_stats_cuda", "conv_fwd_cuda", "conv_dgrad_cuda", "conv_wgrad_cuda", "bn_relu_apply_cuda",
           "relu_grad_sums_cuda", "bn_backward_apply_cuda", "stats_partials_cuda", "bn_finalize_cuda",
           "bn_backward_coefficients_cuda", "postact_out_cuda", "postact_out_backward_cuda")
# Ops of the host emulator that take no tensors (one kernel for every backend, no fake needed):
# the WMMA shim's counters (csrc/cuda/wmma_host.cuh).
# and the reductions' grid rule (csrc/cuda/bn_reduce.h).
EMULATOR_OPS = ("wmma_host_counts_cuda", "bn_reduce_grid_cuda")
# TEST-ONLY ops, CPU kernel only, never called by the package: the forward through a faulty copy
# of the WMMA multiply phase (csrc/cuda/wmma_test_faults.cu), for tests/test_cuda_wmma_faults.py.
TEST_FAULT_OPS = ("_test_fault_wmma_conv_fwd_cuda",)
# Faults of _test_fault_wmma_conv_fwd_cuda (WmmaTestFault in csrc/cuda/wmma_host.h).
WMMA_TEST_FAULTS = {"lda_is_width": 1, "ldm_not_16_bytes": 2, "pointer_not_32_bytes": 3, "lane_divergent": 4}
_WMMA_COUNTERS = ("mma_sync", "load_matrix_sync", "store_matrix_sync", "fill_fragment")

# Rows of one M tile of the C++ conv GEMMs (kConvTileM in csrc/cuda/conv_fused.h): the sums of
# conv_dgrad_cuda and the elementwise passes' partials have ceil(M / CONV_TILE_M) rows.
# Mirrored here for the fake impls; opcheck compares fake and real shapes, so a mismatch fails.
CONV_TILE_M = 64
# The forward's M tile of a 3x3 is an 8x8 block of output pixels of one image
# (kConvSpatialTileH/W, conv_fwd_tiles_m in conv_fused.h), whichever 3x3 kernel runs.
CONV_SPATIAL_TILE = 8


def conv_fwd_tiles_m(n: int, h_out: int, w_out: int, ksize: int) -> int:
    """P of conv_fwd_cuda's statistics partials [3, P, C_out] (conv_fwd_tiles_m in conv_fused.h):
    ceil(M / 64) for a 1x1, N * ceil(H_out / 8) * ceil(W_out / 8) for a 3x3."""
    if ksize == 1:
        return (n * h_out * w_out + CONV_TILE_M - 1) // CONV_TILE_M
    tile = CONV_SPATIAL_TILE
    return n * ((h_out + tile - 1) // tile) * ((w_out + tile - 1) // tile)

_lock = threading.Lock()
#: The fake (shape and dtype only) implementation of each C++ op by name, as registered: also
#: what ``cuda.kernels.skip_kernels`` calls in place of the op (host-overhead measurement).
FAKES: dict = {}
_attempted = False
_module: ModuleType | None = None
_reason: str | None = None


def load() -> ModuleType | None:
    """Import ``resnet_fused._C`` once; return it, or None when it cannot be loaded.

    The reason for a failure is kept for :func:`unavailable_reason` and :func:`require`.
    """
    global _attempted, _module, _reason
    with _lock:
        if _attempted:
            return _module
        _attempted = True
        try:
            # libtorch must be loaded (with its symbols) before the .so that links against it.
            import torch  # noqa: F401

            module = importlib.import_module("resnet_fused._C")
        except ImportError as exc:  # includes "undefined symbol" errors from a stale build
            if isinstance(exc, ModuleNotFoundError) and exc.name == "resnet_fused._C":
                _reason = "resnet_fused._C is not built"
            else:
                _reason = f"resnet_fused._C failed to load ({type(exc).__name__}: {exc})"
            return None
        try:
            _register_fakes()
        except Exception as exc:  # a stale build without the expected ops, or a double registration
            _reason = f"resnet_fused._C loaded but its ops could not be set up ({type(exc).__name__}: {exc})"
            return None
        _module = module
        return module


def is_available() -> bool:
    """True when ``resnet_fused._C`` loads (loading it on the first call)."""
    return load() is not None


def unavailable_reason() -> str | None:
    """Why ``resnet_fused._C`` is not available (None when it is)."""
    load()
    return _reason


def require(feature: str) -> ModuleType:
    """Return the loaded extension, or raise RuntimeError saying that ``feature`` needs it,
    why it is unavailable, and how to build it."""
    module = load()
    if module is None:
        raise RuntimeError(f"{feature} needs the compiled extension resnet_fused._C: {_reason}. {_BUILD_HINT}")
    return module


def wmma_host_counts() -> dict[str, int]:
    """Warp-level WMMA operations the host emulator's WMMA shim has performed in this process
    (keys: mma_sync, load_matrix_sync, store_matrix_sync, fill_fragment). The CPU runs of the
    fp16/bf16 conv kernels go through it; the counts let tests prove that they did."""
    import torch

    require("the WMMA shim's counters")
    return dict(zip(_WMMA_COUNTERS, torch.ops.resnet_fused.wmma_host_counts_cuda()))


def bn_reduce_grid(partials: int, channels: int) -> tuple[int, int, int]:
    """(channel tiles, chunks, partials per chunk) of the chunk kernel of the C++ finalize and
    BN-backward coefficients for ``partials`` tiles of ``channels`` channels (reduce_plan in
    csrc/cuda/bn_reduce.h): its grid is channel tiles x chunks blocks."""
    import torch

    require("the reductions' grid rule")
    tiles, chunks, size = torch.ops.resnet_fused.bn_reduce_grid_cuda(partials, channels)
    return tiles, chunks, size


def _register_fakes() -> None:
    """Shape/dtype-only implementations of the C++ ops, for meta tensors and torch.compile.

    Registered from this module because the C++ side names it in ``m.set_python_module``
    (torch checks that the fake impl lives where C++ says it does).
    """
    import torch

    for name in CPP_OPS + EMULATOR_OPS + TEST_FAULT_OPS:
        if not hasattr(torch.ops.resnet_fused, name):
            raise RuntimeError(f"torch.ops.resnet_fused.{name} is missing: the build is stale, rebuild it")

    def _fake(name: str):
        def register(fn):
            torch.library.register_fake(f"resnet_fused::{name}")(fn)
            FAKES[name] = fn
            return fn
        return register

    @_fake("bn_stats_cuda")
    def _bn_stats_cuda_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch._check(x.dim() == 4, lambda: f"resnet_fused.bn_stats: x must be 4-D (N, C, H, W), got {x.dim()}-D")
        channels = x.shape[1]
        return (x.new_empty((channels,), dtype=torch.float32),
                x.new_empty((channels,), dtype=torch.float32))


    def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
        # Statistics and partial sums: fp64 for fp64 data, fp32 otherwise (csrc/cuda/conv_fused.h).
        return torch.float64 if dtype == torch.float64 else torch.float32

    def _out_size(size, ksize: int, stride: int):
        return (size + 2 * (ksize // 2) - ksize) // stride + 1

    def _nhwc_empty(shape, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)

    @_fake("conv_fwd_cuda")
    def _conv_fwd_cuda_fake(x, w, scale, shift, stride, groups, shortcut, shortcut_kind, shortcut_stride,
                            proj_w, proj_scale, proj_shift, emit_stats, post_scale, post_shift, algo=0,
                            pro_mean=None, pro_var=None, pro_eps=0.0, proj_mean=None, proj_var=None, proj_eps=0.0,
                            post_mean=None, post_var=None, post_eps=0.0, postact_close=False):
        torch._check(x.dim() == 4 and w.dim() == 4,
                     lambda: "resnet_fused.conv_fwd: x and w must be 4-D")
        n, _, h, wd = x.shape
        c_out, ksize = w.shape[0], w.shape[2]
        h_out, w_out = _out_size(h, ksize, stride), _out_size(wd, ksize, stride)
        out = _nhwc_empty((n, c_out, h_out, w_out), x)
        acc = _acc_dtype(x.dtype)
        if emit_stats:
            partials = x.new_empty((3, conv_fwd_tiles_m(n, h_out, w_out, ksize), c_out), dtype=acc)
        else:
            partials = x.new_empty((0,), dtype=acc)
        return out, partials

    @_fake("conv_dgrad_cuda")
    def _conv_dgrad_cuda_fake(grad, w, v, scale, shift, mean, invstd, stride, groups, pro_y, pro_a, pro_b, pro_c,
                              second_grad, second_w, second_stride):
        torch._check(grad.dim() == 4 and v.dim() == 4,
                     lambda: "resnet_fused.conv_dgrad: grad and v must be 4-D")
        n, c_in, h, wd = v.shape
        out = _nhwc_empty((n, c_in, h, wd), grad)
        tiles = (n * h * wd + CONV_TILE_M - 1) // CONV_TILE_M
        return out, grad.new_empty((2, tiles, c_in), dtype=_acc_dtype(grad.dtype))

    @_fake("conv_wgrad_cuda")
    def _conv_wgrad_cuda_fake(grad, v, scale, shift, ksize, stride, groups, pro_y, pro_a, pro_b, pro_c,
                              splits=0, channels_last=False):
        torch._check(grad.dim() == 4 and v.dim() == 4,
                     lambda: "resnet_fused.conv_wgrad: grad and v must be 4-D")
        dw = grad.new_empty((grad.shape[1], v.shape[1] // groups, ksize, ksize))
        return dw.contiguous(memory_format=torch.channels_last) if channels_last else dw

    @_fake("bn_relu_apply_cuda")
    def _bn_relu_apply_cuda_fake(x, scale, shift):
        return _nhwc_empty(x.shape, x)

    def _tiles(t: torch.Tensor):
        n, _, h, wd = t.shape
        return (n * h * wd + CONV_TILE_M - 1) // CONV_TILE_M

    @_fake("relu_grad_sums_cuda")
    def _relu_grad_sums_cuda_fake(grad, extra, v, scale, shift, mean, invstd):
        return _nhwc_empty(v.shape, grad), grad.new_empty((2, _tiles(v), v.shape[1]), dtype=_acc_dtype(grad.dtype))

    @_fake("bn_backward_apply_cuda")
    def _bn_backward_apply_cuda_fake(g, v, a, b, c, shortcut_grad, shortcut_stride):
        return _nhwc_empty(v.shape, v)

    @_fake("stats_partials_cuda")
    def _stats_partials_cuda_fake(x):
        return x.new_empty((3, _tiles(x), x.shape[1]), dtype=_acc_dtype(x.dtype))

    @_fake("bn_finalize_cuda")
    def _bn_finalize_cuda_fake(part, weight, bias, running_mean, running_var, num_batches_tracked, eps, momentum,
                               update, from_running, dtype=None):
        if from_running:
            torch._check(running_mean is not None, lambda: "resnet_fused.bn_finalize: from_running needs running_mean")
            acc = dtype if dtype is not None else _acc_dtype(running_mean.dtype)
            return running_mean.new_empty((5, running_mean.shape[0]), dtype=acc)
        torch._check(part is not None and part.dim() == 3,
                     lambda: "resnet_fused.bn_finalize: part must be [3, P, C]")
        return part.new_empty((5, part.shape[2]))

    @_fake("bn_backward_coefficients_cuda")
    def _bn_backward_coefficients_cuda_fake(part, weight, mean, invstd, count, training):
        torch._check(part.dim() == 3, lambda: "resnet_fused.bn_backward_coefficients: part must be [2, P, C]")
        channels = part.shape[2]
        return tuple(part.new_empty((channels,)) for _ in range(5))

    @_fake("postact_out_cuda")
    def _postact_out_cuda_fake(y, scale, shift, sc, sc_scale, sc_shift):
        torch._check(y.dim() == 4, lambda: "resnet_fused.postact_out: y must be 4-D")
        return _nhwc_empty(y.shape, y)

    @_fake("postact_out_backward_cuda")
    def _postact_out_backward_cuda_fake(grad, y, scale, shift, mean, invstd, sc, sc_scale, sc_shift, sc_mean,
                                        sc_invstd):
        torch._check(y.dim() == 4, lambda: "resnet_fused.postact_out_backward: y must be 4-D")
        acc = _acc_dtype(grad.dtype)
        sums = grad.new_empty((2, _tiles(y), y.shape[1]), dtype=acc)
        sc_sums = grad.new_empty((2, _tiles(y), y.shape[1]), dtype=acc) if sc_scale is not None else \
            grad.new_empty((0,), dtype=acc)
        return _nhwc_empty(y.shape, grad), sums, sc_sums
