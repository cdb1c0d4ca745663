"""Where a benchmark runs: the environment record, the device, torch's settings, the CPU banner."""
from __future__ import annotations

import datetime
import os
import platform
import re
import socket
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch

import resnet_fused


REPO_ROOT = Path(__file__).resolve().parent.parent

CPU_BANNER = ("CPU-only machine: running the eager reference (and Triton-interpreted paths when "
              "available) at small sizes; these numbers are not GPU performance.")
CPU_BANNER_EAGER_ONLY = ("CPU-only machine: running the eager reference at tiny sizes; these numbers "
                         "are not GPU performance.")

#: A CPU-only run stops starting new work after this many seconds unless --budget-s says otherwise.
CPU_DEFAULT_BUDGET_S = 90.0


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
