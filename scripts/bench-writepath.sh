#!/usr/bin/env bash
# Write-path overhead benchmark: fio on (a) a native folder, (b) a bindfs
# mount of it, (c) `vdrep mount` over it. One run of this script = all jobs in
# benches/writepath/*.fio x RUNS repetitions per target; medians are reported.
#
#   scripts/bench-writepath.sh
#
# Environment:
#   SIZE=1G            size of the test disk file (bench.vhd)
#   RUNTIME=10         seconds per fio job
#   RUNS=3             repetitions per job and target (median reported)
#   BENCH_ROOT=/var/tmp/vdrep-bench   work folder (needs SIZE free space; not tmpfs)
#   TARGETS="native bindfs vdrep"     subset to run
#   JOBS="seq-write-1m-psync ..."     subset of job names (default: all)
#   NO_BUILD=1         do not run `cargo build --release` (use existing binary)
#   VDREP=path         vdrep binary (default target/release/vdrep)
#   REPORT_FROM=dir    only re-make the report from an earlier run's raw fio
#                      output folder (printed at the end of each run)
#
# Output: a table on stdout and bench-results/writepath-<UTC time>.{json,md}.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SIZE="${SIZE:-1G}"
RUNTIME="${RUNTIME:-10}"
RUNS="${RUNS:-3}"
BENCH_ROOT="${BENCH_ROOT:-/var/tmp/vdrep-bench}"
TARGETS="${TARGETS:-native bindfs vdrep}"
VDREP="${VDREP:-$REPO/target/release/vdrep}"
JOBDIR="$REPO/benches/writepath"
RESULTS_DIR="$REPO/bench-results"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"

say() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

for tool in fio python3 findmnt; do
    command -v "$tool" >/dev/null || die "missing $tool (apt-get install fio python3 util-linux)"
done
mapfile -t ALL_JOBS < <(find "$JOBDIR" -maxdepth 1 -name '*.fio' -printf '%f\n' | sed 's|\.fio$||' | sort)
read -r -a SEL_JOBS <<<"${JOBS:-${ALL_JOBS[*]}}"
[[ "${#SEL_JOBS[@]}" -gt 0 ]] || die "no jobs in $JOBDIR"

DATA="$BENCH_ROOT/data"        # the "VM disk folder"
BINDMNT="$BENCH_ROOT/bindfs"   # bindfs view of DATA
RAW="${REPORT_FROM:-$BENCH_ROOT/raw-$STAMP}"   # fio JSON outputs
mkdir -p "$DATA" "$BINDMNT" "$RAW" "$RESULTS_DIR"

cleanup() {
    mountpoint -q "$BINDMNT" 2>/dev/null && { fusermount3 -u "$BINDMNT" 2>/dev/null || umount "$BINDMNT" || true; }
    if is_fuse_mounted "$DATA"; then
        "$VDREP" umount "$DATA" 2>/dev/null || fusermount3 -u "$DATA" 2>/dev/null || umount -l "$DATA" || true
    fi
}
is_fuse_mounted() { # DIR is itself a mount point of a FUSE file system
    local fstype
    fstype="$(findmnt -n -o FSTYPE --mountpoint "$1" 2>/dev/null | tail -1 || true)"
    [[ "$fstype" == fuse* ]]
}
trap cleanup EXIT

drop_caches() {
    sync
    if ! { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null; then
        [[ -n "${WARNED_DROP:-}" ]] || say "warning: cannot drop caches (not root or read-only /proc/sys)"
        WARNED_DROP=1
    fi
}

if [[ -z "${REPORT_FROM:-}" ]]; then
# --- build -----------------------------------------------------------------
if [[ " $TARGETS " == *" vdrep "* && "${NO_BUILD:-0}" != 1 ]]; then
    say "cargo build --release"
    if ! (cd "$REPO" && cargo build --release >&2); then
        say "warning: release build failed; vdrep column will be n/a"
    fi
fi

# --- the disk file ---------------------------------------------------------
SIZE_BYTES="$(numfmt --from=iec "${SIZE%B}")"
if [[ "$(stat -c %s "$DATA/bench.vhd" 2>/dev/null || echo 0)" != "$SIZE_BYTES" ]]; then
    say "creating $DATA/bench.vhd ($SIZE of random data)"
    rm -f "$DATA/bench.vhd"
    head -c "$SIZE_BYTES" /dev/urandom > "$DATA/bench.vhd"
    sync
fi
say "native folder: $DATA ($(findmnt -n -o FSTYPE --target "$DATA"), $(findmnt -n -o SOURCE --target "$DATA"))"

# --- targets ---------------------------------------------------------------
setup_target() { # prints the directory fio should use, or fails
    case "$1" in
        native) echo "$DATA" ;;
        bindfs)
            command -v bindfs >/dev/null || { say "bindfs not installed"; return 1; }
            bindfs "$DATA" "$BINDMNT" >&2 || return 1
            is_fuse_mounted "$BINDMNT" || { say "bindfs did not mount"; return 1; }
            echo "$BINDMNT" ;;
        vdrep)
            [[ -x "$VDREP" ]] || { say "no vdrep binary at $VDREP"; return 1; }
            "$VDREP" mount "$DATA" >&2 || { say "vdrep mount failed"; return 1; }
            is_fuse_mounted "$DATA" || { say "vdrep mount returned but $DATA is not a FUSE mount"; return 1; }
            echo "$DATA" ;;
    esac
}
teardown_target() {
    case "$1" in
        bindfs) fusermount3 -u "$BINDMNT" 2>/dev/null || umount "$BINDMNT" ;;
        vdrep)  "$VDREP" umount "$DATA" || say "warning: vdrep umount failed" ;;
        *) ;;
    esac
}

