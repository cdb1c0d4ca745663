"""Host time of a fused block and of a fused model step, with the device work taken out.

    python -m benchmarks.host_overhead [--model M] [--repeats N] [--json PATH]

What the host spends per call before any kernel runs: Python orchestration, op dispatch,
autograd and the launch path. The Triton kernels are skipped (``triton.launch.skip_kernels``)
at one of two levels, both printed:

* ``triton``: every launch goes through Triton with an empty grid, so Triton's own launch path
  runs and no program does. Under the CPU interpreter that path also copies every tensor
  argument's storage onto itself and patches the language per launch, work a compiled launch
  does not do: an upper bound of a GPU host's launch cost.
* ``count``: a launch returns before Triton is called: the package's own host time alone.

Rows: blocks (train forward with grad, training step, no-grad train forward, eval forward) and
models (training step, train forward, eval forward) at a 2x3x32x32 input, for

* ``eager``: the same block or model in PyTorch's own ops. Its kernels RUN (on this CPU, at
  this smallest input): its time is host time plus a small CPU compute time, an upper bound of
  eager's host time;
* ``triton``: the fused block or model, kernels skipped as above;
* ``cuda``: the same on the CUDA C++ backend, at the ``count`` level only
  (``cuda.kernels.skip_kernels``): each C++ op's registered fake runs in its place (the outputs'
  allocation stays), so the op's own dispatch, input checks and launch (a few microseconds per
  op on a GPU host) are not in it. Skipped when the extension is not built.

Pre-activation (``resnet_v2_50``, ``resnet_v2_152``, ``FusedBottleneck``) and post-activation
(torchvision ``resnet50`` converted, ``FusedPostActBottleneck``). Each number is the median
over ``--repeats`` timed calls after two warm-up calls, with ``torch.set_num_threads(1)``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

# The fused ops take CPU tensors through Triton's interpreter (read when triton loads).
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torchvision  # noqa: E402

import resnet_fused as rf  # noqa: E402
from resnet_fused import _extension  # noqa: E402
from resnet_fused.cuda import kernels as cuda_kernels  # noqa: E402
from resnet_fused.triton import launch as triton_launch  # noqa: E402

MODELS = ("resnet_v2_50", "torchvision_resnet50", "resnet_v2_152")
BLOCKS = ("FusedBottleneck(256, 256)", "FusedBottleneck(256, 512, stride=2)", "FusedPostActBottleneck(256, 64)")
BLOCK_MODES = ("train_fwd", "train_step", "train_fwd_no_grad", "eval_fwd")
MODEL_MODES = ("train_step", "train_fwd", "eval_fwd")
LEVELS = ("triton", "count")


def _model(name: str, backend: str) -> torch.nn.Module:
    """The model on ``backend`` ("reference": eager)."""
    torch.manual_seed(0)
    if name == "torchvision_resnet50":
        model = torchvision.models.resnet50()
        return rf.convert(model, backend=backend) if backend != "reference" else model
    return rf.create_model(name, backend=backend)


def _block(name: str, backend: str) -> tuple[torch.nn.Module, torch.Size]:
    """The block on ``backend`` ("reference": eager) and its input shape."""
    torch.manual_seed(0)
    fused = backend != "reference"
    if name == "FusedBottleneck(256, 256)":
        return rf.FusedBottleneck(256, 256, backend=backend), (2, 256, 8, 8)
    if name == "FusedBottleneck(256, 512, stride=2)":
        return rf.FusedBottleneck(256, 512, stride=2, backend=backend), (2, 256, 8, 8)
    if name == "FusedPostActBottleneck(256, 64)":
        if fused:
            return rf.FusedPostActBottleneck(256, 64, backend=backend), (2, 256, 8, 8)
        return torchvision.models.resnet.Bottleneck(256, 64), (2, 256, 8, 8)
    raise ValueError(f"unknown block {name!r}; known: {', '.join(BLOCKS)}")


def _step(module: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """One call of ``mode`` as a closure; the module's mode set for it."""
    module.train(mode != "eval_fwd")
    if mode == "train_step":
        def run() -> None:
            module(x).sum().backward()
            module.zero_grad(set_to_none=True)
            x.grad = None
    elif mode in ("train_fwd_no_grad", "eval_fwd"):
        def run() -> None:
            with torch.no_grad():
                module(x)
    else:
        def run() -> None:
            module(x)
    return run


