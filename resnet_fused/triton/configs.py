"""Launch-configuration choice for the Triton kernels: our own table, not ``triton.autotune``.

``triton.autotune`` cannot run under the CPU interpreter ("0 active drivers") and re-tunes on
every new shape at run time; the table below is a function of the GEMM shape and the device,
filtered by the device's shared memory, so the configs the selector can return are a finite
list that a test compiles for sm_90 ahead of time (``all_configs``).

Tests force small configs with :func:`forced_configs` so that multi-tile M/N/K, partial tiles
and cross-tile statistics merges all run at tiny shapes.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch

from .. import tuned
from .conv import ConvConfig

__all__ = ["BackwardConfig", "backward_config", "BACKWARD_GPU_CONFIGS", "FP64_GPU_CONFIG", "FP64_BACKWARD_CONFIG", "StatsConfig", "conv_config", "conv3x3_strategy", "stats_config", "forced_configs",
           "all_conv_configs", "shared_memory_bytes", "SHARED_MEMORY_LIMITS", "STRATEGIES", "STRATEGY_ENV",
           "TUNE_CONV_CANDIDATES", "TUNE_BACKWARD_CANDIDATES", "all_backward_configs"]

#: How a 3x3 conv with a BN+ReLU prologue runs: ``fused`` (one implicit-GEMM kernel, the
#: prologue per tap) or ``hybrid`` (a BN+ReLU pass, cuDNN's conv, a statistics pass).
STRATEGIES = ("fused", "hybrid")
#: The environment variable that overrides the 3x3 strategy for a whole process.
STRATEGY_ENV = "RESNET_FUSED_3X3_STRATEGY"


@dataclass(frozen=True)
class BackwardConfig:
    """Tiles of the fused 1x1 backward GEMMs: dgrad [block_m x block_n] with K step block_k;
    wgrad [block_k x block_n] outputs, stepping block_m rows (the reduction dimension)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 2

    def dgrad_meta(self) -> dict:
        return dict(block_m=self.block_m, block_n=self.block_n, block_k=self.block_k)

    def wgrad_meta(self) -> dict:
        return dict(block_m=self.block_m, block_k=self.block_k, block_c=self.block_n)


@dataclass(frozen=True)
class StatsConfig:
    """Tile sizes of the statistics pass and of the partials merge."""

    block_m: int = 128
    block_c: int = 64
    block_p: int = 64


#: Usable shared memory per block by compute capability (bytes): sm_90 227 KB, sm_80 164 KB,
#: sm_86/sm_89 99 KB. Unknown devices get the smallest.
SHARED_MEMORY_LIMITS = {(9, 0): 227 * 1024, (8, 0): 164 * 1024, (8, 6): 99 * 1024, (8, 9): 99 * 1024}

# GPU table, (kernel size, 16-bit?) -> configs in order of preference. First measured-free
# defaults from the docs/design.md section 7 probes (128x64 tiles, K 64 for 16-bit); the GPU benchmark refines them.
_GPU_TABLE: dict[tuple[int, bool], list[ConvConfig]] = {
    (1, True): [ConvConfig(128, 128, 64, 8, 3), ConvConfig(128, 64, 64, 4, 3), ConvConfig(64, 64, 32, 4, 2)],
    (3, True): [ConvConfig(128, 64, 64, 4, 3), ConvConfig(64, 64, 32, 4, 2)],
    (1, False): [ConvConfig(64, 64, 32, 4, 3), ConvConfig(32, 32, 32, 4, 2)],
    (3, False): [ConvConfig(64, 64, 32, 4, 3), ConvConfig(32, 32, 32, 4, 2)],
}
# Under the interpreter larger tiles are cheaper (numpy per program): few programs, big arrays.
_INTERPRETER_CONFIG = ConvConfig(64, 64, 32, 4, 1)

#: fp64 on a GPU (the gradcheck slow path): no tensor-core dot exists for it, so ``_dot`` is a
#: broadcast multiply-reduce holding BLOCK_M x BLOCK_K x BLOCK_N products; at the fp32 table's
#: 64x64x32 that compiled to 21,344 bytes of stack per thread. 16^3 tiles keep it in registers
#: (the AOT test checks the spill count).
FP64_GPU_CONFIG = ConvConfig(16, 16, 16, 4, 1)

