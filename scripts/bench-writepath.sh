#!/usr/bin/env bash
# Write-path overhead benchmark: fio on (a) a native folder, (b) a bindfs
# mount of it (optional), (c) `vdrep mount` over it. One run of this script =
# RUNS rounds, each running every job on every target (each vdrep mount with
# fresh tracking state); medians
# are reported, with issue 12's targets as PASS/MISS:
#   1. throughput (IOPS or MB/s) >= 0.95x native on every row, and not below
#      the ratio the issue measured (the "floor" column);
#   2. fio's completion-latency p99 of the 4 KiB O_DIRECT jobs <= 1.5x native;
#   3. daemon CPU per FUSE request <= 10 us on the "tracking only" row
#      (rand-write-4k-direct-psync-4jobs): utime+stime of the mount's worker
#      and supervisor processes (/proc/PID/stat) during the fio job, divided
#      by the FUSE requests the worker answered during it
#      (vdrep_fuse_requests_total, scraped from its metrics endpoint).
# Issue 15, must-show 5: the target vdrep-nolog is the same mount with the
# activity log off (VDREP_ACTIVITY_LOG=off), its column beside vdrep's with
# the on/off ratio, the log's fdatasyncs per job (from `vdrep status`) and
# per 1000 FUSE writes; vdrep-noahead (optional) is the log on without
# recording extents ahead of a sequential writer (VDREP_ACTIVITY_AHEAD=0);
# vdrep-nohot (optional) is the log on with no budget of hot extents
# (VDREP_ACTIVITY_HOT=0: every idle extent leaves at the next cut, as before
# the budget; also what a writer cycling over more extents than the budget
# pays, since LRU then misses every time).
# The worst-* jobs (O_DIRECT writers entering a cold 4 MiB extent every
# write, or every 4th) run while the mount is cut back to back, so extents
# leave the log and are cold again on the next pass when there is no budget
# (vdrep-nohot); with the default budget (1 GiB per disk, SIZE=1G fits) they
# stay hot after the first pass, which is the point of it; a worst-* row whose
# log made no sync in vdrep-nohot FAILs (it did not measure the worst case)
# instead of giving a ratio. Issue 15's verdict (AL): log on/off >= 0.90x on worst-* rows,
# >= 0.97x on the others.
#
#   scripts/bench-writepath.sh
#
# Environment:
#   SIZE=1G            size of the test disk file (bench.vhd)
#   RUNTIME=10         seconds per fio job
#   RUNS=3             repetitions per job and target (median reported)
#   BENCH_ROOT=/var/tmp/vdrep-bench   work folder (needs SIZE free space; not tmpfs)
#   TARGETS="native vdrep vdrep-nolog fuse-min" targets to run (add bindfs, vdrep-noahead,
#                      vdrep-nohot, vdrep-uring, vdrep-uring4, vdrep-uring4r,
#                      vdrep-untracked, vdrep-uring-untracked, fuse-min,
#                      fuse-passthrough)
#   CUT_EVERY=0.1      seconds between cuts during the worst-* jobs (their
#                      logs are deleted: nothing ships them here)
#   JOBS="seq-write-1m-psync ..."     subset of job names (default: all)
#   NO_BUILD=1         do not run `cargo build --release` (use existing binary;
#                      implied by VDREP=)
#   VDREP=path         vdrep binary (default target/release/vdrep, built first)
#   VDREP_MOUNT_ARGS=  extra arguments to `vdrep mount`
#   URING4_MOUNT_ARGS= extra arguments to `vdrep mount` of target vdrep-uring4
#                      only (e.g. `--threads 64`: as many rings of 4 entries
#                      as the 1-entry default has rings)
#   METRICS_PORT=19477 loopback port of the vdrep mount's metrics endpoint
#   REPORT_FROM=dir    only re-make the report from an earlier run's raw fio
#                      output folder (printed at the end of each run)
#
# Issue 12's io_uring transport: the target vdrep-uring is the vdrep mount
# with `--fuse-transport uring` (FUSE over io_uring; the script sets
# /sys/module/fuse/parameters/enable_uring to Y for it and puts the old
# value back at exit); its columns (value, ratio, p99, CPU per request,
# T1-T3) follow vdrep's, with uring/vdrep. The target vdrep-uring4 is the
# same mount with 4 FUSE entries per ring (VDREP_URING_ENTRIES=4; the
# binary's default otherwise), its columns after uring's with uring4/uring;
# URING4_ASYNC_WRITES=1 also submits its O_DIRECT backing writes on the
# rings (VDREP_URING_ASYNC_WRITES=1 for that target only; =auto: on the
# ring only while the ring thread has other work), so the defaults and
# "4 entries + writes on the ring" run in one run. The target
# vdrep-uring4r is 4 entries with every write on the ring
# (VDREP_URING_ASYNC_WRITES=1), its columns after uring4's with
# uring4r/uring: with URING4_ASYNC_WRITES=auto one run compares the
# defaults, adaptive and always-on-the-ring writes.
#
# The floor of FUSE itself: vdrep-untracked is the vdrep mount (same
# transport, threads and options) with a --pattern that matches no file,
# so bench.vhd is served untracked (no bitmap, activity log or cut);
# vdrep-uring-untracked the same over io_uring. Their columns (value,
# ratio to native, p99, CPU per request, T1-T3) follow, with
# vdrep/untracked: what tracking costs on top of the FUSE round trip.
#
# The floor of FUSE on this host, apart from vdrep: fuse-min is
# examples/fuse_floor.rs, the smallest server of the folder (pread/pwrite in
# the worker that got the request, vdrep's INIT choices and worker count, no
# tracking, metrics or locks); fuse-passthrough is the same server answering
# opens with FOPEN_PASSTHROUGH, so the kernel serves reads and writes itself
# and no server could see (or track) them. Their CPU per request is the
# server's CPU over fio's I/O count (exact for the 4 KiB O_DIRECT rows).
# Columns follow the others, with vdrep/min. FLOOR_BIN=path uses a built
# example (default target/release/examples/fuse_floor, built first).
#
# A/B of two builds in one run: BASE_VDREP=path (e.g. main's release binary)
# makes the targets base-vdrep and base-vdrep-uring available: vdrep and
# vdrep-uring run with that binary, interleaved with the others round by
# round; their columns (value, ratio to native, p99, CPU per request, T1-T3)
# follow, with new/base (vdrep/base-vdrep, uring/base-uring).
#
# Splice (issue 12, session 13): the mount receives WRITEs of 64 KiB and
# more with splice(2) when it may make pipes of 2 MiB (room for a 1 MiB
# request): root with CAP_SYS_RESOURCE may (a systemd service has it); a
# root without it (this dev VM's containers) needs fs.pipe-max-size raised.
# PIPE_MAX_SIZE=2097152 (the default) raises it to that for the run if it
# is lower and puts the old value back at exit; PIPE_MAX_SIZE=0 leaves it.
#
# CPU per request: "CPU us/req" is the mount daemon's CPU-µs per FUSE
# request (issue 12's T3); "net us/req" is what the host pays above native:
# the daemon's plus fio's own CPU per request, less native fio's (native
# fio pays the backing I/O in its own context, vdrep's daemon pays it).
#
# Output: a table on stdout and bench-results/writepath-<UTC time>.{json,md}.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"
SIZE="${SIZE:-1G}"
RUNTIME="${RUNTIME:-10}"
RUNS="${RUNS:-3}"
BENCH_ROOT="${BENCH_ROOT:-/var/tmp/vdrep-bench}"
TARGETS="${TARGETS:-native vdrep vdrep-nolog fuse-min}"
CUT_EVERY="${CUT_EVERY:-0.1}"
[[ -n "${VDREP:-}" ]] && NO_BUILD=1   # a binary given by path is used as it is
VDREP="${VDREP:-$REPO/target/release/vdrep}"
BASE_VDREP="${BASE_VDREP:-}"
FLOOR_BIN="${FLOOR_BIN:-$REPO/target/release/examples/fuse_floor}"
floor_pid() { cat "$RAW/floor.pid" 2>/dev/null; }   # set in setup_target's subshell
CUR_VDREP="$VDREP"   # the binary of the target being measured
METRICS_PORT="${METRICS_PORT:-19477}"
read -r -a MOUNT_ARGS <<<"${VDREP_MOUNT_ARGS:-}"
read -r -a URING4_ARGS <<<"${URING4_MOUNT_ARGS:-}"
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

