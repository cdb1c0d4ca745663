#!/usr/bin/env bash
# The GPU machine's checks. Two one-command runs, each within 8.5 minutes of wall time, and the
# older single phases.
#
#   RESNET_FUSED_COMMIT=<sha> scripts/gpu_check.sh quick        # first, in one device command
#   RESNET_FUSED_COMMIT=<sha> scripts/gpu_check.sh tune         # then, if 5+ minutes remain
#   scripts/gpu_check.sh --dry-run quick                        # the same flow on the CPU, tiny
#   scripts/gpu_check.sh [--dry-run] tune
#   scripts/gpu_check.sh build test bench models sanitize       # single phases (10 min each)
#
# QUICK PLAN (GPU, budgets in seconds; each part ends by its deadline, cumulative from the
# start, so time an early part leaves over goes to the later ones; the total, QUICK_LIMIT_S
# (default the plan's sum, 530 s; deadlines scale with it), is inside the 540 s the plan may use
# of a 600 s device command; scripts/gpu_plan.py predicts each part's time, and the dry run
# checks the prediction against these budgets):
#   build    100  (deadline 100)  pip install -v -e . with _C for TORCH_CUDA_ARCH_LIST=9.0a (set
#                                 here, not inherited), MAX_JOBS = nproc (set here);
#                                 CUDA_HOME from `command -v nvcc` when not set;
#                                 $CUDA_HOME/bin on PATH (cuobjdump, compute-sanitizer);
#                                 TRITON_INTERPRET=0 forced. Beside it AND beside the parity, a
#                                 Triton compile warm-up (the parity's Triton cases with the
#                                 stage chain, one process per dtype: the variants the parity and
#                                 the benchmarks build; QUICK_WARMUP=0 disables), stopped when the
#                                 parity ends, its results in build.json
#   parity   130  (deadline 230)  scripts/gpu_parity.py: one process per backend (triton first),
#                                 whole blocks at the real ResNet-50, ResNeXt-50 and
#                                 post-activation ResNet-50 unit shapes, batch 32, bf16 and fp16,
#                                 and the AMP-bf16 stage chain (conv3_x's first two blocks,
#                                 statistics chained): the path the model rows time
#   bench    190  (deadline 420)  benchmarks/bench_blocks.py: eager, triton, compile, then cuda in
#                                 its own process; launches counted per row (0 = error);
#                                 train_fwd, train_fwd_bwd, eval_fwd; conv2..5_x identity units +
#                                 conv3_x projection unit, post-activation conv2_x identity and
#                                 conv3_x projection units; bf16, channels_last, batch 256; GPU
#                                 clocks and power sampled meanwhile; a torch.profiler per-kernel
#                                 breakdown of one unit per fused backend
#   models   100  (deadline 520)  benchmarks/bench_models.py: timm resnetv2_50 converted vs not
#                                 (the package's resnet_v2_50 when timm is missing), AMP bf16,
#                                 batch 256, train images/s and peak memory; eager, triton, cuda;
#                                 a model with a block left eager is an error row
#   summary   10  (deadline 530)  scripts/gpu_summary.py: parity per backend and dtype, the
#                                 backends that failed and how, speedups vs eager and vs compile
#                                 per unit and mode (timings of a backend whose parity failed in
#                                 that dtype marked INVALID; model rows valid only under the
#                                 stage-chain case), model rows
# Back on the development machine: scripts/file_gpu_results.py OUT_DIR files what came back.
# TUNE PLAN (GPU): scripts/gpu_tune.py, TUNE_LIMIT_S = 480 s in all (build first when _C is
#   missing: the tune itself needs only Triton, so a missing build only costs its time).
# Post-activation ResNet-50 (torchvision v1.5) units run in parity and bench as the "postact"
# family (QUICK_BENCH_BLOCKS / QUICK_PARITY_FAMILIES choose the families).
#
# $OUT holds at most 8 files, top level only, AT EVERY MOMENT: one <part>.json record per part
# (build, parity, bench, models, sanitize; tune, tuned), and logs.tar.gz, rewritten after every part, with
# every part's full log. Each record embeds what the part produced and the tail of its log, and
# is written when the part ends, however it ends (its timeout included), so a cut-short run still
# brings back everything done before the cut. Intermediate files live in a work folder outside
# $OUT. The tuned table comes back as tuned.json: copy it to resnet_fused/tuned/<device_slug>.json
# (the slug is in the file) and commit it.
#
# Dry run (--dry-run or GPU_CHECK_DRY_RUN=1): every part at tiny sizes on the CPU (Triton
# interpreter, the CUDA backend's host emulator), small budgets, the build skipped when _C
# already loads; then scripts/gpu_check_verify.py checks $OUT: file names, at most 8 files
# (also the largest count seen while running), the JSON schemas, and scripts/gpu_plan.py the
# GPU plan's predicted times against its budgets. GPU_CHECK_DRY_RUN_FAULT (benchmarks/faults.py)
# injects faults into the dry run's cuda backend and models. tests/test_gpu_check.py runs it.
#
# Environment: OUT (default ./out), PYTHON (python3), RESNET_FUSED_COMMIT (the machine's copy has
# no .git), QUICK_LIMIT_S, TUNE_LIMIT_S, PHASE_TIMEOUT_S (480, single phases), MAX_JOBS (nproc),
# GPU_CHECK_ARCH_LIST (9.0a: TORCH_CUDA_ARCH_LIST is set from it, never inherited),
# GPU_CHECK_MAX_JOBS (nproc: MAX_JOBS is set from it), CUDA_HOME (default: from `command -v nvcc`,
# else /usr/local/cuda), BENCH_BUDGET_S / MODELS_BUDGET_S
# (single phases, 400), and extra arguments, split as the shell would (quotes respected):
# PYTEST_ARGS, BENCH_ARGS, MODELS_ARGS, PARITY_ARGS, TUNE_ARGS; MODELS_CLASSIC=1 adds --classic
# to the models phase; SANITIZE_BACKENDS (triton,cuda); RESNET_FUSED_3X3_STRATEGY as before.
#
# Single phases:
#   build     as the quick run's build
#   test      the whole suite on every core (pytest-xdist, whole files per worker) with
#             pytest-timeout per test; on a GPU the benchmark smoke test uses small batches and
#             no whole-model compile; JUnit summary in the record
#   bench     benchmarks/bench_blocks.py: batch 256, bf16 + amp-bf16, channels_last, all modes
#   models    benchmarks/bench_models.py (MODELS_CLASSIC=1: with --classic)
#   sanitize  compute-sanitizer memcheck and racecheck over scripts/sanitize_blocks.py for each
#             backend of SANITIZE_BACKENDS (triton and cuda)
#   all       build test bench models sanitize (more than one device command: use quick)

