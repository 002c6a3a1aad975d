#!/usr/bin/env bash
# Replication speed benchmark (issue 3, "Speed"), everything on 127.0.0.1:
#
#   scripts/bench-replication.sh                 # SIZE=2G RUNS=3 RPO_SECS=60
#   SIZE=512M RPO_SECS=20 scripts/bench-replication.sh   # quick run
#
# Takes ~4 min (2 GiB) on an idle 2-core host, ~8 min on a busy one.
#
# 1. initial replication of a SIZE random file and of a SIZE ext4 image ~20%
#    full (mix of random and compressible files): vdrep (mount + protect + sync,
#    timed from `protect` to `sync` success) vs `cp` + sync vs an rsync daemon
#    on 127.0.0.1 (`rsync -a --inplace`, then sync). Median of RUNS.
# 1b. copylat (not in the default set): fio writes COPYLAT_IOPS 4 KiB random
#    O_DIRECT writes (QD1) to the random file through the mount for
#    COPYLAT_SECS; after 5 s the VM is protected and synced (its initial
#    copy). Completion latency p50/p99/p99.9/max of the writes before the
#    copy (tracked only) and during it; the replica is compared after.
# 2. delta after changing CHANGE_PCT% of the 4 KiB blocks of the random file
#    (random blocks, random data): `vdrep sync` vs
#    `rsync -I --inplace --no-whole-file -B4096` to the synced copy. RUNS rounds,
#    each a fresh change set. Targets: time <= 1/20 of rsync's, bytes <= rsync's.
# 3. RPO under a steady RPO_RATE random-write load (fio, 4k-64k, O_DIRECT,
#    through the mount) for RPO_SECS per mode, `--every 30s` then
#    `--every continuous`; lag_secs sampled every 0.5 s; p50/p99/max.
#    Target: continuous p99 <= 5 s.
# 4. blip: `--every continuous` under the same load; after 5 s the receiver
#    is killed (-9) and restarted 2 s later on the same address and store.
#    lag_secs sampled every 0.5 s from the restart on, for BLIP_SECS.
#    Target: lag p99 <= 5 s measured from the restart (fast retries), the
#    median of BLIP_RUNS runs' p99 (a run per kill).
#    The VM has two disks (disk.img and a SIZE/4 disk2.img), both under load.
# 5. scale: SCALE_VMS VMs (256) with one SCALE_DISK (16M) disk each in one
#    mount, all `--every continuous` to one receiver; fio writes SCALE_RATE
#    (50m) of 4 KiB random writes in total (O_DIRECT, spread over every disk)
#    for SCALE_SECS; every VM's lag_secs sampled every second. Target: lag
#    p99 <= 1 s over all VMs and samples. Also the daemon's and the
#    receiver's RSS, threads, descriptors and CPU per VM, and the host's
#    capacity: VM-cycles/s (points committed per second over all VMs, from
#    each VM's `points_committed` in the status) and CPU ms per cycle.
#
# "On the wire" is what each tool's sockets carried: for vdrep the UDP
# payload bytes its QUIC connections sent (status `wire_bytes_sent`: data,
# QUIC headers, retransmissions), for rsync its own sent-bytes count (TCP
# payload).
#
# Caches are dropped before every timed step (cold source, as for a real
# initial copy; DROP_CACHES=0 keeps them). No assertions on time: the verdict
# column only reports. `-I` is added to the issue's rsync delta command so
# rsync's size+mtime quick check never skips a round.
#
# Environment:
#   SIZE=2G  RUNS=3  CHANGE_PCT=1  FILL_PCT=20  RPO_SECS=60  RPO_RATE=50m
#   SECTIONS="initial delta rpo blip"   subset to run   BLIP_SECS=30  BLIP_RUNS=$RUNS
#     (add "copylat": the VM's write latency before and during an initial
#      copy of the random file; COPYLAT_IOPS=500 COPYLAT_SECS=20)
#     (add "scale", or SECTIONS=scale alone: SCALE_VMS=256 SCALE_DISK=16M
#      SCALE_RATE=50m SCALE_SECS=60)
#   RPO_MODES="30s continuous"     subset of --every modes for the RPO section
#   BENCH_ROOT=/var/tmp/vdrep-rbench   work folder (needs ~6x SIZE free; not tmpfs)
#   NO_BUILD=1   do not run `cargo build --release` (implied by VDREP=)
#   VDREP=path   binary (default target/release/vdrep, built first)
#   KEEP=1       also keep the disk copies and replicas (logs are always kept
#                under BENCH_ROOT/run-<UTC>/log)
#   NO_INSTALL=1 do not apt-get install missing tools
#   DROP_CACHES=0  keep the page cache between steps (warm source; default: drop)
#   DIAG=1       strace -c -w the sender and receiver during the last delta round
#                (that round is then left out of the medians)
#   PHASES=1     log every cycle's phases (VDREP_LOG=info,vdrep::cycle_time=debug)
#   PERF_DIR=dir system-wide `perf record -F 999` of each timed initial copy
#                (initial-KIND-RUN.perf): the transfer alone, not the setup
#                and print where the time went during the scale and blip loads
#                (benches/replication/phase-times.py; also LOG/phases-*.md)
#
# Output: tables on stdout and bench-results/replication-<UTC>.{md,json,tsv}.
# Needs root (loop mount, drop_caches), rsync, fio, sysstat (pidstat), e2fsprogs.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$REPO/scripts/lib.sh"
SIZE="${SIZE:-2G}"
RUNS="${RUNS:-3}"
CHANGE_PCT="${CHANGE_PCT:-1}"
FILL_PCT="${FILL_PCT:-20}"
RPO_SECS="${RPO_SECS:-60}"
RPO_RATE="${RPO_RATE:-50m}"
SECTIONS="${SECTIONS:-initial delta rpo blip scale}"
BLIP_SECS="${BLIP_SECS:-30}"
BLIP_RUNS="${BLIP_RUNS:-$RUNS}"
SCALE_VMS="${SCALE_VMS:-256}"
SCALE_DISK="${SCALE_DISK:-16M}"
SCALE_RATE="${SCALE_RATE:-50m}"
SCALE_SECS="${SCALE_SECS:-60}"
COPYLAT_IOPS="${COPYLAT_IOPS:-500}"
COPYLAT_SECS="${COPYLAT_SECS:-20}"
export SCALE_SECS SCALE_RATE COPYLAT_IOPS   # read by the report
BENCH_ROOT="${BENCH_ROOT:-/var/tmp/vdrep-rbench}"
# A binary given by path is used as it is (an A/B of two builds must not
# rebuild one of them); the default one is built first.
[[ -n "${VDREP:-}" ]] && NO_BUILD=1
VDREP="${VDREP:-$REPO/target/release/vdrep}"
RESULTS_DIR="$REPO/bench-results"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
SIZE_BYTES="$(numfmt --from=iec "${SIZE%B}")"

