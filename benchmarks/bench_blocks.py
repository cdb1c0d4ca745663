"""Block benchmark: one residual unit at a time, eager vs torch.compile vs the fused backends.

    python benchmarks/bench_blocks.py                                  # GPU: ResNet-50 stage units, b256 bf16
    python benchmarks/bench_blocks.py --blocks bottleneck --stages 2,3 --units identity \\
        --dtype bf16,amp-bf16 --modes train_fwd_bwd --impls eager,compile,triton
    python benchmarks/bench_blocks.py --quick                          # smoke test

Shapes: the identity and first (projection, strided from conv3_x on) units of every stage of
ResNet-v2-50 (``bottleneck``), ResNet-v2-34 (``basic``: two 3x3s) and ResNeXt-v2-50 32x4d
(``resnext``: grouped 3x3), all from ``resnet_fused.configs``.

Modes: ``train_fwd`` (train-mode BN, autograd recording, the input needing a gradient, as inside
a network being trained), ``train_fwd_bwd`` (that forward plus backward of a fixed upstream
gradient; the gradients are set to None before each repetition, outside the timed region) and
``eval_fwd`` (eval-mode BN under no_grad).

Per row: median ms and 20/80% quantiles, TFLOP/s = 2 x MACs / s (MACs counted by
``resnet_fused.count_macs`` on the block; ``train_fwd_bwd`` counts 3x the forward MACs: a dgrad
and a wgrad GEMM per forward GEMM), peak memory (absolute and increment, GPU only), % of the
floor (floor / median, the floor of ``benchmarks/roofline.py`` under the ceilings measured at
the start of the run) and the speedup against eager and torch.compile of the same run.

The cuda rows run in a process of their own, after the others (``benchmarks/isolate.py``), when
other implementations run too: a fault in the C++ kernels costs only the cuda rows, recorded as
errors naming how the process failed (``backend_failures``). Every fused row carries the proof
of what it ran (``benchmarks/harness.py``: launches of its warm-up call, no block left eager).

On a machine without a GPU it runs small sizes (batch 2, spatial sizes / 8 with at least 4x4,
widths / 4 keeping the groups' divisibility) in fp32, eager only (plus the Triton backend under
TRITON_INTERPRET=1 when it is available), and says so on its first line.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Without a GPU, run the Triton kernels under the interpreter (read when @triton.jit decorates a
# kernel, so before resnet_fused is imported). The device nodes tell, without importing torch.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn as nn

import resnet_fused
from resnet_fused.configs import UnitShape, resnet50_stage_units

from benchmarks import faults, harness, isolate, roofline

#: Block families: the model whose stage units are benchmarked.
FAMILIES = {"bottleneck": "resnet_v2_50", "basic": "resnet_v2_34", "resnext": "resnext_v2_50_32x4d",
            "postact": "torchvision:resnet50"}
#: Where a family's unit shapes come from: torchvision's resnet50 (v1.5, stride on the 3x3) has
#: exactly resnet_v2_50's unit shapes; its blocks are post-activation (resnet_fused.postact).
SHAPES_FROM = {"postact": "resnet_v2_50"}
MODES = ("train_fwd", "train_fwd_bwd", "eval_fwd")
UNIT_KINDS = ("identity", "first")
STAGES = (2, 3, 4, 5)  # conv2_x .. conv5_x, the ResNet paper's names

#: docs/design.md section 7's measured anchors (H100, torch 2.11, timm blocks with plain convs, pure
#: bf16, channels_last, batch 256), ms: a run on the same kind of device should land near them.
DESIGN_ANCHORS_MS = {
    ("conv2_x", "train_fwd"): {"eager": 2.91, "compile": 1.66},
    ("conv3_x", "train_fwd"): {"eager": 1.51, "compile": 0.89},
    ("conv4_x", "train_fwd"): {"eager": 0.82, "compile": 1.03},
    ("conv5_x", "train_fwd"): {"eager": 0.51, "compile": 0.46},
    ("conv2_x", "train_fwd_bwd"): {"eager": 6.27, "compile": 4.32},
    ("conv3_x", "train_fwd_bwd"): {"eager": 3.28, "compile": 2.35},
    ("conv4_x", "train_fwd_bwd"): {"eager": 1.88, "compile": 2.04},
    ("conv5_x", "train_fwd_bwd"): {"eager": 1.86, "compile": 1.70},
    ("conv2_x", "eval_fwd"): {"eager": 1.98, "compile": 1.34},
    ("conv3_x", "eval_fwd"): {"eager": 1.01, "compile": 0.74},
    ("conv4_x", "eval_fwd"): {"eager": 0.57, "compile": 0.41},
    ("conv5_x", "eval_fwd"): {"eager": 0.48, "compile": 0.29},
}

CONVENTIONS = {
    "tflops": "2 x MACs / median seconds; MACs from resnet_fused.count_macs on the block; "
              "train_fwd_bwd counts 3 x the forward MACs (dgrad + wgrad per forward GEMM)",
    "floor": "benchmarks/roofline.py plan floor of the standalone block (train modes include K0, "
             "the bn1 statistics pass) under the ceilings measured at the start of this run; "
             "pct_of_floor = floor / median x 100",
    "speedup": "speedup_vs_X = median of X / median of this row, same unit, dtype and mode, same run",
    "memory": "peak_mib: max_memory_allocated during one call; peak_increment_mib: that minus the "
              "memory allocated just before it (parameters, input, upstream gradient); n/a on CPU",
    "amp": "amp-* modes: fp32 parameters under torch.autocast, 16-bit input (a block's input inside "
           "an autocast network is the previous conv's 16-bit output)",
}


@dataclass(frozen=True)
class Case:
    """One unit to benchmark: the family, the model it comes from, its (possibly scaled) shape."""

    family: str
    model: str
    unit: UnitShape

    @property
    def label(self) -> str:
        return f"{self.family}:{self.unit.name}"

    @property
    def stage(self) -> str:
        return self.unit.name.split(".")[0]

    @property
    def kind(self) -> str:
        return self.unit.name.split(".")[1]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def small_unit(unit: UnitShape, width_divisor: int = 4, spatial_divisor: int = 8,
               min_spatial: int = 4) -> UnitShape:
    """The unit at CPU-friendly size: widths / ``width_divisor`` (the grouped conv's width kept
    a multiple of the groups, an identity unit kept an identity), spatial sizes /
    ``spatial_divisor`` with at least ``min_spatial``."""
    def scaled_out(chs: int) -> int:
        out = max(chs // width_divisor, 1)
        # The middle width int(out * ratio) must be a positive multiple of the groups.
        while int(out * unit.bottle_ratio) < unit.groups or int(out * unit.bottle_ratio) % unit.groups:
            out += 1
        return out

    out_chs = scaled_out(unit.out_chs)
    if unit.in_chs == unit.out_chs:
        in_chs = out_chs
    else:
        in_chs = max(unit.in_chs // width_divisor, 1)
        if unit.block == "basic":  # the basic block's first 3x3 is grouped over the input too
            in_chs = _round_up(in_chs, unit.groups)
    return replace(unit, in_chs=in_chs, out_chs=out_chs,
                   height=max(unit.height // spatial_divisor, min_spatial),
                   width=max(unit.width // spatial_divisor, min_spatial))


def build_postact_block(unit: UnitShape, backend: str) -> nn.Module:
    """torchvision's post-activation Bottleneck of ``unit``'s shape (projection shortcut where
    the shape changes) as the fused drop-in; ``backend="reference"`` runs torchvision's own
    forward on the same modules (the eager row)."""
    FusedPostActBottleneck = resnet_fused.FusedPostActBottleneck
    planes = unit.mid_chs
    if planes * FusedPostActBottleneck.expansion != unit.out_chs or unit.groups != 1:
        raise ValueError(f"{unit.name}: not a torchvision Bottleneck shape (out {unit.out_chs} != 4 x mid "
                         f"{planes}, or groups {unit.groups})")
    downsample = None
    if unit.stride != 1 or unit.in_chs != unit.out_chs:
        downsample = nn.Sequential(nn.Conv2d(unit.in_chs, unit.out_chs, 1, stride=unit.stride, bias=False),
                                   nn.BatchNorm2d(unit.out_chs))
    return FusedPostActBottleneck(unit.in_chs, planes, stride=unit.stride, downsample=downsample, backend=backend)


def select_cases(families: Sequence[str], stages: Sequence[int], kinds: Sequence[str],
                 small: bool) -> list[Case]:
    cases = []
    for family in families:
        model = FAMILIES[family]
        units = resnet50_stage_units(SHAPES_FROM.get(family, model), kinds=tuple(kinds),
                                     stages=tuple(s - 2 for s in stages))
        cases += [Case(family, model, small_unit(u) if small else u) for u in units]
    return cases


def mode_function(mode: str, run: Callable[[torch.Tensor], torch.Tensor], module: nn.Module,
                  x: torch.Tensor, grad_out: torch.Tensor,
                  dtype_mode: harness.DtypeMode, device: torch.device) -> tuple[Callable, list]:
    """The function to time for ``mode`` and the tensors whose grads it leaves behind."""
    if mode == "train_fwd":
        module.train()

        def train_forward():
            with dtype_mode.context(device):
                return run(x)
        return train_forward, []
    if mode == "train_fwd_bwd":
        module.train()

        def train_forward_backward():
            with dtype_mode.context(device):
                out = run(x)
            out.backward(grad_out)
        return train_forward_backward, [x] + list(module.parameters())
    module.eval()

    def eval_forward():
        with torch.no_grad(), dtype_mode.context(device):
            return run(x)
    return eval_forward, []


class BlockBenchmark:
    """Runs the cases and fills the run record."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype_modes: list[harness.DtypeMode],
                 modes: list[str], impls: list[harness.Implementation], cases: list[Case], batch: int,
                 record: harness.RunRecord):
        self.args, self.device, self.dtype_modes, self.modes = args, device, dtype_modes, modes
        self.impls, self.cases, self.batch, self.record = impls, cases, batch, record
        self.memory_format = harness.MEMORY_FORMATS[args.memory_format]
        self.timing = harness.QUICK_TIMING if args.quick else harness.BLOCK_TIMING
        self.budget = harness.Budget(args.budget_s)
        self.ceilings: dict = {}

    def run(self) -> None:
        self.ceilings = harness.measure_ceilings(self.device, [m.compute for m in self.dtype_modes])
        self.record.data["ceilings"] = self.ceilings
        self.record.write()
        macs = {case.label: resnet_fused.count_macs(self._build(case, "reference"),
                                                    case.unit.input_shape(self.batch)).total
                for case in self.cases}
        # Implementation-major: every eager row first, then the fused backends, then the
        # compiled variants, so that a budget cuts the most expensive, least needed rows.
        for impl in self.impls:
            for dtype_mode in self.dtype_modes:
                for case in self.cases:
                    print(f"# {impl.name} {dtype_mode.name} {case.label} (batch {self.batch}, in "
                          f"{case.unit.in_chs}, out {case.unit.out_chs}, mid {case.unit.mid_chs}, groups "
                          f"{case.unit.groups}, {case.unit.height}x{case.unit.width}, stride "
                          f"{case.unit.stride})", flush=True)
                    self._run_case(impl, case, dtype_mode, macs[case.label])
                    self.record.write()

    def _build(self, case: Case, backend: str) -> nn.Module:
        if case.family == "postact":
            return build_postact_block(case.unit, backend)
        return resnet_fused.make_block(case.unit.block, backend=backend, **case.unit.block_kwargs())

    def _prepare(self, dtype_mode: harness.DtypeMode) -> Callable[[nn.Module], nn.Module]:
        def prepare(module: nn.Module) -> nn.Module:
            return module.to(device=self.device, dtype=dtype_mode.params).to(memory_format=self.memory_format)
        return prepare

    def _base_row(self, case: Case, dtype_mode: harness.DtypeMode, mode: str, impl: harness.Implementation) -> dict:
        u = case.unit
        return {"block": case.family, "model": case.model, "unit": u.name, "label": case.label,
                "in_chs": u.in_chs, "out_chs": u.out_chs, "mid_chs": u.mid_chs, "stride": u.stride,
                "groups": u.groups, "height": u.height, "width": u.width, "batch": self.batch,
                "dtype": dtype_mode.name, "memory_format": self.args.memory_format, "mode": mode,
                "impl": impl.name, "status": None}

    def _run_case(self, impl: harness.Implementation, case: Case, dtype_mode: harness.DtypeMode, macs: int) -> None:
        rows = [self._base_row(case, dtype_mode, mode, impl) for mode in self.modes]
        # A compiled implementation's first case takes about a minute to compile on an H100.
        reason = self.budget.refusal(impl.name, first_case_s=60.0 if impl.is_compiled else 1.0)
        if reason is not None:
            for row in rows:
                row.update(status="skipped", reason=reason)
            self.record.rows.extend(rows)
            return
        try:
            module, run, x, grad_out = self._setup(impl, case, dtype_mode)
            unfused = harness.unfused_blocks(module) if impl.backend != "reference" else None
            if unfused is not None:
                raise harness.BuildFailed(unfused)
        except Exception as exc:  # a case that cannot be set up must not lose the rest of the run
            status = exc.status if isinstance(exc, harness.NotMeasured) else "error"
            reason = str(exc) if isinstance(exc, harness.NotMeasured) else harness.short_error(exc)
            for row in rows:
                row.update(status=status, reason=reason)
            self.record.rows.extend(rows)
            print(f"  {impl.name}: {status}: {reason}", flush=True)
            harness.free_memory(self.device)
            return
        plan = harness.timing_plan(impl, self.device, self.timing)
        started = time.perf_counter()
        for row, mode in zip(rows, self.modes):
            row.update(self._measure(mode, run, module, x, grad_out, dtype_mode, case, macs, plan, impl.name))
            self.record.rows.append(row)
            print("  " + _progress_line(row), flush=True)
        self.budget.observe(impl.name, time.perf_counter() - started)
        del module, run, x, grad_out
        harness.free_memory(self.device)

    def _setup(self, impl: harness.Implementation, case: Case, dtype_mode: harness.DtypeMode):
        """The module, the callable to time, the input and the upstream gradient of a case."""
        harness.reset_compiled_state()
        # The same seed for every implementation: the same weights and input everywhere.
        harness.seed_everything(self.args.seed)
        prepare = self._prepare(dtype_mode)
        reference = prepare(self._build(case, "reference"))
        x = torch.randn(case.unit.input_shape(self.batch), device=self.device, dtype=dtype_mode.storage)
        x = x.contiguous(memory_format=self.memory_format).requires_grad_()
        with torch.no_grad(), dtype_mode.context(self.device):
            grad_out = torch.randn_like(reference(x))
        module, run = harness.build_implementation(impl, lambda backend: self._build(case, backend), reference,
                                                   prepare, self.device, self.args.compile_mode,
                                                   cuda_on_cpu=self.args.dry_run)
        return module, run, x, grad_out

    def _measure(self, mode: str, run: Callable, module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor,
                 dtype_mode: harness.DtypeMode, case: Case, macs: int, plan: harness.TimingPlan,
                 impl_name: str) -> dict:
        fn, grad_to_none = mode_function(mode, run, module, x, grad_out, dtype_mode, self.device)
        backend = impl_name.partition("+")[0]
        row = harness.measure(fn, self.device, plan, grad_to_none,
                              backend=backend if backend in harness.FUSED_BACKENDS else None)
        if row["status"] != "ok":
            return row
        if "compile" in impl_name:
            row["compile_s"] = row["warmup_s"]  # the warm-up call is torch.compile's compile
        # A train step does a dgrad and a wgrad GEMM per forward GEMM: 3x the forward MACs.
        row["gmacs"] = round(macs / 1e9, 4)
        row["tflops"] = harness.tflops(macs * (3 if mode == "train_fwd_bwd" else 1), row["median_ms"])
        ceiling = harness.ceiling_for(self.ceilings, dtype_mode.compute)
        # The roofline plans the pre-activation blocks; a post-activation unit has no floor yet.
        if ceiling is not None and case.family != "postact":
            floor = roofline.plan_floor(case.unit, self.batch, mode, dtype_mode.element_bytes,
                                        peak_flops=ceiling[0], bandwidth=ceiling[1])
            row["floor_ms"] = harness.round_significant(floor.seconds * 1e3)
            row["pct_of_floor"] = harness.round_significant(100 * floor.seconds * 1e3 / row["median_ms"], 3)
        anchor = self._design_anchor(case, dtype_mode, mode, impl_name)
        if anchor is not None:
            row["design_anchor_ms"] = anchor
        return row

    def _design_anchor(self, case: Case, dtype_mode: harness.DtypeMode, mode: str,
                       impl_name: str) -> Optional[float]:
        """docs/design.md's H100 anchor for the rows it was measured for (None elsewhere)."""
        if not (self.device.type == "cuda" and "H100" in torch.cuda.get_device_name(self.device)
                and case.family == "bottleneck" and case.kind == "identity" and dtype_mode.name == "bf16"
                and self.batch == 256 and self.args.size == "full"
                and self.args.memory_format == "channels_last"):
            return None
        return DESIGN_ANCHORS_MS.get((case.stage, mode), {}).get(impl_name)


