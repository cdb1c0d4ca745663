# Helpers of scripts/gpu_check.sh, in a file of their own so that tests/test_gpu_check.py can
# source them. Needs PY (the Python interpreter) set.

# split_args NAME VALUE: the array NAME gets VALUE split as a shell would (quotes respected,
# nothing expanded, no globbing), so PYTEST_ARGS='-k "a or b"' stays two words: -k, a or b.
split_args() {
    local -n _target=$1
    _target=()
    [ -n "${2:-}" ] || return 0
    local word
    while IFS= read -r -d '' word; do
        _target+=("$word")
    done < <("${PY:-python3}" -c 'import shlex, sys; sys.stdout.write("".join(a + "\0" for a in shlex.split(sys.argv[1])))' "$2")
}

# margin SECONDS RESERVE: what a part's own --budget-s gets, SECONDS - RESERVE, at least 5 s.
margin() {
    local s=$(( $1 - $2 ))
    [ "$s" -lt 5 ] && s=5
    echo "$s"
}
