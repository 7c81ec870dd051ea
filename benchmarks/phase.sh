# Sourced by the one-call benchmark scripts (bench_8b.sh, bench_int4.sh).
#
# phase NAME SECONDS COMMAND...: run COMMAND under a time limit (SIGINT, then kill), its output in
# $OUT/NAME.log; print the return code, the time, and the log's lines that match $PHASE_SUMMARY.
phase() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name: $*"
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - start)) s"
    grep -E "$PHASE_SUMMARY" "$OUT/$name.log" | grep -v '^INFO.*httpx' | cut -c1-400 | tail -"${PHASE_LINES:-30}"
}
