"""Kernel launches of a model step, counted on the CPU: what a small-batch GPU step pays first.

    python -m benchmarks.launches                      # both models, both fused backends
    python -m benchmarks.launches --model resnet_v2_50 --backend triton

At batch 32 or less a ResNet step is launch-bound: each launch costs microseconds of host time
whatever its size. This prints, for a training step (forward + backward), a train forward and an
eval forward, the launches counted by ``resnet_fused.launch_count.count_launches`` (Triton
launches + CUDA C++ op calls + the outermost ATen ops that launch a device kernel; views,
metadata and allocation excluded) of

* eager: the reference model (PyTorch's own ops);
* each fused backend asked for (``--backend``, default triton and cuda).

Models: this package's names (``resnet_v2_50``) and ``torchvision:<name>`` (torchvision's model,
converted with ``resnet_fused.convert``). The Triton kernels are counted without being run (which
kernels launch never depends on the values); the CUDA backend's ops run (on a CPU, through its
host emulator, which takes minutes for a ResNet-50 step). The counts do not depend on the input
size.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional, Sequence

# Count what the CPU runs: Triton's launchers under the interpreter (read when triton loads, so
# this is set before torch and the package are imported below).
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import resnet_fused as rf  # noqa: E402
from resnet_fused.launch_count import count_launches  # noqa: E402

#: The order rows are printed in.
STEPS = ("train_step", "train_fwd", "eval_fwd")
MODELS = ("resnet_v2_50", "torchvision:resnet50")
BACKENDS = ("triton", "cuda")
TORCHVISION_PREFIX = "torchvision:"


def build(name: str, backend: str) -> torch.nn.Module:
    """Model ``name`` running ``backend`` ("reference" = eager), channels_last, seeded."""
    torch.manual_seed(0)
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision  # optional dependency: only for torchvision:<name> models

        model = getattr(torchvision.models, name[len(TORCHVISION_PREFIX):])()
        if backend != "reference":
            rf.convert(model, backend=backend)
    else:
        model = rf.create_model(name, backend=backend)
    return model.to(memory_format=torch.channels_last)


def measure(name: str, backends: Sequence[str] = BACKENDS, batch: int = 2, image_size: int = 32) -> dict:
    """{"eager" | backend: {mode: count_launches(...)}} for model ``name``."""
    x = torch.randn(batch, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    out = {}
    for label, backend in (("eager", "reference"), *((b, b) for b in backends)):
        model = build(name, backend)
        out[label] = {mode: count_launches(model, x, mode) for mode in STEPS}
    return out


def format_table(name: str, counts: dict) -> str:
    labels = list(counts)
    lines = [f"{name}: kernel launches per step (Triton launches + CUDA op calls + outermost "
             "kernel-launching ATen ops, counted on the CPU)",
             f"{'step':<12}" + "".join(f"{label:>9}" for label in labels)
             + "   per fused backend: triton + cuda + aten (largest ATen ops)"]
    for mode in STEPS:
        row = f"{mode:<12}" + "".join(f"{counts[label][mode]['total']:>9}" for label in labels)
        parts = []
        for label in labels[1:]:
            c = counts[label][mode]
            top = ", ".join(f"{op.replace('aten::', '')} {n}" for op, n in list(c["aten_by_op"].items())[:3])
            parts.append(f"{label}: {c['triton']} + {c['cuda']} + {c['aten']} ({top})")
        lines.append(row + "   " + "; ".join(parts))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.launches", description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", default=list(MODELS),
                        help="package model names or torchvision:<name> (default: %(default)s)")
    parser.add_argument("--backend", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--json", default=None, help="also write the counts to this file")
    args = parser.parse_args(argv)
    results = {}
    for name in args.model:
        results[name] = measure(name, args.backend, args.batch, args.image_size)
        print(format_table(name, results[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"models": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
