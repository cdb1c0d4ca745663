"""What the block and model benchmarks share: environment record, dtype modes, implementations,
timing, peak memory, measured ceilings, the JSON record, tables and plots.

Timing. On a GPU, ``triton.testing.do_bench``: it runs the function once, then warms up, then
times each repetition with CUDA events after zeroing a 256 MB buffer (so every repetition starts
with a cold L2, as a block inside a network does), setting the ``grad_to_none`` tensors' grads to
None before each repetition, outside the events; we take its median and 20th/80th percentiles. On
a CPU, ``time.perf_counter`` around each synchronous call, after a warm-up call, with gradients
cleared between calls outside the timed region. Modules, inputs and upstream gradients are built
before timing starts; the timed function does the measured work and nothing else.

Peak memory (GPU only, "n/a" on a CPU): after the timing, the function runs once more between
``reset_peak_memory_stats`` and ``max_memory_allocated``. ``peak_mib`` is the absolute peak;
``peak_increment_mib`` is that minus what was allocated just before the call (parameters, inputs,
the upstream gradient), i.e. what the call itself needs: activations saved for backward,
temporaries, gradients.

Implementations, by name: ``eager`` (the reference module), ``compile`` (torch.compile of it,
``--compile-mode``), ``compile-cudagraphs`` (torch.compile mode "reduce-overhead"), and each
fused backend of ``resnet_fused.available_backends()`` by its name (``triton``, ``cuda``),
optionally compiled: ``triton+compile``, ``cuda+compile-cudagraphs``. A fused backend that this
version cannot build is recorded as unavailable, with the package's reason, not an error.

Proof of what ran. A fused row counts the kernel launches of its warm-up call (the Triton and
CUDA backends' launch counters); a row whose backend launched nothing, or whose module still has
a block that runs eager (``resnet_fused.describe``), is recorded as an error, never as a timing.
Each row also records ``host_ms``: the wall time of an unsynchronised call (what the host spends
launching), beside the device time.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn

import resnet_fused
from resnet_fused.cuda import launch_counts as cuda_launch_counts
from resnet_fused.triton.launch import launch_counts as triton_launch_counts

REPO_ROOT = Path(__file__).resolve().parent.parent

CPU_BANNER = ("CPU-only machine: running the eager reference (and Triton-interpreted paths when "
              "available) at small sizes; these numbers are not GPU performance.")
CPU_BANNER_EAGER_ONLY = ("CPU-only machine: running the eager reference at tiny sizes; these numbers "
                         "are not GPU performance.")

#: A CPU-only run stops starting new work after this many seconds unless --budget-s says otherwise.
CPU_DEFAULT_BUDGET_S = 90.0

#: The quantiles reported with every median (docs/design.md's anchors use the same).
QUANTILES = (0.5, 0.2, 0.8)


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


def git_commit() -> str:
    """The commit being measured: $RESNET_FUSED_COMMIT (the GPU machine's copy has no .git),
    else ``git rev-parse HEAD`` where the checkout has a .git, else "unknown"."""
    from_env = os.environ.get("RESNET_FUSED_COMMIT", "").strip()
    if from_env:
        return from_env
    if (REPO_ROOT / ".git").exists():
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                 text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown"


def _version_of(module_name: str) -> Optional[str]:
    try:
        module = __import__(module_name)
    except Exception:  # an optional package, broken or absent: record that it is not there
        return None
    return getattr(module, "__version__", "unknown")


def _extension_status() -> str:
    """Whether resnet_fused._C loads, and why not (diagnostics for the run record)."""
    try:
        from resnet_fused import _extension
        reason = _extension.unavailable_reason()
    except Exception as exc:
        return f"unknown ({type(exc).__name__}: {exc})"
    return "loaded" if reason is None else reason


def environment(device: torch.device) -> dict:
    """Everything needed to tell whether two runs are comparable."""
    env: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": _version_of("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "resnet_fused": getattr(resnet_fused, "__version__", "unknown"),
        "timm": _version_of("timm"),
        "torchvision": _version_of("torchvision"),
        "available_backends": list(resnet_fused.available_backends()),
        "extension": _extension_status(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "triton_3x3_strategy": os.environ.get("RESNET_FUSED_3X3_STRATEGY", "") or "default",
        "torch_threads": torch.get_num_threads(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "device": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "device_name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        })
    else:
        env["device_name"] = platform.processor() or platform.machine() or "cpu"
    return env


def device_slug(env: dict) -> str:
    """A file-name-safe short device name: "NVIDIA-H100-80GB-HBM3", "cpu"."""
    name = env["device_name"] if env["device"] == "cuda" else "cpu"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "device"


# ---------------------------------------------------------------------------------------------
# Devices, dtype modes, argument checking
# ---------------------------------------------------------------------------------------------


def pick_device(choice: str) -> torch.device:
    """``auto``: the GPU when there is one. Asking for ``cuda`` without one is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch.cuda.is_available() is False on this machine")
    return torch.device(choice)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def configure_torch(device: torch.device, cpu_threads: int = 1) -> None:
    """Settings both benchmarks run under (recorded in the environment)."""
    if device.type == "cuda":
        # cuDNN picks its fastest conv algorithm per shape, as in any real training run.
        torch.backends.cudnn.benchmark = True
    else:
        # On a small shared VM, tiny ops with a 2-thread OpenMP pool stall for 100+ ms at a time
        # (seen on the 2-core development machines): one thread gives repeatable numbers.
        torch.set_num_threads(cpu_threads)
    import torch._dynamo.config as dynamo_config
    # Every (shape, dtype, train/eval, grad mode) combination is a recompile of the same module;
    # the default limit (8) would silently fall back to eager part-way through a run.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))


@dataclass(frozen=True)
class DtypeMode:
    """How a benchmark runs in a dtype, as eager does it (docs/design.md section 3).

    Pure (``bf16``): the module and its input are ``.to(dtype)``. AMP (``amp-bf16``): fp32
    parameters and buffers under ``torch.autocast``; the input is 16-bit because inside an
    autocast network a block's input is the previous conv's 16-bit output.
    """

    name: str
    storage: torch.dtype              # the input's / activations' dtype
    params: torch.dtype               # parameters and buffers
    autocast: Optional[torch.dtype]   # the autocast dtype, None for pure modes

    @property
    def compute(self) -> torch.dtype:
        """The dtype the matrix units run in: the ceiling a floor is taken against."""
        return self.autocast or self.storage

    @property
    def image_dtype(self) -> torch.dtype:
        """The dtype of a batch of images fed to a whole model: fp32 under AMP, as a data
        loader gives it (autocast casts at the first conv); the model's dtype otherwise."""
        return self.params

    @property
    def element_bytes(self) -> int:
        return torch.empty((), dtype=self.storage).element_size()

    def context(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


DTYPE_MODES: dict[str, DtypeMode] = {
    "fp32": DtypeMode("fp32", torch.float32, torch.float32, None),
    "bf16": DtypeMode("bf16", torch.bfloat16, torch.bfloat16, None),
    "fp16": DtypeMode("fp16", torch.float16, torch.float16, None),
    "amp-bf16": DtypeMode("amp-bf16", torch.bfloat16, torch.float32, torch.bfloat16),
    "amp-fp16": DtypeMode("amp-fp16", torch.float16, torch.float32, torch.float16),
}

MEMORY_FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


def parse_choices(text: str, allowed: Iterable[str], option: str) -> list[str]:
    """A comma-separated option value, each item checked against ``allowed``, order kept,
    duplicates dropped. Raises ValueError with a message naming the option."""
    allowed = list(allowed)
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{option}: expected a comma-separated list from {', '.join(allowed)}; got {text!r}")
    unknown = [item for item in items if item not in allowed]
    if unknown:
        raise ValueError(f"{option}: unknown value(s) {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------------------

#: torch.compile variants an implementation name can end in, and the compile mode each means
#: (None: the --compile-mode option's).
COMPILE_VARIANTS = {"compile": None, "compile-cudagraphs": "reduce-overhead"}
#: Backends of the package that can be benchmarked as fused implementations.
FUSED_BACKENDS = tuple(b for b in resnet_fused.BACKENDS if b not in ("reference", "auto"))


class NotMeasured(Exception):
    """A case that could not be set up; ``status`` is what its rows record."""

    status = "error"


class Unavailable(NotMeasured):
    """An implementation that cannot run here (not in this version, not built, no GPU, a shape
    the backend does not support): recorded, not a failure."""

    status = "unavailable"


class BuildFailed(NotMeasured):
    """An available implementation that failed to build: a failure of the run."""

    status = "error"


@dataclass(frozen=True)
class Implementation:
    """An implementation, by the name --impls gives it: a backend, possibly under torch.compile."""

    name: str
    backend: str                  # "reference" or a fused backend
    compile_variant: Optional[str]

    @classmethod
    def parse(cls, name: str) -> "Implementation":
        base, _, variant = name.partition("+")
        if base in COMPILE_VARIANTS and not variant:
            return cls(name, "reference", base)
        if base == "eager" and not variant:
            return cls(name, "reference", None)
        if base in FUSED_BACKENDS and (not variant or variant in COMPILE_VARIANTS):
            return cls(name, base, variant or None)
        raise ValueError(
            f"--impls: unknown implementation {name!r}; use eager, compile, compile-cudagraphs, a "
            f"fused backend ({', '.join(FUSED_BACKENDS)}) or <backend>+compile[-cudagraphs]")

    @property
    def is_compiled(self) -> bool:
        return self.compile_variant is not None


def fused_backends() -> list[str]:
    """The fused backends this installation can build (picked up automatically as they land)."""
    return [b for b in resnet_fused.available_backends() if b != "reference"]


def default_impls(device: torch.device, with_cudagraphs: bool = False,
                  interpreted_triton: bool = True) -> list[str]:
    """GPU: eager, compile and every available fused backend (``with_cudagraphs``: also under
    CUDA graphs). CPU: eager, plus the Triton backend when TRITON_INTERPRET=1 makes it run
    (interpreted) on the CPU and ``interpreted_triton`` allows it."""
    if device.type == "cpu":
        interpreted = (interpreted_triton and os.environ.get("TRITON_INTERPRET") == "1"
                       and "triton" in fused_backends())
        return ["eager"] + (["triton"] if interpreted else [])
    impls = ["eager", "compile"] + (["compile-cudagraphs"] if with_cudagraphs else [])
    for backend in fused_backends():
        impls.append(backend)
        if with_cudagraphs:
            impls.append(f"{backend}+compile-cudagraphs")
    return impls


def parse_impls(text: Optional[str], device: torch.device, with_cudagraphs: bool = False,
                interpreted_triton: bool = True) -> list[Implementation]:
    """The implementations to run, in the order they run: eager first (every ratio needs it),
    then the fused backends (what the benchmark is for), then the torch.compile variants
    (slowest to warm up: under a budget they are the ones left out)."""
    names = default_impls(device, with_cudagraphs, interpreted_triton) if text is None else \
        list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise ValueError("--impls: expected at least one implementation")
    impls = [Implementation.parse(name) for name in names]
    return sorted(impls, key=lambda i: (i.name != "eager", i.is_compiled))


def build_implementation(impl: Implementation, build: Callable[[str], nn.Module], reference: nn.Module,
               prepare: Callable[[nn.Module], nn.Module], device: torch.device,
               compile_mode: str, cuda_on_cpu: bool = False) -> tuple[nn.Module, Callable]:
    """The module (whose parameters get the gradients) and the callable to time.

    ``build(backend)`` makes a fresh module of that backend (CPU, fp32); ``reference`` is the
    eager module, already through ``prepare`` (device, dtype, memory format). A fused module
    gets the reference's weights and BN state, then the same ``prepare``. Raises Unavailable
    for a backend this installation cannot build (or the cuda backend without a GPU) and
    BuildFailed when an available backend fails to build the module. ``cuda_on_cpu`` (the GPU
    check's dry run) lets the cuda backend run its host emulator on CPU tensors.
    """
    if impl.backend == "reference":
        module = reference
    else:
        if impl.backend == "cuda" and device.type != "cuda" and not cuda_on_cpu:
            raise Unavailable("the cuda backend needs a CUDA GPU")
        if impl.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise Unavailable("the triton backend on a CPU needs TRITON_INTERPRET=1 (without it its "
                              "ops run the eager reference, which would be timed under its name)")
        try:
            resnet_fused.resolve_backend(impl.backend)  # the package's own reason when it cannot
        except (NotImplementedError, RuntimeError) as exc:
            raise Unavailable(f"not available in this version: {short_error(exc)}") from None
        try:
            module = build(impl.backend)
            # Same weights and BN state as the eager module: the implementations compute the
            # same function, and a fused module that cannot load them is a bug worth recording.
            module.load_state_dict(reference.state_dict())
            module = prepare(module)
        except NotImplementedError as exc:  # e.g. a shape this backend does not cover
            raise Unavailable(f"not supported: {short_error(exc)}") from None
        except Exception as exc:
            raise BuildFailed(f"building the {impl.backend} module failed: {short_error(exc)}") from None
    if not impl.is_compiled:
        return module, module
    mode = COMPILE_VARIANTS[impl.compile_variant] or compile_mode
    # dynamic=False: each shape gets its own static-shape graph, as a training run with a fixed
    # batch does; automatic dynamic shapes would otherwise kick in from the second shape on.
    compiled = torch.compile(module, mode=None if mode == "default" else mode, dynamic=False)
    return module, compiled


def reset_compiled_state() -> None:
    """Forget compiled graphs between shapes (keeps the recompile counters from piling up)."""
    torch._dynamo.reset()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimingPlan:
    """How long to warm up and repeat. GPU values are do_bench's milliseconds."""

    gpu_warmup_ms: float
    gpu_rep_ms: float
    cpu_min_repeats: int
    cpu_max_repeats: int
    cpu_target_s: float     # keep repeating on a CPU until this much time was timed (or max)


BLOCK_TIMING = TimingPlan(gpu_warmup_ms=50, gpu_rep_ms=300, cpu_min_repeats=3, cpu_max_repeats=15, cpu_target_s=0.3)
MODEL_TIMING = TimingPlan(gpu_warmup_ms=300, gpu_rep_ms=2000, cpu_min_repeats=3, cpu_max_repeats=10, cpu_target_s=1.0)
QUICK_TIMING = TimingPlan(gpu_warmup_ms=10, gpu_rep_ms=50, cpu_min_repeats=3, cpu_max_repeats=3, cpu_target_s=0.0)
#: Triton kernels under TRITON_INTERPRET=1 take seconds per call: the point of timing them on
#: a CPU is that the path runs, so one timed call after the warm-up.
INTERPRETED_TIMING = TimingPlan(gpu_warmup_ms=0, gpu_rep_ms=0, cpu_min_repeats=1, cpu_max_repeats=1, cpu_target_s=0.0)


def timing_plan(impl: "Implementation", device: torch.device, plan: TimingPlan) -> TimingPlan:
    """``plan``, except for Triton kernels running under the interpreter on a CPU."""
    if device.type == "cpu" and impl.backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return INTERPRETED_TIMING
    return plan


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without needing numpy."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def round_significant(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits (tiny CPU rates must not round to 0)."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def _clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def time_callable(fn: Callable[[], Any], device: torch.device, plan: TimingPlan,
                  grad_to_none: Sequence[torch.Tensor] = ()) -> dict:
    """Median and 20/80% quantiles of ``fn()`` in ms (see the module docstring for the method).

    The caller has already run ``fn`` once (compilation, autotuning, cuDNN's algorithm search).
    """
    if device.type == "cuda":
        from triton.testing import do_bench
        median, q20, q80 = do_bench(fn, warmup=plan.gpu_warmup_ms, rep=plan.gpu_rep_ms,
                                    grad_to_none=list(grad_to_none) or None, quantiles=list(QUANTILES))
        return {"median_ms": median, "q20_ms": q20, "q80_ms": q80, "timer": "triton.testing.do_bench"}
    times_ms: list[float] = []
    timed_s = 0.0
    while len(times_ms) < plan.cpu_max_repeats and (len(times_ms) < plan.cpu_min_repeats
                                                     or timed_s < plan.cpu_target_s):
        _clear_grads(grad_to_none)
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times_ms.append(elapsed * 1e3)
        timed_s += elapsed
    return {"median_ms": statistics.median(times_ms), "q20_ms": quantile(times_ms, 0.2),
            "q80_ms": quantile(times_ms, 0.8), "repeats": len(times_ms), "timer": "time.perf_counter"}


def time_each_call(fn: Callable[[], Any], device: torch.device, calls: int, burn_in: int) -> list[float]:
    """Milliseconds of each of ``calls`` synchronous calls after ``burn_in`` untimed ones.

    The classic benchmarks' method (host clock around each call, device synchronised): it
    includes launch overhead, which is the point when a workload is launch-bound.
    """
    for _ in range(burn_in):
        fn()
    synchronize(device)
    times_ms = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times_ms.append((time.perf_counter() - start) * 1e3)
    return times_ms


def peak_memory(fn: Callable[[], Any], device: torch.device,
                grad_to_none: Sequence[torch.Tensor] = ()) -> dict:
    """Absolute peak and increment over the live baseline of one call, in MiB ("n/a" on a CPU)."""
    if device.type != "cuda":
        return {"peak_mib": "n/a", "peak_increment_mib": "n/a"}
    _clear_grads(grad_to_none)
    gc.collect()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mib": round(peak / 2**20, 1), "peak_increment_mib": round((peak - baseline) / 2**20, 1)}


def launch_totals() -> dict[str, int]:
    """Kernel launches so far, per fused backend (the backends' own counters)."""
    return {"triton": sum(triton_launch_counts().values()), "cuda": sum(cuda_launch_counts().values())}


def host_time_ms(fn: Callable[[], Any], device: torch.device, calls: int = 3) -> float:
    """Median wall time of an unsynchronised call of ``fn`` (the device drained before each):
    on a GPU, what the host spends issuing the work; on a CPU, the whole call."""
    times = []
    for _ in range(calls):
        synchronize(device)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    synchronize(device)
    return statistics.median(times)


def unfused_blocks(module: nn.Module) -> Optional[str]:
    """Why ``module`` (a fused row's) would not time fused kernels: no block found, or blocks
    that run eager (``resnet_fused.describe``); None when every block is fused."""
    blocks = resnet_fused.describe(module, as_dict=True)
    if not blocks:
        return "proof: no pre- or post-activation block found in the module (it would time eager)"
    eager = [f"{path} ({info.get('runs')})" for path, info in blocks.items() if not info.get("fused")]
    if eager:
        return (f"proof: {len(eager)} of {len(blocks)} blocks run eager, not fused: {', '.join(eager[:4])}"
                + (" ..." if len(eager) > 4 else ""))
    return None


def measure(fn: Callable[[], Any], device: torch.device, plan: TimingPlan,
            grad_to_none: Sequence[torch.Tensor] = (), backend: Optional[str] = None) -> dict:
    """Warm up, time and take the peak memory of ``fn``: the fields of one result row.

    ``backend`` (a fused row's): the warm-up call must launch that backend's kernels, else the
    row is an error (it would time something else under the backend's name). A failure becomes
    ``status: error`` with its message, so one failing case never loses the rest of a run.
    """
    try:
        before = launch_totals()
        warmup_s = warm_up(fn, device)
        after = launch_totals()
        launches = {k: after[k] - before[k] for k in after}
        if backend in ("triton", "cuda") and launches[backend] == 0:
            return {"status": "error", "warmup_launches": launches,
                    "reason": f"proof: the warm-up call launched 0 {backend} kernels (the row would time eager)"}
        host_ms = host_time_ms(fn, device)
        timing = time_callable(fn, device, plan, grad_to_none)
        memory = peak_memory(fn, device, grad_to_none)
    except Exception as exc:
        free_memory(device)
        return {"status": "error", "reason": short_error(exc)}
    row = {"status": "ok", "warmup_s": round(warmup_s, 3), "warmup_launches": launches,
           "host_ms": round_significant(host_ms, 4), **timing, **memory}
    for key in ("median_ms", "q20_ms", "q80_ms"):
        row[key] = round_significant(row[key], 5)
    return row


def tflops(macs: int, median_ms: float) -> float:
    """TFLOP/s of ``macs`` multiply-accumulates done in ``median_ms`` (one MAC = 2 FLOPs)."""
    return round_significant(2 * macs / (median_ms * 1e-3) / 1e12)


def warm_up(fn: Callable[[], Any], device: torch.device) -> float:
    """Run ``fn`` once (compiling, autotuning); return the seconds it took."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------


def measure_ceilings(device: torch.device, compute_dtypes: Iterable[torch.dtype]) -> dict:
    """Measured matrix-product rate per compute dtype (TFLOP/s) and copy bandwidth (TB/s).

    GPU: an 8192^3 product on random data (zeros run faster than real data), and a 1 GiB
    device-to-device copy counting bytes read plus written. fp32 is measured with TF32 allowed,
    as cuDNN runs fp32 convolutions by default. CPU: a 1024^3 product and a 64 MiB copy, only so
    that the CPU run exercises the same code; its floors mean little.
    """
    gpu = device.type == "cuda"
    size = 8192 if gpu else 1024
    plan = TimingPlan(25, 200, 3, 5, 0.2)
    result: dict[str, Any] = {"matmul_size": size, "matmul_tflops": {}}
    previous_precision = torch.get_float32_matmul_precision()
    for dtype in dict.fromkeys(compute_dtypes):
        allow_tf32 = dtype == torch.float32 and gpu and torch.backends.cudnn.allow_tf32
        try:
            torch.set_float32_matmul_precision("high" if allow_tf32 else previous_precision)
            a = torch.randn(size, size, device=device, dtype=dtype)
            b = torch.randn(size, size, device=device, dtype=dtype)
            a @ b
            synchronize(device)
            ms = time_callable(lambda: a @ b, device, plan)["median_ms"]
        finally:
            torch.set_float32_matmul_precision(previous_precision)
        result["matmul_tflops"][str(dtype).replace("torch.", "")] = round_significant(2 * size**3 / (ms * 1e-3) / 1e12)
        del a, b
    copy_bytes = 2**30 if gpu else 2**26
    source = torch.randn(copy_bytes // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    ms = time_callable(lambda: target.copy_(source), device, plan)["median_ms"]
    result["copy_bytes"] = copy_bytes
    result["copy_tbps"] = round_significant(2 * copy_bytes / (ms * 1e-3) / 1e12)
    del source, target
    free_memory(device)
    return result


def ceiling_for(ceilings: dict, dtype: torch.dtype) -> Optional[tuple[float, float]]:
    """(peak FLOP/s, bandwidth bytes/s) for a compute dtype, None if it was not measured."""
    rate = ceilings.get("matmul_tflops", {}).get(str(dtype).replace("torch.", ""))
    if rate is None or not ceilings.get("copy_tbps"):
        return None
    return rate * 1e12, ceilings["copy_tbps"] * 1e12


# ---------------------------------------------------------------------------------------------
# Ratios, the run record, tables, plots
# ---------------------------------------------------------------------------------------------


def add_speedups(rows: list[dict], same_case: Sequence[str], value: str = "median_ms") -> None:
    """Add ``speedup_vs_eager`` and ``speedup_vs_compile`` (> 1: faster than that baseline) to
    every measured row, against the baseline row of the same case from the same run; ``value``
    is a time (lower is better)."""
    def case(row: dict) -> tuple:
        return tuple(row.get(k) for k in same_case)

    baselines: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row.get("status") == "ok" and row["impl"] in ("eager", "compile"):
            baselines.setdefault(case(row), {})[row["impl"]] = row[value]
    for row in rows:
        if row.get("status") != "ok":
            continue
        for baseline in ("eager", "compile"):
            reference = baselines.get(case(row), {}).get(baseline)
            speedup = None
            if reference:
                speedup = reference / row[value]
            row[f"speedup_vs_{baseline}"] = None if speedup is None else round_significant(speedup)


class RunRecord:
    """One run's JSON: what was asked, where it ran, what it measured. Written after every
    case (``complete`` false until the end), so a run cut short still leaves its rows."""

    def __init__(self, what: str, args: argparse.Namespace, device: torch.device,
                 conventions: dict[str, str]):
        self.data: dict[str, Any] = {
            "what": what,
            "schema": 1,
            "complete": False,
            "config": {k: v for k, v in vars(args).items()},
            "environment": environment(device),
            "conventions": conventions,
            "ceilings": None,
            "notes": [],
            "rows": [],
        }
        out_dir = Path(args.out) if args.out else Path(os.environ.get("OUT") or REPO_ROOT / "benchmarks" / "out")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = args.name or f"{stamp}_{device_slug(self.data['environment'])}_{what}"
        self.json_path = out_dir / f"{name}.json"
        self.png_path = out_dir / f"{name}.png"

    @property
    def rows(self) -> list[dict]:
        return self.data["rows"]

    def note(self, text: str) -> None:
        self.data["notes"].append(text)

    def write(self, complete: bool = False) -> Path:
        self.data["complete"] = complete
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.json_path)  # never leave a half-written JSON behind
        return self.json_path


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width table. ``columns``: (header, row key, format spec); missing values as "-"."""
    def cell(row: dict, key: str, spec: str) -> str:
        value = row.get(key)
        if value is None or value == "":
            return "-"
        if isinstance(value, (int, float)) and not isinstance(value, bool) and spec:
            return format(value, spec)
        return str(value)

    cells = [[cell(row, key, spec) for _, key, spec in columns] for row in rows]
    widths = [max([len(header)] + [len(r[i]) for r in cells]) for i, (header, _, _) in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip((c[0] for c in columns), widths)))]
    for r in cells:
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def geometric_mean(values: Iterable[float]) -> Optional[float]:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def plot_grouped_bars(panels: dict[str, dict[str, dict[str, float]]], path: Path, ylabel: str,
                      title: str, markers: Optional[dict[str, dict[str, float]]] = None,
                      log_y: bool = False) -> str:
    """One subplot per panel; in each, groups along x and one bar per series.

    ``panels[panel][group][series] = value``; ``markers[panel][group]`` draws a black tick
    across the group (the floor). Returns a note: where the PNG went, or why there is none.
    """
    if not panels:
        return "no plot: nothing was measured"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed"
    n = len(panels)
    fig, axes = plt.subplots(n, 1, figsize=(max(8.0, 1.1 * max(len(g) for g in panels.values()) + 3), 3.2 * n),
                             squeeze=False)
    for ax, (panel, groups) in zip(axes[:, 0], panels.items()):
        series = list(dict.fromkeys(s for values in groups.values() for s in values))
        width = 0.8 / max(len(series), 1)
        for i, name in enumerate(series):
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            ys = [values.get(name, float("nan")) for values in groups.values()]
            ax.bar(xs, ys, width, label=name)
        for g, group in enumerate(groups):
            floor = (markers or {}).get(panel, {}).get(group)
            if floor:
                ax.hlines(floor, g - 0.45, g + 0.45, colors="black", linewidth=1.5,
                          label="floor" if g == 0 else None)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(list(groups), rotation=20, ha="right", fontsize=8)
        ax.set_title(panel, fontsize=10)
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=min(len(series) + 1, 6))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"PNG: {path}"