def _median_ms(run: Callable[[], None], repeats: int) -> float:
    run()
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _skip(impl: str, level: Optional[str]):
    if level is None:
        return contextlib.nullcontext()
    return cuda_kernels.skip_kernels() if impl == "cuda" else triton_launch.skip_kernels(level)


def _time(module: torch.nn.Module, shape: Sequence[int], mode: str, repeats: int, impl: str,
          level: Optional[str]) -> float:
    x = torch.randn(*shape)
    if mode in ("train_step", "train_fwd") and shape[1] != 3:
        x.requires_grad_(True)  # a block inside a network: its input gradient is computed
    with _skip(impl, level):
        return _median_ms(_step(module, x, mode), repeats)


def _impls() -> list[tuple[str, Optional[str]]]:
    """(impl, skip level) of every row kind: eager (kernels run), triton at each level, cuda at
    ``count`` where the extension is built."""
    out = [("eager", None)] + [("triton", level) for level in LEVELS]
    return out + [("cuda", "count")] if _extension.is_available() else out


def measure(models: Sequence[str], blocks: Sequence[str], repeats: int) -> list[dict]:
    """Rows ``{kind, name, mode, impl, level, ms}``: eager with its kernels run, triton at each
    skip level, cuda at ``count`` (when built)."""
    rows = []
    impls = _impls()

    def add(kind, name, mode, impl, level, ms):
        rows.append(dict(kind=kind, name=name, mode=mode, impl=impl, level=level, ms=round(ms, 3)))

    for kind, names, modes in (("block", blocks, BLOCK_MODES), ("model", models, MODEL_MODES)):
        for name in names:
            built = {}
            for impl in dict.fromkeys(i for i, _ in impls):
                backend = "reference" if impl == "eager" else impl
                built[impl] = _block(name, backend) if kind == "block" else (_model(name, backend), (2, 3, 32, 32))
            for mode in modes:
                for impl, level in impls:
                    module, shape = built[impl]
                    add(kind, name, mode, impl, level or "kernels run",
                        _time(module, shape, mode, repeats, impl, level))
    return rows


def format_table(rows: list[dict]) -> str:
    out = []
    for kind, modes in (("block", BLOCK_MODES), ("model", MODEL_MODES)):
        names = list(dict.fromkeys(r["name"] for r in rows if r["kind"] == kind))
        if not names:
            continue
        head = f"{kind + ' (host ms, median)':<40}{'impl':<8}{'kernels':<13}" + "".join(f"{m:>19}" for m in modes)
        out += [head]
        for name in names:
            keys = list(dict.fromkeys((r["impl"], r["level"]) for r in rows if r["name"] == name))
            for impl, level in keys:
                by_mode = {r["mode"]: r["ms"] for r in rows
                           if r["name"] == name and (r["impl"], r["level"]) == (impl, level)}
                cells = "".join(f"{by_mode[m]:>19.2f}" if m in by_mode else f"{'-':>19}" for m in modes)
                label = "run" if impl == "eager" else f"skip:{level}"
                out.append(f"{name:<40}{impl:<8}{label:<13}{cells}")
        out.append("")
    cuda = ("cuda skip:count = each C++ op's fake in its place (no op dispatch or launch)." if _extension.is_available()
            else f"cuda: not measured ({_extension.unavailable_reason()}).")
    out.append("eager: its kernels run (CPU, smallest input). triton skip:triton = empty grids through Triton's "
               "launch path (the interpreter's); skip:count = returned before Triton. " + cuda)
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=MODELS,
                        help="a model to time (repeatable; default: all of them)")
    parser.add_argument("--no-blocks", action="store_true", help="time the models only")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    rows = measure(args.model or MODELS, () if args.no_blocks else BLOCKS, args.repeats)
    print(format_table(rows))
    if args.json:
        machine = dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), threads=args.threads,
                       torch=torch.__version__, interpreter=os.environ.get("TRITON_INTERPRET") == "1")
        Path(args.json).write_text(json.dumps(dict(machine=machine, repeats=args.repeats, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