URING_WAS="$(cat /sys/module/fuse/parameters/enable_uring 2>/dev/null || true)"
PIPE_MAX_SIZE="${PIPE_MAX_SIZE:-2097152}"
PIPE_MAX_WAS="$(cat /proc/sys/fs/pipe-max-size 2>/dev/null || true)"
if [[ "$PIPE_MAX_SIZE" != 0 && -n "$PIPE_MAX_WAS" && "$PIPE_MAX_WAS" -lt "$PIPE_MAX_SIZE" ]]; then
    if echo "$PIPE_MAX_SIZE" > /proc/sys/fs/pipe-max-size 2>/dev/null; then
        say "fs.pipe-max-size $PIPE_MAX_WAS -> $PIPE_MAX_SIZE for this run (splice of 1 MiB WRITEs)"
    else
        say "warning: cannot raise fs.pipe-max-size to $PIPE_MAX_SIZE: 1 MiB WRITEs are copied, not spliced"
    fi
fi
cleanup() {
    if [[ -n "$PIPE_MAX_WAS" && "$(cat /proc/sys/fs/pipe-max-size 2>/dev/null)" != "$PIPE_MAX_WAS" ]]; then
        echo "$PIPE_MAX_WAS" > /proc/sys/fs/pipe-max-size 2>/dev/null || true
    fi
    if [[ -n "$URING_WAS" && "$(cat /sys/module/fuse/parameters/enable_uring 2>/dev/null)" != "$URING_WAS" ]]; then
        echo "$URING_WAS" > /sys/module/fuse/parameters/enable_uring 2>/dev/null || true
    fi
    mountpoint -q "$BINDMNT" 2>/dev/null && { fusermount3 -u "$BINDMNT" 2>/dev/null || umount "$BINDMNT" || true; }
    if is_fuse_mounted "$DATA"; then
        "$VDREP" umount "$DATA" 2>/dev/null || fusermount3 -u "$DATA" 2>/dev/null || umount -l "$DATA" || true
    fi
    if [[ -n "$(floor_pid)" ]]; then kill "$(floor_pid)" 2>/dev/null || true; rm -f "$RAW/floor.pid"; fi
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

# The vdrep mount daemon's CPU clock ticks (worker and supervisor apart) and
# the FUSE requests its worker answered so far, as one JSON object.
DAEMON_SNAPSHOT_PY='
import json, os, re, sys, urllib.request
st, port = json.loads(sys.argv[1] or "{}"), sys.argv[2]
w = st.get("worker") or {}
def ticks(pid):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])  # utime + stime (fields 14 and 15)
    except (OSError, IndexError, ValueError):
        return None
