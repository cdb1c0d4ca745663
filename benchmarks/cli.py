"""The options both benchmarks take, and the wall-clock budget they run under."""
from __future__ import annotations

import argparse
import math
import time
from typing import Optional, Sequence

import torch


from benchmarks.environment import CPU_DEFAULT_BUDGET_S
from benchmarks.impls import DtypeMode, DTYPE_MODES, MEMORY_FORMATS, parse_choices, FUSED_BACKENDS, Implementation, parse_impls


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
