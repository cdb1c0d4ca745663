"""Per-kernel device time of one unit per fused backend, under torch.profiler (a few steps).

    python scripts/gpu_profile.py --out profile.json [--unit conv3_x.identity] [--steps 3]
    python scripts/gpu_profile.py --dry-run --out profile.json     # tiny, on the CPU

ResNet-v2-50's unit (batch 256, bf16, channels_last; the dry run: batch 2 at widths / 16, fp32)
in train mode, forward + backward: one untimed step, then ``--steps`` steps under the profiler.
For each backend (triton first, then cuda: a fault in the second loses nothing of the first),
the kernels by self device time (on a CPU: the ops by self CPU time), and the step's total.
The JSON is written after each backend.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import resnet_fused as rf  # noqa: E402
from resnet_fused.configs import resnet50_stage_units  # noqa: E402

from benchmarks import faults  # noqa: E402

TOP_KERNELS = 25


def self_time_us(event, device: bool) -> float:
    """An averaged event's self time on the device (or the CPU), across torch versions."""
    names = ("self_device_time_total", "self_cuda_time_total") if device else ("self_cpu_time_total",)
    for name in names:
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def profile_backend(backend: str, unit, batch: int, dtype: torch.dtype, device: torch.device, steps: int) -> dict:
    torch.manual_seed(0)
    block = rf.make_block(unit.block, backend=backend, **unit.block_kwargs())
    block = block.to(device=device, dtype=dtype).to(memory_format=torch.channels_last).train()
    x = torch.randn(unit.input_shape(batch), device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()

    def step() -> None:
        x.grad = None
        block.zero_grad(set_to_none=True)
        block(x).float().sum().backward()

    step()
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if gpu:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - started) * 1e3 / steps
    events = [e for e in prof.key_averages() if self_time_us(e, gpu) > 0]
    events.sort(key=lambda e: self_time_us(e, gpu), reverse=True)
    total = sum(self_time_us(e, gpu) for e in events)
    return {"status": "ok", "unit": unit.name, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
            "steps": steps, "wall_ms_per_step": round(wall_ms, 3), "clock": "device" if gpu else "cpu",
            "total_self_us_per_step": round(total / steps, 1),
            "kernels": [{"name": e.key[:160], "calls_per_step": e.count / steps,
                         "self_us_per_step": round(self_time_us(e, gpu) / steps, 1),
                         "share": round(self_time_us(e, gpu) / total, 4) if total else None}
                        for e in events[:TOP_KERNELS]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--unit", default="conv3_x.identity")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backends", default="triton,cuda")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        print("gpu_profile: no GPU here; use --dry-run for the CPU flow", file=sys.stderr)
        return 2
    faults.install(args.dry_run)
    device = torch.device("cuda" if gpu else "cpu")
    unit = {u.name: u for u in resnet50_stage_units("resnet_v2_50")}[args.unit]
    batch, dtype, steps = 256, torch.bfloat16, args.steps
    if not gpu:
        unit = replace(unit, in_chs=max(unit.in_chs // 16, 16), out_chs=max(unit.out_chs // 16, 16), height=4, width=4)
        batch, dtype, steps = 2, torch.float32, 1
    result: dict = {"what": "profile", "device": torch.cuda.get_device_name() if gpu else "cpu (dry run)",
                    "backends": {}}
    available = set(rf.available_backends())
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if backend not in available:
            result["backends"][backend] = {"status": "unavailable"}
            continue
        try:
            result["backends"][backend] = profile_backend(backend, unit, batch, dtype, device, steps)
        except Exception as exc:  # a faulting backend must not lose the others' profiles
            result["backends"][backend] = {"status": "error", "failure": faults.classify(str(exc)),
                                           "reason": " ".join(f"{type(exc).__name__}: {exc}".split())[:600]}
        Path(args.out).write_text(json.dumps(result, indent=1))
        entry = result["backends"][backend]
        print(f"profile {backend}: {entry['status']}"
              + (f", {entry['wall_ms_per_step']} ms/step, top {entry['kernels'][0]['name'][:60] if entry['kernels'] else '-'}"
                 if entry["status"] == "ok" else f" ({entry.get('reason', '')[:200]})"), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
