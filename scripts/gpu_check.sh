#!/usr/bin/env bash
# The GPU machine's checks, one phase at a time, each writing $OUT/<phase>.json and
# $OUT/<phase>.log (the JSON embeds what the phase produced and the tail of its log).
#
#   RESNET_FUSED_COMMIT=$(git rev-parse HEAD) scripts/gpu_check.sh build test
#   RESNET_FUSED_COMMIT=... scripts/gpu_check.sh build bench
#   scripts/gpu_check.sh all
#
# Phases (each meant to fit in about 8 minutes; PHASE_TIMEOUT_S stops one that does not):
#   build     pip install --no-build-isolation --no-deps -e . with the extension
#             (TORCH_CUDA_ARCH_LIST=9.0a); records the time and whether resnet_fused._C loads
#   test      the whole pytest suite with the GPU tests enabled (the CPU tests run too: on this
#             machine's torch/triton they are the compatibility check); JUnit summary in the JSON
#   bench     benchmarks/bench_blocks.py: batch 256, bf16 + amp-bf16, channels_last, all modes,
#             eager / fused backends / torch.compile, ResNet-50 units (BENCH_ARGS adds options)
#   models    benchmarks/bench_models.py with --classic (MODELS_ARGS adds options, e.g.
#             --models resnet_v2_50,timm:resnetv2_50,timm:resnetv2_101 for converted timm models)
#   sanitize  compute-sanitizer memcheck and racecheck over scripts/sanitize_blocks.py (one
#             forward+backward of each block type through the cuda backend)
#   all       all of the above, in that order
#
# The machine starts bare: a phase that imports the package needs `build` first in the same
# command (or in an earlier command on the same warm machine). One device command may run 10
# minutes: run one or two phases per command, not `all`, there. It has no .git: pass the commit
# in RESNET_FUSED_COMMIT. Only 8 files come back from $OUT: when more are there at the end, the
# logs are packed into logs.tar.gz (each phase's JSON already holds its log's tail).
#
# Environment: OUT (default ./out), PYTHON (python3), PHASE_TIMEOUT_S (480),
# BENCH_BUDGET_S (400), MODELS_BUDGET_S (400), BENCH_ARGS, MODELS_ARGS, PYTEST_ARGS,
# TORCH_CUDA_ARCH_LIST (9.0a), SANITIZE_BACKEND (cuda; triton also possible),
# RESNET_FUSED_3X3_STRATEGY (fused | hybrid: the Triton 3x3 forward and backward; unset, the
# selector's default; the benchmark JSON records it), e.g. to compare the two:
#   RESNET_FUSED_3X3_STRATEGY=fused BENCH_ARGS="--impls eager,triton --modes train_fwd_bwd" \
#       scripts/gpu_check.sh bench

set -u -o pipefail
export PYTHONUNBUFFERED=1

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
OUT=${OUT:-$ROOT/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
PHASE_TIMEOUT_S=${PHASE_TIMEOUT_S:-480}
export RESNET_FUSED_COMMIT=${RESNET_FUSED_COMMIT:-unknown}
# Intermediate files (benchmark JSON before embedding, JUnit XML, sanitizer logs) live here so
# that $OUT holds only the files that come back.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
RECORD="$PY $ROOT/scripts/gpu_check_record.py --out $OUT"
SUMMARY=()

log_header() {  # phase command...
    local phase=$1; shift
    {
        echo "=== gpu_check $phase, commit $RESNET_FUSED_COMMIT, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "=== $*"
    } | tee "$OUT/$phase.log"
}

run_logged() {  # phase command... : runs under the phase timeout, output to the log and stdout
    local phase=$1; shift
    timeout --kill-after=20 "$PHASE_TIMEOUT_S" "$@" 2>&1 | tee -a "$OUT/$phase.log"
    return "${PIPESTATUS[0]}"
}

record() {  # phase rc seconds [extra gpu_check_record.py options...]
    local phase=$1 rc=$2 seconds=$3; shift 3
    local line
    line=$($RECORD --phase "$phase" --rc "$rc" --seconds "$seconds" --log "$OUT/$phase.log" "$@" 2>&1) \
        || line="$phase: could not write its record: $line"
    echo "$line" | tee -a "$OUT/$phase.log"
    SUMMARY+=("$line")
}

phase_build() {
    local cmd="$PY -m pip install --no-build-isolation --no-deps -e ."
    log_header build "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} RESNET_FUSED_BUILD_CUDA=1 $cmd"
    local start=$SECONDS rc
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} RESNET_FUSED_BUILD_CUDA=1 \
        run_logged build $cmd
    rc=$?
    local build_seconds=$((SECONDS - start))
    # Whether the extension loads, and what the build contains (a cubin per arch).
    run_logged build "$PY" - "$WORK/build.json" "$build_seconds" <<'EOF'
import glob, json, os, subprocess, sys
result = {"build_seconds": float(sys.argv[2])}
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
    record build "$rc" $((SECONDS - start)) --command "$cmd" --result "$WORK/build.json"
}