set -u -o pipefail
export PYTHONUNBUFFERED=1

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}

DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
PHASES=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,70p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) PHASES+=("$arg") ;;
    esac
done
[ "$DRY_RUN" = "0" ] || DRY_RUN=1
[ ${#PHASES[@]} -eq 0 ] && PHASES=(quick)
if [ "${PHASES[*]}" = "all" ]; then
    PHASES=(build test bench models sanitize)
fi
for phase in "${PHASES[@]}"; do
    case "$phase" in
        quick|tune|build|test|bench|models|sanitize) ;;
        *) echo "gpu_check.sh: unknown phase '$phase'; phases: quick tune build test bench models sanitize all" >&2
           exit 2 ;;
    esac
done

OUT=${OUT:-$ROOT/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -z "${RESNET_FUSED_COMMIT:-}" ] && [ -d "$ROOT/.git" ]; then
    RESNET_FUSED_COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
fi
export RESNET_FUSED_COMMIT=${RESNET_FUSED_COMMIT:-unknown}
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=$(cd "$(dirname "$(readlink -f "$(command -v nvcc)")")/.." && pwd)
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
if [ "$DRY_RUN" = 1 ]; then
    export TRITON_INTERPRET=1
else
    # A missing device node would otherwise make the scripts pick the interpreter and time it.
    export TRITON_INTERPRET=0
fi
NPROC=$(nproc 2>/dev/null || echo 4)
# Set here, never inherited from the image: a long arch list multiplies the build time.
export TORCH_CUDA_ARCH_LIST=${GPU_CHECK_ARCH_LIST:-9.0a}
export MAX_JOBS=${GPU_CHECK_MAX_JOBS:-$NPROC}
PHASE_TIMEOUT_S=${PHASE_TIMEOUT_S:-480}

# Intermediate files (part JSONs while running, JUnit XML, the logs) live here, so that $OUT only
# ever holds the files that come back.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$WORK/logs"
SUMMARY=()
WARM_PIDS=()
SAMPLER_PID=
START=$SECONDS