body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
counts = [(m.group(1), float(m.group(2))) for m in
          re.finditer(r"^vdrep_fuse_requests_total\{([^}]*)\} (\S+)$", body, re.M)]
req = sum(v for _, v in counts)
writes = sum(v for lab, v in counts if "op=\"write\"" in lab)
syncs = sum(d.get("activity_syncs") or 0 for d in st.get("disks") or [])
states = sorted({(d.get("state") or {}).get("state", "?") for d in st.get("disks") or []})
print(json.dumps({"worker_pid": w.get("pid"), "worker": ticks(w.get("pid", 0)),
                  "supervisor": ticks(w.get("supervisor_pid", 0)), "requests": req, "writes": writes,
                  "al_syncs": syncs, "states": states, "hz": os.sysconf("SC_CLK_TCK")}))
'
daemon_snapshot() {
    python3 -c "$DAEMON_SNAPSHOT_PY" "$("$CUR_VDREP" status "$DATA" --json 2>/dev/null || echo '{}')" "$METRICS_PORT"
}

if [[ -z "${REPORT_FROM:-}" ]]; then
# --- build -----------------------------------------------------------------
if [[ " $TARGETS " == *" vdrep"* && "${NO_BUILD:-0}" != 1 ]]; then
    say "cargo build --release"
    if ! (cd "$REPO" && cargo build --release >&2); then
        say "warning: release build failed; vdrep column will be n/a"
    fi
fi

if [[ " $TARGETS " == *" fuse-"* && "${NO_BUILD:-0}" != 1 ]]; then
    say "cargo build --release --example fuse_floor"
    (cd "$REPO" && cargo build --release --example fuse_floor >&2) \
        || say "warning: fuse_floor build failed; its columns will be n/a"
fi

# --- the disk file ---------------------------------------------------------
SIZE_BYTES="$(numfmt --from=iec "${SIZE%B}")"
if [[ "$(stat -c %s "$DATA/bench.vhd" 2>/dev/null || echo 0)" != "$SIZE_BYTES" ]]; then
    say "creating $DATA/bench.vhd ($SIZE of random data)"
    rm -f "$DATA/bench.vhd"
    head -c "$SIZE_BYTES" /dev/urandom > "$DATA/bench.vhd"
    sync
fi
say "native folder: $DATA ($(vdrep_fs_desc "$DATA"))"

