"""Budgeted sweep of the Triton launch configs at the ResNet-50 / ResNeXt-50 shapes: the tuned table.

    python scripts/gpu_tune.py --out tuned.json [--budget-s 420] [--dtypes bf16,fp16]
    python scripts/gpu_tune.py --dry-run --out tuned.json           # tiny, on the CPU

For every GEMM of the identity and first units of every stage of ResNet-v2-50 and ResNeXt-v2-50
32x4d (batch 256 on a GPU), and each direction:

* ``forward``: the fused BN+ReLU-prologue conv (statistics epilogue on) over
  ``configs.TUNE_CONV_CANDIDATES``;
* ``dgrad`` and ``wgrad``: the fused backward GEMMs over ``configs.TUNE_BACKWARD_CANDIDATES``;
* ``strategy3x3``: ``fused`` against ``hybrid`` for the unit's 3x3, timed as the whole block's
  train forward + backward;

each candidate's output is first compared with PyTorch's (cuDNN's) conv in the same dtype, both
against an fp32 reference, under the project's rule (``scripts/parity_rule.py``); a candidate
that fails is recorded with its error and never chosen. The fastest valid candidate per dtype,
direction and shape becomes an entry of the table (``resnet_fused/tuned/__init__.py`` describes
the format), plus one ``backward`` default per dtype (the least total backward time over the
shapes measured), which is what the selector uses when its caller passes no shape.

Work runs bf16 first (every GEMM shape, its three directions together, then the 3x3 strategy),
then fp16: the budget cuts the least needed. The table is rewritten after every shape (``complete`` false until the
end). Copy it to ``resnet_fused/tuned/<device>.json`` (``scripts/gpu_check.sh`` names the file)
and commit it: the selector reads it at run time for that device.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Never tune on top of an older table: every candidate is timed as itself.
os.environ["RESNET_FUSED_TUNED"] = "0"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import resnet_fused as rf  # noqa: E402
from resnet_fused import tuned  # noqa: E402
from resnet_fused.configs import UnitShape, resnet50_stage_units  # noqa: E402
from resnet_fused.triton import configs  # noqa: E402
from resnet_fused.triton.kernel_set import TRITON  # noqa: E402

import gpu_parity  # noqa: E402
import parity_rule  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FAMILIES = {"bottleneck": "resnet_v2_50", "resnext": "resnext_v2_50_32x4d"}
DIRECTIONS = ("forward", "dgrad", "wgrad", "strategy3x3")


class Gemm:
    """One conv of a unit: input (N, C_in, H, W), weight (C_out, C_in / groups, k, k)."""

    def __init__(self, name: str, n: int, c_in: int, h: int, w: int, c_out: int, ksize: int, stride: int,
                 groups: int):
        self.name, self.n, self.c_in, self.h, self.w = name, n, c_in, h, w
        self.c_out, self.ksize, self.stride, self.groups = c_out, ksize, stride, groups
        pad = ksize // 2
        self.h_out = (h + 2 * pad - ksize) // stride + 1
        self.w_out = (w + 2 * pad - ksize) // stride + 1

    @property
    def key(self) -> tuple:
        return (self.n, self.c_in, self.h, self.w, self.c_out, self.ksize, self.stride, self.groups)

    def forward_shape(self) -> dict:
        """(m, n, k) as the selector sees them (resnet_fused/triton/kernel_set.py: conv)."""
        return {"ksize": self.ksize, "m": self.n * self.h_out * self.w_out, "n": self.c_out // self.groups,
                "k": (self.c_in // self.groups) * self.ksize ** 2}


def unit_gemms(unit: UnitShape, batch: int) -> list[Gemm]:
    """The three convs of a pre-activation bottleneck (stride on the 3x3, as the blocks' default)."""
    mid = unit.mid_chs
    h2 = (unit.height - 1) // unit.stride + 1
    return [Gemm(f"{unit.name}.conv1", batch, unit.in_chs, unit.height, unit.width, mid, 1, 1, 1),
            Gemm(f"{unit.name}.conv2", batch, mid, unit.height, unit.width, mid, 3, unit.stride, unit.groups),
            Gemm(f"{unit.name}.conv3", batch, mid, h2, h2, unit.out_chs, 1, 1, 1)]


def timer(device: torch.device, quick: bool) -> Callable[[Callable], float]:
    def measure(fn: Callable) -> float:
        fn()
        if device.type == "cuda":
            from triton.testing import do_bench
            torch.cuda.synchronize()
            return float(do_bench(fn, warmup=10, rep=40 if not quick else 10))
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return measure


class Operands:
    """Random operands of one GEMM in one dtype, and the fp32 / same-dtype PyTorch results."""

    def __init__(self, g: Gemm, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
        fmt = torch.channels_last

        def rnd(*shape, scale=1.0):  # drawn on the device: batch-256 operands are hundreds of MB
            return torch.randn(shape, generator=gen, device=device) * scale

        self.g, self.dtype = g, dtype
        self.x = rnd(g.n, g.c_in, g.h, g.w).to(dtype).contiguous(memory_format=fmt)
        fan_in = (g.c_in // g.groups) * g.ksize ** 2
        self.w = (rnd(g.c_out, g.c_in // g.groups, g.ksize, g.ksize) / fan_in ** 0.5).to(dtype)
        self.scale = torch.rand(g.c_in, generator=gen, device=device) + 0.5
        self.shift = torch.randn(g.c_in, generator=gen, device=device) * 0.5
        self.mean = torch.zeros(g.c_in, device=device)
        self.invstd = torch.ones(g.c_in, device=device)
        self.grad = rnd(g.n, g.c_out, g.h_out, g.w_out).to(dtype).contiguous(memory_format=fmt)
        pad = g.ksize // 2
        # The reference: fp32 for 16-bit data, fp64 for fp32 data (the rule needs one more precise).
        ref = torch.float64 if dtype == torch.float32 else torch.float32
        pre = self.x.to(ref) * self.scale[None, :, None, None].to(ref) + self.shift[None, :, None, None].to(ref)
        act32 = pre.relu()
        mask = (pre > 0).to(ref)
        self.exact, self.eager = {}, {}
        for label, act, w, grad in (("exact", act32, self.w.to(ref), self.grad.to(ref)),
                                    ("eager", act32.to(dtype), self.w, self.grad)):
            out = F.conv2d(act, w, stride=g.stride, padding=pad, groups=g.groups)
            dgrad = torch.nn.grad.conv2d_input(act.shape, w, grad, stride=g.stride, padding=pad, groups=g.groups)
            wgrad = torch.nn.grad.conv2d_weight(act, w.shape, grad, stride=g.stride, padding=pad, groups=g.groups)
            target = self.exact if label == "exact" else self.eager
            target.update(forward=out, dgrad=dgrad * mask.to(dgrad.dtype), wgrad=wgrad)
        # eager's activation is the 16-bit rounding of the exact one, as the fused prologue's is not:
        # the fused kernels apply BN+ReLU in fp32 and round only the conv's operand.

    def run(self, direction: str) -> Callable[[], torch.Tensor]:
        g = self
        if direction == "forward":
            return lambda: TRITON.conv(g.x, g.w, scale=g.scale, shift=g.shift, stride=g.g.stride,
                                       groups=g.g.groups, emit_stats=True)[0]
        if direction == "dgrad":
            return lambda: TRITON.conv_dgrad(g.grad, g.w, g.x, g.scale, g.shift, g.mean, g.invstd,
                                             stride=g.g.stride, groups=g.g.groups)[0]
        return lambda: TRITON.conv_wgrad(g.grad, g.x, g.scale, g.shift, ksize=g.g.ksize, stride=g.g.stride,
                                         groups=g.g.groups)


def candidates(direction: str, ksize: int, dtype: torch.dtype) -> list:
    sixteen = dtype in (torch.float16, torch.bfloat16)
    if direction == "forward":
        return list(configs.TUNE_CONV_CANDIDATES[(ksize, sixteen)])
    return list(configs.TUNE_BACKWARD_CANDIDATES[sixteen])


def default_config(direction: str, g: Gemm, dtype: torch.dtype, device: torch.device):
    if direction == "forward":
        s = g.forward_shape()
        return configs.conv_config(s["m"], s["n"], s["k"], g.ksize, dtype, device)
    return configs.backward_config(dtype, device)


def forced(direction: str, config):
    return configs.forced_configs(conv=config) if direction == "forward" else configs.forced_configs(backward=config)


def fits(config, dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    element = torch.empty((), dtype=dtype).element_size()
    limit = configs._shared_memory_limit(device)
    if isinstance(config, configs.ConvConfig):
        return configs.shared_memory_bytes(config, element) <= limit
    return configs.shared_memory_bytes(config, element, backward=True) <= limit


class Tuner:
    def __init__(self, args: argparse.Namespace, device: torch.device, out: Path):
        self.args, self.device, self.out = args, device, out
        self.started = time.monotonic()
        self.measure = timer(device, args.dry_run)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
        env = gpu_parity.environment(device)
        self.table = {
            "schema": tuned.SCHEMA, "device_name": name, "device_slug": tuned.device_slug(name),
            "complete": False, "dry_run": args.dry_run, "generated_by": "scripts/gpu_tune.py",
            "commit": env.get("commit", os.environ.get("RESNET_FUSED_COMMIT", "unknown")),
            "torch": torch.__version__, "triton": env.get("triton"), "batch": args.batch,
            "budget_s": args.budget_s, "entries": [], "measurements": [], "skipped": [],
        }
        self.item_seconds: dict[str, float] = {}

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started) if self.args.budget_s else float("inf")

    def write(self, complete: bool = False) -> None:
        self.table["complete"] = complete
        self.table["seconds"] = round(time.monotonic() - self.started, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.parent / f".{self.out.name}.tmp"
        tmp.write_text(json.dumps(self.table, indent=1, default=str))
        os.replace(tmp, self.out)

    def budget_refuses(self, kind: str) -> Optional[str]:
        estimate = self.item_seconds.get(kind, 0.0)
        left = self.left()
        if left <= 0 or left < estimate:
            return f"budget: {max(left, 0):.0f} s left, about {estimate:.0f} s needed"
        return None

    def tune_gemm(self, g: Gemm, direction: str, dtype: torch.dtype, operands: Callable[[], "Operands"]) -> None:
        dtype_name = str(dtype).replace("torch.", "")
        shape = g.forward_shape()
        kind = f"{direction}:{g.ksize}"
        reason = self.budget_refuses(kind)
        if reason:
            self.table["skipped"].append({"direction": direction, "dtype": dtype_name, **shape, "reason": reason})
            return
        t0 = time.monotonic()
        ops = operands()
        run = ops.run(direction)
        default = default_config(direction, g, dtype, self.device)
        results = []
        for config in candidates(direction, g.ksize, dtype):
            row = {"direction": direction, "dtype": dtype_name, **shape, "stride": g.stride, "groups": g.groups,
                   "gemm": g.name, "config": asdict(config), "is_default": config == default}
            if not fits(config, dtype, self.device):
                row.update(status="too much shared memory")
                results.append(row)
                continue
            try:
                with forced(direction, config):
                    got = run()
                    check = parity_rule.check(got, ops.eager[direction], ops.exact[direction], dtype,
                                              what=f"{direction} {g.name}")
                    row["check"] = check
                    if not check["ok"]:
                        row.update(status="wrong result")
                    else:
                        row.update(status="ok", ms=round(self.measure(run), 5))
            except Exception as exc:
                row.update(status="error", reason=gpu_parity.short_error(exc, 300))
            results.append(row)
        self.table["measurements"].extend(results)
        valid = [r for r in results if r["status"] == "ok"]
        if valid:
            best = min(valid, key=lambda r: r["ms"])
            default_ms = next((r["ms"] for r in valid if r["is_default"]), None)
            self.table["entries"].append({"direction": direction, "dtype": dtype_name, **shape, "config": best["config"],
                                          "ms": best["ms"], "default_ms": default_ms, "gemm": g.name})
        self.item_seconds[kind] = max(self.item_seconds.get(kind, 0.0), time.monotonic() - t0)

    def backward_default(self, dtype: torch.dtype) -> None:
        """The backward config with the least total dgrad + wgrad time over every shape where all
        candidates ran, as the ``backward`` entry of the dtype."""
        dtype_name = str(dtype).replace("torch.", "")
        rows = [r for r in self.table["measurements"]
                if r["dtype"] == dtype_name and r["direction"] in ("dgrad", "wgrad")]
        totals: dict[str, float] = {}
        configs_by_key: dict[str, dict] = {}
        shapes = {(r["direction"], r["gemm"]) for r in rows}
        for key in {json.dumps(r["config"], sort_keys=True) for r in rows}:
            mine = [r for r in rows if json.dumps(r["config"], sort_keys=True) == key]
            if len(mine) == len(shapes) and all(r["status"] == "ok" for r in mine):
                totals[key] = sum(r["ms"] for r in mine)
                configs_by_key[key] = mine[0]["config"]
        if totals:
            best = min(totals, key=totals.get)
            self.table["entries"].append({"direction": "backward", "dtype": dtype_name, "config": configs_by_key[best],
                                          "total_ms": round(totals[best], 4), "shapes": len(shapes)})

    def tune_strategy(self, family: str, unit: UnitShape, dtype: torch.dtype) -> None:
        dtype_name = str(dtype).replace("torch.", "")
        conv2 = unit_gemms(unit, self.args.batch)[1]
        shape = conv2.forward_shape()
        key = {"direction": "strategy3x3", "dtype": dtype_name, "m": shape["m"], "n": shape["n"], "k": shape["k"]}
        reason = self.budget_refuses("strategy3x3")
        if reason:
            self.table["skipped"].append({**key, "unit": f"{family}:{unit.name}", "reason": reason})
            return
        t0 = time.monotonic()
        rows = {}
        try:
            problem = _BlockProblem(unit, dtype, self.args.batch, self.device)
            for strategy in configs.STRATEGIES:
                with configs.forced_configs(strategy=strategy):
                    ok, detail = problem.check()
                    rows[strategy] = {"ok": ok, "check": detail}
                    if ok:
                        rows[strategy]["ms"] = round(self.measure(problem.step), 5)
        except Exception as exc:
            rows["error"] = gpu_parity.short_error(exc, 300)
        self.table["measurements"].append({**key, "unit": f"{family}:{unit.name}", "results": rows})
        valid = {s: r["ms"] for s, r in rows.items() if isinstance(r, dict) and r.get("ok") and "ms" in r}
        if valid:
            best = min(valid, key=valid.get)
            self.table["entries"].append({**key, "strategy": best, "ms": valid, "unit": f"{family}:{unit.name}"})
        self.item_seconds["strategy3x3"] = max(self.item_seconds.get("strategy3x3", 0.0), time.monotonic() - t0)


class _BlockProblem:
    """A unit's fused block (triton) in train mode, its train forward + backward, and a check of
    the output and input gradient against eager (same dtype) and fp32 under the rule."""

    def __init__(self, unit: UnitShape, dtype: torch.dtype, batch: int, device: torch.device):
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        base = rf.make_block(unit.block, backend="reference", **unit.block_kwargs())
        gpu_parity.randomize_bn(base, gen)
        fmt = torch.channels_last
        self.eager = base.to(device=device, dtype=dtype).to(memory_format=fmt).train()
        self.exact = rf.make_block(unit.block, backend="reference", **unit.block_kwargs())
        self.exact.load_state_dict(self.eager.state_dict())
        ref = torch.float64 if dtype == torch.float32 else torch.float32
        self.exact = self.exact.to(device=device, dtype=ref).train()
        self.fused = rf.make_block(unit.block, backend="triton", **unit.block_kwargs())
        self.fused.load_state_dict(self.eager.state_dict())
        self.fused = self.fused.to(device=device, dtype=dtype).to(memory_format=fmt).train()
        dgen = torch.Generator(device=device).manual_seed(1)
        self.x = torch.randn(unit.input_shape(batch), generator=dgen, device=device).to(dtype)
        self.x = self.x.contiguous(memory_format=fmt).requires_grad_()
        with torch.no_grad():
            shape = self.eager(self.x).shape
        self.grad = torch.randn(shape, generator=dgen, device=device).to(dtype).contiguous(memory_format=fmt)
        self.dtype = dtype

    def _run(self, module):
        x = self.x.detach().clone().requires_grad_()
        out = module(x.to(next(module.parameters()).dtype))
        out.backward(self.grad.to(out.dtype))
        return out.detach(), x.grad

    def check(self) -> tuple[bool, list]:
        got, eager, exact = self._run(self.fused), self._run(self.eager), self._run(self.exact)
        checks = [parity_rule.check(got[i], eager[i], exact[i], self.dtype, what=what)
                  for i, what in enumerate(("train.output", "train.grad.input"))]
        return all(c["ok"] for c in checks), checks

    def step(self) -> None:
        for p in self.fused.parameters():
            p.grad = None
        self.x.grad = None
        self.fused(self.x).backward(self.grad)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the tuned table to write")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (interpreter)")
    parser.add_argument("--batch", type=int, default=None, help="default 256 on a GPU, 2 in a dry run")
    parser.add_argument("--dtypes", default=None, help="comma-separated, bf16,fp16 by default (dry run: fp32)")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--directions", default=",".join(DIRECTIONS))
    parser.add_argument("--units", default=None, help="comma-separated unit names (default: every stage's "
                                                      "identity and first unit; dry run: conv3_x.first)")
    parser.add_argument("--budget-s", type=float, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type == "cpu" and not args.dry_run:
        print("gpu_tune: no GPU here; use --dry-run for the CPU flow", file=sys.stderr)
        return 2
    args.batch = args.batch or (256 if device.type == "cuda" else 2)
    dtypes = [DTYPES[d.strip()] for d in (args.dtypes or ("fp32" if args.dry_run else "bf16,fp16")).split(",")]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    directions = [d.strip() for d in args.directions.split(",") if d.strip()]
    names = args.units.split(",") if args.units else (["conv3_x.first"] if args.dry_run else None)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    else:
        torch.set_num_threads(1)

    unit_list: list[tuple[str, UnitShape]] = []
    for family in families:
        for unit in resnet50_stage_units(FAMILIES[family]):
            if names is None or unit.name in names:
                unit_list.append((family, gpu_parity.tiny(unit) if args.dry_run else unit))
    gemms: dict[tuple, Gemm] = {}
    for _, unit in unit_list:
        for g in unit_gemms(unit, args.batch):
            gemms.setdefault(g.key, g)

    tuner = Tuner(args, device, Path(args.out))
    tuner.write()
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in dtypes:
        # Shape-major: the operands and the PyTorch results of a GEMM are made once, for all
        # three directions (at batch 256 they are hundreds of MB); a budget cut drops whole shapes.
        for g in gemms.values():
            made: list[Operands] = []

            def operands(g: Gemm = g, made: list = made) -> Operands:
                if not made:
                    made.append(Operands(g, dtype, device, gen))
                return made[0]

            for direction in ("forward", "dgrad", "wgrad"):
                if direction in directions:
                    tuner.tune_gemm(g, direction, dtype, operands)
            tuner.write()
            made.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"{g.name} {g.key} {dtype}: {tuner.left():.0f} s left", flush=True)
        tuner.backward_default(dtype)
        if "strategy3x3" in directions:
            for family, unit in unit_list:
                tuner.tune_strategy(family, unit, dtype)
                tuner.write()
    tuner.write(complete=not tuner.table["skipped"])
    counts = {d: sum(e["direction"] == d for e in tuner.table["entries"]) for d in tuned.DIRECTIONS}
    bad = [m for m in tuner.table["measurements"] if m.get("status") in ("wrong result", "error")]
    print(f"tune: {len(tuner.table['entries'])} entries {counts}, {len(tuner.table['skipped'])} skipped (budget), "
          f"{len(bad)} candidates rejected (wrong result or error); table: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