#: What ``scripts/gpu_check.sh tune`` sweeps per (kernel size, 16-bit?): the table's configs plus
#: one more tile shape for 16-bit. A tuned table (``resnet_fused/tuned/<device>.json``) can only name
#: a config of this list, so :func:`all_conv_configs` (the AOT test's list) includes them all;
#: each candidate costs CI an AOT compile and a real-config parity case, so the list stays short.
TUNE_CONV_CANDIDATES: dict[tuple[int, bool], list[ConvConfig]] = {
    (1, True): _GPU_TABLE[(1, True)] + [ConvConfig(64, 128, 64, 4, 4)],
    (3, True): _GPU_TABLE[(3, True)] + [ConvConfig(128, 128, 64, 8, 3)],
    (1, False): list(_GPU_TABLE[(1, False)]),
    (3, False): list(_GPU_TABLE[(3, False)]),
}

_forced: dict[str, object] = {}
#: A GPU compute capability the selector answers for whatever the tensors' device
#: (:func:`selecting_for`), or None.
_select_for: Optional[tuple[int, int]] = None


@contextlib.contextmanager
def selecting_for(capability: tuple[int, int] = (9, 0)) -> Iterator[None]:
    """Inside the block the selector answers as on a GPU of ``capability`` for CPU tensors too
    (its heuristic tables, no tuned table): what ``resnet_fused.triton.aot`` records the GPU
    run's launches under, on a machine without one."""
    global _select_for
    saved, _select_for = _select_for, tuple(capability)
    try:
        yield
    finally:
        _select_for = saved


def _as_gpu(device: torch.device) -> bool:
    return device.type == "cuda" or _select_for is not None


#: Triton's shared memory over the operand staging alone (layout conversions, the epilogue's
#: scratch, barriers): the sm_90 compile of every selector config used up to 1.27x the staging
#: in the forward GEMM (the AOT test holds every compiled kernel to this estimate).
SHARED_MEMORY_OVERHEAD = 1.4
#: The same for the backward GEMMs, which stage a second operand layout (the dgrad's transposed
#: weight tile, the wgrad's transposed activation): up to 1.78x in the sm_90 compile (the bf16
#: 128x64x64/4/3 wgrad took 131,072 B over 73,728 B of staging; its dgrad 116,224 B).
BACKWARD_SHARED_MEMORY_OVERHEAD = 1.8


def shared_memory_bytes(config: Union[ConvConfig, "BackwardConfig"], element_size: int, *,
                        backward: bool = False) -> int:
    """What a pipelined GEMM of ``config`` takes of shared memory, estimated: num_stages copies
    of the A and B tiles (at least two: an unpipelined triton 3.6 GEMM still takes two, the
    fp64 16x16x16/4/1 forward 8,192 B), times :data:`SHARED_MEMORY_OVERHEAD`, or with
    ``backward`` (the dgrad and wgrad of a BackwardConfig) :data:`BACKWARD_SHARED_MEMORY_OVERHEAD`.
    A BackwardConfig's tiles are its dgrad's (block_m x block_k and block_k x block_n; its wgrad
    stages the same sizes)."""
    copies = max(config.num_stages, 2)
    staging = copies * (config.block_m * config.block_k + config.block_k * config.block_n) * element_size
    return int(staging * (BACKWARD_SHARED_MEMORY_OVERHEAD if backward else SHARED_MEMORY_OVERHEAD))


def _shared_memory_limit(device: torch.device) -> int:
    if device.type != "cuda" and _select_for is not None:
        return SHARED_MEMORY_LIMITS.get(_select_for, min(SHARED_MEMORY_LIMITS.values()))
    major, minor = torch.cuda.get_device_capability(device)
    return SHARED_MEMORY_LIMITS.get((major, minor), min(SHARED_MEMORY_LIMITS.values()))


def _fits(config: ConvConfig, n: int, k: int) -> bool:
    # Narrow GEMMs (a 64-wide conv2_x layer) waste half of a 128-wide N tile.
    return not (config.block_n > 64 and n <= 64)


