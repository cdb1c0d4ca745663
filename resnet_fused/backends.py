"""The ``backend=`` keyword, one name for the implementation choice everywhere.

``reference``: eager PyTorch (``reference.py``), the oracle and the fallback.
``triton``: the Triton kernels (NHWC, fp32 accumulation).
``cuda``: the CUDA C++ kernels of ``resnet_fused._C`` (built by setup.py).
``auto``: the fastest backend that can run the block, falling back to ``reference``; it
never raises for a shape the reference handles.
"""
from __future__ import annotations

import functools
import warnings

import torch

from . import _extension
from . import tuned as _tuned

__all__ = ["AUTO_CUDA_TABLE", "BACKENDS", "auto_backend", "available_backends", "block_backend",
           "check_backend", "resolve_backend"]

BACKENDS = ("reference", "triton", "cuda", "auto")

# The fused block implementations land per backend; until a backend's blocks exist, asking for
# it explicitly is an error that says so (never a silent fallback), while "auto" falls back.
_FUSED_BLOCKS_AVAILABLE = {"triton": True, "cuda": True}

#: Where ``auto`` runs the CUDA C++ blocks instead of Triton on a GPU, keyed by (compute
#: capability "9.0", dtype "bfloat16", block "bottleneck" / "basic" / "resnext"). Loaded from the
#: generated data file ``resnet_fused/tuned/auto_cuda_table.json``, which
#: ``scripts/derive_auto_table.py`` derives from a GPU quick run's JSON (``benchmarks/results/``:
#: the cuda backend beats triton in train_fwd_bwd on every unit measured, and both passed the
#: real-shape parity in that dtype); never typed in by hand. Until a GPU run lands the file has
#: no entries and ``auto`` runs Triton on every GPU. The CUDA kernels take every shape the blocks
#: allow, so no shape needs routing away from them.
AUTO_CUDA_TABLE: dict[tuple[str, str, str], bool] = dict(_tuned.auto_cuda_table())

_warned_missing_extension = False


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


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> str:
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"{major}.{minor}"


def auto_backend(x: torch.Tensor, kind: str) -> str:
    """What ``auto`` runs for input ``x`` of a ``kind`` block: eager on the CPU; on a GPU the CUDA
    C++ blocks where :data:`AUTO_CUDA_TABLE` says they win, else Triton. When the table asks for
    the CUDA blocks and ``resnet_fused._C`` is missing, says so once and runs Triton."""
    global _warned_missing_extension
    if not x.is_cuda:
        return "reference"
    key = (_capability(x.device.index if x.device.index is not None else torch.cuda.current_device()),
           str(x.dtype).replace("torch.", ""), kind)
    if not AUTO_CUDA_TABLE.get(key):
        return "triton"
    if _extension.is_available():
        return "cuda"
    if not _warned_missing_extension:
        _warned_missing_extension = True
        warnings.warn(f"resnet_fused: backend='auto' would run the CUDA C++ kernels for {key} but "
                      f"{_extension.unavailable_reason()}; running the Triton kernels instead",
                      RuntimeWarning, stacklevel=3)
    return "triton"


def block_backend(backend: str, x: torch.Tensor, kind: str) -> str:
    """The backend a block runs for one call (``auto`` resolved by :func:`auto_backend`)."""
    return auto_backend(x, kind) if backend == "auto" else backend