phase_test() {
    # The tests demand the compiled extension where a CUDA toolkit could build it (as `make test`).
    local require_c=0
    [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] && require_c=1
    local cmd="$PY -m pytest -q -p no:cacheprovider -o junit_family=xunit2 --junitxml $WORK/test.junit.xml ${PYTEST_ARGS:-} tests"
    log_header test "RESNET_FUSED_REQUIRE_C=$require_c $cmd"
    local start=$SECONDS rc
    RESNET_FUSED_REQUIRE_C=$require_c run_logged test $cmd
    rc=$?
    record test "$rc" $((SECONDS - start)) --command "$cmd" --junit "$WORK/test.junit.xml"
}

phase_bench() {
    local cmd="$PY benchmarks/bench_blocks.py --blocks bottleneck --batch 256 --dtype bf16,amp-bf16 \
--memory-format channels_last --modes train_fwd,train_fwd_bwd,eval_fwd --budget-s ${BENCH_BUDGET_S:-400} \
--out $WORK --name bench ${BENCH_ARGS:-}"
    log_header bench "$cmd"
    local start=$SECONDS rc
    run_logged bench $cmd
    rc=$?
    # The PNG comes back beside the JSON when there is room for it (see the file count below).
    [ -f "$WORK/bench.png" ] && cp "$WORK/bench.png" "$OUT/bench.png"
    record bench "$rc" $((SECONDS - start)) --command "$cmd" --result "$WORK/bench.json"
}

phase_models() {
    local cmd="$PY benchmarks/bench_models.py --classic --budget-s ${MODELS_BUDGET_S:-400} \
--out $WORK --name models ${MODELS_ARGS:-}"
    log_header models "$cmd"
    local start=$SECONDS rc
    run_logged models $cmd
    rc=$?
    [ -f "$WORK/models.png" ] && cp "$WORK/models.png" "$OUT/models.png"
    record models "$rc" $((SECONDS - start)) --command "$cmd" --result "$WORK/models.json"
}

phase_sanitize() {
    local backend=${SANITIZE_BACKEND:-cuda}
    local cmd="compute-sanitizer --tool <memcheck|racecheck> $PY scripts/sanitize_blocks.py --backend $backend"
    log_header sanitize "PYTORCH_NO_CUDA_MEMORY_CACHING=1 $cmd"
    local start=$SECONDS
    if ! command -v compute-sanitizer >/dev/null 2>&1; then
        record sanitize 0 0 --command "$cmd" --not-run "compute-sanitizer is not on the PATH"
        return
    fi
    # Is there anything to check? (Never report "clean" for a run that checked nothing.)
    run_logged sanitize "$PY" -c "
import sys, resnet_fused
backends = resnet_fused.available_backends()
print('available backends:', backends)
sys.exit(0 if '$backend' in backends else 3)"
    if [ $? -ne 0 ]; then
        record sanitize 0 $((SECONDS - start)) --command "$cmd" \
            --not-run "no $backend backend in this build (see the log for the available ones)"
        return
    fi
    local specs=() tool rc
    for tool in memcheck racecheck; do
        echo "--- compute-sanitizer --tool $tool" | tee -a "$OUT/sanitize.log"
        # Without the caching allocator every tensor is its own allocation, so memcheck sees
        # accesses past the end of a tensor instead of into a neighbour in the same pool.
        # Each tool gets half the phase's time; its whole output (the tool's report and the
        # program's completion marker) goes to a file of its own for the record.
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --kill-after=20 $((PHASE_TIMEOUT_S / 2)) \
            compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 50 \
            "$PY" scripts/sanitize_blocks.py --backend "$backend" 2>&1 \
            | tee "$WORK/sanitize.$tool.log" | tee -a "$OUT/sanitize.log"
        rc=${PIPESTATUS[0]}
        specs+=(--sanitizer "$tool=$rc=$WORK/sanitize.$tool.log")
    done
    record sanitize 0 $((SECONDS - start)) --command "$cmd" "${specs[@]}"
}

PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(all)
if [ "${PHASES[*]}" = "all" ]; then
    PHASES=(build test bench models sanitize)
fi
for phase in "${PHASES[@]}"; do
    case "$phase" in
        build|test|bench|models|sanitize) ;;
        *) echo "gpu_check.sh: unknown phase '$phase'; phases: build test bench models sanitize all" >&2
           exit 2 ;;
    esac
done

echo "gpu_check: phases ${PHASES[*]}, commit $RESNET_FUSED_COMMIT, OUT=$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
for phase in "${PHASES[@]}"; do
    "phase_$phase"
done

# At most 8 files come back from $OUT: pack the logs when there are more.
if [ "$(find "$OUT" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
    (cd "$OUT" && tar czf logs.tar.gz ./*.log && rm -f ./*.log)
    SUMMARY+=("(more than 8 files in $OUT: the logs were packed into logs.tar.gz)")
fi
rm -rf "$WORK"

echo
echo "=== gpu_check summary (commit $RESNET_FUSED_COMMIT)"
for line in "${SUMMARY[@]}"; do
    echo "$line"
done
