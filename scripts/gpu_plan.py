"""The quick GPU run's predicted time per part, against its budget.

    python scripts/gpu_plan.py [--json PATH] [--aot-variants N]

Reads the GPU plan from scripts/gpu_check.sh (the ``plan=(build:... )`` line and QUICK_UNITS),
counts what each part runs (the parity's problems from scripts/gpu_parity.py's own plan, the
block benchmark's rows, the model rows) and prices each with :data:`COSTS`. The costs are
planning assumptions, not measurements: the quick run's records (``seconds`` of each part, the
rows' ``warmup_s``) are what to replace them with once it has run. Exit status 1 when a part's
prediction exceeds its budget or the plan's total exceeds :data:`LIMIT_S`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
#: What the plan may use of the 600 s device command (the rest: start, copy back, slack).
LIMIT_S = 540
#: Seconds per item on the GPU machine (H200, 16 cores): planning assumptions.
COSTS = {
    "build": 40.0,                # nvcc build of _C for sm_90a at MAX_JOBS = 16
    "process_start": 10.0,        # import torch, triton, resnet_fused; CUDA context
    "parity_setup": 2.5,          # a problem's eager, float64 reference and spread samples, batch 32
    "parity_check": 1.0,          # one backend's eval + train step and the comparisons
    "triton_compile": 1.5,        # one Triton variant's compile, serial
    "warmup_processes": 6,        # the warm-up's processes (family x dtype), compiling beside the build
    "bench_setup": 1.5,           # a (implementation, unit) case's module and inputs
    "bench_row": 1.2,             # a row: warm-up call, host timing, do_bench 50 + 300 ms, peak memory
    "compile_row": 20.0,          # a torch.compile of one unit in one mode
    "ceilings": 3.0,              # the matmul and copy ceilings at the start of a benchmark
    "profile": 20.0,              # the profiler of one unit per fused backend
    "model_impl": 17.0,           # a model row: build, first step, quick timing
    "summary": 2.0,
}


#: The parity problems that must fit: two unit names x three families x two dtypes, and the
#: stage chain.
HEADLINE_PROBLEMS = 13


def gpu_plan() -> dict[str, int]:
    """{part: budget} of the GPU quick plan, from gpu_check.sh."""
    text = SCRIPT.read_text()
    m = re.search(r"local plan=\(([^)]*)\)", text)
    if not m:
        raise SystemExit("gpu_plan: no 'local plan=(...)' line in scripts/gpu_check.sh")
    return {k: int(v) for k, v in (item.split(":") for item in m.group(1).split())}


def quick_units() -> list[str]:
    text = SCRIPT.read_text()
    m = re.search(r"^QUICK_UNITS=((?:[^\n]*\\\n)*[^\n]*)$", text, re.M)
    return [u for u in m.group(1).replace("\\\n", "").split(",") if u] if m else []


def parity_problems() -> int:
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_parity  # noqa: E402  (torch: only when the prediction is asked for)

    args = SimpleNamespace(dry_run=False, stage_dtype="amp-bf16")
    return len(gpu_parity.plan(args, ["bf16", "fp16"], list(gpu_parity.FAMILIES), list(gpu_parity.UNIT_ORDER)))


def predict(problems: int, units: int, aot_variants: int, budgets: dict[str, int]) -> dict[str, dict]:
    c = COSTS
    build = c["build"]
    # The warm-up compiles beside the build; what it has not compiled by the parity's start,
    # the parity's triton process compiles serially (the warm-up still beside it).
    compiled_before = c["warmup_processes"] * build / c["triton_compile"]
    compile_left = max(0.0, aot_variants - compiled_before) * c["triton_compile"] / c["warmup_processes"]
    # One process per backend, each under half of the parity's time (the cuda one also gets
    # what triton left), each starting no problem after 80% of its share: the budget trims the
    # problem list (most informative first), so the prediction is what fits.
    # Deadlines are cumulative: the parity gets its budget and what the build left.
    parity_time = budgets["parity"] + max(0.0, budgets["build"] - build)
    share = parity_time / 2
    per_problem = c["parity_setup"] + c["parity_check"]
    fit = {}
    parity = 0.0
    for backend, extra in (("triton", compile_left), ("cuda", 0.0)):
        room = 0.8 * share - c["process_start"] - extra
        fit[backend] = max(0, min(problems, int(room // per_problem) + 1))
        parity += min(share, c["process_start"] + extra + problems * per_problem)
    modes = 3
    fused = 2 * c["ceilings"] + c["process_start"] + units * 3 * (c["bench_setup"] + modes * c["bench_row"])
    room = budgets["bench"] - 40 - fused - c["profile"]  # the bench's own margin, then the compile rows
    compile_units = max(0, min(units, int(room // (c["bench_setup"] + modes * c["compile_row"]))))
    bench = fused + c["profile"] + compile_units * (c["bench_setup"] + modes * c["compile_row"])
    models = c["process_start"] + c["ceilings"] + 3 * c["model_impl"]
    # The parity's prediction is held against its budget plus what the build left over.
    budgets = {**budgets, "parity": parity_time}
    predicted = {"build": build, "parity": parity, "bench": bench, "models": models, "summary": c["summary"]}
    out = {part: {"predicted_s": round(predicted[part], 1), "budget_s": budgets.get(part),
                  "ok": budgets.get(part) is not None and predicted[part] <= budgets[part]} for part in predicted}
    out["bench"]["compile_units_that_fit"] = compile_units
    out["bench"]["units"] = units
    out["parity"]["problems"] = problems
    out["parity"]["problems_that_fit"] = fit
    # The headline problems (the first unit name of each family, the stage chain, the second
    # unit name) must fit in both backends' shares.
    out["parity"]["ok"] = out["parity"]["ok"] and min(fit.values()) >= HEADLINE_PROBLEMS
    out["parity"]["triton_variants"] = aot_variants
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="also write the prediction here")
    parser.add_argument("--aot-variants", type=int, default=None,
                        help="Triton variants the run compiles (default: resnet_fused.triton.aot's plan)")
    args = parser.parse_args(argv)
    budgets = gpu_plan()
    variants = args.aot_variants
    if variants is None:
        sys.path.insert(0, str(ROOT))
        from resnet_fused.triton import aot  # noqa: E402  (torch and triton: only when asked)

        variants = len(aot.launch_plan())
    parts = predict(parity_problems(), len(quick_units()), variants, budgets)
    total_budget = sum(budgets.values())
    total_predicted = round(sum(p["predicted_s"] for p in parts.values()), 1)
    result = {"limit_s": LIMIT_S, "budget_total_s": total_budget, "predicted_total_s": total_predicted,
              "costs_are": "planning assumptions (scripts/gpu_plan.py COSTS), not measurements",
              "costs": COSTS, "parts": parts,
              "ok": all(p["ok"] for p in parts.values()) and total_budget <= LIMIT_S and total_predicted <= LIMIT_S}
    print(f"{'part':<8}{'predicted s':>12}{'budget s':>10}")
    for part, p in parts.items():
        print(f"{part:<8}{p['predicted_s']:>12.1f}{p['budget_s']:>10}{'' if p['ok'] else '  OVER'}")
    print(f"{'total':<8}{total_predicted:>12.1f}{total_budget:>10}  (limit {LIMIT_S} s of a 600 s command; "
          f"bench: {parts['bench']['compile_units_that_fit']} of {parts['bench']['units']} units get compile rows)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print("gpu_plan: " + ("ok" if result["ok"] else "OVER BUDGET"))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