# --- targets ---------------------------------------------------------------
# The binary of target $1: base-* targets run BASE_VDREP.
bin_for() { if [[ "$1" == base-* ]]; then echo "$BASE_VDREP"; else echo "$VDREP"; fi; }
setup_target() { # prints the directory fio should use, or fails
    local bin kind="${1#base-}"
    bin="$(bin_for "$1")"
    case "$kind" in
        native) echo "$DATA" ;;
        bindfs)
            command -v bindfs >/dev/null || { say "bindfs not installed"; return 1; }
            bindfs "$DATA" "$BINDMNT" >&2 || return 1
            is_fuse_mounted "$BINDMNT" || { say "bindfs did not mount"; return 1; }
            echo "$BINDMNT" ;;
        vdrep|vdrep-nolog|vdrep-noahead|vdrep-nohot|vdrep-uring|vdrep-uring4|vdrep-uring4r|vdrep-untracked|vdrep-uring-untracked)
            [[ -x "$bin" ]] || { say "no vdrep binary at '$bin'"; return 1; }
            local al=on ahead="${VDREP_ACTIVITY_AHEAD:-}" transport=dev
            local entries="${VDREP_URING_ENTRIES:-}" asyncw="${VDREP_URING_ASYNC_WRITES:-}"
            [[ "$kind" == vdrep-nolog ]] && al=off
            [[ "$kind" == vdrep-noahead ]] && ahead=0
            [[ "$kind" == vdrep-uring* ]] && transport=uring
            [[ "$kind" == vdrep-uring4 ]] && entries=4 && asyncw="${URING4_ASYNC_WRITES:-$asyncw}"
            [[ "$kind" == vdrep-uring4r ]] && entries=4 && asyncw=1
            local extra=()
            [[ "$kind" == vdrep-uring4 ]] && extra=("${URING4_ARGS[@]}")
            # The same mount serving bench.vhd as an untracked file: no
            # pattern matches it, so no bitmap, log or cut touches it.
            [[ "$kind" == *-untracked ]] && extra=(--pattern '*.vdrep-bench-untracked')
            local hot="${VDREP_ACTIVITY_HOT:-}"
            [[ "$kind" == vdrep-nohot ]] && hot=0
            VDREP_ACTIVITY_LOG=$al VDREP_ACTIVITY_AHEAD="$ahead" VDREP_ACTIVITY_HOT="$hot" \
                VDREP_URING_ENTRIES="$entries" VDREP_URING_ASYNC_WRITES="$asyncw" "$bin" mount "$DATA" --metrics-listen "127.0.0.1:$METRICS_PORT" \
                --fuse-transport "$transport" $([[ $transport == uring ]] && echo --enable-uring) "${MOUNT_ARGS[@]}" "${extra[@]}" >&2 \
                || { say "vdrep mount failed"; return 1; }
            is_fuse_mounted "$DATA" || { say "vdrep mount returned but $DATA is not a FUSE mount"; return 1; }
            echo "$DATA" ;;
        fuse-min|fuse-passthrough)
            [[ -x "$FLOOR_BIN" ]] || { say "no fuse_floor binary at '$FLOOR_BIN'"; return 1; }
            local mode=()
            [[ "$kind" == fuse-passthrough ]] && mode=(--passthrough)
            "$FLOOR_BIN" "$DATA" "${mode[@]}" >"$RAW/$kind.server.log" 2>&1 &
            echo $! > "$RAW/floor.pid"
            for _ in $(seq 1 100); do
                is_fuse_mounted "$DATA" && break
                kill -0 "$(floor_pid)" 2>/dev/null || break
                sleep 0.1
            done
            is_fuse_mounted "$DATA" || { say "fuse_floor did not mount: $(tail -2 "$RAW/$kind.server.log")"; return 1; }
            echo "$DATA" ;;
    esac
}
# The fuse_floor server's CPU clock ticks, as one JSON object.
floor_snapshot() {
    python3 -c '
import json, os, sys
pid = int(sys.argv[1])
f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
print(json.dumps({"pid": pid, "ticks": int(f[11]) + int(f[12]), "hz": os.sysconf("SC_CLK_TCK")}))' "$(floor_pid)"
}
teardown_target() {
    case "${1#base-}" in
        bindfs) fusermount3 -u "$BINDMNT" 2>/dev/null || umount "$BINDMNT" ;;
        vdrep|vdrep-nolog|vdrep-noahead|vdrep-nohot|vdrep-uring|vdrep-uring4|vdrep-uring4r|vdrep-untracked|vdrep-uring-untracked)  "$(bin_for "$1")" umount "$DATA" || say "warning: vdrep umount failed" ;;
        fuse-min|fuse-passthrough)
            fusermount3 -u "$DATA" 2>/dev/null || umount "$DATA" || say "warning: fuse_floor umount failed"
            local pid; pid="$(floor_pid)"
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill "$pid" 2>/dev/null || true
            rm -f "$RAW/floor.pid"
            # The server says at unmount how many READs and WRITEs reached it:
            # none may with passthrough, or the column measured something else.
            local served; served="$(grep -o 'served .*' "$RAW/${1}.server.log" || true)"
            say "$1: $served"
            if [[ "$1" == fuse-passthrough && "$served" != "served 0 reads, 0 writes" ]]; then
                say "ERROR: fuse-passthrough: the server saw requests ('$served'): passthrough was not in effect"
                touch "$RAW/fuse-passthrough.invalid"
            fi ;;
        *) ;;
    esac
}

# Cut DATA every CUT_EVERY s until killed, one line per cut into $1; the
# sealed logs are deleted (nothing ships them in this benchmark).
cutter() {
    : > "$1"
    while sleep "$CUT_EVERY"; do
        if logs="$("$CUR_VDREP" cut "$DATA" 2>/dev/null)"; then
            [[ -z "$logs" ]] || xargs -r -d '\n' rm -f <<<"$logs"
            echo cut >> "$1"
        fi
    done
}

# Rounds: every target once per run, so that a slow spell of this shared
# host falls on all targets alike rather than on one column.
for run in $(seq 1 "$RUNS"); do
for target in $TARGETS; do
    say "=== round $run/$RUNS, target: $target"
    CUR_VDREP="$(bin_for "$target")"
    if [[ "${target#base-}" == vdrep* ]]; then
        # Fresh tracking state each mount: a disk changed while unmounted
        # (by the native target) would come back ResyncRequired, and a
        # resyncing disk finishes no cycle, so no extent would leave the log.
        rm -rf "${DATA:?}/.vdrep"
    fi
    if ! dir="$(setup_target "$target")"; then
        say "$target: n/a"
        echo "setup failed" > "$RAW/$target.na"
        cleanup
        continue
    fi
    for job in "${SEL_JOBS[@]}"; do
        drop_caches
        out="$RAW/$target.$job.$run.json"
        say "$target $job run $run/$RUNS"
        if [[ "$job" == worst-* && "${target#base-}" == vdrep* ]]; then
            # Cut away what the earlier jobs wrote (up to the whole file),
            # outside the measured window: the cuts during the job then
            # carry only its own writes, and the extents start cold.
            # (Retried: the previous job's last cut may still be running.)
            for _ in $(seq 1 60); do
                if logs="$("$CUR_VDREP" cut "$DATA" 2>/dev/null)"; then
                    [[ -z "$logs" ]] || xargs -r -d '\n' rm -f <<<"$logs"
                    break
                fi
                sleep 0.5
            done
        fi
        if [[ "${target#base-}" == vdrep* ]]; then
            daemon_snapshot > "$out.cpu0" || say "warning: no daemon snapshot before the job"
        fi
        if [[ "$target" == fuse-* ]]; then
            floor_snapshot > "$out.fcpu0" || say "warning: no server snapshot before the job"
        fi
        cutter_pid=""
        if [[ "$job" == worst-* && "${target#base-}" == vdrep* ]]; then
            cutter "$out.cuts" & cutter_pid=$!
        fi
        if ! BENCH_DIR="$dir" SIZE="$SIZE" RUNTIME="$RUNTIME" \
            fio --output-format=json --output="$out" "$JOBDIR/$job.fio" >/dev/null 2>"$out.err"; then
            say "warning: fio failed for $target $job run $run: $(tail -2 "$out.err" | tr '\n' ' ')"
            rm -f "$out"
        fi
        if [[ -n "$cutter_pid" ]]; then
            kill "$cutter_pid" 2>/dev/null || true
            wait "$cutter_pid" 2>/dev/null || true
            say "$target $job run $run: $(wc -l < "$out.cuts") cuts"
        fi
        if [[ "${target#base-}" == vdrep* ]]; then
            daemon_snapshot > "$out.cpu1" || say "warning: no daemon snapshot after the job"
        fi
        if [[ "$target" == fuse-* ]]; then
            floor_snapshot > "$out.fcpu1" || say "warning: no server snapshot after the job"
        fi
    done
    teardown_target "$target"