class Budget:
    """A wall-clock budget for a run, so that a phase on the GPU machine ends in its slot.

    Cases are refused, not interrupted: a case is expected to take as long as the slowest
    case of the same kind (implementation) so far, ``first_case_s`` before there is one.
    """

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self.start = time.perf_counter()
        self.case_seconds: dict[str, list[float]] = {}

    def left(self) -> float:
        if self.seconds is None:
            return math.inf
        return self.seconds - (time.perf_counter() - self.start)

    def refusal(self, key: str, first_case_s: float) -> Optional[str]:
        """Why a case of kind ``key`` (an implementation's name) should not start (None: go ahead)."""
        seen = self.case_seconds.get(key)
        estimate = max(seen) if seen else first_case_s
        if self.left() > estimate:
            return None
        return f"budget: {max(self.left(), 0):.0f} s of --budget-s left, about {estimate:.0f} s needed"

    def observe(self, key: str, seconds: float) -> None:
        self.case_seconds.setdefault(key, []).append(seconds)


def add_common_arguments(parser: argparse.ArgumentParser, default_dtype: str, default_modes: str,
                         modes: Sequence[str]) -> None:
    """The options both benchmarks take, with the same meaning."""
    parser.add_argument("--dtype", default=None,
                        help=f"comma-separated dtype modes from {', '.join(DTYPE_MODES)} (pure: module and "
                             f"input .to(dtype); amp: fp32 parameters under torch.autocast). "
                             f"Default: {default_dtype} on a GPU, fp32 on a CPU")
    parser.add_argument("--modes", default=default_modes, help=f"comma-separated, from {', '.join(modes)}")
    parser.add_argument("--impls", default=None,
                        help="comma-separated implementations: eager, compile, compile-cudagraphs, a fused "
                             f"backend ({', '.join(FUSED_BACKENDS)}), or <backend>+compile[-cudagraphs]. "
                             "Default: eager, compile and every available fused backend on a GPU; eager "
                             "(and triton when TRITON_INTERPRET=1) on a CPU")
    parser.add_argument("--compile-mode", default="default",
                        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                        help="torch.compile mode of the 'compile' implementations")
    parser.add_argument("--memory-format", default="channels_last", choices=tuple(MEMORY_FORMATS))
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on a GPU, 2 on a CPU")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="a smoke test: fewer cases, short timing")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new cases when this many seconds are used (the cases left are "
                             f"recorded as skipped). Default: none on a GPU; {CPU_DEFAULT_BUDGET_S:.0f} on a CPU "
                             "unless --impls is given")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/out/)")
    parser.add_argument("--name", default=None,
                        help="file name stem of the JSON and PNG (default: <date>_<device>_<what>)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch threads on a CPU-only run (1: repeatable on small shared machines)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the GPU check's CPU dry run: the cuda backend runs its host emulator, and "
                             "GPU_CHECK_DRY_RUN_FAULT (benchmarks/faults.py) is read")
    parser.add_argument("--require-gpu", action="store_true",
                        help="refuse to run (exit 2) when torch sees no CUDA GPU, instead of timing the "
                             "CPU (the GPU check passes it)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the cuda rows in this process (default: a process of their own, after "
                             "the other rows, when other implementations run too)")


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                           device: torch.device, modes: Sequence[str], default_dtype: str,
                           interpreted_triton: bool = True) -> tuple[list[DtypeMode], list[str], list[Implementation]]:
    """Validate the common options; exit through ``parser.error`` with a clear message."""
    if args.require_gpu and device.type != "cuda":
        parser.error(f"--require-gpu: torch sees no CUDA GPU (torch.cuda.is_available() is "
                     f"{torch.cuda.is_available()}, --device {args.device}); refusing to time full-size "
                     "work on the CPU. Use --dry-run or drop --require-gpu for a CPU run")
    try:
        dtype_names = parse_dtypes(args.dtype, device, default_dtype, "--dtype")
        mode_names = parse_choices(args.modes, modes, "--modes")
        impls = parse_impls(args.impls, device, interpreted_triton=interpreted_triton)
    except ValueError as exc:
        parser.error(str(exc))
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be a positive integer, got {args.batch}")
    if args.cpu_threads < 1:
        parser.error(f"--cpu-threads must be a positive integer, got {args.cpu_threads}")
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.budget_s is None and device.type == "cpu" and args.impls is None:
        # The default CPU run must stay a quick check even when Triton kernels run interpreted;
        # implementations asked for by name run without a budget unless --budget-s says so.
        args.budget_s = CPU_DEFAULT_BUDGET_S
    return [DTYPE_MODES[m] for m in dtype_names], mode_names, impls


