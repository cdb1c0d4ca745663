"""The ``backend=`` keyword, one name for the implementation choice everywhere.

``reference``: eager PyTorch (``reference.py``), the oracle and the fallback.
``triton``: the Triton kernels (NHWC, fp32 accumulation).
``cuda``: the CUDA C++ kernels of ``resnet_fused._C`` (built by setup.py).
``auto``: the fastest backend that can run the block, falling back to ``reference``; it
never raises for a shape the reference handles.
"""
from __future__ import annotations

from . import _extension

__all__ = ["BACKENDS", "available_backends", "block_backend", "check_backend", "resolve_backend"]

BACKENDS = ("reference", "triton", "cuda", "auto")

# The fused block implementations land per backend; until a backend's blocks exist, asking for
# it explicitly is an error that says so (never a silent fallback), while "auto" falls back.
_FUSED_BLOCKS_AVAILABLE = {"triton": True, "cuda": False}


def check_backend(backend: object) -> str:
    """Validate a ``backend=`` value and return it; raise ValueError/TypeError otherwise."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def available_backends() -> tuple[str, ...]:
    """The concrete backends whose fused blocks can be built in this installation."""
    out = ["reference"]
    if _FUSED_BLOCKS_AVAILABLE["triton"]:
        out.append("triton")
    if _FUSED_BLOCKS_AVAILABLE["cuda"] and _extension.is_available():
        out.append("cuda")
    return tuple(out)


def resolve_backend(backend: str) -> str:
    """Validate that blocks can be built for ``backend`` and return it.

    ``auto`` stays ``auto``: the block decides per call (fused kernels for a CUDA tensor, the
    eager reference on the CPU). Raises RuntimeError when ``cuda`` is asked for and
    ``resnet_fused._C`` is not built (the message says how to build it), NotImplementedError
    when a backend's fused blocks are not part of this version yet.
    """
    check_backend(backend)
    if backend == "auto":
        return backend
    if backend == "cuda":
        _extension.require("backend='cuda'")
    if backend != "reference" and not _FUSED_BLOCKS_AVAILABLE[backend]:
        raise NotImplementedError(
            f"backend={backend!r}: the fused {backend} blocks are not in this version of "
            "resnet_fused yet; use backend='triton', 'reference' (eager PyTorch) or 'auto'")
    return backend


def block_backend(backend: str, x_is_cuda: bool) -> str:
    """The backend a block runs for one call: ``auto`` is the fused kernels on a GPU, else eager."""
    if backend != "auto":
        return backend
    if x_is_cuda:
        return "cuda" if "cuda" in available_backends() else "triton"
    return "reference"
