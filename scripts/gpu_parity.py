"""Whole-block parity of the fused backends at the real ResNet-50 / ResNeXt-50 unit shapes.

    python scripts/gpu_parity.py --out parity.json [--budget-s 110] [--batch 32]
    python scripts/gpu_parity.py --dry-run --out parity.json      # tiny shapes on the CPU

For each unit (the identity and first units of every stage of ResNet-v2-50 and ResNeXt-v2-50
32x4d, most informative first), each dtype (bf16, fp16 on a GPU) and each fused backend
(``triton``, ``cuda``), with the selector's own launch configs (nothing forced):

* eval: the output;
* train (one step): the output, the input gradient, every parameter gradient and the running
  statistics after the step;

each compared with the eager module in the same dtype, both against a float64 eager reference
built from the same rounded parameters and input, under the project's rule
(``scripts/parity_rule.py``, the formula of tests/helpers.py), eager's error taken as the largest
over the plain run and ``--spread-samples`` rounding-noise copies (tests/helpers.py:
``eager_error_spread``). Each case also asserts that its backend's kernels launched and the
other backend's did not (``resnet_fused.triton.launch`` and ``resnet_fused.cuda`` counters).

The JSON is rewritten after every case (``complete`` false until the end), so a run cut short
by its budget or a kill keeps what it did; cases the budget left out are recorded as skipped.
Exit status 0 when every case that ran passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Triton reads TRITON_INTERPRET when a kernel is decorated, so before resnet_fused is imported.
# Without a GPU the kernels can only run interpreted; gpu_check.sh forces 0 on the GPU machine.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import resnet_fused as rf  # noqa: E402
from resnet_fused.configs import UnitShape, resnet50_stage_units  # noqa: E402

import parity_rule  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BACKENDS = ("triton", "cuda")
FAMILIES = {"bottleneck": "resnet_v2_50", "resnext": "resnext_v2_50_32x4d", "postact": "resnet_v2_50"}
#: Families whose blocks are not this package's pre-activation ones: torchvision's resnet50
#: (v1.5) post-activation Bottleneck, at resnet_v2_50's unit shapes (the same shapes).
POSTACT_FAMILIES = ("postact",)


def make_unit(family: str, unit: UnitShape, backend: str) -> torch.nn.Module:
    """The block of ``unit`` for ``family`` on ``backend`` (``reference``: the eager twin)."""
    if family in POSTACT_FAMILIES:
        from benchmarks.bench_blocks import build_postact_block

        return build_postact_block(unit, backend)
    return rf.make_block(unit.block, backend=backend, **unit.block_kwargs())
#: Units in the order they run (most informative first, so a budget cut keeps the best cover):
#: an identity unit and a strided projection unit of each family, then the rest.
UNIT_ORDER = ("conv2_x.identity", "conv3_x.first", "conv4_x.identity", "conv5_x.first",
              "conv3_x.identity", "conv2_x.first", "conv4_x.first", "conv5_x.identity")
SCHEMA = 1


def units(families: list[str], names: list[str], dry_run: bool) -> list[tuple[str, UnitShape]]:
    """(family, unit) in run order: for each unit name, each family."""
    by_name = {f: {u.name: u for u in resnet50_stage_units(FAMILIES[f])} for f in families}
    out = []
    for name in names:
        for family in families:
            unit = by_name[family][name]
            out.append((family, tiny(unit) if dry_run else unit))
    return out


def tiny(unit: UnitShape) -> UnitShape:
    """A CPU-sized copy of a unit: widths / 16 (groups kept dividing the middle width), 4x4 or
    5x5 spatial (odd where the unit is strided, so partial tiles and padding both run)."""
    groups = min(unit.groups, 4)
    out = max(unit.out_chs // 16, 16)
    # the middle width a multiple of the groups, and out = 4 x mid exactly (torchvision's shape)
    while int(out * unit.bottle_ratio) % groups or int(out * unit.bottle_ratio) != out * unit.bottle_ratio:
        out += 1
    in_chs = out if unit.in_chs == unit.out_chs else max(unit.in_chs // 16, 8)
    size = 5 if unit.stride > 1 else 4
    return replace(unit, in_chs=in_chs, out_chs=out, groups=groups, height=size, width=size)


def randomize_bn(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN affine parameters and running statistics (as tests/helpers.py does)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def launch_snapshot() -> tuple[dict, dict]:
    from resnet_fused.cuda import launch_counts as cuda_counts
    from resnet_fused.triton.launch import launch_counts as triton_counts
    return dict(triton_counts()), dict(cuda_counts())


def reset_launches() -> None:
    from resnet_fused.cuda import reset_launch_counts as cuda_reset
    from resnet_fused.triton.launch import reset_launch_counts as triton_reset
    triton_reset()
    cuda_reset()


def train_step(module: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, input gradient, every parameter gradient and the running statistics after one
    train-mode forward + backward of ``grad_out``."""
    module.train()
    xi = x.detach().clone().requires_grad_()
    out = module(xi)
    out.backward(grad_out)
    result = {"train.output": out.detach(), "train.grad.input": xi.grad}
    for name, p in module.named_parameters():
        result[f"train.grad.{name}"] = p.grad if p.grad is not None else torch.zeros_like(p)
    for name, b in module.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            result[f"train.{name}"] = b.detach().clone()
    return result