PRISTINE="$BENCH_ROOT/pristine-$SIZE_BYTES"   # reused across runs of the script
W="$BENCH_ROOT/run-$STAMP"
VSRC="$W/site-a"          # the vdrep-mounted "VM disk folder"
KEYS_A="$W/keys-a" KEYS_B="$W/keys-b"
CPDST="$W/cp-dst"
RMOD="$W/rsyncd-mod"      # the rsync daemon module's folder
RSRC="$W/rsync-src"       # source copy for the rsync delta
RES="$W/results.tsv"      # section  subject  run  key  value
LOG="$W/log"
VM=benchvm

say() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }
rec() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RES"; }
now() { date +%s.%N; }
# PERF_DIR: a system-wide profile of one timed step (perf_start NAME ... perf_stop).
PERF_PID=""
perf_start() {
    [[ -n "${PERF_DIR:-}" ]] || return 0
    command -v perf >/dev/null || die "PERF_DIR is set but perf is not installed (apt-get install linux-perf)"
    mkdir -p "$PERF_DIR"
    perf record -F 999 -a -o "$PERF_DIR/$1.perf" >/dev/null 2>&1 & PERF_PID=$!
    sleep 0.5   # perf is sampling before the step starts
}
perf_stop() {
    [[ -n "$PERF_PID" ]] || return 0
    kill -INT "$PERF_PID"; wait "$PERF_PID" 2>/dev/null || true; PERF_PID=""
}
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.3f}')" "$1" "$2"; }

[[ "$(id -u)" == 0 ]] || die "run as root (loop mount of the ext4 image in scripts/bench-images.sh, drop_caches)"
BENCH_PKGS="rsync fio python3 jq e2fsprogs util-linux sysstat qemu-utils fuse3"
missing=()
for t in rsync fio python3 jq mkfs.ext4 findmnt pidstat qemu-img fusermount3; do
    command -v "$t" >/dev/null || missing+=("$t")