done
done

fi # REPORT_FROM

# --- report ----------------------------------------------------------------
say "raw fio output: $RAW"
python3 - "$RAW" "$RESULTS_DIR/writepath-$STAMP" "$SIZE" "$RUNTIME" "$RUNS" "$TARGETS" "${SEL_JOBS[*]}" <<'PY'
import json, os, statistics, subprocess, sys, platform
raw, base, size, runtime, runs, targets, jobs = sys.argv[1:8]
targets, jobs = targets.split(), jobs.split()
GOAL, P99_GOAL, CPU_GOAL_US = 0.95, 1.5, 10.0
CPU_JOB = "rand-write-4k-direct-psync-4jobs"   # issue 12's "tracking only" load
# vdrep/native as measured when issue 12 was filed: no row may fall below it.
FLOOR = {"rand-read-4k-direct-qd16": 0.62, "rand-write-4k-direct-qd16": 0.82,
         "rand-write-4k-psync-qd1": 0.89, "seq-write-1m-direct-qd4": 0.91,
         "seq-write-1m-psync": 0.72}
def spec(job):
    seq = "seq" in job
    rw = "read" if "read" in job else "write"
    p99 = (not seq) and "direct" in job   # the 4 KiB O_DIRECT jobs
    return ("MB/s" if seq else "IOPS"), rw, p99
def fio(path, unit, rw):
    j = json.load(open(path))["jobs"][0][rw]
    v = j["bw_bytes"] / 1e6 if unit == "MB/s" else j["iops"]
    p99 = (j.get("clat_ns", {}).get("percentile") or {}).get("99.000000")
    return v, (p99 / 1e3 if p99 else None)
def fio_cpu(path):
    """fio's own CPU-µs per request (user + system, all its jobs): with
    the daemon's, what a request costs the host, to set against native."""
    try:
        js = json.load(open(path))["jobs"]
        secs = sum((j["usr_cpu"] + j["sys_cpu"]) / 100.0 * j["job_runtime"] / 1000.0 for j in js)
        ios = sum(j["read"]["total_ios"] + j["write"]["total_ios"] for j in js)
        return secs * 1e6 / ios if ios else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
def cpu(path):
    try:
        a, b = (json.load(open(path + s)) for s in (".cpu0", ".cpu1"))
    except (OSError, ValueError):
        return None
    n = b["requests"] - a["requests"]
    if n <= 0 or a["worker"] is None or b["worker"] is None or a["worker_pid"] != b["worker_pid"]:
        return None
    us = lambda k: (b[k] - a[k]) / a["hz"] * 1e6 / n if a[k] is not None and b[k] is not None else 0.0
    return {"requests": n, "worker_us": us("worker"), "supervisor_us": us("supervisor"),
            "us_per_request": us("worker") + us("supervisor"),
            "al_syncs": (b.get("al_syncs") or 0) - (a.get("al_syncs") or 0),
            "writes": (b.get("writes") or 0) - (a.get("writes") or 0),
            "states": b.get("states")}
med = lambda xs: statistics.median(xs) if xs else None
U4 = tuple(t for t in ("vdrep-uring4", "vdrep-uring4r") if t in targets)
# Untracked (the FUSE floor) and the tracked target each is compared with.
UNTR = tuple((t, tr) for t, tr in (("vdrep-untracked", "vdrep"), ("vdrep-uring-untracked", "vdrep-uring"))
             if t in targets)
# The FUSE floor apart from vdrep (examples/fuse_floor.rs).
FLOORS = tuple(t for t in ("fuse-min", "fuse-passthrough") if t in targets)
if "fuse-passthrough" in FLOORS and os.path.exists(os.path.join(raw, "fuse-passthrough.invalid")):
    print("[bench] fuse-passthrough: passthrough was not in effect; its column is dropped", file=sys.stderr)
    targets.remove("fuse-passthrough")
    FLOORS = tuple(t for t in FLOORS if t != "fuse-passthrough")
