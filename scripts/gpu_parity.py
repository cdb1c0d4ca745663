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

The stage-chain case (family ``stage``): two blocks of ResNet-v2-50's conv3_x (the strided
projection unit, then an identity unit) as the fused models run them, statistics chained from the
first block's last conv into the second (stage fusion), under AMP (``--stage-dtype``, default
amp-bf16: fp32 parameters and BN, 16-bit activations), through the same rule; the case also
checks that the second block's statistics came chained (``rf.describe``). It is the path the
model benchmark times.

Each backend runs in its own process (triton first), under its share of the budget as a
timeout, so that a fault in one backend (a poisoned CUDA context, a crash, a hang) costs only
that backend's cases: the record names the backend and how it failed (``backend_failures``:
the exception, the CUDA error string, or the timeout), and every case that process did not get
to is recorded as an error. ``--dry-run`` reads ``GPU_CHECK_DRY_RUN_FAULT``
(``benchmarks/faults.py``) in each backend's process.

The JSON is rewritten after every case (``complete`` false until the end), so a run cut short
by its budget or a kill keeps what it did; cases the budget left out are recorded as skipped.
Exit status 0 when every case that ran passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
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
from benchmarks import faults, isolate  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: AMP dtypes (the stage-chain case): fp32 parameters, activations and autocast in the second.
AMP_DTYPES = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}
BACKENDS = ("triton", "cuda")
FAMILIES = {"bottleneck": "resnet_v2_50", "resnext": "resnext_v2_50_32x4d", "postact": "resnet_v2_50",
            "stage": "resnet_v2_50"}
#: The stage-chain family runs one unit: conv3_x's first two blocks, named by the first.
STAGE_UNIT = "conv3_x.first"
#: Families whose blocks are not this package's pre-activation ones: torchvision's resnet50
#: (v1.5) post-activation Bottleneck, at resnet_v2_50's unit shapes (the same shapes).
POSTACT_FAMILIES = ("postact",)


def make_stage_chain(unit: UnitShape, backend: str) -> torch.nn.Module:
    """Two blocks of one stage as a fused model runs them (``FusedStage``: statistics chained),
    the first of the shape ``unit`` (a stage's first unit), the second an identity unit: stage 2
    of a ResNet-v2-50 whose widths put ``unit`` there."""
    config = dataclasses.replace(rf.MODEL_CONFIGS["resnet_v2_50"], layers=(1, 2, 1, 1),
                                 channels=(unit.in_chs, unit.out_chs, unit.out_chs, unit.out_chs),
                                 bottle_ratio=unit.mid_chs / unit.out_chs)
    return rf.ResNetV2(config, backend=backend).stages[1].blocks


def make_unit(family: str, unit: UnitShape, backend: str) -> torch.nn.Module:
    """The block of ``unit`` for ``family`` on ``backend`` (``reference``: the eager twin)."""
    if family == "stage":
        return make_stage_chain(unit, backend)
    if family in POSTACT_FAMILIES:
        from benchmarks.bench_blocks import build_postact_block

        return build_postact_block(unit, backend)
    return rf.make_block(unit.block, backend=backend, **unit.block_kwargs())
#: Units in the order they run (most informative first, so a budget cut keeps the best cover):
#: an identity unit and a strided projection unit of each family, then the rest.
UNIT_ORDER = ("conv2_x.identity", "conv3_x.first", "conv4_x.identity", "conv5_x.first",
              "conv3_x.identity", "conv2_x.first", "conv4_x.first", "conv5_x.identity")
SCHEMA = 1
#: Seconds a backend's process gets past its share (its start-up); gpu_check.sh's timeout of
#: the parity part leaves 25 s past --budget-s, room for two.
CHILD_GRACE_S = 10.0


def units(families: list[str], names: list[str], dry_run: bool) -> list[tuple[str, UnitShape]]:
    """(family, unit) in run order: for each unit name, each family; the stage chain after the
    first unit name's group (the model rows depend on it: a budget cut must not drop it)."""
    by_name = {f: {u.name: u for u in resnet50_stage_units(FAMILIES[f])} for f in families}
    out = []
    for i, name in enumerate(names):
        for family in families:
            if family == "stage":
                continue
            unit = by_name[family][name]
            out.append((family, tiny(unit) if dry_run else unit))
        if i == 0 and "stage" in families:
            unit = by_name["stage"][STAGE_UNIT]
            out.append(("stage", tiny(unit) if dry_run else unit))
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


