"""How a benchmark times: timing plans, the GPU and CPU timers, host time per call, peak memory,
the launch proof of a fused row's warm-up, the measured ceilings (see benchmarks/harness.py)."""
from __future__ import annotations

import gc
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from resnet_fused.cuda import launch_counts as cuda_launch_counts
from resnet_fused.triton.launch import launch_counts as triton_launch_counts

from benchmarks.environment import synchronize, short_error
from benchmarks.impls import Implementation, free_memory


QUANTILES = (0.5, 0.2, 0.8)


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