def floor_cpu(path):
    """The fuse_floor server's CPU-µs per fio I/O (one FUSE request each on
    the 4 KiB O_DIRECT rows), in cpu()'s shape."""
    try:
        a, b = (json.load(open(path + s)) for s in (".fcpu0", ".fcpu1"))
        js = json.load(open(path))["jobs"]
        ios = sum(j["read"]["total_ios"] + j["write"]["total_ios"] for j in js)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if ios <= 0 or a["pid"] != b["pid"]:
        return None
    us = (b["ticks"] - a["ticks"]) / a["hz"] * 1e6 / ios
    return {"requests": ios, "worker_us": us, "supervisor_us": 0.0, "us_per_request": us,
            "al_syncs": 0, "writes": 0, "states": None}
res = {}
for job in jobs:
    unit, rw, want_p99 = spec(job)
    row = {"unit": unit, "target_ratio": GOAL, "floor": FLOOR.get(job), "runs": {}, "median": {},
           "p99_us": {}, "cpu": None, "fio_cpu_us": {}}
    cpus, syncs, per_k, cpus_u, cpus_b = [], {}, {}, [], {}
    for t in targets:
        vals, p99s, fcs = [], [], []
        for r in range(1, int(runs) + 1):
            p = os.path.join(raw, f"{t}.{job}.{r}.json")
            if not os.path.exists(p):
                continue
            try:
                v, p99 = fio(p, unit, rw)
            except Exception as e:
                print(f"[bench] cannot parse {p}: {e}", file=sys.stderr)
                continue
            vals.append(v)
            if p99 is not None:
                p99s.append(p99)
            if (fc := fio_cpu(p)) is not None:
                fcs.append(fc)
            if t in FLOORS and (c := floor_cpu(p)):
                cpus_b.setdefault(t, []).append(c)
            if t.removeprefix("base-").startswith("vdrep") and (c := cpu(p)):
                if t == "vdrep":
                    cpus.append(c)
                if t == "vdrep-uring":
                    cpus_u.append(c)
                if t in U4 or t in dict(UNTR):
                    cpus_b.setdefault(t, []).append(c)
                if t in ("base-vdrep", "base-vdrep-uring"):
                    cpus_b.setdefault(t, []).append(c)
                syncs.setdefault(t, []).append(c["al_syncs"])
                if c["writes"] > 0:
                    per_k.setdefault(t, []).append(c["al_syncs"] * 1000 / c["writes"])
                if c["states"] not in (["Normal"], None) and not t.endswith("-untracked"):
                    print(f"[bench] warning: {t} {job} run {r}: disk state {c['states']}", file=sys.stderr)
        row["runs"][t] = vals
        row["median"][t] = med(vals)
        row["p99_us"][t] = med(p99s) if want_p99 else None
        row["fio_cpu_us"][t] = med(fcs)
    if cpus:
        row["cpu"] = {k: med([c[k] for c in cpus]) for k in cpus[0] if k != "states"}
        row["cpu"]["runs"] = cpus
    row["cpu_uring"] = None
    if cpus_u:
        row["cpu_uring"] = {k: med([c[k] for c in cpus_u]) for k in cpus_u[0] if k != "states"}
        row["cpu_uring"]["runs"] = cpus_u
    for t in ("base-vdrep", "base-vdrep-uring") + U4 + tuple(t for t, _ in UNTR) + FLOORS:
        cb = cpus_b.get(t)
        row["cpu_" + t] = None
        if cb:
            row["cpu_" + t] = {k: med([c[k] for c in cb]) for k in cb[0] if k != "states"}
            row["cpu_" + t]["runs"] = cb
    row["al_syncs"] = {t: med(v) for t, v in syncs.items()}
    row["al_syncs_per_1000_writes"] = {t: med(v) for t, v in per_k.items()}
    res[job] = row
def fmt(v, unit):
    if v is None: return "n/a"
    return f"{v:,.0f}" if unit == "IOPS" or v >= 100 else f"{v:.1f}"
def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b
rx = lambda r: "n/a" if r is None else f"{r:.2f}x"
try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except Exception:
    rev = "?"
meta = {"utc": os.path.basename(base).split("-", 1)[1], "git": rev, "kernel": platform.release(),
        "cpus": os.cpu_count(), "size": size, "runtime_s": int(runtime), "runs": int(runs),
        "mount_args": os.environ.get("VDREP_MOUNT_ARGS", ""),
        "uring4_mount_args": os.environ.get("URING4_MOUNT_ARGS", "")}
NOLOG, NOAHEAD = "vdrep-nolog" in targets, "vdrep-noahead" in targets
NOHOT = "vdrep-nohot" in targets
URING = "vdrep-uring" in targets
BASES = [t for t in ("base-vdrep", "base-vdrep-uring") if t in targets]
def net_cpu(row, t, c):
    """Host CPU-µs per request above native: the daemon's plus fio's, less
    native fio's (native pays the backing I/O in fio; vdrep in the daemon)."""
    f, fn = row["fio_cpu_us"].get(t), row["fio_cpu_us"].get("native")
    if c is None or f is None or fn is None:
        return None
    return c["us_per_request"] + f - fn
def net_cell(row, t, c):
    n = net_cpu(row, t, c)
    return "n/a" if n is None else f"{n:.1f}"