def autocast(x: torch.Tensor, amp: Optional[torch.dtype]):
    """torch.autocast to ``amp`` on ``x``'s device (a no-op context when ``amp`` is None)."""
    return torch.autocast(x.device.type, dtype=amp, enabled=amp is not None and x.dtype != torch.float64)


def train_step(module: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor,
               amp: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Output, input gradient, every parameter gradient and the running statistics after one
    train-mode forward + backward of ``grad_out`` (the forward under autocast to ``amp``)."""
    module.train()
    xi = x.detach().clone().requires_grad_()
    with autocast(x, amp):
        out = module(xi)
    out.backward(grad_out.to(out.dtype))
    result = {"train.output": out.detach(), "train.grad.input": xi.grad}
    for name, p in module.named_parameters():
        result[f"train.grad.{name}"] = p.grad if p.grad is not None else torch.zeros_like(p)
    for name, b in module.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            result[f"train.{name}"] = b.detach().clone()
    return result


def eval_forward(module: torch.nn.Module, x: torch.Tensor, amp: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    module.eval()
    with torch.no_grad(), autocast(x, amp):
        return {"eval.output": module(x)}


def everything(module: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor,
               amp: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    return {**eval_forward(copy.deepcopy(module), x, amp), **train_step(copy.deepcopy(module), x, grad_out, amp)}


def spread(eager: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype,
           exact: dict, samples: int, gen: torch.Generator, amp: Optional[torch.dtype] = None) -> dict[str, float]:
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
        got = everything(twin, perturbed(x).contiguous(memory_format=torch.channels_last), grad_out, amp)
        result = {k: max(result[k], parity_rule.rel_err(got[k], exact[k])) for k in exact}
    return result


def dtype_of(name: str) -> tuple[torch.dtype, torch.dtype, Optional[torch.dtype]]:
    """(parameter dtype, activation dtype, autocast dtype or None) of a --dtypes name."""
    if name in AMP_DTYPES:
        return torch.float32, AMP_DTYPES[name], AMP_DTYPES[name]
    return DTYPES[name], DTYPES[name], None


class Problem:
    """One unit in one dtype: the eager module, the float64 reference's results, eager's.

    ``dtype_name``: a pure dtype (module and input in it) or an AMP one (fp32 module, 16-bit
    input, forward under autocast), the bound taken in the 16-bit dtype either way."""

    def __init__(self, family: str, unit: UnitShape, dtype_name: str, batch: int, device: torch.device,
                 seed: int, spread_samples: int):
        params, dtype, self.amp = dtype_of(dtype_name)
        self.family, self.unit, self.dtype, self.params = family, unit, dtype, params
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        base = make_unit(family, unit, "reference")
        randomize_bn(base, gen)
        fmt = torch.channels_last
        self.eager = base.to(device=device, dtype=params).to(memory_format=fmt)
        exact_module = copy.deepcopy(self.eager).double()  # from the rounded parameters
        # Activations drawn on the device (batch 32 at 56x56 is tens of MB per tensor).
        dgen = torch.Generator(device=device).manual_seed(seed + 1)
        x = torch.randn(unit.input_shape(batch), generator=dgen, dtype=torch.float64, device=device).to(dtype)
        self.x = x.contiguous(memory_format=fmt)
        with torch.no_grad(), autocast(self.x, self.amp):
            shape = copy.deepcopy(self.eager).eval()(self.x).shape
        self.grad_out = torch.randn(shape, generator=dgen, dtype=torch.float64, device=device).to(dtype)
        self.grad_out = self.grad_out.contiguous(memory_format=fmt)
        self.exact = everything(exact_module, self.x.double(), self.grad_out.double())
        self.eager_results = everything(self.eager, self.x, self.grad_out, self.amp)
        self.spread = spread(self.eager, self.x, self.grad_out, dtype, self.exact, spread_samples, dgen, self.amp)
        del exact_module

    def check(self, backend: str) -> dict:
        fused = make_unit(self.family, self.unit, backend)
        fused.load_state_dict(self.eager.state_dict())
        fused = fused.to(device=self.x.device, dtype=self.params).to(memory_format=torch.channels_last)
        chain_reason = None
        if self.family == "stage":
            # The case is the chained path: the second block must take its statistics from the
            # first block's last conv, or the case checks something else.
            sources = [e.get("input_stats") for e in rf.describe(fused, as_dict=True, statistics=True).values()]
            if len(sources) != 2 or "chained" not in str(sources[1]):
                chain_reason = f"stage chain: the blocks' input statistics are {sources}, want the second chained"
        reset_launches()
        got = everything(fused, self.x, self.grad_out, self.amp)
        if self.x.is_cuda:
            torch.cuda.synchronize()
        triton_launches, cuda_launches = launch_snapshot()
        own, other = (triton_launches, cuda_launches) if backend == "triton" else (cuda_launches, triton_launches)
        checks = [parity_rule.check(got[k], self.eager_results[k], self.exact[k], self.dtype,
                                    self.spread.get(k, 0.0), what=k) for k in self.exact]
        launch_ok = sum(own.values()) > 0 and sum(other.values()) == 0
        failed = [c["what"] for c in checks if not c["ok"]]
        reason = chain_reason
        if chain_reason is not None:
            pass
        elif not launch_ok:
            reason = (f"launch check: {backend} kernels launched {sum(own.values())}, the other backend's "
                      f"{sum(other.values())} (must be > 0 and 0)")
        elif failed:
            reason = f"{len(failed)} of {len(checks)} comparisons over the bound: {', '.join(failed[:6])}"
        worst = max((c["fused_err"] / c["bound"] for c in checks if c["fused_err"] is not None and c["bound"]),
                    default=None)
        ok = launch_ok and not failed and chain_reason is None
        return {"status": "pass" if ok else "fail", "reason": reason,
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


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the JSON to write")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (interpreter, host emulator)")
    parser.add_argument("--batch", type=int, default=None, help="default 32 on a GPU, 2 in a dry run")
    parser.add_argument("--dtypes", default=None, help="comma-separated: bf16, fp16, fp32 (default bf16,fp16)")
    parser.add_argument("--stage-dtype", default="amp-bf16", choices=tuple(AMP_DTYPES),
                        help="the stage-chain case's dtype (the model benchmark's)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--units", default=None, help=f"comma-separated unit names (default: {','.join(UNIT_ORDER)})")
    parser.add_argument("--budget-s", type=float, default=None, help="start no case after this many seconds")
    parser.add_argument("--spread-samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", action="store_true",
                        help="run every backend in this process (the default: one process per backend)")
    args = parser.parse_args(argv)
    unknown = [f for f in args.families.split(",") if f.strip() and f.strip() not in FAMILIES]
    if unknown:
        parser.error(f"--families: unknown {unknown}; families: {', '.join(FAMILIES)}")
    return args


def plan(args: argparse.Namespace, dtypes: list[str], families: list[str], names: list[str]) -> list[tuple[str, UnitShape, str]]:
    """(family, unit, dtype name) of every problem, in run order: the stage chain in its own dtype."""
    out = []
    for family, unit in units(families, names, args.dry_run):
        for dtype in ([args.stage_dtype] if family == "stage" else dtypes):
            out.append((family, unit, dtype))
    return out


def base_case(family: str, unit: UnitShape, dtype: str, batch: int) -> dict:
    return {"family": family, "unit": unit.name, "label": f"{family}:{unit.name}", "dtype": dtype,
            "batch": batch, "in_chs": unit.in_chs, "out_chs": unit.out_chs, "mid_chs": unit.mid_chs,
            "stride": unit.stride, "groups": unit.groups, "height": unit.height, "width": unit.width}


def dtype_label(name: str) -> str:
    """The record's dtype name: torch's for a pure dtype, the --dtypes name for an AMP one."""
    return name if name in AMP_DTYPES else str(DTYPES[name]).replace("torch.", "")


def run_isolated(args: argparse.Namespace, argv: list[str], backends: list[str], record: "Record",
                 problems: list[tuple[str, UnitShape, str]], batch: int, started: float) -> int:
    """Each backend in its own process, in order, under its share of what is left of the budget;
    the cases merged into ``record``, a failed process's kind and text in ``backend_failures``."""
    exit_code = 0
    failures = record.data.setdefault("backend_failures", {})
    for i, backend in enumerate(backends):
        left = None if args.budget_s is None else args.budget_s - (time.monotonic() - started)
        share = None if left is None else max(left, 1.0) / (len(backends) - i)
        child_out = Path(args.out).with_name(f".{Path(args.out).stem}.{backend}.json")
        child_out.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), *isolate.strip_options(argv, ("--backends", "--out", "--budget-s")),
               "--backends", backend, "--out", str(child_out), "--in-process"]
        timeout = None
        if share is not None:
            # The child starts no case after most of its share; the rest is the last case's time,
            # then it is killed (a hang costs this backend its share, nothing more).
            cmd += ["--budget-s", f"{max(share * 0.8, 1.0):.1f}"]
            timeout = max(share, 5.0) + CHILD_GRACE_S
        print(f"--- parity: {backend} in its own process ({'no timeout' if timeout is None else f'timeout {timeout:.0f} s'})",
              flush=True)
        rc, timed_out, tail, seconds = isolate.run_child(cmd, timeout)
        child = {}
        try:
            child = json.loads(child_out.read_text())
        except (OSError, ValueError):
            pass
        cases = [c for c in child.get("cases", []) if c.get("backend") == backend]
        for case in cases:
            if case.get("status") == "error":
                case["failure"] = faults.classify(str(case.get("reason")))
        record.data["cases"].extend(cases)
        if child.get("fault_injected"):
            record.data.setdefault("fault_injected", {})[backend] = child["fault_injected"]
        failure = isolate.failure(rc, timed_out, tail, seconds, bool(child.get("complete")))
        if failure is not None:
            kind = failure["kind"]
            what = failure["reason"].split(":")[0]
            done = {(c["label"], c["dtype"]) for c in cases}
            for family, unit, dtype in problems:
                base = base_case(family, unit, dtype_label(dtype), batch)
                if (base["label"], base["dtype"]) not in done:
                    record.data["cases"].append({**base, "backend": backend, "status": "error", "failure": kind,
                                                 "reason": f"not run: the {backend} process {what}"})
        else:
            errors = [c for c in cases if c.get("status") == "error"]
            if errors:
                failure = {"kind": errors[0]["failure"], "rc": rc, "seconds": round(seconds, 1),
                           "reason": f"{len(errors)} case(s) raised; first: {errors[0].get('reason')}"}
        if failure is not None:
            failures[backend] = failure
            print(f"--- parity: {backend} FAILED ({failure['kind']}): {failure['reason'][:300]}", flush=True)
        if rc != 0 or failure is not None:
            exit_code = 1
        child_out.unlink(missing_ok=True)
        record.write()
    return exit_code


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = time.monotonic()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type == "cpu" and not args.dry_run:
        print("gpu_parity: no GPU here; use --dry-run for the CPU flow", file=sys.stderr)
        return 2
    dtypes = [d.strip() for d in (args.dtypes or "bf16,fp16").split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        print(f"gpu_parity: --dtypes: unknown {unknown}; dtypes: {', '.join(DTYPES)}", file=sys.stderr)
        return 2
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    names = [u.strip() for u in (args.units or ",".join(UNIT_ORDER)).split(",") if u.strip()]
    batch = args.batch or (32 if device.type == "cuda" else 2)
    problems = plan(args, dtypes, families, names)
    isolated = len(backends) > 1 and not args.in_process

    record = Record(Path(args.out), {
        "what": "parity", "schema": SCHEMA, "complete": False, "dry_run": args.dry_run,
        "rule": "rel_err(fused, fp64) <= 2 * max(rel_err(eager, fp64), eager spread) + 2 * unit roundoff "
                "(tests/helpers.py; scripts/parity_rule.py)",
        "config": {"batch": batch, "dtypes": [dtype_label(d) for d in dtypes], "backends": backends,
                   "families": families, "units": names, "budget_s": args.budget_s,
                   "stage_dtype": args.stage_dtype if "stage" in families else None,
                   "spread_samples": args.spread_samples, "seed": args.seed,
                   "isolation": "one process per backend" if isolated else "one process",
                   "launch_configs": "the selector's own (nothing forced)"},
        "environment": environment(device), "cases": [], "summary": {}, "backend_failures": {},
    })
    record.write()
    if isolated:
        exit_code = run_isolated(args, argv, backends, record, problems, batch, started)
        record.data["seconds"] = round(time.monotonic() - started, 1)
        record.write(complete=True)
        print("parity summary:", json.dumps(record.data["summary"]), flush=True)
        for backend, failure in record.data["backend_failures"].items():
            print(f"parity: {backend} failed ({failure['kind']}): {failure['reason'][:300]}", flush=True)
        return exit_code

    try:
        injected = faults.install(args.dry_run)
    except ValueError as exc:
        print(f"gpu_parity: {exc}", file=sys.stderr)
        return 2
    if injected:
        record.data["fault_injected"] = injected
        print(f"gpu_parity: dry run with an injected fault: {injected}", flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False  # the fp32 path is not what is checked here
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)) if device.type == "cuda" else 1)
    available = set(rf.available_backends())
    last_problem_s = 0.0
    exit_code = 0
    for family, unit, dtype_name in problems:
        base = base_case(family, unit, dtype_label(dtype_name), batch)
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
            problem = Problem(family, unit, dtype_name, batch, device, args.seed, args.spread_samples)
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
            print(f"{base['label']} {base['dtype']} {backend}: {result['status']}"
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