for target in $TARGETS; do
    say "=== target: $target"
    if ! dir="$(setup_target "$target")"; then
        say "$target: n/a"
        echo "setup failed" > "$RAW/$target.na"
        cleanup
        continue
    fi
    for job in "${SEL_JOBS[@]}"; do
        for run in $(seq 1 "$RUNS"); do
            drop_caches
            out="$RAW/$target.$job.$run.json"
            say "$target $job run $run/$RUNS"
            if ! BENCH_DIR="$dir" SIZE="$SIZE" RUNTIME="$RUNTIME" \
                fio --output-format=json --output="$out" "$JOBDIR/$job.fio" >/dev/null 2>"$out.err"; then
                say "warning: fio failed for $target $job run $run: $(tail -2 "$out.err" | tr '\n' ' ')"
                rm -f "$out"
            fi
        done
    done
    teardown_target "$target"
done

fi # REPORT_FROM

# --- report ----------------------------------------------------------------
python3 - "$RAW" "$RESULTS_DIR/writepath-$STAMP" "$SIZE" "$RUNTIME" "$RUNS" "$TARGETS" "${SEL_JOBS[*]}" <<'PY'
import json, os, statistics, subprocess, sys, platform
raw, base, size, runtime, runs, targets, jobs = sys.argv[1:8]
targets, jobs = targets.split(), jobs.split()
# metric per job: seq -> MB/s, random -> IOPS; targets from the brief
def spec(job):
    seq = job.startswith("seq")
    rw = "read" if "read" in job else "write"
    if seq:
        goal = 0.85
    elif rw == "write":
        goal = 0.5
    else:
        goal = 0.8
    return ("MB/s" if seq else "IOPS"), rw, goal
def value(path, unit, rw):
    d = json.load(open(path))
    j = d["jobs"][0][rw]
    return j["bw_bytes"] / 1e6 if unit == "MB/s" else j["iops"]
res = {}
for job in jobs:
    unit, rw, goal = spec(job)
    row = {"unit": unit, "target_ratio": goal, "runs": {}, "median": {}}
    for t in targets:
        vals = []
        for r in range(1, int(runs) + 1):
            p = os.path.join(raw, f"{t}.{job}.{r}.json")
            if os.path.exists(p):
                try:
                    vals.append(value(p, unit, rw))
                except Exception as e:
                    print(f"[bench] cannot parse {p}: {e}", file=sys.stderr)
        row["runs"][t] = vals
        row["median"][t] = statistics.median(vals) if vals else None
    res[job] = row
def fmt(v, unit):
    if v is None: return "n/a"
    return f"{v:,.0f}" if unit == "IOPS" or v >= 100 else f"{v:.1f}"
def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b
try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except Exception:
    rev = "?"
meta = {"utc": os.path.basename(base).split("-", 1)[1], "git": rev, "kernel": platform.release(),
        "cpus": os.cpu_count(), "size": size, "runtime_s": int(runtime), "runs": int(runs)}
hdr = ["job", "unit", "native", "bindfs", "vdrep", "bindfs/native", "vdrep/native", "target", "verdict"]
rows = []
for job, row in res.items():
    m, unit = row["median"], row["unit"]
    rb, rv = ratio(m.get("bindfs"), m.get("native")), ratio(m.get("vdrep"), m.get("native"))
    if rv is None:
        verdict = "n/a"
    else:
        ok = rv >= row["target_ratio"] and (rb is None or rv >= rb)
        verdict = "PASS" if ok else "FAIL"
    row["ratio"] = {"bindfs": rb, "vdrep": rv}
    row["verdict"] = verdict
    rows.append([job, unit, fmt(m.get("native"), unit), fmt(m.get("bindfs"), unit), fmt(m.get("vdrep"), unit),
                 "n/a" if rb is None else f"{rb:.2f}x", "n/a" if rv is None else f"{rv:.2f}x",
                 f">={row['target_ratio']}x & >=bindfs", verdict])
w = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
line = lambda r: "  ".join(str(x).ljust(w[i]) for i, x in enumerate(r))
print(f"\nwrite-path benchmark  git={rev} kernel={meta['kernel']} size={size} runtime={runtime}s runs={runs} (medians)")
print(line(hdr)); print(line(["-" * x for x in w]))
for r in rows: print(line(r))
json.dump({"meta": meta, "results": res}, open(base + ".json", "w"), indent=2)
with open(base + ".md", "w") as f:
    f.write(f"# vdrep write-path benchmark {meta['utc']}\n\n")
    f.write(f"git {rev}, kernel {meta['kernel']}, {meta['cpus']} CPUs, file {size}, {runtime} s per job, median of {runs} runs.\n\n")
    f.write("| " + " | ".join(hdr) + " |\n|" + "---|" * len(hdr) + "\n")
    for r in rows: f.write("| " + " | ".join(r) + " |\n")
print(f"\nresults: {base}.json {base}.md")
PY
say "raw fio output: $RAW"