def verdicts(job, row, t, cpu_key):
    """T1-T3 of target t: (cells, ratio, p99 ratio, verdict dict)."""
    m, unit, floor = row["median"], row["unit"], row["floor"]
    rv = ratio(m.get(t), m.get("native"))
    t1 = "n/a" if rv is None else ("PASS" if rv >= GOAL and (floor is None or rv >= floor) else "MISS")
    pn, pv = row["p99_us"].get("native"), row["p99_us"].get(t)
    pr = ratio(pv, pn)
    t2 = "-" if pn is None and pv is None else ("n/a" if pr is None else ("PASS" if pr <= P99_GOAL else "MISS"))
    c = row[cpu_key]
    cpu_s = "n/a" if c is None else f"{c['us_per_request']:.1f} ({c['worker_us']:.1f}+{c['supervisor_us']:.1f})"
    t3 = "-" if job != CPU_JOB else ("n/a" if c is None else ("PASS" if c["us_per_request"] <= CPU_GOAL_US else "MISS"))
    row.setdefault("net_cpu_us", {})[t] = net_cpu(row, t, c)
    cells = [fmt(m.get(t), unit), rx(rv), t1, "-" if pv is None else f"{pv:,.0f}",
             "-" if pr is None else f"{pr:.2f}x", t2, cpu_s, net_cell(row, t, c), t3]
    return cells, rv, pr, {"T1": t1, "T2": t2, "T3": t3}
AL_WORST, AL_TYPICAL = 0.90, 0.97   # issue 15: log on/off, worst-* rows / the others
failed = []
def al_ratio(job, row, t):
    """(cell, ratio): the log-on target t over log off; a worst-* row whose
    log made no sync without a budget (vdrep-nohot) did not measure the
    worst case: FAIL, no ratio. With the budget, 0 syncs is the result
    (the extents stayed hot)."""
    n = row["al_syncs"].get(t)
    if job.startswith("worst-") and not n and t == "vdrep-nohot":
        failed.append(f"{job} ({t}: {n} activity-log syncs)")
        return "FAIL (0 log syncs)", None
    r = ratio(row["median"].get(t), row["median"].get("vdrep-nolog"))
    return rx(r), r
def syncs_cell(row, t):
    n, k = row["al_syncs"].get(t), row["al_syncs_per_1000_writes"].get(t)
    return "n/a" if n is None else f"{n:.0f}" + ("" if k is None else f" ({k:.0f}/1k wr)")
hdr = ["job", "unit", "native"] + (["bindfs"] if "bindfs" in targets else []) + [
    "vdrep", "ratio"] + (["vdrep log off", "ratio off", "log on/off", "log syncs (per 1k writes)",
                          "AL worst>=0.90x typ>=0.97x"] if NOLOG else []) + (
    ["no-ahead", "no-ahead/off", "no-ahead syncs"] if NOLOG and NOAHEAD else []) + (
    ["budget 0", "budget 0/off", "budget 0 syncs"] if NOLOG and NOHOT else []) + [
    "floor", "T1 >=0.95x", "p99 native us", "p99 vdrep us", "p99 ratio", "T2 <=1.5x",
    "CPU us/req (worker+sup)", "net us/req", "T3 <=10us"] + (
    ["uring", "uring ratio", "uring T1", "p99 uring us", "uring p99 ratio", "uring T2",
     "uring CPU us/req", "uring net us/req", "uring T3", "uring/vdrep"] if URING else []) + (
    [c for n in (t.removeprefix("vdrep-") for t in U4)
     for c in [n, f"{n} ratio", f"{n} T1", f"p99 {n} us", f"{n} p99 ratio", f"{n} T2",
               f"{n} CPU us/req", f"{n} net us/req", f"{n} T3", f"{n}/uring"]])
for t, tr in UNTR:
    n = t.removeprefix("vdrep-")
    hdr += [n, f"{n} ratio", f"{n} T1", f"p99 {n} us", f"{n} p99 ratio", f"{n} T2",
            f"{n} CPU us/req", f"{n} net us/req", f"{n} T3", f"{tr.removeprefix('vdrep-') or 'vdrep'}/{n}"]
for t in FLOORS:
    n = t.removeprefix("fuse-")
    hdr += [n, f"{n} ratio", f"{n} T1", f"p99 {n} us", f"{n} p99 ratio", f"{n} T2",
            f"{n} CPU us/req", f"{n} net us/req", f"{n} T3", f"vdrep/{n}"]
for t in BASES:
    short = t.removeprefix("base-vdrep").lstrip("-") or "dev"
    hdr += [f"base {short}", "ratio", "T1", "p99 us", "p99 ratio", "T2", "CPU us/req", "net us/req", "T3",
            f"new/base {short}"]
