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

__all__ = ["load", "is_available", "unavailable_reason", "require"]

_BUILD_HINT = (
    "Build it with a CUDA toolkit installed (no GPU needed): "
    "`pip install --no-build-isolation -e .` from the repository root, with "
    "RESNET_FUSED_BUILD_CUDA=1 to make the build fail loudly instead of skipping the extension "
    "(CUDA_HOME must point at the toolkit if it is not in /usr/local/cuda)."
)

_lock = threading.Lock()
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


def _register_fakes() -> None:
    """Shape/dtype-only implementations of the C++ ops, for meta tensors and torch.compile.

    Registered from this module because the C++ side names it in ``m.set_python_module``
    (torch checks that the fake impl lives where C++ says it does).
    """
    import torch

    if not hasattr(torch.ops.resnet_fused, "bn_stats_cuda"):
        raise RuntimeError("torch.ops.resnet_fused.bn_stats_cuda is missing: the build is stale, rebuild it")

    @torch.library.register_fake("resnet_fused::bn_stats_cuda")
    def _bn_stats_cuda_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch._check(x.dim() == 4, lambda: f"resnet_fused.bn_stats: x must be 4-D (N, C, H, W), got {x.dim()}-D")
        channels = x.shape[1]
        return (x.new_empty((channels,), dtype=torch.float32),
                x.new_empty((channels,), dtype=torch.float32))

