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
# (default the plan's sum, 500 s = 8 min 20 s; deadlines scale with it), is inside the
# 8.5 minutes and well inside a 560 s device command):
#   build    170  (deadline 170)  pip install -e . with _C for sm_90a; MAX_JOBS = nproc (not
#                                 MemAvailable, which starts small on that VM); $CUDA_HOME/bin on
#                                 PATH (cuobjdump, compute-sanitizer); TRITON_INTERPRET=0 forced.
#                                 Beside it, a Triton compile warm-up (the parity's Triton cases,
#                                 one process per dtype; QUICK_WARMUP=0 disables), stopped when
#                                 the build ends
#   parity   110  (deadline 280)  scripts/gpu_parity.py: whole blocks at the real ResNet-50,
#                                 ResNeXt-50 and post-activation ResNet-50 (torchvision v1.5)
#                                 unit shapes, batch 32, bf16 and fp16, triton and
#                                 cuda, the selector's own configs; eval output, train output,
#                                 input grad, every param grad, running stats; launch checks
#   bench    150  (deadline 430)  benchmarks/bench_blocks.py: eager, triton, cuda, compile
#                                 (compile last: the budget skips what it cannot fit, recorded);
#                                 train_fwd, train_fwd_bwd, eval_fwd; conv2..5_x identity units +
#                                 conv3_x projection unit, post-activation conv2_x identity and
#                                 conv3_x projection units; bf16, channels_last, batch 256
#   models    60  (deadline 490)  benchmarks/bench_models.py: timm resnetv2_50 converted vs not
#                                 (the package's resnet_v2_50 when timm is missing), AMP bf16,
#                                 batch 256, train images/s and peak memory; eager, triton, cuda
#   summary   10  (deadline 500)  scripts/gpu_summary.py: parity per backend and dtype, speedups
#                                 vs eager and vs compile per unit and mode (timings of a backend
#                                 whose parity failed in that dtype marked INVALID), model rows
# TUNE PLAN (GPU): scripts/gpu_tune.py, TUNE_LIMIT_S = 480 s in all (build first when _C is
#   missing: the tune itself needs only Triton, so a missing build only costs its time).
# Post-activation ResNet-50 (torchvision v1.5) units run in parity and bench as the "postact"
# family (QUICK_BENCH_BLOCKS / QUICK_PARITY_FAMILIES choose the families).
#
# $OUT holds at most 8 files, top level only, AT EVERY MOMENT: one <part>.json record per part
# (build, parity, bench, models; tune, tuned), and logs.tar.gz, rewritten after every part, with
# every part's full log. Each record embeds what the part produced and the tail of its log, and
# is written when the part ends, however it ends (its timeout included), so a cut-short run still
# brings back everything done before the cut. Intermediate files live in a work folder outside
# $OUT. The tuned table comes back as tuned.json: copy it to resnet_fused/tuned/<device_slug>.json
# (the slug is in the file) and commit it.
#
# Dry run (--dry-run or GPU_CHECK_DRY_RUN=1): every part at tiny sizes on the CPU (Triton
# interpreter, the CUDA backend's host emulator), small budgets, the build skipped when _C
# already loads; then scripts/gpu_check_verify.py checks $OUT: file names, at most 8 files
# (also the largest count seen while running), the JSON schemas. tests/test_gpu_check.py runs it.
#
# Environment: OUT (default ./out), PYTHON (python3), RESNET_FUSED_COMMIT (the machine's copy has
# no .git), QUICK_LIMIT_S, TUNE_LIMIT_S, PHASE_TIMEOUT_S (480, single phases), MAX_JOBS (nproc),
# TORCH_CUDA_ARCH_LIST (9.0a), CUDA_HOME (/usr/local/cuda), BENCH_BUDGET_S / MODELS_BUDGET_S
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
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
if [ "$DRY_RUN" = 1 ]; then
    export TRITON_INTERPRET=1
