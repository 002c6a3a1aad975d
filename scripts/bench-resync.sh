#!/usr/bin/env bash
# Checksum resync benchmark (issue 5, "Speed"), everything on 127.0.0.1:
#
#   scripts/bench-resync.sh                  # SIZE=2G RUNS=3 CHANGE_PCT=1
#
# A SIZE random disk is replicated (vdrep mount + protect + sync), then
# CHANGE_PCT% of its 4 KiB blocks are changed behind vdrep's back (in the
# replica: bytes flipped in random blocks, so only a checksum compare can
# find them). Timed: `vdrep resync NAME` (compare both sides, ship the
# differing blocks as one point) vs an rsync daemon on 127.0.0.1 fed with a
# copy carrying the same damage: `rsync -I --inplace --no-whole-file -B4096`
# and with rsync's default block size. Wire bytes: vdrep = digests received
# + resync log sent; rsync = "Total bytes sent" + "Total bytes received".
# Also: digest throughput (xxh3-128 of 4 KiB blocks) on 1 core and all cores
# (`vdrep hash-bench`). Median of RUNS; caches are warm (each tool's inputs
# are read right before its timed step; DROP_CACHES=1 drops them instead).
# No time is asserted.
#
# Environment: SIZE=2G RUNS=3 CHANGE_PCT=1 BENCH_ROOT=/var/tmp/vdrep-rsbench
#   NO_BUILD=1 VDREP=target/release/vdrep KEEP=1 DROP_CACHES=0 NO_INSTALL=1
#   SKIP_RSYNC=1 (vdrep only)  PERF=1 (perf record -a -g of each vdrep run
#   into $LOG/perf-N.data; `perf report -i ... --comm vdrep`)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-2G}
RUNS=${RUNS:-3}
CHANGE_PCT=${CHANGE_PCT:-1}
BENCH_ROOT=${BENCH_ROOT:-/var/tmp/vdrep-rsbench}
VDREP=${VDREP:-target/release/vdrep}
RSYNC_PORT=${RSYNC_PORT:-18873}
[ "$(id -u)" = 0 ] || { echo "needs root (FUSE mount)"; exit 2; }
# The baseline (rsync) and the helpers are installed when missing, as
# bench-replication.sh does (NO_INSTALL=1 to refuse).
BENCH_PKGS="rsync python3 jq qemu-utils"
missing=()
for t in rsync python3 jq qemu-img; do command -v "$t" >/dev/null || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ] && [ "${NO_INSTALL:-0}" != 1 ] && command -v apt-get >/dev/null; then
    echo "missing ${missing[*]}: apt-get install $BENCH_PKGS" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $BENCH_PKGS >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $BENCH_PKGS >&2; } \
        || { echo "apt-get install $BENCH_PKGS failed"; exit 2; }