# --- $OUT file count, sampled while the run lasts (the verify step checks the largest) -------
echo 0 > "$WORK/max_files"
SCRIPT_PID=$$
(
    max=0
    # Ends with the script: its folder gone, or the script itself gone (killed).
    while [ -d "$WORK" ] && kill -0 "$SCRIPT_PID" 2>/dev/null; do
        n=$(find "$OUT" -mindepth 1 2>/dev/null | wc -l)
        if [ "$n" -gt "$max" ]; then max=$n; echo "$max" > "$WORK/max_files.tmp" && mv -f "$WORK/max_files.tmp" "$WORK/max_files"; fi
        sleep 0.2
    done
) 2>/dev/null &
MONITOR_PID=$!

cleanup() {
    kill "$MONITOR_PID" 2>/dev/null
    [ -n "${SAMPLER_PID:-}" ] && kill "$SAMPLER_PID" 2>/dev/null
    local pid
    for pid in "${WARM_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT
# A kill (the device command's timeout) runs the cleanup too, so nothing keeps stdout open.
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP

# --- helpers ------------------------------------------------------------------------------------

# split_args (quote-aware splitting of PYTEST_ARGS and the like into arrays) and margin.
# shellcheck source=scripts/gpu_check_lib.sh
source "$ROOT/scripts/gpu_check_lib.sh"

log_file() { echo "$WORK/logs/$1.log"; }

log_header() {  # part command...
    local part=$1; shift
    {
        echo "=== gpu_check $part, commit $RESNET_FUSED_COMMIT, $(date -u +%Y-%m-%dT%H:%M:%SZ), dry run $DRY_RUN"
        echo "=== $*"
    } | tee -a "$(log_file "$part")"
}

# run_logged part seconds command...: under a timeout, output to the part's log and stdout.
run_logged() {
    local part=$1 seconds=$2; shift 2
    [ "$seconds" -lt 1 ] && seconds=1
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee -a "$(log_file "$part")"
    return "${PIPESTATUS[0]}"
}

# pack_logs: every log so far into $OUT/logs.tar.gz (written beside, then moved over the old one).
pack_logs() {
    tar -czf "$WORK/logs.tar.gz" -C "$WORK/logs" . 2>/dev/null && cp -f "$WORK/logs.tar.gz" "$OUT/logs.tar.gz"
}

# record part rc seconds [gpu_check_record.py options...]: $OUT/<part>.json, then the logs.
record() {
    local part=$1 rc=$2 seconds=$3; shift 3
    local line
    line=$("$PY" "$ROOT/scripts/gpu_check_record.py" --out "$OUT" --phase "$part" --rc "$rc" \
           --seconds "$seconds" --log "$(log_file "$part")" --dry-run "$DRY_RUN" "$@" 2>&1) \
        || line="$part: could not write its record: $line"
    echo "$line" | tee -a "$(log_file "$part")"
    SUMMARY+=("$line")
    pack_logs
}

# time_left deadline: seconds until START + deadline.
time_left() { echo $(( START + $1 - SECONDS )); }



# extension_loads: whether resnet_fused._C loads (asked once: importing torch takes seconds).
EXT_LOADS=
extension_loads() {
    if [ -z "$EXT_LOADS" ]; then
        EXT_LOADS=no
        "$PY" -c "from resnet_fused import _extension; import sys; sys.exit(0 if _extension.is_available() else 1)" \
            >/dev/null 2>&1 && EXT_LOADS=yes
    fi
    [ "$EXT_LOADS" = yes ]
}

# --- Triton compile warm-up, beside the build and the parity ----------------------------------
# nvcc leaves cores idle while it builds _C, and the real-shape parity spends most of its budget
# compiling Triton kernels: one process per dtype runs the parity's Triton cases meanwhile (no
# _C needed; the bf16 one also the AMP stage chain, the model rows' variants), filling Triton's
# cache for the parity and the benchmarks. It keeps running beside the parity and is stopped
# when the parity ends (before anything is timed); what it did goes into parity.json.
start_warmup() {  # seconds
    local seconds=$1 dt family name
    [ "${QUICK_WARMUP:-1}" = 1 ] || return 0
    # One process per (family, dtype), the stage chain with bf16's bottleneck one: six Triton
    # compile streams beside nvcc, most of the parity's variants built before it starts.
    local jobs=(bottleneck,stage:bf16 resnext:bf16 postact:bf16 bottleneck:fp16 resnext:fp16 postact:fp16) extra=()
    if [ "$DRY_RUN" = 1 ]; then
        jobs=(bottleneck,stage:fp16)  # the interpreter compiles nothing: this only runs the path
        extra=(--dry-run --units conv3_x.first --spread-samples 0 --stage-dtype amp-fp16)
    fi
    for job in "${jobs[@]}"; do
        family=${job%%:*} dt=${job#*:} name=warmup.${job%%,*}.${job#*:}
        timeout --kill-after=5 "$seconds" "$PY" scripts/gpu_parity.py --backends triton --dtypes "$dt" \
            --families "$family" --out "$WORK/$name.json" --budget-s "$seconds" "${extra[@]}" \
            > "$WORK/logs/$name.log" 2>&1 &
        WARM_PIDS+=($!)
    done
    echo "warm-up: Triton parity cases (${jobs[*]}) beside the build and the parity (pids ${WARM_PIDS[*]})" \
        | tee -a "$(log_file build)"
}

stop_warmup() {  # wait: 1 to let them finish (dry run), else stop them now
    local pid
    for pid in "${WARM_PIDS[@]}"; do
        [ "${1:-0}" = 1 ] || kill -TERM "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    [ ${#WARM_PIDS[@]} -gt 0 ] && echo "warm-up: stopped after $((SECONDS - START)) s" | tee -a "$(log_file parity)"
    WARM_PIDS=()
    # What the warm-up did, one JSON (the parity record attaches it).
    "$PY" - "$WORK" > /dev/null 2>&1 <<'WARMUP'
import glob, json, os, sys
work = sys.argv[1]
out = {}
for path in sorted(glob.glob(os.path.join(work, "warmup.*.json"))):
    name = os.path.basename(path)[len("warmup."):-len(".json")]
    try:
        data = json.load(open(path))
    except (OSError, ValueError) as exc:
        out[name] = f"unreadable: {exc}"
        continue
    out[name] = {"complete": data.get("complete"), "summary": data.get("summary"), "seconds": data.get("seconds"),
                 "cases": [{k: c.get(k) for k in ("label", "dtype", "status", "seconds", "reason")}
                           for c in data.get("cases", [])]}
json.dump(out, open(os.path.join(work, "warmup_results.json"), "w"), indent=1)
WARMUP
    return 0
}

# --- GPU clocks and power, sampled while the benchmarks run ------------------------------------
start_sampler() {
    command -v nvidia-smi >/dev/null 2>&1 || return 0
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu \
        --format=csv,noheader -lms 1000 > "$WORK/clocks.csv" 2>/dev/null &
    SAMPLER_PID=$!
}

stop_sampler() {
    [ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null && wait "$SAMPLER_PID" 2>/dev/null
    SAMPLER_PID=
    return 0
}

# --- parts --------------------------------------------------------------------------------------

part_build() {  # seconds
    local seconds=$1
    # -v: setup.py's "build config" lines (arch list, jobs, flags) reach the log
    local cmd=("$PY" -m pip install -v --no-build-isolation --no-deps -e .)
    log_header build "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST RESNET_FUSED_BUILD_CUDA=1 MAX_JOBS=$MAX_JOBS CUDA_HOME=$CUDA_HOME ${cmd[*]}"
    local start=$SECONDS rc=0
    if [ "$DRY_RUN" = 1 ] && extension_loads; then
        echo "dry run: resnet_fused._C already loads; build skipped" | tee -a "$(log_file build)"
    else
        RESNET_FUSED_BUILD_CUDA=1 run_logged build "$seconds" "${cmd[@]}"
        rc=$?
        EXT_LOADS=
    fi
    local build_seconds=$((SECONDS - start))
    # Whether the extension loads, and what the build contains (a cubin per arch).
    run_logged build 60 "$PY" - "$WORK/build.json" "$build_seconds" <<'EOF'
import glob, json, os, subprocess, sys
result = {"build_seconds": float(sys.argv[2]), "max_jobs": os.environ.get("MAX_JOBS"),
          "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"), "cuda_home": os.environ.get("CUDA_HOME"),
          "triton_interpret": os.environ.get("TRITON_INTERPRET")}
try:
    import torch
    import resnet_fused
    from resnet_fused import _extension
    result["extension_loads"] = _extension.is_available()
    result["extension_reason"] = _extension.unavailable_reason()
    result["available_backends"] = list(resnet_fused.available_backends())
    result["torch"] = torch.__version__
    result["cuda"] = torch.version.cuda
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    import triton
    result["triton"] = triton.__version__
    for name in ("timm", "torchvision"):
        try:
            result[name] = __import__(name).__version__
        except Exception as exc:
            result[name] = f"not importable: {type(exc).__name__}"
except Exception as exc:
    result["extension_loads"] = False
    result["import_error"] = f"{type(exc).__name__}: {exc}"
libraries = glob.glob("resnet_fused/_C*.so")
result["libraries"] = {p: os.path.getsize(p) for p in libraries}
for path in libraries:
    try:
        out = subprocess.run(["cuobjdump", "--list-elf", path], capture_output=True, text=True, timeout=60)
        result.setdefault("cubins", {})[path] = out.stdout.split("\n")[:20]
    except (OSError, subprocess.SubprocessError) as exc:
        result.setdefault("cubins", {})[path] = f"cuobjdump failed: {exc}"
try:
    result["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().split("\n")[-1]
except OSError:
    result["nvcc"] = None
# setup.py's build report (pip -v passes it through): its "build config" lines.
log = os.path.join(os.path.dirname(sys.argv[1]), "logs", "build.log")
try:
    result["build_report"] = [line.strip()[:300] for line in open(log, errors="replace")
                              if "build config" in line][:40]
except OSError:
    result["build_report"] = []
json.dump(result, open(sys.argv[1], "w"), indent=1)
print(json.dumps({k: result.get(k) for k in ("extension_loads", "extension_reason", "available_backends")}))
sys.exit(0 if result["extension_loads"] else 1)
EOF
    local check_rc=$?
    [ "$rc" -eq 0 ] && rc=$check_rc
    record build "$rc" $((SECONDS - start)) --command "${cmd[*]}" --result "$WORK/build.json"
}

part_parity() {  # seconds
    local seconds=$1 extra=()
    split_args extra "${PARITY_ARGS:-}"
    local cmd=("$PY" scripts/gpu_parity.py --out "$WORK/parity.json" --budget-s "$(margin "$seconds" 25)")
    if [ "$DRY_RUN" = 1 ]; then
        # fp16: the interpreter has no bf16 (numpy), so bf16 is checked on the GPU only
        cmd=("$PY" scripts/gpu_parity.py --dry-run --out "$WORK/parity.json" --budget-s "$(margin "$seconds" 15)"
             --dtypes fp16,fp32 --families "${QUICK_PARITY_FAMILIES:-bottleneck,postact,stage}" --units conv3_x.first
             --stage-dtype amp-fp16 --spread-samples 1)
    elif [ -n "${QUICK_PARITY_FAMILIES:-}" ]; then
        cmd+=(--families "$QUICK_PARITY_FAMILIES")
    fi
    cmd+=("${extra[@]}")
    log_header parity "${cmd[*]}"
    local start=$SECONDS rc
    run_logged parity "$seconds" "${cmd[@]}"
    rc=$?
    stop_warmup "$DRY_RUN"
    # What Triton compiled here: registers, spills, shared memory per kernel (from its cache).
    run_logged parity 60 "$PY" scripts/gpu_triton_meta.py --out "$WORK/triton_meta.json"
    record parity "$rc" $((SECONDS - start)) --command "${cmd[*]}" --result "$WORK/parity.json" \
        --attach "triton_meta=$WORK/triton_meta.json" \
        --attach "warmup=$WORK/warmup_results.json"
}

# The pre-activation identity units and the conv3_x projection unit, then two post-activation
# (torchvision resnet50) units: an identity and a strided projection unit.
QUICK_BENCH_DEADLINE=0
QUICK_UNITS=bottleneck:conv2_x.identity,bottleneck:conv3_x.identity,bottleneck:conv4_x.identity,\
bottleneck:conv5_x.identity,bottleneck:conv3_x.first,postact:conv2_x.identity,postact:conv3_x.first

part_bench() {  # seconds
    local seconds=$1 extra=()
    split_args extra "${BENCH_ARGS:-}"
    local cmd=("$PY" benchmarks/bench_blocks.py --blocks "${QUICK_BENCH_BLOCKS:-bottleneck,postact}"
               --unit-names "$QUICK_UNITS" --dtype bf16 --memory-format channels_last
               --modes train_fwd,train_fwd_bwd,eval_fwd --impls eager,triton,cuda,compile
               --out "$WORK" --name bench --no-plot)
    if [ "$DRY_RUN" = 1 ]; then
        # compile stays in the list: a 90 s budget refuses it (its first case is estimated at
        # 60 s), which is the skipped-rows path of the GPU run
        cmd=("$PY" benchmarks/bench_blocks.py --blocks bottleneck,postact --unit-names conv3_x.first --dtype fp32
             --size small --batch 2 --memory-format channels_last --modes train_fwd,train_fwd_bwd,eval_fwd
             --impls eager,triton,cuda,compile --out "$WORK" --name bench --no-plot --quick --budget-s 90 --dry-run)
    else
        cmd+=(--batch 256 --size full --budget-s "$(margin "$seconds" 40)" --require-gpu)
    fi
    cmd+=("${extra[@]}")
    log_header bench "${cmd[*]}"
    local start=$SECONDS rc
    start_sampler
    run_logged bench "$seconds" "${cmd[@]}"
    rc=$?
    stop_sampler
    # One unit per fused backend under torch.profiler (a few steps): where the GPU time goes.
    local profile=()
    if [ "$(time_left "$QUICK_BENCH_DEADLINE")" -gt 20 ] || [ "$DRY_RUN" = 1 ]; then
        run_logged bench 30 "$PY" scripts/gpu_profile.py --out "$WORK/profile.json" \
            $([ "$DRY_RUN" = 1 ] && echo --dry-run)
        profile=(--attach "profile=$WORK/profile.json")
    fi
    record bench "$rc" $((SECONDS - start)) --command "${cmd[*]}" --result "$WORK/bench.json" \
        --attach "clocks=$WORK/clocks.csv" "${profile[@]}"
}

part_models() {  # seconds
    local seconds=$1 extra=() model=timm:resnetv2_50
    split_args extra "${MODELS_ARGS:-}"
    "$PY" -c "import timm" >/dev/null 2>&1 || model=resnet_v2_50
    local cmd=("$PY" benchmarks/bench_models.py --models "$model" --modes train --dtype amp-bf16
               --out "$WORK" --name models --no-plot)
    if [ "$DRY_RUN" = 1 ]; then
        cmd=("$PY" benchmarks/bench_models.py --models "$model" --modes train --dtype fp32 --batch 2
             --image-size 32 --impls eager,cuda --quick --out "$WORK" --name models --no-plot --budget-s 40 --dry-run)
    else
        # --quick timing: the rows are build- and first-step-bound; triton and cuda must both fit
        cmd+=(--batch 256 --impls eager,triton,cuda --quick --budget-s "$(margin "$seconds" 15)" --require-gpu)
    fi
    cmd+=("${extra[@]}")
    log_header models "${cmd[*]}"
    local start=$SECONDS rc
    [ "$model" = timm:resnetv2_50 ] || echo "timm is not installed: the package's resnet_v2_50 instead" \
        | tee -a "$(log_file models)"
    run_logged models "$seconds" "${cmd[@]}"
    rc=$?
    record models "$rc" $((SECONDS - start)) --command "${cmd[*]}" --result "$WORK/models.json"
}

part_summary() {
    log_header summary "$PY scripts/gpu_summary.py $OUT"
    run_logged summary 30 "$PY" scripts/gpu_summary.py "$OUT"
    pack_logs
}

part_tune() {  # seconds
    local seconds=$1 extra=()
    split_args extra "${TUNE_ARGS:-}"
    local cmd=("$PY" scripts/gpu_tune.py --out "$WORK/tuned.json" --budget-s "$(margin "$seconds" 30)")
    if [ "$DRY_RUN" = 1 ]; then
        cmd=("$PY" scripts/gpu_tune.py --dry-run --out "$WORK/tuned.json" --families bottleneck
             --units conv3_x.first --budget-s "$(margin "$seconds" 10)")
    fi
    cmd+=("${extra[@]}")
    log_header tune "${cmd[*]}"
    local start=$SECONDS rc
    run_logged tune "$seconds" "${cmd[@]}"
    rc=$?
    # The table itself comes back as tuned.json (what resnet_fused/tuned/ holds), the record as tune.json.
    [ -f "$WORK/tuned.json" ] && cp -f "$WORK/tuned.json" "$OUT/tuned.json"
    record tune "$rc" $((SECONDS - start)) --command "${cmd[*]}" --result "$WORK/tuned.json"
}

# A compute-sanitizer memcheck of one tiny cuda-backend block, when the time before the
# summary's deadline allows (recorded as sanitize.json; not run otherwise, and said so).
part_memcheck() {  # seconds
    local seconds=$1 start=$SECONDS
    local cmd="compute-sanitizer --tool memcheck $PY scripts/sanitize_blocks.py --backend cuda"
    log_header sanitize "PYTORCH_NO_CUDA_MEMORY_CACHING=1 $cmd ($seconds s)"
    if [ "$DRY_RUN" = 1 ] || ! command -v compute-sanitizer >/dev/null 2>&1; then
        record sanitize 0 0 --command "$cmd" --not-run "compute-sanitizer is not on the PATH (or a dry run)"
        return
    fi
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --kill-after=5 "$seconds" \
        compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 50 \
        "$PY" scripts/sanitize_blocks.py --backend cuda 2>&1 \
        | tee "$WORK/sanitize.cuda.memcheck.log" | tee -a "$(log_file sanitize)"
    local rc=${PIPESTATUS[0]}
    record sanitize 0 $((SECONDS - start)) --command "$cmd" --sanitizer "cuda/memcheck=$rc=$WORK/sanitize.cuda.memcheck.log"
}

run_quick() {
    # name:budget in seconds, in order; each part's deadline is the sum of the budgets up to it,
    # scaled so that the last one lands on the limit (QUICK_LIMIT_S, default: the plan's total)
    # the GPU plan (scripts/gpu_plan.py reads this line: keep it one line)
    local plan=(build:100 parity:130 bench:190 models:100 summary:10)
    if [ "$DRY_RUN" = 1 ]; then
        plan=(build:30 parity:150 bench:160 models:90 summary:20)  # roomy: a busy CI core must not time out
        extension_loads || plan[0]=build:900
    fi
    local total=0 item
    for item in "${plan[@]}"; do total=$((total + ${item#*:})); done
    local limit=${QUICK_LIMIT_S:-$total}
    local deadline=0 used=0 part budget seconds
    for item in "${plan[@]}"; do
        part=${item%%:*}
        budget=${item#*:}
        used=$((used + budget))
        deadline=$((used * limit / total))
        seconds=$(time_left "$deadline")
        echo "--- quick: $part, $seconds s (deadline $deadline s of $limit s; $((SECONDS - START)) s used)"
        [ "$part" = bench ] && QUICK_BENCH_DEADLINE=$deadline
        if [ "$part" = summary ]; then
            # what the models part left of its time (less the summary's own) goes to a memcheck
            local spare=$(( $(time_left "$deadline") - 15 ))
            if [ "$spare" -ge 30 ]; then part_memcheck "$spare"; else
                log_header sanitize "memcheck not run: $spare s spare before the summary"
                record sanitize 0 0 --not-run "no spare time ($spare s) before the summary"
            fi
            part_summary
        elif [ "$part" = build ]; then
            # the warm-up may run until the parity's deadline
            start_warmup "$(time_left $(( (used + ${plan[1]#*:}) * limit / total )))"
            part_build "$seconds"
        elif [ "$seconds" -lt 15 ] && [ "$part" != build ]; then
            log_header "$part" "not started: $seconds s left before its deadline"
            [ "$part" = parity ] && stop_warmup 0
            record "$part" 124 0 --not-run "no time left ($seconds s before its deadline of $deadline s)"
        else
            "part_$part" "$seconds"
        fi
    done
}

run_tune() {
    local limit=${TUNE_LIMIT_S:-480}
    [ "$DRY_RUN" = 1 ] && limit=${TUNE_LIMIT_S:-90}
    local deadline=$((SECONDS - START + limit))  # from now: tune may follow quick in one command
    if [ "$DRY_RUN" != 1 ] && ! extension_loads; then
        part_build $((limit / 3))
    fi
    part_tune "$(time_left "$deadline")"
}

# --- single phases (each under PHASE_TIMEOUT_S) ------------------------------------------------

phase_test() {
    # The tests demand the compiled extension where a CUDA toolkit could build it (as `make test`).
    local require_c=0 extra=()
    [ -x "$CUDA_HOME/bin/nvcc" ] && require_c=1
    split_args extra "${PYTEST_ARGS:-}"
    local cmd=("$PY" -m pytest -q -p no:cacheprovider -n "$NPROC" --dist loadfile --timeout 300
               -o junit_family=xunit2 --junitxml "$WORK/test.junit.xml" "${extra[@]}" tests)
    log_header test "RESNET_FUSED_REQUIRE_C=$require_c ${cmd[*]}"
    local start=$SECONDS rc
    RESNET_FUSED_REQUIRE_C=$require_c run_logged test "$PHASE_TIMEOUT_S" "${cmd[@]}"
    rc=$?
    record test "$rc" $((SECONDS - start)) --command "${cmd[*]}" --junit "$WORK/test.junit.xml"
}

phase_bench() {
    local extra=()
    split_args extra "${BENCH_ARGS:-}"
    local cmd=("$PY" benchmarks/bench_blocks.py --blocks bottleneck --batch 256 --dtype bf16,amp-bf16
               --memory-format channels_last --modes train_fwd,train_fwd_bwd,eval_fwd
               --budget-s "${BENCH_BUDGET_S:-400}" --out "$WORK" --name bench --no-plot "${extra[@]}")
    log_header bench "${cmd[*]}"
    local start=$SECONDS rc
    run_logged bench "$PHASE_TIMEOUT_S" "${cmd[@]}"
    rc=$?
    record bench "$rc" $((SECONDS - start)) --command "${cmd[*]}" --result "$WORK/bench.json"
}

phase_models() {
    local extra=() classic=()
    split_args extra "${MODELS_ARGS:-}"
    [ "${MODELS_CLASSIC:-0}" = 1 ] && classic=(--classic)
    local cmd=("$PY" benchmarks/bench_models.py "${classic[@]}" --budget-s "${MODELS_BUDGET_S:-400}"
               --out "$WORK" --name models --no-plot "${extra[@]}")
    log_header models "${cmd[*]}"
    local start=$SECONDS rc
    run_logged models "$PHASE_TIMEOUT_S" "${cmd[@]}"
    rc=$?
    record models "$rc" $((SECONDS - start)) --command "${cmd[*]}" --result "$WORK/models.json"
}

phase_sanitize() {
    local backends backend tool rc specs=()
    IFS=',' read -ra backends <<< "${SANITIZE_BACKENDS:-${SANITIZE_BACKEND:-triton,cuda}}"
    local cmd="compute-sanitizer --tool <memcheck|racecheck> $PY scripts/sanitize_blocks.py --backend <${backends[*]}>"
    log_header sanitize "PYTORCH_NO_CUDA_MEMORY_CACHING=1 $cmd"
    local start=$SECONDS
    if ! command -v compute-sanitizer >/dev/null 2>&1; then
        record sanitize 0 0 --command "$cmd" --not-run "compute-sanitizer is not on the PATH"
        return
    fi
    local runs=$(( ${#backends[@]} * 2 ))
    for backend in "${backends[@]}"; do
        for tool in memcheck racecheck; do
            echo "--- compute-sanitizer --tool $tool, backend $backend" | tee -a "$(log_file sanitize)"
            # Without the caching allocator every tensor is its own allocation, so memcheck sees
            # accesses past the end of a tensor instead of into a neighbour in the same pool.
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --kill-after=20 $((PHASE_TIMEOUT_S / runs)) \
                compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 50 \
                "$PY" scripts/sanitize_blocks.py --backend "$backend" 2>&1 \
                | tee "$WORK/sanitize.$backend.$tool.log" | tee -a "$(log_file sanitize)"
            rc=${PIPESTATUS[0]}
            specs+=(--sanitizer "$backend/$tool=$rc=$WORK/sanitize.$backend.$tool.log")
        done
    done
    record sanitize 0 $((SECONDS - start)) --command "$cmd" "${specs[@]}"
}

# --- main ----------------------------------------------------------------------------------------

echo "gpu_check: ${PHASES[*]}, dry run $DRY_RUN, commit $RESNET_FUSED_COMMIT, OUT=$OUT, nproc $NPROC"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
} | tee -a "$(log_file machine)"
for phase in "${PHASES[@]}"; do
    case "$phase" in
        quick) run_quick ;;
        tune) run_tune ;;
        build) part_build "$PHASE_TIMEOUT_S" ;;
        *) "phase_$phase" ;;
    esac
done
pack_logs

status=0
if [ "$DRY_RUN" = 1 ]; then
    kill "$MONITOR_PID" 2>/dev/null
    wait "$MONITOR_PID" 2>/dev/null
    n=$(find "$OUT" -mindepth 1 | wc -l)
    [ "$n" -gt "$(cat "$WORK/max_files")" ] && echo "$n" > "$WORK/max_files"
    verify_phases=()
    for phase in "${PHASES[@]}"; do verify_phases+=(--phase "$phase"); done
    echo "=== dry run: verifying $OUT"
    "$PY" scripts/gpu_check_verify.py --out "$OUT" --max-files-seen "$(cat "$WORK/max_files")" "${verify_phases[@]}" \
        --fault "${GPU_CHECK_DRY_RUN_FAULT:-}"
    status=$?
    # The GPU quick plan's predicted time per part against its budget (the dry run's own times
    # say nothing about the GPU's).
    if [[ " ${PHASES[*]} " == *" quick "* ]]; then
        echo "=== dry run: the GPU quick plan, predicted vs budget"
        "$PY" scripts/gpu_plan.py || status=1
    fi
fi

echo
echo "=== gpu_check records (commit $RESNET_FUSED_COMMIT, $((SECONDS - START)) s)"
for line in "${SUMMARY[@]}"; do
    echo "$line"
done
exit "$status"
