#!/usr/bin/env bash
# Run every fuzz target in fuzz/fuzz_targets for SECONDS each (default 60),
# as many at once as there are CPUs, on the stable toolchain
# (kernel-notes/fuzzing.md says how).
# Prints each target's executions and executions per second; exits 1 if any
# target crashed, hung or ran out of memory, and prints the input's path.
#
#   scripts/fuzz.sh [SECONDS]
#
# Installs cargo-fuzz from crates.io if it is missing. Each target starts from
# its committed seeds (fuzz/seeds/TARGET, made by examples/fuzz_seeds.rs) and
# keeps what it learns in fuzz/corpus/TARGET (not committed).
# Environment: VDREP_FUZZ_JOBS_NICE (default 19) is the fuzzers' nice level.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v cargo >/dev/null && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi

secs="${1:-60}"
if ! [[ "$secs" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: scripts/fuzz.sh [SECONDS]  (a positive whole number, default 60)" >&2
    exit 2
fi
nice_level="${VDREP_FUZZ_JOBS_NICE:-19}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz (cargo install --locked)"
    cargo install cargo-fuzz --locked
fi

# Stable toolchain: no sanitizer, so cargo-fuzz passes only stable codegen
# flags (-Cpasses=sancov-module, -Cllvm-args=...); RUSTC_BOOTSTRAP=1 covers
# any -Z flag a cargo-fuzz version adds. Without ASan nothing is lost here:
# the fuzzed code is safe Rust, so a bug shows as a panic, and the targets run
# about twice as fast. Debug assertions and overflow checks stay on (the
# default release build of cargo-fuzz keeps them; -O would drop them).
# 16 codegen units instead of 1 shorten the build for a short run.
export RUSTC_BOOTSTRAP=1
flags=(--sanitizer none --codegen-units 16)

start="$(date +%s)"
echo "fuzz: building the targets"
nice -n 10 cargo fuzz build "${flags[@]}"
echo "fuzz: built in $(( $(date +%s) - start ))s"

mapfile -t targets < <(cargo fuzz list)
if [[ "${#targets[@]}" == 0 ]]; then
    echo "fuzz: no targets in fuzz/fuzz_targets" >&2
    exit 1
fi

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT

# One target: its exit code goes to $logs/TARGET.rc, its output to .log.
run_target() {
    local t="$1" corpus="fuzz/corpus/$1" rc=0
    mkdir -p "$corpus"
    local dirs=("$corpus")
    [[ -d "fuzz/seeds/$t" ]] && dirs+=("fuzz/seeds/$t")
    nice -n "$nice_level" cargo fuzz run "${flags[@]}" "$t" "${dirs[@]}" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 >"$logs/$t.log" 2>&1 || rc=$?
    echo "$rc" >"$logs/$t.rc"
}

# The targets run side by side, one per CPU (each fuzzer is one process on
# one core): on CI's two cores the five take three rounds, not five.
lanes="$(nproc)"
for t in "${targets[@]}"; do
    while [[ "$(jobs -rp | wc -l)" -ge "$lanes" ]]; do wait -n || true; done
    run_target "$t" &
done
wait

failed=()
printf '%-16s %12s %10s %8s  %s\n' target executions exec/s seconds result
for t in "${targets[@]}"; do
    log="$logs/$t.log"
    rc="$(cat "$logs/$t.rc" 2>/dev/null || echo '?')"
    execs="$(awk '/^stat::number_of_executed_units:/ {print $2}' "$log" | tail -n 1)"
    rate="$(awk '/^stat::average_exec_per_sec:/ {print $2}' "$log" | tail -n 1)"
    ran="$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)"
    if [[ "$rc" == 0 ]]; then
        result=ok
    else
        artefact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
        result="FAILED (exit $rc): ${artefact:-no input written, see the log below}"
        failed+=("$t")
    fi
    printf '%-16s %12s %10s %8s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "${ran:-?}" "$result"
    if [[ "$rc" != 0 ]]; then
        echo "---- last lines of $t's log ----"
        tail -n 40 "$log"
        echo "---- reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run ${flags[*]} $t ${artefact:-ARTEFACT}"
    fi
done

echo "fuzz: total $(( $(date +%s) - start ))s"
if [[ "${#failed[@]}" != 0 ]]; then
    echo "fuzz: FAIL: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz: PASS (${#targets[@]} targets, ${secs}s each)"