fi
for t in rsync python3 jq qemu-img; do command -v "$t" >/dev/null || { echo "missing $t (apt-get install $BENCH_PKGS)"; exit 2; }; done
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet
VDREP=$(realpath "$VDREP")
W="$BENCH_ROOT/run-$(date -u +%Y%m%dT%H%M%SZ)"
LOG="$W/log"
mkdir -p "$W"/{ka,kb,vm,store,mod} "$LOG"
export VDREP_RUN_DIR="$W/run" VDREP_RETRY_SCALE=0.01
PIDS=()
cleanup() {
    "$VDREP" umount "$W/vm" >/dev/null 2>&1 || "$VDREP" umount --lazy "$W/vm" >/dev/null 2>&1 || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    if [ -z "${KEEP:-}" ]; then rm -rf "$W/vm" "$W/store" "$W/mod" "$W/src.img"; fi
}
trap cleanup EXIT
# Caches: DROP_CACHES=1 drops them before each timed step; otherwise both
# tools' inputs are read once right before their timed step (warm cache:
# hosts running DAMON reclaim, `kdamond`, page out files that sat idle for
# a few seconds, e.g. vdrep's disk during the rsync runs). Either way the
# setup's dirty pages are written back first (`sync`): the 2 GiB `cp` of
# rsync's target was still being written back during the next timed step
# (vdrep's resync took 1.25-1.55 s after it, 0.80-0.97 s with SKIP_RSYNC=1).
drop() {
    sync
    if [ "${DROP_CACHES:-0}" = 1 ]; then echo 3 >/proc/sys/vm/drop_caches
    else cat "$@" >/dev/null; fi
}
now() { date +%s.%N; }
el() { python3 -c "print(f'{$2-$1:.3f}')"; }
median() { sort -g | awk '{a[NR]=$1} END{print (NR%2)? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

"$VDREP" keys init --name site-a --out "$W/ka" >/dev/null
"$VDREP" keys init --name site-b --out "$W/kb" >/dev/null
echo "== making a $SIZE random disk"
# Written in 4 MiB writes, as `cp` writes rsync's copies below: the page
# cache then holds every tool's input in folios of the same (large) size.
# (`head -c` writes 8 KiB at a time, which left vdrep's disk alone in 4 KiB
# folios: mapping or copying it cost ~4x more CPU per byte than the 2 MiB
# folios of rsync's source; kernel-notes/resync.md, session 25.)
head -c "$SIZE" /dev/urandom | dd of="$W/vm/disk.img" bs=4M iflag=fullblock status=none
BYTES=$(stat -c %s "$W/vm/disk.img")
BLOCKS=$((BYTES / 4096))
NCHANGE=$((BLOCKS * CHANGE_PCT / 100))

"$VDREP" receive --listen 127.0.0.1:0 --store "$W/store" --keys "$W/kb" --trust "$W/ka/site-a.crt" >"$LOG/recv.out" 2>"$LOG/recv.err" &
PIDS+=($!)
for _ in $(seq 50); do grep -q "listening on" "$LOG/recv.out" 2>/dev/null && break; sleep 0.1; done
ADDR=$(sed -n 's/^listening on \([^ ]*\).*/\1/p' "$LOG/recv.out")
"$VDREP" mount "$W/vm" --keys "$W/ka" --log-file "$W/mount.log"
"$VDREP" protect bench-rs --to "$ADDR" --trust "$W/kb/site-b.crt" --every 1h "$W/vm/disk.img" >/dev/null
"$VDREP" sync "$W/vm" --timeout 1200 >/dev/null
REPLICA=$(find "$W/store" -name disk.vhd | head -1)
echo "== replicated; replica $REPLICA"

# rsync daemon with a copy of the source as its module's target.
cat >"$W/rsyncd.conf" <<CONF
use chroot = no
uid = root
gid = root
[mod]
path = $W/mod
read only = no
CONF
rsync --daemon --no-detach --address=127.0.0.1 --port="$RSYNC_PORT" --config="$W/rsyncd.conf" --log-file="$LOG/rsyncd.log" &
PIDS+=($!)
sleep 0.5
cp "$W/vm/disk.img" "$W/src.img"   # source read by rsync (not through the mount)

# Flip one byte in NCHANGE random distinct blocks of FILE (seeded).
damage() {
    python3 - "$1" "$NCHANGE" "$BLOCKS" "$2" <<'PY'
import os, random, sys
path, n, blocks, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
r = random.Random(seed)
fd = os.open(path, os.O_RDWR)
for b in r.sample(range(blocks), n):
    at = b * 4096 + r.randrange(4096)
    v = os.pread(fd, 1, at)
    os.pwrite(fd, bytes([v[0] ^ 0xA5]), at)
os.fsync(fd); os.close(fd)
PY
}

echo "run,tool,secs,wire_bytes,blocks_sent" >"$LOG/results.csv"
PREV_SENT=$("$VDREP" status "$W/vm" --json | jq '.replication[0].bytes_sent')
RECV_PID=${PIDS[0]}
MOUNT_PID=$(jq .pid "$W/vm/.vdrep/mount.json" 2>/dev/null || echo 0)
# What vdrep's sender reads is the backing file under the mount, not the
# mount's view of it (a read through FUSE may be served from the mount's
# own page cache and leave the backing file's pages cold: the first resync
# then read 2 GiB from the device, 1.3-2.1 s against 0.7-0.8 for the next
# ones). The daemon's descriptor of the folder reaches the file under the
# mount.
BACKING=""
for fd in /proc/"$MOUNT_PID"/fd/*; do
    if [ "$(readlink "$fd")" = "$W/vm" ] && [ -f "$fd/disk.img" ]; then BACKING="$fd/disk.img"; break; fi
done
[ -n "$BACKING" ] || echo "WARNING: the backing file under the mount was not found: vdrep's input is warmed through the mount only"
# CPU seconds (user+system) a process used so far.
cpu() { awk -v t="$(getconf CLK_TCK)" '{print ($14+$15)/t}' "/proc/$1/stat" 2>/dev/null || echo 0; }
for run in $(seq "$RUNS"); do
    # vdrep: damage the replica, resync. The replica is read into the
    # cache first, as rsync's target is (written by `cp`) when it is
    # damaged: the damage's scattered reads of an uncached replica (the
    # initial copy writes it past the cache) filled the cache with 4 KiB
    # folios around which the warm-up's read-ahead built no large ones.
    drop "$REPLICA"
    damage "$REPLICA" "$run"
    drop "$W/vm/disk.img" ${BACKING:+"$BACKING"} "$REPLICA"
    c0s=$(cpu "$MOUNT_PID"); c0r=$(cpu "$RECV_PID")
    t0=$(now)
    if [ -n "${PERF:-}" ]; then
        perf record -q -F 1999 -a -g -o "$LOG/perf-$run.data" -- \
            "$VDREP" resync bench-rs --json --timeout 1200 >"$LOG/resync-$run.json"
    else
        "$VDREP" resync bench-rs --json --timeout 1200 >"$LOG/resync-$run.json"
    fi
    t1=$(now)
    cs=$(el "$c0s" "$(cpu "$MOUNT_PID")"); cr=$(el "$c0r" "$(cpu "$RECV_PID")")
    st=$("$VDREP" status "$W/vm" --json)
    sent=$(jq '.replication[0].bytes_sent' <<<"$st")
    dig=$(jq '.replication[0].last_resync.digest_bytes' <<<"$st")
    prev=$PREV_SENT; PREV_SENT=$sent
    nb=$(jq .blocks_sent "$LOG/resync-$run.json")
    ph=$(sed 's/\x1b\[[0-9;]*m//g' "$W/mount.log" | sed -n 's/.*resync timing: \(.*\) vm=.*/\1/p' | tail -1)
    echo "run $run: vdrep $(el "$t0" "$t1") s ($ph); CPU s sender $cs receiver $cr; load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "$run,vdrep,$(el "$t0" "$t1"),$((sent - prev + dig)),$nb" >>"$LOG/results.csv"
    # rsync -B4096 and default: the same kind of damage in its target copy.
    for mode in $([ -n "${SKIP_RSYNC:-}" ] || echo b4096 default); do
        cp "$W/src.img" "$W/mod/disk.img"
        damage "$W/mod/disk.img" "$run"
        drop "$W/src.img" "$W/mod/disk.img"
        opt=(-I --inplace --no-whole-file --stats)
        [ "$mode" = b4096 ] && opt+=(-B4096)
        t0=$(now)
        rsync "${opt[@]}" "$W/src.img" "rsync://127.0.0.1:$RSYNC_PORT/mod/disk.img" >"$LOG/rsync-$mode-$run.out"
        t1=$(now)
        s=$(sed -n 's/^Total bytes sent: *//p' "$LOG/rsync-$mode-$run.out" | tr -d ',')
        r=$(sed -n 's/^Total bytes received: *//p' "$LOG/rsync-$mode-$run.out" | tr -d ',')
        echo "$run,rsync-$mode,$(el "$t0" "$t1"),$((s + r)),-" >>"$LOG/results.csv"
    done
    cmp -s "$W/vm/disk.img" <(head -c "$BYTES" "$REPLICA") || echo "WARNING: run $run: replica differs from the source"
done
# The baseline "sent 23.6 MB" in the issue was the bytes written by the sender.

echo "== digest throughput (xxh3-128, 4 KiB blocks, 512 MiB in memory)"
head -c 512M "$W/vm/disk.img" >"$W/hb.bin"
"$VDREP" hash-bench "$W/hb.bin" | tee "$LOG/hash.txt"
rm -f "$W/hb.bin"

echo "== results ($SIZE disk, $NCHANGE of $BLOCKS blocks changed = ${CHANGE_PCT}%, median of $RUNS)"
printf "%-16s %10s %14s\n" tool secs wire_bytes
for tool in vdrep rsync-b4096 rsync-default; do
    s=$(awk -F, -v t="$tool" '$2==t{print $3}' "$LOG/results.csv" | median)
    b=$(awk -F, -v t="$tool" '$2==t{print $4}' "$LOG/results.csv" | median)
    printf "%-16s %10s %14s\n" "$tool" "$s" "$b"
done
echo "changed data: $((NCHANGE * 4096)) bytes; 1% of the disk: $((BYTES / 100)) bytes"
# Targets (issue 12, T5): time <= 0.2x rsync -B4096's from the same run;
# (issue 5) wire bytes <= changed data + 1% of the disk.
vs=$(awk -F, '$2=="vdrep"{print $3}' "$LOG/results.csv" | median)
vb=$(awk -F, '$2=="vdrep"{print $4}' "$LOG/results.csv" | median)
rs=$(awk -F, '$2=="rsync-b4096"{print $3}' "$LOG/results.csv" | median)
if [ -n "$rs" ] && [ -n "$vs" ]; then
    python3 - "$vs" "$rs" <<'PY'
import sys
v, r = float(sys.argv[1]), float(sys.argv[2])
ratio = v / r if r > 0 else float("inf")
print(f"target resync time <= 0.2x rsync -B4096: {v:.3f} s vs {r:.3f} s = {ratio:.2f}x {'PASS' if ratio <= 0.2 else 'MISS'}")
PY
else
    echo "target resync time <= 0.2x rsync -B4096: no rsync run (SKIP_RSYNC=1)"
fi
if [ -n "$vb" ]; then
    lim=$((NCHANGE * 4096 + BYTES / 100))
    if [ "${vb%.*}" -le "$lim" ]; then v=PASS; else v=MISS; fi
    echo "target resync wire bytes <= changed + 1% of the disk: $vb vs $lim $v"
fi
echo "logs: $LOG"