done
if [[ ${#missing[@]} -gt 0 && "${NO_INSTALL:-0}" != 1 ]] && command -v apt-get >/dev/null; then
    say "missing ${missing[*]}: apt-get install $BENCH_PKGS"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $BENCH_PKGS >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $BENCH_PKGS >&2; } \
        || die "apt-get install failed"
fi
for t in rsync fio python3 jq mkfs.ext4 findmnt pidstat qemu-img fusermount3; do
    command -v "$t" >/dev/null || die "missing $t (apt-get install $BENCH_PKGS)"
done
mkdir -p "$W" "$LOG" "$RESULTS_DIR" "$PRISTINE"
: >"$RES"

RECV_PID="" RSYNCD_PID=""
is_fuse_mounted() { [[ "$(findmnt -n -o FSTYPE --mountpoint "$1" 2>/dev/null | tail -1 || true)" == fuse* ]]; }
stop_receiver() {
    if [[ -n "$RECV_PID" ]]; then kill "$RECV_PID" 2>/dev/null || true; wait "$RECV_PID" 2>/dev/null || true; fi
    RECV_PID=""
}
umount_src() {
    if is_fuse_mounted "$VSRC"; then
        "$VDREP" umount "$VSRC" >/dev/null 2>&1 || fusermount3 -u "$VSRC" 2>/dev/null || umount -l "$VSRC" || true
    fi
}
cleanup() {
    local rc=$?
    set +e
    [[ -n "${SAMPLER_PID:-}" ]] && kill "$SAMPLER_PID" 2>/dev/null
    [[ -n "${FIO_PID:-}" ]] && kill "$FIO_PID" 2>/dev/null
    [[ -n "${PIDSTAT_PID:-}" ]] && kill "$PIDSTAT_PID" 2>/dev/null
    umount_src
    stop_receiver
    [[ -n "$RSYNCD_PID" ]] && kill "$RSYNCD_PID" 2>/dev/null
    if [[ "${KEEP:-0}" != 1 ]]; then
        rm -rf "$W/site-a" "$W/cp-dst" "$W/rsyncd-mod" "$W/rsync-src" "$W"/store-*
    fi
    [[ $rc != 0 ]] && say "FAILED (rc $rc); logs in $LOG"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

drop_caches() { sync; [[ "${DROP_CACHES:-1}" == 1 ]] && { echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }; return 0; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_secs() { # utime+stime of PID (and its threads) in seconds
    awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat" 2>/dev/null || echo 0
}
status_json() { "$VDREP" status "$VSRC" --json; }
vm_field() { status_json | jq -r --arg vm "$VM" ".replication[] | select(.vm == \$vm) | .$1"; }

# --- build -----------------------------------------------------------------
if [[ "${NO_BUILD:-0}" != 1 ]]; then
    say "cargo build --release"
    (cd "$REPO" && cargo build --release -q) || die "cargo build --release failed"
fi
[[ -x "$VDREP" ]] || die "no vdrep binary at $VDREP"
if [[ "${PHASES:-0}" == 1 ]]; then
    export VDREP_LOG="${VDREP_LOG:-info},vdrep::cycle_time=debug"
fi
iso() { date -u +%Y-%m-%dT%H:%M:%S; }
phases() { # NAME SINCE UNTIL: the phase table of the sender's and receiver's logs
    [[ "${PHASES:-0}" == 1 ]] || return 0
    python3 "$REPO/benches/replication/phase-times.py" --since "$2" --until "$3" \
        "$LOG/sender.log" "$LOG/receiver.log" >"$LOG/phases-$1.md" || return 0
    say "where the $1 load's cycles spent their time (ms per event):"
    cat "$LOG/phases-$1.md" >&2
}

# --- test data (cached in $PRISTINE, made by scripts/bench-images.sh) -------
if [[ " $SECTIONS " == *" "@(initial|copylat|delta|rpo|blip)" "* ]]; then
    kinds=random; [[ " $SECTIONS " == *" initial "* ]] && kinds="random ext4"
    FILL_PCT="$FILL_PCT" "$REPO/scripts/bench-images.sh" "$PRISTINE" "$SIZE" $kinds || die "making the test images failed"
fi

# --- helpers: receiver, mount, rsync daemon --------------------------------
keys() {
    [[ -f "$KEYS_A/site-a.crt" ]] && return 0
    mkdir -p "$KEYS_A" "$KEYS_B"
    "$VDREP" keys init --name site-a --out "$KEYS_A" >/dev/null
    "$VDREP" keys init --name site-b --out "$KEYS_B" >/dev/null
}
start_receiver() { # STORE
    stop_receiver
    rm -rf "$1"; mkdir -p "$1"
    RECV_STORE="$1"
    vdrep_bench_receiver "$VDREP" "$1" "$KEYS_B" "$KEYS_A/site-a.crt" "$LOG" \
        || die "receiver did not start (see $LOG/receiver.log)"
}
mount_src() {
    "$VDREP" mount "$VSRC" --keys "$KEYS_A" --log-file "$LOG/sender.log" || die "vdrep mount failed"
    is_fuse_mounted "$VSRC" || die "vdrep mount returned but $VSRC is not a FUSE mount"
    # the worker process (the replication runs there), not the supervisor
    SENDER_PID="$(status_json | jq -r '.worker.pid // .pid')"
}
protect() { # EVERY [DISK...] (default: disk.img)
    local every="$1"; shift
    [[ $# -gt 0 ]] || set -- "$VSRC/disk.img"
    "$VDREP" protect "$VM" --to "$RECV_ADDR" --trust "$KEYS_B/site-b.crt" --every "$every" "$@" >>"$LOG/protect.log" 2>&1 \
        || die "vdrep protect failed: $(tail -3 "$LOG/protect.log")"
}
start_rsyncd() {
    [[ -n "$RSYNCD_PID" ]] && return 0
    RSYNC_PORT="$(free_port)"
    mkdir -p "$RMOD"
    cat >"$W/rsyncd.conf" <<EOF
use chroot = no
uid = root
gid = root
log file = $LOG/rsyncd.log
[mod]
    path = $RMOD
    read only = no
EOF
    rsync --daemon --no-detach --address=127.0.0.1 --port="$RSYNC_PORT" --config="$W/rsyncd.conf" &
    RSYNCD_PID=$!
    for _ in $(seq 50); do rsync "rsync://127.0.0.1:$RSYNC_PORT/" >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "rsync daemon did not start (see $LOG/rsyncd.log)"
}
rsync_bytes() { sed -n 's/^Total bytes sent: *//p' "$1" | tr -d ',' | head -1; }

keys
say "work folder $W ($(vdrep_fs_desc "$BENCH_ROOT")); vdrep $("$VDREP" --version 2>/dev/null || echo '?'); SIZE=$SIZE RUNS=$RUNS"

# =============================================================================
# 1. initial replication
if [[ " $SECTIONS " == *" initial "* ]]; then
start_rsyncd
for run in $(seq 1 "$RUNS"); do
    for kind in random ext4; do
        src="$PRISTINE/$kind.img"
        # cp + sync
        rm -rf "$CPDST"; mkdir -p "$CPDST"; drop_caches
        t0=$(now); cp "$src" "$CPDST/disk.img"; sync -f "$CPDST/disk.img"; t1=$(now)
        rec initial "$kind/cp" "$run" secs "$(elapsed "$t0" "$t1")"
        rm -rf "$CPDST"
        # rsync daemon + sync
        rm -rf "${RMOD:?}"/*; drop_caches
        t0=$(now)
        rsync -a --inplace --stats "$src" "rsync://127.0.0.1:$RSYNC_PORT/mod/disk.img" >"$LOG/rsync-$kind-$run.out"
        sync -f "$RMOD/disk.img"; t1=$(now)
        rec initial "$kind/rsyncd" "$run" secs "$(elapsed "$t0" "$t1")"
        rec initial "$kind/rsyncd" "$run" wire "$(rsync_bytes "$LOG/rsync-$kind-$run.out")"
        # vdrep: fresh source folder, store and receiver each run
        umount_src; rm -rf "$VSRC"; mkdir -p "$VSRC"
        cp --sparse=always "$src" "$VSRC/disk.img"
        start_receiver "$W/store-$kind"
        mount_src
        drop_caches
        cs0=$(cpu_secs "$SENDER_PID"); cr0=$(cpu_secs "$RECV_PID")
        perf_start "initial-$kind-$run"
        t0=$(now)
        protect 1h
        "$VDREP" sync "$VM" >>"$LOG/sync.log" 2>&1 || die "vdrep sync failed (initial $kind run $run)"
        t1=$(now)
        perf_stop
        cs1=$(cpu_secs "$SENDER_PID"); cr1=$(cpu_secs "$RECV_PID")
        rec initial "$kind/vdrep" "$run" secs "$(elapsed "$t0" "$t1")"
        rec initial "$kind/vdrep" "$run" wire "$(vm_field wire_bytes_sent)"
        rec initial "$kind/vdrep" "$run" cpu_sender "$(elapsed "$cs0" "$cs1")"
        rec initial "$kind/vdrep" "$run" cpu_receiver "$(elapsed "$cr0" "$cr1")"
        if [[ "$run" == 1 ]]; then   # correctness spot check (untimed)
            rep="$(find "$W/store-$kind/sites/site-a/vms/$VM/disks" -name disk.vhd | head -1)"
            if [[ -n "$rep" ]] && qemu-img compare -q -f raw -F vpc "$VSRC/disk.img" "$rep"; then
                say "initial $kind: replica equals source"
            else
                say "WARNING: initial $kind: replica differs from source ($rep)"
                rec initial "$kind/vdrep" "$run" compare_failed 1
            fi
        fi
        umount_src; stop_receiver; rm -rf "$W/store-$kind"
        say "initial $kind run $run/$RUNS: $(grep -P "^initial\t$kind/[^\t]*\t$run\tsecs" "$RES" | cut -f2,5 | tr '\t\n' '= ')"
    done
done
rm -rf "${RMOD:?}"/*
fi

# =============================================================================
# 1b. the VM's write latency before and during an initial copy
if [[ " $SECTIONS " == *" copylat "* ]]; then
for run in $(seq 1 "$RUNS"); do
    umount_src; rm -rf "$VSRC"; mkdir -p "$VSRC"
    cp --sparse=always "$PRISTINE/random.img" "$VSRC/disk.img"
    start_receiver "$W/store-copylat"
    mount_src
    drop_caches
    say "copylat run $run/$RUNS: fio ${COPYLAT_IOPS} IOPS of 4 KiB random O_DIRECT writes (QD1) for ${COPYLAT_SECS}s; the initial copy starts after 5 s"
    rm -f "$LOG/copylat-$run"_*.log
    fio --name=copylat --filename="$VSRC/disk.img" --rw=randwrite --bs=4k --direct=1 --ioengine=psync \
        --rate_iops="$COPYLAT_IOPS" --time_based=1 --runtime="$COPYLAT_SECS" --randrepeat=0 --refill_buffers=1 \
        --write_lat_log="$LOG/copylat-$run" --log_unix_epoch=1 \
        --output-format=json --output="$LOG/fio-copylat-$run.json" >/dev/null 2>"$LOG/fio-copylat-$run.err" &
    FIO_PID=$!
    sleep 5
    t0=$(now)
    protect 1h
    "$VDREP" sync "$VM" >>"$LOG/sync.log" 2>&1 || die "vdrep sync failed (copylat run $run)"
    t1=$(now)
    wait "$FIO_PID" || die "fio failed during the initial copy: $(tail -2 "$LOG/fio-copylat-$run.err")"
    FIO_PID=""
    rec copylat vdrep "$run" copy_secs "$(elapsed "$t0" "$t1")"
    # fio stops COPYLAT_SECS after its start; a longer copy is only partly under load
    awk -v a="$(elapsed "$t0" "$t1")" -v b="$((COPYLAT_SECS - 5))" 'BEGIN {exit !(a > b)}' \
        && say "WARNING: copylat run $run: the copy outlasted the load; 'during' covers only its first $((COPYLAT_SECS - 5)) s (raise COPYLAT_SECS)"
    # Every write's completion latency, split at protect (t0) and at the
    # end of the sync (t1): before = tracked, not replicating.
    python3 - "$LOG/copylat-${run}_clat.1.log" "$t0" "$t1" "$run" >>"$RES" <<'PY'
import sys
path, t0, t1, run = sys.argv[1], float(sys.argv[2]) * 1000, float(sys.argv[3]) * 1000, sys.argv[4]
for line in open(path):
    f = line.split(",")
    if len(f) < 2:
        continue
    t, ns = float(f[0]), float(f[1])
    key = "before" if t < t0 else ("during" if t <= t1 else None)
    if key:
        print(f"copylat\t{key}\t{run}\tclat_us\t{ns / 1000:.1f}")
PY
    if [[ "$run" == 1 ]]; then   # the copy plus what was written during it, checked (untimed)
        "$VDREP" sync "$VM" >>"$LOG/sync.log" 2>&1 || die "vdrep sync failed (copylat check)"
        rep="$(find "$W/store-copylat/sites/site-a/vms/$VM/disks" -name disk.vhd | head -1)"
        # `sync` returns once the point is stored; the receiver applies it
        # to the replica right after: give the apply up to 30 s.
        same=0
        for try in $(seq 30); do
            if [[ -n "$rep" ]] && qemu-img compare -q -f raw -F vpc "$VSRC/disk.img" "$rep"; then same=1; break; fi
            sleep 1
        done
        if [[ "$same" == 1 ]]; then
            say "copylat: replica equals source after the writes during the copy (compare $try)"
        else
            say "WARNING: copylat: replica differs from source ($rep)"
            rec copylat vdrep "$run" compare_failed 1
        fi
    fi
    umount_src; stop_receiver; rm -rf "$W/store-copylat"
    say "copylat run $run/$RUNS: copy $(elapsed "$t0" "$t1") s"
done
fi

# =============================================================================
# 2. delta
if [[ " $SECTIONS " == *" delta "* ]]; then
start_rsyncd
say "delta: setting up (untimed initial copy of the random file)"
umount_src; rm -rf "$VSRC" "$RSRC"; mkdir -p "$VSRC" "$RSRC"
cp "$PRISTINE/random.img" "$VSRC/disk.img"
cp "$PRISTINE/random.img" "$RSRC/disk.img"
cp "$PRISTINE/random.img" "$RMOD/disk.img"
start_receiver "$W/store-delta"
mount_src
protect 1h
"$VDREP" sync "$VM" >>"$LOG/sync.log" 2>&1 || die "vdrep sync failed (delta setup)"
for run in $(seq 1 "$RUNS"); do
    # the same CHANGE_PCT% of random 4 KiB blocks (random data) in both sources
    python3 - "$VSRC/disk.img" "$RSRC/disk.img" "$CHANGE_PCT" "$run" <<'PY'
import os, random, sys
a, b, pct, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
nblk = os.path.getsize(a) // 4096
rnd = random.Random(1000 + seed)
blocks = rnd.sample(range(nblk), int(nblk * pct / 100))
fa, fb = os.open(a, os.O_WRONLY), os.open(b, os.O_WRONLY)
for blk in blocks:
    d = os.urandom(4096)
    os.pwrite(fa, d, blk * 4096); os.pwrite(fb, d, blk * 4096)
os.fsync(fa); os.fsync(fb); os.close(fa); os.close(fb)
print(f"changed {len(blocks)} of {nblk} blocks", file=sys.stderr)
PY
    sent0=$(vm_field wire_bytes_sent)
    drop_caches
    cs0=$(cpu_secs "$SENDER_PID"); cr0=$(cpu_secs "$RECV_PID")
    st_s="" st_r=""
    if [[ "${DIAG:-0}" == 1 && "$run" == "$RUNS" ]]; then   # syscall profile of the last round (slows it down)
        strace -f -c -w -o "$LOG/strace-delta-sender.txt" -p "$SENDER_PID" 2>/dev/null & st_s=$!
        strace -f -c -w -o "$LOG/strace-delta-receiver.txt" -p "$RECV_PID" 2>/dev/null & st_r=$!
        sleep 1
    fi
    t0=$(now)
    "$VDREP" sync "$VM" >>"$LOG/sync.log" 2>&1 || die "vdrep sync failed (delta run $run)"
    t1=$(now)
    if [[ -n "$st_s" ]]; then
        kill -INT "$st_s" "$st_r" 2>/dev/null || true; wait "$st_s" "$st_r" 2>/dev/null || true
        say "DIAG: syscall profiles (wall time) in $LOG/strace-delta-{sender,receiver}.txt; this round's time includes strace overhead"
        rec delta vdrep "$run" straced 1
    fi
    cs1=$(cpu_secs "$SENDER_PID"); cr1=$(cpu_secs "$RECV_PID")
    sent1=$(vm_field wire_bytes_sent)
    rec delta vdrep "$run" secs "$(elapsed "$t0" "$t1")"
    rec delta vdrep "$run" wire "$((sent1 - sent0))"
    rec delta vdrep "$run" cpu_sender "$(elapsed "$cs0" "$cs1")"
    rec delta vdrep "$run" cpu_receiver "$(elapsed "$cr0" "$cr1")"
    drop_caches
    t0=$(now)
    # -I: always run the delta algorithm; rsync's quick check (size + mtime)
    # can otherwise skip the file when a round follows the previous one quickly
    rsync -I --inplace --no-whole-file -B4096 --stats "$RSRC/disk.img" "rsync://127.0.0.1:$RSYNC_PORT/mod/disk.img" >"$LOG/rsync-delta-$run.out"
    sync -f "$RMOD/disk.img"; t1=$(now)
    rec delta rsyncd "$run" secs "$(elapsed "$t0" "$t1")"
    rec delta rsyncd "$run" wire "$(rsync_bytes "$LOG/rsync-delta-$run.out")"
    say "delta run $run/$RUNS: $(grep -P "^delta\t[^\t]*\t$run\t(secs|wire)" "$RES" | cut -f2,4,5 | tr '\t\n' ' ;')"
done
rep="$(find "$W/store-delta/sites/site-a/vms/$VM/disks" -name disk.vhd | head -1)"
if [[ -n "$rep" ]] && qemu-img compare -q -f raw -F vpc "$VSRC/disk.img" "$rep"; then
    say "delta: replica equals source"
else
    say "WARNING: delta: replica differs from source"; rec delta vdrep 0 compare_failed 1
fi
cmp -s "$RSRC/disk.img" "$RMOD/disk.img" || { say "WARNING: delta: rsync copy differs from its source"; rec delta rsyncd 0 compare_failed 1; }
rm -rf "$RSRC" "${RMOD:?}"/*
fi

# =============================================================================
# 3. RPO under load
if [[ " $SECTIONS " == *" rpo "* ]]; then
if ! is_fuse_mounted "$VSRC" || [[ -z "$RECV_PID" ]]; then
    say "rpo: setting up (untimed initial copy)"
    umount_src; rm -rf "$VSRC"; mkdir -p "$VSRC"
    cp "$PRISTINE/random.img" "$VSRC/disk.img"
    start_receiver "$W/store-delta"
    mount_src
    protect 1h
    "$VDREP" sync "$VM" >>"$LOG/sync.log" 2>&1 || die "vdrep sync failed (rpo setup)"
fi
for mode in ${RPO_MODES:-30s continuous}; do
    say "rpo: --every $mode, fio $RPO_RATE random writes for ${RPO_SECS}s"
    protect "$mode"
    "$VDREP" sync "$VM" >>"$LOG/sync.log" 2>&1 || die "vdrep sync failed (rpo $mode)"
    pidstat -u -d -h -p "$SENDER_PID,$RECV_PID" 1 >"$LOG/pidstat-rpo-$mode.txt" 2>&1 &
    PIDSTAT_PID=$!
    cs0=$(cpu_secs "$SENDER_PID"); cr0=$(cpu_secs "$RECV_PID"); sent0=$(vm_field wire_bytes_sent)
    BENCH_FILE="$VSRC/disk.img" RATE="$RPO_RATE" RUNTIME="$RPO_SECS" \
        fio --output-format=json --output="$LOG/fio-rpo-$mode.json" "$REPO/benches/replication/rpo-load.fio" \
        >/dev/null 2>"$LOG/fio-rpo-$mode.err" &
    FIO_PID=$!
    python3 "$REPO/benches/replication/lag-sample.py" "$VDREP" "$VSRC" "$VM" "$RPO_SECS" >"$LOG/lag-$mode.tsv" &
    SAMPLER_PID=$!
    wait "$FIO_PID" || say "warning: fio failed: $(tail -2 "$LOG/fio-rpo-$mode.err")"
    FIO_PID=""
    wait "$SAMPLER_PID" || true; SAMPLER_PID=""
    cs1=$(cpu_secs "$SENDER_PID"); cr1=$(cpu_secs "$RECV_PID"); sent1=$(vm_field wire_bytes_sent)
    kill "$PIDSTAT_PID" 2>/dev/null || true; wait "$PIDSTAT_PID" 2>/dev/null || true; PIDSTAT_PID=""
    while IFS=$'\t' read -r _ lag pend _; do
        [[ -n "$lag" ]] && rec rpo "$mode" 1 lag "$lag"
        [[ -n "$pend" ]] && rec rpo "$mode" 1 pending "$pend"
    done <"$LOG/lag-$mode.tsv"
    rec rpo "$mode" 1 samples "$(wc -l <"$LOG/lag-$mode.tsv")"
    rec rpo "$mode" 1 fio_bw "$(jq '.jobs[0].write.bw_bytes' "$LOG/fio-rpo-$mode.json" 2>/dev/null || echo 0)"
    rec rpo "$mode" 1 cpu_sender "$(elapsed "$cs0" "$cs1")"
    rec rpo "$mode" 1 cpu_receiver "$(elapsed "$cr0" "$cr1")"
    # wire_bytes_sent restarts at 0 when `protect` restarts the VM's worker
    rec rpo "$mode" 1 wire "$((sent1 >= sent0 ? sent1 - sent0 : sent1))"
    # how long the backlog takes to drain once the load stops
    t0=$(now)
    "$VDREP" sync "$VM" >>"$LOG/sync.log" 2>&1 || say "warning: sync after rpo $mode failed"
    rec rpo "$mode" 1 drain_secs "$(elapsed "$t0" "$(now)")"
done
fi

# =============================================================================
# 4. blip: the receiver killed and back 2 s later, under load
if [[ " $SECTIONS " == *" blip "* ]]; then
# A 2-disk VM (as in the issue): its own folder, store and receiver.
say "blip: setting up a 2-disk VM (untimed initial copy)"
umount_src; rm -rf "$VSRC"; mkdir -p "$VSRC"
cp "$PRISTINE/random.img" "$VSRC/disk.img"
head -c "$((SIZE_BYTES / 4))" "$PRISTINE/random.img" >"$VSRC/disk2.img"
start_receiver "$W/store-blip"
mount_src
protect continuous "$VSRC/disk.img" "$VSRC/disk2.img"
"$VDREP" sync "$VM" >>"$LOG/sync.log" 2>&1 || die "vdrep sync failed (blip setup)"
for r in $(seq "$BLIP_RUNS"); do
    say "blip run $r/$BLIP_RUNS: fio $RPO_RATE random writes over both disks; receiver kill -9 after 5 s, back 2 s later; lag sampled for ${BLIP_SECS}s after the restart"
    BENCH_FILE="$VSRC/disk.img:$VSRC/disk2.img" RATE="$RPO_RATE" RUNTIME="$((BLIP_SECS + 8))" \
        fio --output-format=json --output="$LOG/fio-blip-$r.json" "$REPO/benches/replication/rpo-load.fio" \
        >/dev/null 2>"$LOG/fio-blip-$r.err" &
    FIO_PID=$!
    sleep 5
    retries0="$(vm_field retries)"
    kill -9 "$RECV_PID" 2>/dev/null || true; wait "$RECV_PID" 2>/dev/null || true
    sleep 2
    "$VDREP" receive --listen "$RECV_ADDR" --store "$RECV_STORE" --keys "$KEYS_B" --trust "$KEYS_A/site-a.crt" \
        >"$LOG/receiver-blip-$r.out" 2>>"$LOG/receiver.log" &
    RECV_PID=$!
    for _ in $(seq 100); do grep -q '^listening on' "$LOG/receiver-blip-$r.out" 2>/dev/null && break; sleep 0.1; done
    grep -q '^listening on' "$LOG/receiver-blip-$r.out" || die "the receiver did not come back on $RECV_ADDR"
    back_at="$(iso)"
    python3 "$REPO/benches/replication/lag-sample.py" --relative "$VDREP" "$VSRC" "$VM" "$BLIP_SECS" >"$LOG/lag-blip-$r.tsv"
    phases "blip-$r" "$back_at" "$(iso)"
    wait "$FIO_PID" || say "warning: fio failed: $(tail -2 "$LOG/fio-blip-$r.err")"
    FIO_PID=""
    while IFS=$'\t' read -r _ lag _; do
        [[ -n "$lag" ]] && rec blip continuous "$r" lag "$lag"
    done <"$LOG/lag-blip-$r.tsv"
    rec blip continuous "$r" samples "$(wc -l <"$LOG/lag-blip-$r.tsv")"
    rec blip continuous "$r" retries "$(( $(vm_field retries) - retries0 ))"
    # the last sample (seconds after the restart) in which the VM was not Normal
    warn_until="$(awk -F'\t' '$4 != "Normal" {t = $1} END {print t + 0}' "$LOG/lag-blip-$r.tsv")"
    rec blip continuous "$r" recovered_secs "$warn_until"
    "$VDREP" sync "$VM" >>"$LOG/sync.log" 2>&1 || say "warning: sync after the blip failed"
done
fi

# =============================================================================
# 5. scale: SCALE_VMS one-disk VMs in one mount, all continuous to one receiver
if [[ " $SECTIONS " == *" scale "* ]]; then
say "scale: $SCALE_VMS VMs x $SCALE_DISK, one mount, one receiver (untimed setup)"
umount_src; stop_receiver; rm -rf "$VSRC"; mkdir -p "$VSRC"
for i in $(seq 0 $((SCALE_VMS - 1))); do truncate -s "$SCALE_DISK" "$VSRC/s$i.img"; done
start_receiver "$W/store-scale"
mount_src
proc_mem() { # PID -> "rss_kib threads fds"
    echo "$(awk '/^VmRSS:/ {print $2}' "/proc/$1/status") $(awk '/^Threads:/ {print $2}' "/proc/$1/status") $(ls "/proc/$1/fd" | wc -l)"
}
read -r s_rss0 s_thr0 s_fd0 <<<"$(proc_mem "$SENDER_PID")"
read -r r_rss0 r_thr0 r_fd0 <<<"$(proc_mem "$RECV_PID")"
t0=$(now)
for i in $(seq 0 $((SCALE_VMS - 1))); do
    "$VDREP" protect "s$i" --to "$RECV_ADDR" --trust "$KEYS_B/site-b.crt" --every continuous "$VSRC/s$i.img" \
        >>"$LOG/protect.log" 2>&1 || die "vdrep protect s$i failed: $(tail -3 "$LOG/protect.log")"
done
rec scale vdrep 1 protect_secs "$(elapsed "$t0" "$(now)")"
"$VDREP" sync "$VSRC" --timeout 900 >>"$LOG/sync.log" 2>&1 || die "vdrep sync of the $SCALE_VMS VMs failed (scale setup)"
rec scale vdrep 1 setup_secs "$(elapsed "$t0" "$(now)")"
say "scale: fio $SCALE_RATE of 4 KiB random writes over $SCALE_VMS disks for ${SCALE_SECS}s; every VM's lag sampled every second"
# fio's filename= list is too long for 256 paths: the files are
# s0.img .. sN.img, fio's $filenum.
printf '%s\n' "[scale-load]" "directory=$VSRC" "nrfiles=$SCALE_VMS" 'filename_format=s$filenum.img' \
    "filesize=$SCALE_DISK" allow_file_create=0 file_service_type=random rw=randwrite bs=4k direct=1 \
    ioengine=libaio iodepth=16 "rate=$SCALE_RATE" time_based=1 "runtime=$SCALE_SECS" randrepeat=0 \
    >"$W/scale.fio"
pidstat -u -h -t -p "$SENDER_PID,$RECV_PID" 1 >"$LOG/pidstat-scale.txt" 2>&1 &
PIDSTAT_PID=$!
cs0=$(cpu_secs "$SENDER_PID"); cr0=$(cpu_secs "$RECV_PID")
failed0="$(grep -c 'replication interrupted' "$LOG/sender.log" || true)"
load_from="$(iso)"
fio --output-format=json --output="$LOG/fio-scale.json" "$W/scale.fio" >/dev/null 2>"$LOG/fio-scale.err" &
FIO_PID=$!
# One line per sample and VM: seconds, vm, lag (empty: no point yet).
python3 - "$VDREP" "$VSRC" "$SCALE_SECS" "$RES" >"$LOG/lag-scale.tsv" <<'PY' &
import json, subprocess, sys, time
vdrep, d, secs, res = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
t0 = time.time(); nxt = t0 + 1
n = 0
first, last = {}, {}   # vm -> (time, points committed): the VM-cycles per second
while time.time() < t0 + secs:
    time.sleep(max(0.0, nxt - time.time())); nxt += 1
    ts = time.time()
    try:
        s = json.loads(subprocess.run([vdrep, "status", d, "--json"], capture_output=True, text=True, timeout=10).stdout)
    except Exception as e:
        print(f"{time.time() - t0:.2f}\t\t\terror:{e}", flush=True)
        with open(res, "a") as out:
            out.write(f"scale\tvdrep\t1\tstatus_secs\t{time.time() - ts:.3f}\n")
        continue
    n += 1
    with open(res, "a") as out:
        out.write(f"scale\tvdrep\t1\tstatus_secs\t{time.time() - ts:.3f}\n")
        for v in s.get("replication", []):
            if v.get("points_committed") is not None:
                first.setdefault(v["vm"], (ts, v["points_committed"]))
                last[v["vm"]] = (ts, v["points_committed"])
            lag = v.get("lag_secs")
            print(f"{time.time() - t0:.2f}\t{v['vm']}\t{'' if lag is None else f'{lag:.3f}'}\t{v.get('state')}")
            out.write(f"scale\tvdrep\t1\tlag\t{'' if lag is None else f'{lag:.3f}'}\n")
            out.write(f"scale\tvdrep\t1\tpending\t{v.get('bytes_pending', 0)}\n")
with open(res, "a") as out:
    out.write(f"scale\tvdrep\t1\tsamples\t{n}\n")
    span = max((last[v][0] - first[v][0] for v in last), default=0)
    if span > 0:
        out.write(f"scale\tvdrep\t1\tvm_cycles_per_sec\t{sum(last[v][1] - first[v][1] for v in last) / span:.1f}\n")
PY
SAMPLER_PID=$!
sleep "$((SCALE_SECS / 2))"
read -r s_rss1 s_thr1 s_fd1 <<<"$(proc_mem "$SENDER_PID")"
read -r r_rss1 r_thr1 r_fd1 <<<"$(proc_mem "$RECV_PID")"
wait "$FIO_PID" || say "warning: fio failed: $(tail -2 "$LOG/fio-scale.err")"
FIO_PID=""
phases scale "$load_from" "$(iso)"
cs1=$(cpu_secs "$SENDER_PID"); cr1=$(cpu_secs "$RECV_PID")
failed1="$(grep -c 'replication interrupted' "$LOG/sender.log" || true)"
rec scale vdrep 1 sessions_failed "$((failed1 - failed0))"
wait "$SAMPLER_PID" || true; SAMPLER_PID=""
kill "$PIDSTAT_PID" 2>/dev/null || true; wait "$PIDSTAT_PID" 2>/dev/null || true; PIDSTAT_PID=""
rec scale vdrep 1 vms "$SCALE_VMS"
rec scale vdrep 1 fio_bw "$(jq '.jobs[0].write.bw_bytes' "$LOG/fio-scale.json" 2>/dev/null || echo 0)"
rec scale vdrep 1 cpu_sender "$(elapsed "$cs0" "$cs1")"
rec scale vdrep 1 cpu_receiver "$(elapsed "$cr0" "$cr1")"
for k in rss thr fd; do
    for side in s r; do
        v0="${side}_${k}0" v1="${side}_${k}1"
        rec scale vdrep 1 "${side}_${k}0" "${!v0}"; rec scale vdrep 1 "${side}_${k}1" "${!v1}"
    done
done
t0=$(now)
"$VDREP" sync "$VSRC" --timeout 900 >>"$LOG/sync.log" 2>&1 || say "warning: sync after the scale load failed"
rec scale vdrep 1 drain_secs "$(elapsed "$t0" "$(now)")"
fi

umount_src; stop_receiver

# =============================================================================
# report
cp "$RES" "$RESULTS_DIR/replication-$STAMP.tsv"
python3 - "$RES" "$RESULTS_DIR/replication-$STAMP" "$SIZE" "$SIZE_BYTES" "$RUNS" "$CHANGE_PCT" "$RPO_SECS" "$RPO_RATE" "$FILL_PCT" <<'PY'
import collections, json, os, platform, statistics, subprocess, sys
res, base, size, size_b, runs, pct, rpo_secs, rpo_rate, fill = sys.argv[1:10]
size_b = int(size_b)
d = collections.defaultdict(list)
lines = [l.rstrip("\n").split("\t") for l in open(res) if l.strip()]
straced = {(s, su, r) for s, su, r, k, v in lines if k == "straced"}
for sec, subj, run, key, val in lines:
    if (sec, subj, run) in straced and key != "straced":
        continue
    try:
        d[(sec, subj, key)].append(float(val))
    except ValueError:
        pass
med = lambda sec, subj, key: statistics.median(d[(sec, subj, key)]) if d.get((sec, subj, key)) else None
def pctl(xs, p):
    if not xs: return None
    xs = sorted(xs); k = (len(xs) - 1) * p / 100; f = int(k); c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)
f1 = lambda v, n=2: "n/a" if v is None else f"{v:.{n}f}"
mb = lambda v: "n/a" if v is None else f"{v/1e6:,.1f}"
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
out, js = [], {"meta": {"utc": os.path.basename(base).split("-", 1)[1], "git": rev, "kernel": platform.release(),
        "cpus": os.cpu_count(), "size": size, "runs": int(runs), "change_pct": float(pct),
        "rpo_secs": int(rpo_secs), "rpo_rate": rpo_rate}, "initial": {}, "delta": {}, "rpo": {}}
def table(title, hdr, rows):
    out.append(f"\n### {title}\n")
    out.append("| " + " | ".join(hdr) + " |")
    out.append("|" + "|".join("---" for _ in hdr) + "|")
    for r in rows: out.append("| " + " | ".join(str(x) for x in r) + " |")
out.append(f"# vdrep replication benchmark {js['meta']['utc']}\n")
out.append(f"git {rev}, kernel {platform.release()}, {os.cpu_count()} CPUs, loopback 127.0.0.1, "
           f"file {size}, {'caches dropped before each timed step' if os.environ.get('DROP_CACHES','1')=='1' else 'warm page cache (DROP_CACHES=0)'}, medians of {runs} runs.")
bad = sorted({f"{k[0]} {k[1]}" for k in d if k[2] == "compare_failed"})
if bad:
    out.append(f"\n**WARNING: copy differs from its source: {', '.join(bad)}** (see the run log)")
if any(k[0] == "initial" for k in d):
    rows = []
    for kind in ("random", "ext4"):
        cp = med("initial", f"{kind}/cp", "secs"); rs = med("initial", f"{kind}/rsyncd", "secs")
        for tool in ("cp", "rsyncd", "vdrep"):
            s = med("initial", f"{kind}/{tool}", "secs")
            if s is None: continue
            w = med("initial", f"{kind}/{tool}", "wire")
            cpu = (med("initial", f"{kind}/{tool}", "cpu_sender"), med("initial", f"{kind}/{tool}", "cpu_receiver"))
            rows.append([f"{kind} {size}" + (f" ({fill}% full ext4)" if kind == "ext4" else ""), tool, f1(s),
                         f"{size_b/1e6/s:,.0f}", "-" if w is None else mb(w),
                         f1(s / cp) + "x" if cp else "n/a", f1(s / rs) + "x" if rs else "n/a",
                         "-" if cpu[0] is None else f"{cpu[0]:.1f} / {cpu[1]:.1f}"])
            js["initial"][f"{kind}/{tool}"] = {"secs": d[("initial", f"{kind}/{tool}", "secs")], "median_secs": s,
                                               "wire_bytes": w, "cpu_sender_receiver": cpu}
    table("1. Initial replication", ["image", "tool", "seconds", "MB/s (image size / time)", "MB on the wire",
                                     "time vs cp", "time vs rsyncd", "vdrep CPU s sender / receiver"], rows)
if any(k[0] == "delta" for k in d):
    v, r = med("delta", "vdrep", "secs"), med("delta", "rsyncd", "secs")
    vw, rw = med("delta", "vdrep", "wire"), med("delta", "rsyncd", "wire")
    rows = [["rsyncd (-I --inplace --no-whole-file -B4096)", f1(r), mb(rw), "1.00x", "1.00x", "-", "-"],
            ["vdrep sync", f1(v), mb(vw),
             f"{v/r:.3f}x (1/{r/v:.0f})" if v and r else "n/a", f"{vw/rw:.2f}x" if vw and rw else "n/a",
             ("PASS" if v and r and v <= r / 20 else "MISS") + " / " + ("PASS" if vw is not None and rw and vw <= rw else "MISS"),
             f"{med('delta','vdrep','cpu_sender'):.2f} / {med('delta','vdrep','cpu_receiver'):.2f}"]]
    js["delta"] = {"vdrep_secs": d[("delta", "vdrep", "secs")], "rsyncd_secs": d[("delta", "rsyncd", "secs")],
                   "vdrep_wire": d[("delta", "vdrep", "wire")], "rsyncd_wire": d[("delta", "rsyncd", "wire")]}
    table(f"2. Delta: {pct}% of the 4 KiB blocks of the {size} random file changed",
          ["tool", "seconds", "MB on the wire", "time ratio (target <= 1/20)", "bytes ratio (target <= 1)",
           "verdict time / bytes", "vdrep CPU s sender / receiver"], rows)
if any(k[0] == "rpo" for k in d):
    rows = []
    for mode in ("30s", "continuous"):
        lags = d.get(("rpo", mode, "lag"), [])
        if not lags and not d.get(("rpo", mode, "samples")): continue
        n = int(med("rpo", mode, "samples") or 0)
        p50, p99, mx = pctl(lags, 50), pctl(lags, 99), (max(lags) if lags else None)
        pend = d.get(("rpo", mode, "pending"), [])
        bw = med("rpo", mode, "fio_bw")
        verdict = ("PASS" if p99 is not None and p99 <= 5 else "MISS") if mode == "continuous" else "-"
        rows.append([f"--every {mode}", f"{len(lags)}/{n}", f1(p50, 1), f1(p99, 1), f1(mx, 1),
                     mb(pctl(pend, 50)), mb(max(pend) if pend else None), mb(bw),
                     mb((med("rpo", mode, "wire") or 0) / int(rpo_secs)),
                     f"{med('rpo', mode, 'cpu_sender')/int(rpo_secs)*100:.0f}% / {med('rpo', mode, 'cpu_receiver')/int(rpo_secs)*100:.0f}%",
                     f1(med("rpo", mode, "drain_secs"), 1), verdict])
        js["rpo"][mode] = {"p50": p50, "p99": p99, "max": mx, "samples": len(lags), "fio_bw": bw}
    table(f"3. RPO under load: fio {rpo_rate}/s random writes 4k-64k O_DIRECT through the mount, {rpo_secs} s per mode, lag_secs sampled every 0.5 s",
          ["mode", "samples with a point", "lag p50 s", "lag p99 s", "lag max s", "pending p50 MB", "pending max MB",
           "fio MB/s achieved", "sent MB/s", "CPU sender / receiver", "drain s (sync after load)", "target p99 <= 5 s"], rows)
if any(k[0] == "copylat" for k in d):
    # every write of every run, pooled: before = tracked only, during = the initial copy
    rows = []
    lat = {w: [float(v) for sec, subj, _, k, v in lines if sec == "copylat" and subj == w and k == "clat_us"]
           for w in ("before", "during")}
    for w in ("before", "during"):
        xs = lat[w]
        rows.append([w, f"{len(xs):,}", f1(pctl(xs, 50), 0), f1(pctl(xs, 99), 0), f1(pctl(xs, 99.9), 0),
                     f1(max(xs) if xs else None, 0)])
    b99, d99 = pctl(lat["before"], 99), pctl(lat["during"], 99)
    rows.append(["during / before", "", "", "n/a" if not b99 or d99 is None else f"{d99 / b99:.2f}x", "", ""])
    table(f"1b. The VM's 4 KiB O_DIRECT write latency (QD1, {os.environ.get('COPYLAT_IOPS', '500')} IOPS) before and during the initial copy "
          f"(copy median {f1(med('copylat', 'vdrep', 'copy_secs'))} s; all runs pooled)",
          ["window", "writes", "p50 us", "p99 us", "p99.9 us", "max us"], rows)
    js["copylat"] = {w: {"n": len(lat[w]), "p50": pctl(lat[w], 50), "p99": pctl(lat[w], 99),
                         "p999": pctl(lat[w], 99.9), "max": max(lat[w]) if lat[w] else None} for w in lat}
if any(k[0] == "blip" for k in d):
    # one row per run (its own p50/p99/max), then the medians over runs
    rows, per = [], []
    for r in sorted({run for sec, _, run, _, _ in lines if sec == "blip"}, key=int):
        lags = [float(v) for sec, _, run, k, v in lines if sec == "blip" and run == r and k == "lag"]
        one = lambda k: next((float(v) for sec, _, run, kk, v in lines if sec == "blip" and run == r and kk == k), None)
        p = (pctl(lags, 50), pctl(lags, 99), max(lags) if lags else None)
        per.append(p)
        rows.append([f"run {r}", f"{len(lags)}/{int(one('samples') or 0)}", f1(p[0], 1), f1(p[1], 1), f1(p[2], 1),
                     f"{int(one('retries') or 0)}", f1(one("recovered_secs"), 1), ""])
    mid = lambda i: statistics.median([x[i] for x in per if x[i] is not None]) if any(x[i] is not None for x in per) else None
    p50, p99, mx = mid(0), mid(1), mid(2)
    # a run whose samples never had a point counts as a miss
    verdict = "PASS" if p99 is not None and p99 <= 5 and all(x[1] is not None for x in per) else "MISS"
    rows.append([f"median of {len(per)}", "", f1(p50, 1), f1(p99, 1), f1(mx, 1),
                 f"{int(med('blip', 'continuous', 'retries') or 0)}", f1(med("blip", "continuous", "recovered_secs"), 1), verdict])
    table("4. Blip: receiver kill -9, back 2 s later, under the RPO load (--every continuous, 2 disks); lag from the restart on",
          ["run", "samples with a point", "lag p50 s", "lag p99 s", "lag max s", "retries", "last not-Normal sample, s after restart", "target p99 <= 5 s"],
          rows)
    js["blip"] = {"p50": p50, "p99": p99, "max": mx, "runs": [{"p50": a, "p99": b, "max": c} for a, b, c in per]}
if any(k[0] == "scale" for k in d):
    g = lambda k: med("scale", "vdrep", k)
    lags = d.get(("scale", "vdrep", "lag"), [])
    st = d.get(("scale", "vdrep", "status_secs"), [])
    n = int(g("vms") or 0); secs = float(os.environ.get("SCALE_SECS", "60"))
    total = n * int(g("samples") or 0)
    p50, p99, mx = pctl(lags, 50), pctl(lags, 99), (max(lags) if lags else None)
    # a sample without a point counts as a miss too
    verdict = "PASS" if p99 is not None and p99 <= 1 and len(lags) == total else "MISS"
    per = lambda a, b: "n/a" if g(a) is None or g(b) is None or not n else f"{(g(b) - g(a)) / n:,.1f}"
    # Points committed per second over all VMs (each VM's turn comes every
    # VMs / this seconds), and the CPU of both processes per point.
    vcs = g("vm_cycles_per_sec")
    cpu_both = (g("cpu_sender") or 0) + (g("cpu_receiver") or 0)
    per_cycle = "n/a" if not vcs else f"{cpu_both / (vcs * secs) * 1e3:.1f}"
    table(f"5. Scale: {n} VMs x 1 disk, one mount, all --every continuous to one receiver; fio {os.environ.get('SCALE_RATE', '50m')}/s of 4 KiB random writes in total, {secs:.0f} s",
          ["lag samples with a point", "lag p50 s", "lag p99 s", "lag max s", "VM-cycles/s", "CPU ms per cycle (both)",
           "fio MB/s", "pending max MB",
           "drain s", "sessions failed", "status call p50 / max s", "target p99 <= 1 s"],
          [[f"{len(lags)}/{total}", f1(p50, 2), f1(p99, 2), f1(mx, 2), f1(vcs, 0), per_cycle, mb(g("fio_bw")),
            mb(max(d.get(("scale", "vdrep", "pending"), [0]))), f1(g("drain_secs"), 1),
            f"{int(g('sessions_failed') or 0)}",
            f"{f1(pctl(st, 50), 2)} / {f1(max(st) if st else None, 2)}", verdict]])
    rows = []
    for side, name, cpu in (("s", "mount daemon (sender)", "cpu_sender"), ("r", "receiver", "cpu_receiver")):
        rows.append([name, f"{(g(side + '_rss0') or 0) / 1024:,.0f} -> {(g(side + '_rss1') or 0) / 1024:,.0f}",
                     per(side + "_rss0", side + "_rss1"),
                     f"{int(g(side + '_thr0') or 0)} -> {int(g(side + '_thr1') or 0)}",
                     f"{int(g(side + '_fd0') or 0)} -> {int(g(side + '_fd1') or 0)}",
                     f"{(g(cpu) or 0) / secs * 100:.0f}%",
                     "n/a" if not n else f"{(g(cpu) or 0) / secs / n * 1e3:.2f}"])
    table("5b. Scale: cost per VM (before protect -> under load)",
          ["process", "RSS MiB", "RSS KiB per VM", "threads", "descriptors", "CPU (of one core)",
           "CPU ms per second per VM"], rows)
    js["scale"] = {"vms": n, "p50": p50, "p99": p99, "max": mx, "samples": len(lags), "expected": total,
                   "vm_cycles_per_sec": vcs,
                   "fio_bw": g("fio_bw"), "cpu_sender_s": g("cpu_sender"), "cpu_receiver_s": g("cpu_receiver"),
                   "rss_kib": {k: g(k) for k in ("s_rss0", "s_rss1", "r_rss0", "r_rss1")},
                   "setup_secs": g("setup_secs"), "protect_secs": g("protect_secs"),
                   "sessions_failed": g("sessions_failed"),
                   "status_secs": {"p50": pctl(st, 50), "max": max(st) if st else None}}
text = "\n".join(out) + "\n"
print(text)
open(base + ".md", "w").write(text)
json.dump(js, open(base + ".json", "w"), indent=2)
print(f"results: {base}.md {base}.json {base}.tsv")
PY
say "done; logs in $LOG"