else
    # A missing device node would otherwise make the scripts pick the interpreter and time it.
    export TRITON_INTERPRET=0
fi
NPROC=$(nproc 2>/dev/null || echo 4)
export MAX_JOBS=${MAX_JOBS:-$NPROC}
PHASE_TIMEOUT_S=${PHASE_TIMEOUT_S:-480}

# Intermediate files (part JSONs while running, JUnit XML, the logs) live here, so that $OUT only
# ever holds the files that come back.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$WORK/logs"
SUMMARY=()
START=$SECONDS

# --- $OUT file count, sampled while the run lasts (the verify step checks the largest) -------
echo 0 > "$WORK/max_files"
(
    max=0
    while [ -d "$WORK" ]; do
        n=$(find "$OUT" -mindepth 1 2>/dev/null | wc -l)
        if [ "$n" -gt "$max" ]; then max=$n; echo "$max" > "$WORK/max_files.tmp" && mv -f "$WORK/max_files.tmp" "$WORK/max_files"; fi
        sleep 0.2
    done
) 2>/dev/null &
MONITOR_PID=$!

cleanup() {
    kill "$MONITOR_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

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

# --- Triton compile warm-up, beside the build ----------------------------------------------------
# nvcc leaves cores idle while it builds _C, and the real-shape parity spends most of its budget
# compiling Triton kernels: one process per dtype runs the parity's Triton cases meanwhile (no
# _C needed), filling Triton's cache for the parity and the benchmarks. Stopped when the build
# ends; its results are not the parity's (that part reruns everything), only its log is kept.
WARM_PIDS=()
start_warmup() {  # seconds
    local seconds=$1 dt
    [ "${QUICK_WARMUP:-1}" = 1 ] || return 0
    local dtypes=(bf16 fp16) extra=()
    if [ "$DRY_RUN" = 1 ]; then
        dtypes=(fp16)  # the interpreter compiles nothing: this only runs the path
        extra=(--dry-run --families bottleneck --units conv3_x.first --spread-samples 0)
    fi
    for dt in "${dtypes[@]}"; do
        timeout --kill-after=5 "$seconds" "$PY" scripts/gpu_parity.py --backends triton --dtypes "$dt" \
            --out "$WORK/warmup.$dt.json" --budget-s "$seconds" "${extra[@]}" \
            > "$WORK/logs/warmup.$dt.log" 2>&1 &
        WARM_PIDS+=($!)
    done
    echo "warm-up: Triton parity cases for ${dtypes[*]} beside the build (pids ${WARM_PIDS[*]})" | tee -a "$(log_file build)"
}

stop_warmup() {  # wait: 1 to let them finish (dry run), else stop them now
    local pid
    for pid in "${WARM_PIDS[@]}"; do
        [ "${1:-0}" = 1 ] || kill -TERM "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    [ ${#WARM_PIDS[@]} -gt 0 ] && echo "warm-up: stopped after $((SECONDS - START)) s" | tee -a "$(log_file build)"
    WARM_PIDS=()
    return 0
}

# --- parts --------------------------------------------------------------------------------------

part_build() {  # seconds
    local seconds=$1
    local cmd=("$PY" -m pip install --no-build-isolation --no-deps -e .)
    log_header build "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} RESNET_FUSED_BUILD_CUDA=1 MAX_JOBS=$MAX_JOBS ${cmd[*]}"
    local start=$SECONDS rc=0
    if [ "$DRY_RUN" = 1 ] && extension_loads; then
        echo "dry run: resnet_fused._C already loads; build skipped" | tee -a "$(log_file build)"
    else
        TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} RESNET_FUSED_BUILD_CUDA=1 \
            run_logged build "$seconds" "${cmd[@]}"
        rc=$?
        EXT_LOADS=
    fi
    local build_seconds=$((SECONDS - start))
    # Whether the extension loads, and what the build contains (a cubin per arch).
    run_logged build 60 "$PY" - "$WORK/build.json" "$build_seconds" <<'EOF'
import glob, json, os, subprocess, sys
result = {"build_seconds": float(sys.argv[2]), "max_jobs": os.environ.get("MAX_JOBS"),
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
             --dtypes fp16 --families "${QUICK_PARITY_FAMILIES:-bottleneck,postact}" --units conv3_x.first
             --spread-samples 1)
    elif [ -n "${QUICK_PARITY_FAMILIES:-}" ]; then
        cmd+=(--families "$QUICK_PARITY_FAMILIES")
    fi
    cmd+=("${extra[@]}")
    log_header parity "${cmd[*]}"
    local start=$SECONDS rc
    run_logged parity "$seconds" "${cmd[@]}"
    rc=$?
    record parity "$rc" $((SECONDS - start)) --command "${cmd[*]}" --result "$WORK/parity.json"
}

