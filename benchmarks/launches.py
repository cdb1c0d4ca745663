"""Kernel launches of a model step, counted on the CPU: what a small-batch GPU step pays first.

    python -m benchmarks.launches --model resnet_v2_50

At batch 32 or less a ResNet step is launch-bound: each launch costs microseconds of host time
whatever its size. This prints, for a training step (forward + backward), a train forward and an
eval forward, the launches of three implementations, counted by
``resnet_fused.launch_count.count_launches`` (Triton launches + the outermost ATen ops that
launch a device kernel; views, metadata and allocation excluded):

* eager: the reference model (PyTorch's own ops);
* fused before: the Triton-fused model before stage fusion and launch economy, as recorded in
  ``benchmarks/results/launches_before.json`` (counted the same way at commit 8a62a7a);
* fused now: the Triton-fused model of this checkout.

The Triton kernels are counted without being run (which kernels launch never depends on the
values), so this takes seconds on a CPU; the counts do not depend on the input size.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional, Sequence

# Count what the CPU runs: Triton's launchers under the interpreter (read when triton loads).
os.environ.setdefault("TRITON_INTERPRET", "1")

BEFORE_PATH = Path(__file__).resolve().parent / "results" / "launches_before.json"
#: The order rows are printed in.
STEPS = ("train_step", "train_fwd", "eval_fwd")


def measure(name: str, batch: int = 2, image_size: int = 32) -> dict:
    """{"eager" | "fused": {mode: count_launches(...)}} for model ``name``."""
    import torch

    import resnet_fused as rf
    from resnet_fused.launch_count import count_launches

    x = torch.randn(batch, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    out = {}
    for label, backend in (("eager", "reference"), ("fused", "triton")):
        torch.manual_seed(0)
        model = rf.create_model(name, backend=backend).to(memory_format=torch.channels_last)
        out[label] = {mode: count_launches(model, x, mode) for mode in STEPS}
    return out


def load_before(name: str) -> Optional[dict]:
    if not BEFORE_PATH.exists():
        return None
    return json.loads(BEFORE_PATH.read_text()).get("models", {}).get(name)


def format_table(name: str, now: dict, before: Optional[dict]) -> str:
    lines = [f"{name}: kernel launches per step (Triton launches + outermost kernel-launching ATen ops, "
             "counted on the CPU)",
             f"{'step':<12}{'eager':>7}{'fused before':>14}{'fused now':>11}   now: triton + aten (largest ATen ops)"]
    for mode in STEPS:
        fused = now["fused"][mode]
        old = before["fused"][mode]["total"] if before else "-"
        top = ", ".join(f"{op.replace('aten::', '')} {n}" for op, n in list(fused["aten_by_op"].items())[:4])
        lines.append(f"{mode:<12}{now['eager'][mode]['total']:>7}{old:>14}{fused['total']:>11}   "
                     f"{fused['triton']} + {fused['aten']} ({top})")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.launches", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet_v2_50")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--json", default=None, help="also write the counts to this file")
    args = parser.parse_args(argv)
    now = measure(args.model, args.batch, args.image_size)
    print(format_table(args.model, now, load_before(args.model)))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "counts": now}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