rows = []
for job, row in res.items():
    m, unit = row["median"], row["unit"]
    rv = ratio(m.get("vdrep"), m.get("native"))
    floor = row["floor"]
    t1 = "n/a" if rv is None else ("PASS" if rv >= GOAL and (floor is None or rv >= floor) else "MISS")
    pn, pv = row["p99_us"].get("native"), row["p99_us"].get("vdrep")
    pr = ratio(pv, pn)
    t2 = "-" if pn is None and pv is None else ("n/a" if pr is None else ("PASS" if pr <= P99_GOAL else "MISS"))
    c = row["cpu"]
    cpu_s = "n/a" if c is None else f"{c['us_per_request']:.1f} ({c['worker_us']:.1f}+{c['supervisor_us']:.1f})"
    t3 = "-" if job != CPU_JOB else ("n/a" if c is None else ("PASS" if c["us_per_request"] <= CPU_GOAL_US else "MISS"))
    row.setdefault("net_cpu_us", {})["vdrep"] = net_cpu(row, "vdrep", c)
    ro = ratio(m.get("vdrep-nolog"), m.get("native"))
    al = []
    onoff = None
    if NOLOG:
        cell, onoff = al_ratio(job, row, "vdrep")
        goal = AL_WORST if job.startswith("worst-") else AL_TYPICAL
        tal = "FAIL" if cell.startswith("FAIL") else (
            "n/a" if onoff is None else ("PASS" if onoff >= goal else "MISS"))
        al = [fmt(m.get("vdrep-nolog"), unit), rx(ro), cell, syncs_cell(row, "vdrep"), tal]
        if NOAHEAD:
            al += [fmt(m.get("vdrep-noahead"), unit), al_ratio(job, row, "vdrep-noahead")[0],
                   syncs_cell(row, "vdrep-noahead")]
        if NOHOT:
            al += [fmt(m.get("vdrep-nohot"), unit), al_ratio(job, row, "vdrep-nohot")[0],
                   syncs_cell(row, "vdrep-nohot")]
    row.update({"ratio": {"vdrep": rv, "bindfs": ratio(m.get("bindfs"), m.get("native")),
                          "vdrep-nolog": ro, "log_on_off": onoff},
                "p99_ratio": pr, "verdict": {"T1": t1, "T2": t2, "T3": t3,
                                             "AL": al[4] if al else None}})
    ur = []
    if URING:
        ur, urv, upr, uv = verdicts(job, row, "vdrep-uring", "cpu_uring")
        ur.append(rx(ratio(m.get("vdrep-uring"), m.get("vdrep"))))
        row["ratio"]["vdrep-uring"] = urv
        row["p99_ratio_uring"] = upr
        row["verdict_uring"] = uv
    for t in U4:
        cells, u4rv, u4pr, u4v = verdicts(job, row, t, "cpu_" + t)
        cells.append(rx(ratio(m.get(t), m.get("vdrep-uring"))))
        row["ratio"][t] = u4rv
        row["ratio"][f"{t}/vdrep-uring"] = ratio(m.get(t), m.get("vdrep-uring"))
        row["verdict_" + t] = u4v
        ur = ur + cells
    for t, tr in UNTR:
        cells, nrv, npr, nv = verdicts(job, row, t, "cpu_" + t)
        cells.append(rx(ratio(m.get(tr), m.get(t))))
        row["ratio"][t] = nrv
        row["ratio"][f"{tr}/{t}"] = ratio(m.get(tr), m.get(t))
        row["verdict_" + t] = nv
        ur = ur + cells
    for t in FLOORS:
        cells, frv, fpr, fv = verdicts(job, row, t, "cpu_" + t)
        cells.append(rx(ratio(m.get("vdrep"), m.get(t))))
        row["ratio"][t] = frv
        row["ratio"][f"vdrep/{t}"] = ratio(m.get("vdrep"), m.get(t))
        row["verdict_" + t] = fv
        ur = ur + cells
    for t in BASES:
        cells, brv, bpr, bv = verdicts(job, row, t, "cpu_" + t)
        new = t.removeprefix("base-")
        nb = ratio(m.get(new), m.get(t))
        cells.append(rx(nb))
        row["ratio"][t] = brv
        row["ratio"][f"{new}/{t}"] = nb
        row["verdict_" + t] = bv
        ur = ur + cells
    rows.append([job, unit, fmt(m.get("native"), unit)] + ([fmt(m.get("bindfs"), unit)] if "bindfs" in targets else []) + [
        fmt(m.get("vdrep"), unit), rx(rv)] + al + [
        "-" if floor is None else f"{floor:.2f}x", t1,
        "-" if pn is None else f"{pn:,.0f}", "-" if pv is None else f"{pv:,.0f}", "-" if pr is None else f"{pr:.2f}x", t2,
        cpu_s, net_cell(row, "vdrep", c), t3] + ur)
w = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
line = lambda r: "  ".join(str(x).ljust(w[i]) for i, x in enumerate(r))
print(f"\nwrite-path benchmark  git={rev} kernel={meta['kernel']} size={size} runtime={runtime}s runs={runs} "
      f"mount_args='{meta['mount_args']}' (medians)")
print(line(hdr)); print(line(["-" * x for x in w]))
for r in rows: print(line(r))
json.dump({"meta": meta, "results": res}, open(base + ".json", "w"), indent=2)
with open(base + ".md", "w") as f:
    f.write(f"# vdrep write-path benchmark {meta['utc']}\n\n")
    f.write(f"git {rev}, kernel {meta['kernel']}, {meta['cpus']} CPUs, file {size}, {runtime} s per job, "
            f"median of {runs} runs, mount args '{meta['mount_args']}'.\n\n")
    f.write("| " + " | ".join(hdr) + " |\n|" + "---|" * len(hdr) + "\n")
    for r in rows: f.write("| " + " | ".join(r) + " |\n")
print(f"\nresults: {base}.json {base}.md")
if failed:
    print("[bench] FAIL: worst-case rows that did not exercise the activity log: " + "; ".join(failed),
          file=sys.stderr)
    sys.exit(1)
PY