def _progress_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['mode']:<14} {row['impl']:<24} {row['status']}: {row.get('reason', '')}"
    return (f"{row['mode']:<14} {row['impl']:<24} {row['median_ms']:.4f} ms "
            f"[{row['q20_ms']:.4f}, {row['q80_ms']:.4f}]  {row['tflops']:.3g} TFLOP/s  "
            f"warm-up {row['warmup_s']:.1f} s")


TABLE_COLUMNS = [
    ("unit", "label", ""), ("dtype", "dtype", ""), ("mode", "mode", ""), ("impl", "impl", ""),
    ("median ms", "median_ms", ".4f"), ("q20 ms", "q20_ms", ".4f"), ("q80 ms", "q80_ms", ".4f"),
    ("TFLOP/s", "tflops", ".3g"), ("peak MiB", "peak_mib", ".0f"), ("+MiB", "peak_increment_mib", ".0f"),
    ("% floor", "pct_of_floor", ".1f"), ("x eager", "speedup_vs_eager", ".3g"),
    ("x compile", "speedup_vs_compile", ".3g"),
]


def plot(record: harness.RunRecord) -> str:
    panels: dict = {}
    floors: dict = {}
    for row in record.rows:
        if row["status"] != "ok":
            continue
        panel = f"{row['dtype']} {row['mode']}"
        panels.setdefault(panel, {}).setdefault(row["label"], {})[row["impl"]] = row["median_ms"]
        if row.get("floor_ms"):
            floors.setdefault(panel, {})[row["label"]] = row["floor_ms"]
    env = record.data["environment"]
    title = (f"resnet_fused blocks, {env['device_name']}, batch {record.data['config']['resolved']['batch']}, "
             f"commit {env['commit'][:12]}" + (" (CPU: not GPU performance)" if env["device"] == "cpu" else ""))
    return harness.plot_grouped_bars(panels, record.png_path, "median ms (log)", title, floors, log_y=True)