def eval_forward(module: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    module.eval()
    with torch.no_grad():
        return {"eval.output": module(x)}


def everything(module: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**eval_forward(copy.deepcopy(module), x), **train_step(copy.deepcopy(module), x, grad_out)}


def spread(eager: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype,
           exact: dict, samples: int, gen: torch.Generator) -> dict[str, float]:
    """Eager's largest error over ``samples`` rounding-noise copies of the problem
    (tests/helpers.py: eager_error_spread)."""
    result = {k: 0.0 for k in exact}
    u = parity_rule.UNIT_ROUNDOFF[dtype]

    def perturbed(t: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float64, device=t.device)
        return (t.double() * (1 + u * noise)).to(t.dtype)

    for _ in range(samples):
        twin = copy.deepcopy(eager)
        with torch.no_grad():
            for p in twin.parameters():
                p.copy_(perturbed(p))
        got = everything(twin, perturbed(x).contiguous(memory_format=torch.channels_last), grad_out)
        result = {k: max(result[k], parity_rule.rel_err(got[k], exact[k])) for k in exact}
    return result


class Problem:
    """One unit in one dtype: the eager module, the float64 reference's results, eager's."""

    def __init__(self, family: str, unit: UnitShape, dtype: torch.dtype, batch: int, device: torch.device,
                 seed: int, spread_samples: int):
        self.family, self.unit, self.dtype = family, unit, dtype
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        base = make_unit(family, unit, "reference")
        randomize_bn(base, gen)
        fmt = torch.channels_last
        self.eager = base.to(device=device, dtype=dtype).to(memory_format=fmt)
        exact_module = copy.deepcopy(self.eager).double()  # from the rounded parameters
        # Activations drawn on the device (batch 32 at 56x56 is tens of MB per tensor).
        dgen = torch.Generator(device=device).manual_seed(seed + 1)
        x = torch.randn(unit.input_shape(batch), generator=dgen, dtype=torch.float64, device=device).to(dtype)
        self.x = x.contiguous(memory_format=fmt)
        with torch.no_grad():
            shape = copy.deepcopy(self.eager).eval()(self.x).shape
        self.grad_out = torch.randn(shape, generator=dgen, dtype=torch.float64, device=device).to(dtype)
        self.grad_out = self.grad_out.contiguous(memory_format=fmt)
        self.exact = everything(exact_module, self.x.double(), self.grad_out.double())
        self.eager_results = everything(self.eager, self.x, self.grad_out)
        self.spread = spread(self.eager, self.x, self.grad_out, dtype, self.exact, spread_samples, dgen)
        del exact_module

    def check(self, backend: str) -> dict:
        fused = make_unit(self.family, self.unit, backend)
        fused.load_state_dict(self.eager.state_dict())
        fused = fused.to(device=self.x.device, dtype=self.dtype).to(memory_format=torch.channels_last)
        reset_launches()
        got = everything(fused, self.x, self.grad_out)
        if self.x.is_cuda:
            torch.cuda.synchronize()
        triton_launches, cuda_launches = launch_snapshot()
        own, other = (triton_launches, cuda_launches) if backend == "triton" else (cuda_launches, triton_launches)
        checks = [parity_rule.check(got[k], self.eager_results[k], self.exact[k], self.dtype,
                                    self.spread.get(k, 0.0), what=k) for k in self.exact]
        launch_ok = sum(own.values()) > 0 and sum(other.values()) == 0
        failed = [c["what"] for c in checks if not c["ok"]]
        reason = None
        if not launch_ok:
            reason = (f"launch check: {backend} kernels launched {sum(own.values())}, the other backend's "
                      f"{sum(other.values())} (must be > 0 and 0)")
        elif failed:
            reason = f"{len(failed)} of {len(checks)} comparisons over the bound: {', '.join(failed[:6])}"
        worst = max((c["fused_err"] / c["bound"] for c in checks if c["fused_err"] is not None and c["bound"]),
                    default=None)
        return {"status": "pass" if launch_ok and not failed else "fail", "reason": reason,
                "launches": own, "other_backend_launches": other, "launch_ok": launch_ok,
                "worst_err_over_bound": None if worst is None else round(worst, 4), "checks": checks}


def environment(device: torch.device) -> dict:
    try:
        from benchmarks import harness
        env = harness.environment(device)
    except Exception as exc:  # the record must still be written
        env = {"error": f"{type(exc).__name__}: {exc}", "torch": torch.__version__}
    env["tuned_tables"] = os.environ.get("RESNET_FUSED_TUNED", "1")
    return env


def short_error(exc: BaseException, limit: int = 600) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summarize(cases: list[dict]) -> dict:
    """{backend: {dtype: pass | fail | error | not run}}: fail if any case failed or errored."""
    out: dict[str, dict[str, str]] = {}
    for case in cases:
        slot = out.setdefault(case["backend"], {})
        status = case["status"]
        previous = slot.get(case["dtype"], "not run")
        rank = {"not run": 0, "pass": 1, "error": 2, "fail": 3}
        if status in ("pass", "fail", "error") and rank[status] > rank[previous]:
            slot[case["dtype"]] = status
        else:
            slot.setdefault(case["dtype"], previous)
    return out


class Record:
    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    def write(self, complete: bool = False) -> None:
        self.data["complete"] = complete
        self.data["summary"] = summarize(self.data["cases"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.parent / f".{self.path.name}.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the JSON to write")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (interpreter, host emulator)")
    parser.add_argument("--batch", type=int, default=None, help="default 32 on a GPU, 2 in a dry run")
    parser.add_argument("--dtypes", default=None, help="comma-separated: bf16, fp16, fp32 (default bf16,fp16)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--units", default=None, help=f"comma-separated unit names (default: {','.join(UNIT_ORDER)})")
    parser.add_argument("--budget-s", type=float, default=None, help="start no case after this many seconds")
    parser.add_argument("--spread-samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.monotonic()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type == "cpu" and not args.dry_run:
        print("gpu_parity: no GPU here; use --dry-run for the CPU flow", file=sys.stderr)
        return 2
    dtypes = [DTYPES[d.strip()] for d in (args.dtypes or "bf16,fp16").split(",") if d.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    names = [u.strip() for u in (args.units or ",".join(UNIT_ORDER)).split(",") if u.strip()]
    batch = args.batch or (32 if device.type == "cuda" else 2)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False  # the fp32 path is not what is checked here
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)) if device.type == "cuda" else 1)

    record = Record(Path(args.out), {
        "what": "parity", "schema": SCHEMA, "complete": False, "dry_run": args.dry_run,
        "rule": "rel_err(fused, fp64) <= 2 * max(rel_err(eager, fp64), eager spread) + 2 * unit roundoff "
                "(tests/helpers.py; scripts/parity_rule.py)",
        "config": {"batch": batch, "dtypes": [str(d).replace("torch.", "") for d in dtypes], "backends": backends,
                   "families": families, "units": names, "budget_s": args.budget_s,
                   "spread_samples": args.spread_samples, "seed": args.seed,
                   "launch_configs": "the selector's own (nothing forced)"},
        "environment": environment(device), "cases": [], "summary": {},
    })
    record.write()
    available = set(rf.available_backends())
    last_problem_s = 0.0
    exit_code = 0
    for family, unit in units(families, names, args.dry_run):
        for dtype in dtypes:
            dtype_name = str(dtype).replace("torch.", "")
            base = {"family": family, "unit": unit.name, "label": f"{family}:{unit.name}", "dtype": dtype_name,
                    "batch": batch, "in_chs": unit.in_chs, "out_chs": unit.out_chs, "mid_chs": unit.mid_chs,
                    "stride": unit.stride, "groups": unit.groups, "height": unit.height, "width": unit.width}
            left = (args.budget_s - (time.monotonic() - started)) if args.budget_s else float("inf")
            # The last problem's time (setup + every backend) predicts the next one's: the first
            # ones also compile kernels, so the estimate falls as the cache fills.
            estimate = last_problem_s
            if left <= 0 or left < estimate:
                for backend in backends:
                    record.data["cases"].append({**base, "backend": backend, "status": "skipped",
                                                 "reason": f"budget: {max(left, 0):.0f} s left"})
                record.write()
                continue
            t0 = time.monotonic()
            try:
                problem = Problem(family, unit, dtype, batch, device, args.seed, args.spread_samples)
            except Exception as exc:
                for backend in backends:
                    record.data["cases"].append({**base, "backend": backend, "status": "error",
                                                 "reason": "eager/reference setup: " + short_error(exc)})
                record.write()
                exit_code = 1
                continue
            for backend in backends:
                t1 = time.monotonic()
                if backend not in available:
                    record.data["cases"].append({**base, "backend": backend, "status": "unavailable",
                                                 "reason": f"not in this build (available: {sorted(available)})"})
                    record.write()
                    continue
                try:
                    result = problem.check(backend)
                except Exception as exc:
                    result = {"status": "error", "reason": short_error(exc)}
                if result["status"] != "pass":
                    exit_code = 1
                seconds = time.monotonic() - t1
                record.data["cases"].append({**base, "backend": backend, **result, "seconds": round(seconds, 2)})
                record.write()
                print(f"{family}:{unit.name} {dtype_name} {backend}: {result['status']}"
                      + (f" ({result.get('reason')})" if result.get("reason") else "")
                      + f" [{seconds:.1f} s]", flush=True)
            last_problem_s = time.monotonic() - t0
            del problem
            if device.type == "cuda":
                torch.cuda.empty_cache()
    record.data["seconds"] = round(time.monotonic() - started, 1)
    record.write(complete=True)
    print("parity summary:", json.dumps(record.data["summary"]), flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