# The pre-activation identity units and the conv3_x projection unit, then two post-activation
# (torchvision resnet50) units: an identity and a strided projection unit.
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
        # compile stays in the list: a 20 s budget refuses it (its first case is estimated at
        # 60 s), which is the skipped-rows path of the GPU run
        cmd=("$PY" benchmarks/bench_blocks.py --blocks bottleneck,postact --unit-names conv3_x.first --dtype fp32
             --size small --batch 2 --memory-format channels_last --modes train_fwd,train_fwd_bwd,eval_fwd
             --impls eager,triton,cuda,compile --out "$WORK" --name bench --no-plot --quick --budget-s 20)
    else
        cmd+=(--batch 256 --size full --budget-s "$(margin "$seconds" 30)")
    fi
    cmd+=("${extra[@]}")
    log_header bench "${cmd[*]}"
    local start=$SECONDS rc
    run_logged bench "$seconds" "${cmd[@]}"
    rc=$?
    record bench "$rc" $((SECONDS - start)) --command "${cmd[*]}" --result "$WORK/bench.json"
}

part_models() {  # seconds
    local seconds=$1 extra=() model=timm:resnetv2_50
    split_args extra "${MODELS_ARGS:-}"
    "$PY" -c "import timm" >/dev/null 2>&1 || model=resnet_v2_50
    local cmd=("$PY" benchmarks/bench_models.py --models "$model" --modes train --dtype amp-bf16
               --out "$WORK" --name models --no-plot)
    if [ "$DRY_RUN" = 1 ]; then
        cmd=("$PY" benchmarks/bench_models.py --models "$model" --modes train --dtype fp32 --batch 2
             --image-size 32 --impls eager,cuda --quick --out "$WORK" --name models --no-plot --budget-s 40)
    else
        cmd+=(--batch 256 --impls eager,triton,cuda --budget-s "$(margin "$seconds" 15)")
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

run_quick() {
    # name:budget in seconds, in order; each part's deadline is the sum of the budgets up to it,
    # scaled so that the last one lands on the limit (QUICK_LIMIT_S, default: the plan's total)
    local plan=(build:170 parity:110 bench:150 models:60 summary:10)
    if [ "$DRY_RUN" = 1 ]; then
        plan=(build:30 parity:120 bench:90 models:90 summary:20)  # roomy: a busy CI core must not time out
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
        if [ "$part" = summary ]; then
            part_summary
        elif [ "$part" = build ]; then
            start_warmup "$seconds"
            part_build "$seconds"
            stop_warmup "$DRY_RUN"
        elif [ "$seconds" -lt 15 ] && [ "$part" != build ]; then
            log_header "$part" "not started: $seconds s left before its deadline"
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
    "$PY" scripts/gpu_check_verify.py --out "$OUT" --max-files-seen "$(cat "$WORK/max_files")" "${verify_phases[@]}"
    status=$?
fi

echo
echo "=== gpu_check records (commit $RESNET_FUSED_COMMIT, $((SECONDS - START)) s)"
for line in "${SUMMARY[@]}"; do
    echo "$line"
done
exit "$status"