def all_conv_configs() -> list[tuple[int, torch.dtype, ConvConfig]]:
    """Every (kernel size, dtype, config) the GPU selector can return (heuristic table and tuning
    candidates, which a tuned table may name): what the AOT test compiles."""
    out = []
    for (ksize, sixteen), configs in TUNE_CONV_CANDIDATES.items():
        dtypes = (torch.bfloat16, torch.float16) if sixteen else (torch.float32,)
        out += [(ksize, dtype, c) for dtype in dtypes for c in configs]
    out += [(ksize, torch.float64, FP64_GPU_CONFIG) for ksize in (1, 3)]
    return out


def conv_config(m: int, n: int, k: int, ksize: int, dtype: torch.dtype,
                device: torch.device) -> ConvConfig:
    """The launch config of a fused conv: GEMM [m, k] x [k, n] per group, kernel ``ksize``.

    Order: :func:`forced_configs`; the CPU interpreter's config; fp64's; the device's tuned table
    (``resnet_fused.tuned``) for this dtype and shape; the heuristic table below.
    """
    if "conv" in _forced:
        return _forced["conv"]  # type: ignore[return-value]
    if not _as_gpu(device):
        return _INTERPRETER_CONFIG
    if dtype == torch.float64:
        return FP64_GPU_CONFIG
    measured = None
    if device.type == "cuda":
        measured = _tuned_conv(tuned.conv_entry(device, dtype, "forward", ksize=ksize, m=m, n=n, k=k))
    if measured is not None:
        return measured
    sixteen = dtype in (torch.float16, torch.bfloat16)
    limit = _shared_memory_limit(device)
    element = dtype.itemsize  # no tensor per launch for an element size
    for config in _GPU_TABLE[(ksize, sixteen)]:
        if shared_memory_bytes(config, element) <= limit and _fits(config, n, k):
            return config
    return _GPU_TABLE[(ksize, sixteen)][-1]