def parse_dtypes(text: Optional[str], device: torch.device, gpu_default: str, option: str) -> list[str]:
    """Dtype mode names; the default is ``gpu_default`` on a GPU and fp32 on a CPU, where fp16
    is refused (CPU convolutions in fp16 are slow or missing)."""
    names = parse_choices(text or (gpu_default if device.type == "cuda" else "fp32"), DTYPE_MODES, option)
    if device.type == "cpu":
        gpu_only = [m for m in names if DTYPE_MODES[m].storage == torch.float16]
        if gpu_only:
            raise ValueError(f"{option} {','.join(gpu_only)}: fp16 is a GPU dtype here (CPU convolutions "
                             "in fp16 are slow or missing); use fp32 or bf16 on a CPU")
    return names


def print_banner(device: torch.device, banner: str = CPU_BANNER) -> None:
    """The first line of output on a machine without a GPU says what the numbers are."""
    if device.type == "cpu":
        print(banner, flush=True)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def short_error(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary_lines(rows: Sequence[dict], impls: Sequence[Implementation], group_key: str) -> list[str]:
    """The closing lines of a run: row counts, each implementation's geometric-mean speedup
    over eager per ``group_key`` value (e.g. per mode), and why rows were not measured."""
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "unavailable", "skipped", "error")}
    lines = [f"summary: {len(rows)} rows: {counts['ok']} measured, {counts['unavailable']} unavailable, "
             f"{counts['skipped']} skipped (budget), {counts['error']} errors"]
    groups = list(dict.fromkeys(r[group_key] for r in rows))
    for impl in impls:
        impl_rows = [r for r in rows if r["impl"] == impl.name]
        speedups = []
        for group in groups:
            g = geometric_mean(r.get("speedup_vs_eager") for r in impl_rows
                               if r[group_key] == group and r["status"] == "ok")
            if g is not None and impl.name != "eager":
                speedups.append(f"{group} {g:.3g}x")
        if speedups:
            lines.append(f"  {impl.name}: geometric-mean speedup vs eager: {', '.join(speedups)}")
        for status in ("unavailable", "error", "skipped"):
            reasons = sorted({r["reason"] for r in impl_rows if r["status"] == status})
            for reason in reasons[:3]:
                lines.append(f"  {impl.name}: {status}: {reason}")
            if len(reasons) > 3:
                lines.append(f"  {impl.name}: ... and {len(reasons) - 3} more {status} reasons in the JSON")
    return lines


def exit_code(rows: Sequence[dict]) -> int:
    """Non-zero when any case failed (unavailable implementations are not failures)."""
    return 1 if any(row.get("status") == "error" for row in rows) else 0