def parse_args(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(
        description="Benchmark single pre-activation ResNet units: eager vs torch.compile vs fused backends.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--blocks", default="bottleneck,basic,resnext",
                        help=f"comma-separated block families from {', '.join(FAMILIES)} "
                             f"({', '.join(f'{k}: {v}' for k, v in FAMILIES.items())})")
    parser.add_argument("--stages", default=None,
                        help="comma-separated stages, 2..5 (conv2_x..conv5_x). Default: all; --quick: 2")
    parser.add_argument("--units", default=None,
                        help="comma-separated: identity (a unit of unchanged shape), first (the stage's "
                             "projection unit, strided from conv3_x on). Default: both; --quick: identity")
    parser.add_argument("--unit-names", default=None,  # [<family>:]<unit>, e.g. postact:conv3_x.first
                        help="comma-separated unit names (e.g. conv2_x.identity,conv3_x.first), run in this "
                             "order; replaces --stages and --units")
    parser.add_argument("--size", default=None, choices=("full", "small"),
                        help="full: the real shapes; small: widths/4, spatial/8 (min 4). "
                             "Default: full on a GPU, small on a CPU")
    harness.add_common_arguments(parser, default_dtype="bf16,amp-bf16",
                                 default_modes=",".join(MODES), modes=MODES)
    return parser.parse_args(argv), parser


#: The share of --budget-s kept for the cuda rows' own process when they run isolated.
CUDA_BUDGET_SHARE = 0.3
#: Seconds the cuda process gets past the budget left (its start-up: imports, CUDA context).
CHILD_GRACE_S = 20.0


def run_cuda_isolated(argv: list[str], args: argparse.Namespace, record: harness.RunRecord, cases: list[Case],
                      dtype_modes: list[harness.DtypeMode], modes: list[str], batch: int, budget_s: Optional[float]) -> None:
    """The cuda rows in a process of their own; its rows merged into ``record``; when the
    process fails (a fault, a crash, its timeout), every row it did not write is an error
    naming how."""
    name = f".{record.json_path.stem}.cuda"
    child_json = record.json_path.with_name(f"{name}.json")
    child_json.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()),
           *isolate.strip_options(argv, ("--impls", "--out", "--name", "--budget-s")),
           "--impls", "cuda", "--out", str(record.json_path.parent), "--name", name, "--in-process", "--no-plot"]
    timeout = None
    if budget_s is not None:
        # the child starts no case after 80% of what is left; the timeout adds its start-up (the
        # GPU check's own timeout of this part leaves 40 s past --budget-s)
        cmd += ["--budget-s", f"{max(budget_s * 0.8, 1.0):.1f}"]
        timeout = max(budget_s, 5.0) + CHILD_GRACE_S
    print(f"# cuda in its own process ({'no timeout' if timeout is None else f'timeout {timeout:.0f} s'})", flush=True)
    rc, timed_out, tail, seconds = isolate.run_child(cmd, timeout)
    try:
        child = json.loads(child_json.read_text())
    except (OSError, ValueError):
        child = {}
    rows = [r for r in child.get("rows", []) if r.get("impl") == "cuda"]
    record.rows.extend(rows)
    if child.get("fault_injected"):
        record.data["fault_injected"] = child["fault_injected"]
    failure = isolate.failure(rc, timed_out, tail, seconds, bool(child.get("complete")))
    errors = [r for r in rows if r.get("status") == "error"]
    if failure is None and errors:
        failure = {"kind": faults.classify(str(errors[0].get("reason"))), "rc": rc, "seconds": round(seconds, 1),
                   "reason": f"{len(errors)} row(s) failed; first: {errors[0].get('reason')}"}
    if failure is not None:
        record.data.setdefault("backend_failures", {})["cuda"] = failure
        print(f"# cuda FAILED ({failure['kind']}): {failure['reason'][:300]}", flush=True)
        done = {(r["label"], r["dtype"], r["mode"]) for r in rows}
        for case in cases:
            for dtype_mode in dtype_modes:
                for mode in modes:
                    if (case.label, dtype_mode.name, mode) in done:
                        continue
                    record.rows.append({"block": case.family, "model": case.model, "unit": case.unit.name,
                                        "label": case.label, "batch": batch, "dtype": dtype_mode.name,
                                        "memory_format": args.memory_format, "mode": mode, "impl": "cuda",
                                        "status": "error", "failure": failure["kind"],
                                        "reason": f"not run: the cuda process {failure['reason'][:300]}"})
    child_json.unlink(missing_ok=True)
    record.write()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, parser = parse_args(argv)
    device = harness.pick_device(args.device)
    harness.print_banner(device)
    dtype_modes, modes, impls = harness.check_common_arguments(parser, args, device, MODES, "bf16,amp-bf16")
    if device.type == "cpu" and args.size == "full" and not args.dry_run:
        parser.error("--size full on a CPU: the real shapes would take hours here (torch sees no GPU); "
                     "use --size small, or run on a GPU")
    try:
        injected = faults.install(args.dry_run)
    except ValueError as exc:
        parser.error(str(exc))
    # --quick: one unit per family unless the shapes are chosen explicitly.
    default_stages = STAGES[:1] if args.quick else STAGES
    default_kinds = UNIT_KINDS[:1] if args.quick else UNIT_KINDS
    try:
        families = harness.parse_choices(args.blocks, FAMILIES, "--blocks")
        stages = [int(s) for s in harness.parse_choices(args.stages or ",".join(map(str, default_stages)),
                                                        map(str, STAGES), "--stages")]
        kinds = harness.parse_choices(args.units or ",".join(default_kinds), UNIT_KINDS, "--units")
    except ValueError as exc:
        parser.error(str(exc))
    args.size = args.size or ("full" if device.type == "cuda" else "small")
    batch = args.batch or (256 if args.size == "full" and device.type == "cuda" else 2)
    harness.configure_torch(device, args.cpu_threads)
    cases = select_cases(families, stages, kinds, small=args.size == "small")
    if args.unit_names:
        # "conv3_x.first" selects that unit of every family in --blocks; "postact:conv3_x.first"
        # of one family only.
        names = [n.strip() for n in args.unit_names.split(",") if n.strip()]
        every = select_cases(families, STAGES, UNIT_KINDS, small=args.size == "small")

        def matches(case: Case, name: str) -> bool:
            family, _, unit = name.rpartition(":")
            return case.unit.name == unit and family in ("", case.family)

        unknown = [n for n in names if not any(matches(c, n) for c in every)]
        if unknown:
            parser.error(f"--unit-names: unknown unit(s) {', '.join(unknown)}; names are "
                         f"[<family>:]conv<2..5>_x.<{'|'.join(UNIT_KINDS)}>, families from --blocks")
        cases = [c for n in names for c in every if matches(c, n)]

    record = harness.RunRecord("bench_blocks", args, device, CONVENTIONS)
    record.data["config"]["resolved"] = {
        "batch": batch, "size": args.size, "dtypes": [m.name for m in dtype_modes], "modes": modes,
        "impls": [i.name for i in impls], "cases": [c.label for c in cases],
        "timing": vars(harness.QUICK_TIMING if args.quick else harness.BLOCK_TIMING),
    }
    if device.type == "cpu":
        record.note(harness.CPU_BANNER)
    print(f"device {record.data['environment']['device_name']}, torch {torch.__version__}, "
          f"backends {list(resnet_fused.available_backends())}, batch {batch}, size {args.size}, "
          f"dtypes {[m.name for m in dtype_modes]}, impls {[i.name for i in impls]}", flush=True)

    if injected:
        record.data["fault_injected"] = injected
    isolated = any(i.name == "cuda" for i in impls) and len(impls) > 1 and not args.in_process
    budget_s = args.budget_s
    if isolated:
        impls_here = [i for i in impls if i.name != "cuda"]
        if budget_s is not None:
            args.budget_s = budget_s * (1 - CUDA_BUDGET_SHARE)
        record.data["config"]["resolved"]["isolation"] = "cuda rows in their own process, after the others"
    else:
        impls_here = impls
    started = time.perf_counter()
    bench = BlockBenchmark(args, device, dtype_modes, modes, impls_here, cases, batch, record)
    bench.run()
    if isolated:
        left = None if budget_s is None else budget_s - (time.perf_counter() - started)
        run_cuda_isolated(argv, args, record, cases, dtype_modes, modes, batch, left)
    harness.add_speedups(record.rows, ("label", "dtype", "mode"))
    path = record.write(complete=True)
    print(f"ceilings: matmul {bench.ceilings['matmul_tflops']} TFLOP/s, copy {bench.ceilings['copy_tbps']} TB/s")
    print(harness.format_table([r for r in record.rows if r["status"] in ("ok", "error")], TABLE_COLUMNS))
    plot_note = "no plot: --no-plot" if args.no_plot else plot(record)
    for line in harness.summary_lines(record.rows, impls, "mode"):
        print(line)
    print(f"JSON: {path}")
    print(plot_note)
    if device.type == "cpu":
        print("(CPU-only machine: small sizes; these numbers are not GPU performance.)")
    return harness.exit_code(record.rows)


if __name__ == "__main__":
    raise SystemExit(main())