def conv3x3_strategy(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> str:
    """``fused`` or ``hybrid`` for a 3x3 conv whose input needs BN+ReLU.

    On a GPU the hybrid is the default: in docs/design.md section 7's H100 probe (bf16, batch 256) it
    took 273 / 241 / 180 us at conv2_x / conv3_x / conv4_x against 529 / 285 / 180 for the
    fused per-tap prologue. The fused kernel is what the interpreter runs (no cuDNN there to
    compare with). The backward's 3x3 dgrad/wgrad follow the same choice. Either can be forced:
    ``forced_configs(strategy=...)`` in code, or the environment variable
    ``RESNET_FUSED_3X3_STRATEGY=fused|hybrid`` for a whole run (the benchmarks record it).
    """
    if "strategy" in _forced:
        return _forced["strategy"]  # type: ignore[return-value]
    chosen = os.environ.get(STRATEGY_ENV, "").strip()
    if chosen:
        if chosen not in STRATEGIES:
            raise ValueError(f"{STRATEGY_ENV} must be one of {STRATEGIES}, got {chosen!r}")
        return chosen
    if device.type == "cuda":
        measured = tuned.strategy_entry(device, dtype, m, n, k)  # the device's tuned table
        if measured is not None:
            return measured
    return "hybrid" if _as_gpu(device) else "fused"


#: GPU backward tiles by 16-bit-ness; the AOT test compiles both.
BACKWARD_GPU_CONFIGS = {True: BackwardConfig(128, 64, 64, 4, 3), False: BackwardConfig(64, 64, 32, 4, 2)}
#: fp64 backward tiles on a GPU, small for the same reason as :data:`FP64_GPU_CONFIG`.
FP64_BACKWARD_CONFIG = BackwardConfig(16, 16, 16, 4, 1)
#: What ``scripts/gpu_check.sh tune`` sweeps for dgrad and wgrad, per 16-bit-ness
#: (:func:`all_backward_configs` lists them with their dtypes, for the AOT compile).
TUNE_BACKWARD_CANDIDATES: dict[bool, list[BackwardConfig]] = {
    True: [BACKWARD_GPU_CONFIGS[True], BackwardConfig(64, 64, 64, 4, 3), BackwardConfig(128, 128, 64, 8, 3)],
    False: [BACKWARD_GPU_CONFIGS[False], BackwardConfig(64, 64, 32, 4, 3)],
}


def all_backward_configs() -> list[tuple[torch.dtype, BackwardConfig]]:
    """Every (dtype, backward config) the GPU selector can return, tuning candidates included."""
    out = []
    for sixteen, configs in TUNE_BACKWARD_CANDIDATES.items():
        dtypes = (torch.bfloat16, torch.float16) if sixteen else (torch.float32,)
        out += [(dtype, c) for dtype in dtypes for c in configs]
    return out + [(torch.float64, FP64_BACKWARD_CONFIG)]


def _tuned_conv(fields: Optional[dict]) -> Optional[ConvConfig]:
    try:
        return ConvConfig(**fields) if fields else None
    except TypeError:  # a table written by another version of the config's fields
        return None


def _tuned_backward(fields: Optional[dict]) -> Optional[BackwardConfig]:
    try:
        return BackwardConfig(**fields) if fields else None
    except TypeError:
        return None


def backward_config(dtype: torch.dtype, device: torch.device, *, direction: Optional[str] = None,
                    ksize: Optional[int] = None, m: Optional[int] = None, n: Optional[int] = None,
                    k: Optional[int] = None) -> BackwardConfig:
    """The tiles of the fused backward GEMMs.

    Order: :func:`forced_configs`; the CPU interpreter's; fp64's; the device's tuned table for
    ``direction`` (``dgrad`` / ``wgrad``) and the GEMM shape when the caller passes them, else
    the table's one backward default for the dtype; the heuristic :data:`BACKWARD_GPU_CONFIGS`.
    """
    if "backward" in _forced:
        return _forced["backward"]  # type: ignore[return-value]
    if not _as_gpu(device):
        return BackwardConfig(64, 64, 32, 4, 1)
    if dtype == torch.float64:
        return FP64_BACKWARD_CONFIG
    measured = None
    if direction is not None and device.type == "cuda":
        measured = _tuned_backward(tuned.conv_entry(device, dtype, direction, ksize=ksize, m=m, n=n, k=k))
    if measured is None and device.type == "cuda":
        measured = _tuned_backward(tuned.conv_entry(device, dtype, "backward"))
    sixteen = dtype in (torch.float16, torch.bfloat16)
    limit = _shared_memory_limit(device)
    # A tuned or default config that would not fit this device's shared memory falls back to
    # the smallest candidate that does.
    for config in ([measured] if measured is not None else []) + [BACKWARD_GPU_CONFIGS[sixteen]]:
        if shared_memory_bytes(config, dtype.itemsize, backward=True) <= limit:
            return config
    fitting = [c for c in TUNE_BACKWARD_CANDIDATES[sixteen]
               if shared_memory_bytes(c, dtype.itemsize, backward=True) <= limit]
    return min(fitting or TUNE_BACKWARD_CANDIDATES[sixteen],
               key=lambda c: shared_memory_bytes(c, dtype.itemsize, backward=True))


def stats_config(device: torch.device) -> StatsConfig:
    if "stats" in _forced:
        return _forced["stats"]  # type: ignore[return-value]
    if not _as_gpu(device):
        # The interpreter runs tl.reduce's merge function element by element in Python: narrow
        # partial blocks keep the merge cheap (about 15x faster at a small model's widths).
        return StatsConfig(block_m=128, block_c=16, block_p=4)
    return StatsConfig()


@contextlib.contextmanager
def forced_configs(conv: Optional[ConvConfig] = None, stats: Optional[StatsConfig] = None,
                   strategy: Optional[str] = None, backward: Optional[BackwardConfig] = None) -> Iterator[None]:
    """Use these configs for every launch inside the block (tests: small tiles, many of them)."""
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    saved = dict(_forced)
    if strategy is not None:
        _forced["strategy"] = strategy
    if backward is not None:
        _forced["backward"] = backward
    if conv is not None:
        _forced["conv"] = conv
    if stats is not None:
        _forced["stats"] = stats
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)
